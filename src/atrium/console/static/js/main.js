// The console's entry point: the navigation, the page table, and the first render.

import { isLoggedIn, logout, refresh, sessionEvents } from "./api.js";
import { h, replace } from "./dom.js";
import { navigate, onLayout, route, start } from "./router.js";
import { loadMeta, loadTenants, loadUser, resetState, state, tenantById } from "./state.js";
import * as auth from "./pages/auth.js";
import * as tenants from "./pages/tenants.js";
import * as members from "./pages/members.js";
import * as keys from "./pages/keys.js";
import * as collections from "./pages/collections.js";
import * as playground from "./pages/playground.js";
import * as usage from "./pages/usage.js";
import * as account from "./pages/account.js";

const SECTIONS = [
  ["collections", "Collections"],
  ["playground", "Playground"],
  ["members", "Members"],
  ["api-keys", "API keys"],
  ["usage", "Usage"],
];

let lastTenantId = null;

route("/", tenants.home, { auth: true, title: "Start" });
route("/signup", auth.signup, { title: "Sign up" });
route("/login", auth.login, { title: "Log in" });
route("/verify-email", auth.verifyEmail, { title: "Verify your e-mail address" });
route("/forgot-password", auth.forgotPassword, { title: "Forgot password" });
route("/reset-password", auth.resetPassword, { title: "Choose a new password" });
route("/invitations/accept", auth.acceptInvitation, { title: "Invitation" });
route("/account", account.page, { auth: true, title: "Account settings" });
route("/tenants", tenants.list, { auth: true, title: "Workspaces" });
route("/tenants/:tenant", tenants.overview, { auth: true, title: "Workspace" });
route("/tenants/:tenant/collections", collections.list, {
  auth: true, title: "Collections", section: "collections",
});
route("/tenants/:tenant/collections/:collection", collections.detail, {
  auth: true, title: "Collection", section: "collections",
});
route("/tenants/:tenant/playground", playground.page, {
  auth: true, title: "Playground", section: "playground",
});
route("/tenants/:tenant/members", members.page, {
  auth: true, title: "Members", section: "members",
});
route("/tenants/:tenant/api-keys", keys.page, {
  auth: true, title: "API keys", section: "api-keys",
});
route("/tenants/:tenant/usage", usage.page, { auth: true, title: "Usage", section: "usage" });

async function drawNav(found, ctx) {
  const nav = document.getElementById("nav");
  if (!isLoggedIn()) {
    replace(
      nav,
      h(
        "nav",
        { "aria-label": "Account" },
        h("ul", { class: "navlinks" },
          h("li", {}, h("a", { href: "/login" }, "Log in")),
          h("li", {}, h("a", { href: "/signup" }, "Sign up"))),
      ),
    );
    return;
  }
  await Promise.all([loadUser(), loadTenants(), loadMeta()]);
  const current = ctx.params.tenant || lastTenantId;
  if (ctx.params.tenant && tenantById(ctx.params.tenant)) lastTenantId = ctx.params.tenant;
  const tenant = tenantById(current) || (state.tenants || [])[0];
  const switcher = h(
    "select",
    {
      id: "tenant-switcher",
      onchange: (event) => {
        const id = event.target.value;
        if (id === "") navigate("/tenants");
        else navigate(`/tenants/${id}/${ctx.section || "collections"}`);
      },
    },
    (state.tenants || []).map((t) => h("option", { value: t.id, selected: tenant && t.id === tenant.id }, t.name)),
    h("option", { value: "" }, "All workspaces / new…"),
  );
  const links = tenant
    ? SECTIONS.map(([slug, label]) => {
      const href = `/tenants/${tenant.id}/${slug}`;
      const active = ctx.section === slug && ctx.params.tenant === tenant.id;
      return h("li", {}, h("a", { href, "aria-current": active ? "page" : null }, label));
    })
    : [];
  replace(
    nav,
    h(
      "nav",
      { "aria-label": "Main" },
      tenant
        ? h("div", { class: "switcher" }, h("label", { for: "tenant-switcher" }, "Workspace"), switcher)
        : null,
      h("ul", { class: "navlinks" }, links),
      h(
        "ul",
        { class: "navlinks account-links" },
        h("li", {}, h("a", { href: "/account", "aria-current": location.pathname === "/account" ? "page" : null }, "Account")),
        h("li", {}, h("button", { type: "button", class: "link", id: "logout", onclick: onLogout }, "Log out")),
      ),
    ),
  );
}

async function onLogout() {
  try {
    await logout();
  } finally {
    resetState();
    lastTenantId = null;
    navigate("/login?logged_out=1");
  }
}

sessionEvents.addEventListener("ended", () => {
  resetState();
  navigate(`/login?ended=1&next=${encodeURIComponent(location.pathname + location.search)}`);
});

onLayout(drawNav);

async function boot() {
  // A page load starts with no access token: trade the refresh cookie for one, if there is one.
  await refresh().catch(() => false);
  await start();
}

boot();
