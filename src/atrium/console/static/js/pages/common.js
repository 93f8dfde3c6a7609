// Helpers shared by the workspace pages.

import { errorText } from "../api.js";
import { add, h } from "../dom.js";
import { notice } from "../forms.js";
import { loadMeta, loadTenants, tenantById } from "../state.js";

/** The workspace of the path, or null after drawing "not found" into the page. */
export async function currentTenant(ctx) {
  try {
    await Promise.all([loadTenants(), loadMeta()]);
  } catch (err) {
    add(ctx.root, h("h1", {}, "Workspace"), notice(errorText(err), "error"));
    return null;
  }
  const tenant = tenantById(ctx.params.tenant);
  if (!tenant) {
    add(ctx.root, 
      h("h1", {}, "Workspace not found"),
      h("p", {}, "You are not a member of this workspace. ", h("a", { href: "/tenants" }, "See your workspaces"), "."),
    );
    return null;
  }
  return tenant;
}

/** The page heading with the workspace's name above it. */
export function heading(tenant, title) {
  return h("header", { class: "page-head" }, h("p", { class: "eyebrow" }, tenant.name), h("h1", {}, title));
}

/** A table with a caption (for screen readers) and header cells. */
export function table(caption, headers, rows) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows),
    ),
  );
}

/** Run an action from a button, showing its error in `where` (a live region). */
export async function act(button, where, fn) {
  button.disabled = true;
  where.textContent = "";
  try {
    await fn();
  } catch (err) {
    where.textContent = errorText(err);
  } finally {
    button.disabled = false;
  }
}
