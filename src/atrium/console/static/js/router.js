// A History-API router: same-origin links render without a page load (the access token in
// memory survives), and the server answers every page path with the same shell, so reloads and
// links from mail work too.

import { isLoggedIn, refresh } from "./api.js";
import { h } from "./dom.js";

const routes = [];
let renderCount = 0;
let cleanups = [];
let layoutHook = async () => {};

/**
 * Register a page.
 * @param {string} pattern e.g. "/tenants/:tenant/collections/:collection"
 * @param {(ctx: object) => any} render draws into `ctx.root`
 * @param {{auth?: boolean, title?: string, section?: string}} [opts]
 */
export function route(pattern, render, opts = {}) {
  const names = [];
  const source = pattern
    .replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
    .replace(/:(\w+)/g, (_, name) => {
      names.push(name);
      return "([^/]+)";
    });
  routes.push({ regex: new RegExp(`^${source}/?$`), names, render, opts });
}

/** Called before each page renders with `(match, ctx)`: draws the navigation. */
export function onLayout(fn) {
  layoutHook = fn;
}

/** Go to a path in the console. */
export function navigate(to, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", to);
  else history.pushState(null, "", to);
  return render({ focus: true });
}

function match(pathname) {
  for (const r of routes) {
    const m = r.regex.exec(pathname);
    if (m) {
      const params = {};
      r.names.forEach((name, i) => { params[name] = decodeURIComponent(m[i + 1]); });
      return { ...r, params };
    }
  }
  return null;
}

function onClick(event) {
  if (event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const a = event.target.closest("a[href]");
  if (!a || a.target || a.hasAttribute("download") || a.origin !== location.origin) return;
  const path = a.pathname;
  // A link to a place on this page (citations → sources): let the browser scroll.
  if (a.hash && path === location.pathname && a.search === location.search) return;
  if (/^\/(v1|docs|redoc|openapi\.json|console\/static|metrics)(\/|$)/.test(path)) return;
  event.preventDefault();
  navigate(path + a.search + a.hash);
}

/** Draw the page for the current location. */
export async function render({ focus = false } = {}) {
  const mine = ++renderCount;
  for (const fn of cleanups) {
    try { fn(); } catch { /* a page's cleanup must not stop navigation */ }
  }
  cleanups = [];
  const main = document.getElementById("main");
  const found = match(location.pathname);
  if (found && found.opts.auth && !isLoggedIn()) {
    const ok = await refresh().catch(() => false);
    if (mine !== renderCount) return;
    if (!ok) {
      const next = location.pathname + location.search;
      history.replaceState(null, "", next === "/" ? "/login" : `/login?next=${encodeURIComponent(next)}`);
      return render({ focus });
    }
  }
  const root = h("div", { class: "page" });
  const ctx = {
    params: found ? found.params : {},
    query: new URLSearchParams(location.search),
    root,
    alive: () => mine === renderCount,
    onCleanup: (fn) => cleanups.push(fn),
    section: found ? found.opts.section : null,
  };
  try {
    await layoutHook(found, ctx);
  } catch {
    // The navigation is a convenience; the page itself reports errors.
  }
  if (mine !== renderCount) return;
  main.replaceChildren(root);
  document.title = found && found.opts.title ? `${found.opts.title} · Atrium` : "Atrium";
  if (!found) {
    root.append(
      h("h1", { tabindex: "-1" }, "Page not found"),
      h("p", {}, "There is no console page at this address. ", h("a", { href: "/" }, "Go to the start page"), "."),
    );
  } else {
    await found.render(ctx);
  }
  if (focus && mine === renderCount) {
    // Move focus to the new page's heading so keyboard and screen-reader users start there.
    const heading = root.querySelector("h1");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      heading.focus();
    } else {
      main.focus();
    }
  }
}

/** Start listening to links and history, and draw the first page. */
export async function start() {
  document.addEventListener("click", onClick);
  window.addEventListener("popstate", () => render({ focus: true }));
  await render();
}
