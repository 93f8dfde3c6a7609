// Workspaces (tenants): the list, the switcher's target, and creating one.

import { api } from "../api.js";
import { add, h, time } from "../dom.js";
import { field, form } from "../forms.js";
import { navigate } from "../router.js";
import { loadTenants, state } from "../state.js";
import { table } from "./common.js";

/** "/": go to a workspace, or to the list when there is none. */
export async function home(ctx) {
  const tenants = await loadTenants();
  add(ctx.root, h("h1", {}, "Atrium"));
  if (tenants.length) navigate(`/tenants/${tenants[0].id}/collections`, { replace: true });
  else navigate("/tenants", { replace: true });
}

/** "/tenants/:tenant": its collections. */
export async function overview(ctx) {
  add(ctx.root, h("h1", {}, "Workspace"));
  navigate(`/tenants/${ctx.params.tenant}/collections`, { replace: true });
}

/** Every workspace of the caller, and a form to create one. */
export async function list(ctx) {
  const { root } = ctx;
  const tenants = await loadTenants(true);
  add(root, h("h1", {}, "Your workspaces"));
  if (tenants.length) {
    add(root, 
      table(
        "Your workspaces",
        ["Name", "Your role", "Plan", "Created"],
        tenants.map((t) => h(
          "tr",
          {},
          h("td", {}, h("a", { href: `/tenants/${t.id}/collections` }, t.name)),
          h("td", {}, t.role),
          h("td", {}, t.plan),
          h("td", {}, time(t.created_at)),
        )),
      ),
    );
  } else {
    add(root, h("p", {}, "You are not in any workspace yet. Create one:"));
  }
  add(root, 
    h("h2", {}, "Create a workspace"),
    form(
      {
        submitLabel: "Create workspace",
        busyLabel: "Creating…",
        onSubmit: async (v) => {
          const tenant = await api("POST", "/v1/tenants", { json: { name: v.name } });
          state.tenants = null;
          await loadTenants(true);
          navigate(`/tenants/${tenant.id}/collections`);
        },
      },
      field({ label: "Name", name: "name", required: true, autocomplete: "organization" }),
    ),
  );
}
