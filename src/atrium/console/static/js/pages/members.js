// Members of a workspace, their roles, ownership, and invitations.

import { api } from "../api.js";
import { add, announce, h, replace, time } from "../dom.js";
import { field, form, notice, selectField } from "../forms.js";
import { navigate } from "../router.js";
import { can, loadTenants, loadUser, state } from "../state.js";
import { act, currentTenant, heading, table } from "./common.js";

const ROLES = [["admin", "Admin"], ["member", "Member"], ["viewer", "Viewer"]];

export async function page(ctx) {
  const tenant = await currentTenant(ctx);
  if (!tenant) return;
  const { root } = ctx;
  const me = await loadUser();
  const base = `/v1/tenants/${tenant.id}`;
  const manage = can(tenant, "members:manage");
  const status = h("p", { class: "status-line", role: "status", "aria-live": "polite" });
  const membersBox = h("div");
  const invitesBox = h("div");
  const transferBox = h("div");
  add(root, heading(tenant, "Members"), status, membersBox);

  async function loadMembers() {
    const pageData = await api("GET", `${base}/members`, { query: { size: 100 } });
    const rows = pageData.items.map((m) => {
      const isMe = m.user_id === me.id;
      let roleCell = m.role;
      if (manage && m.role !== "owner" && !isMe) {
        const select = h(
          "select",
          {
            "aria-label": `Role of ${m.email}`,
            onchange: (event) => act(event.target, status, async () => {
              await api("PATCH", `${base}/members/${m.user_id}`, { json: { role: event.target.value } });
              status.textContent = `${m.email} is now ${event.target.value}.`;
            }),
          },
          ROLES.map(([v, label]) => h("option", { value: v, selected: v === m.role }, label)),
        );
        roleCell = select;
      }
      const actions = [];
      if (manage && m.role !== "owner" && !isMe) {
        const remove = h("button", { type: "button", class: "danger small" }, "Remove");
        remove.addEventListener("click", () => {
          if (!window.confirm(`Remove ${m.email} from ${tenant.name}?`)) return;
          act(remove, status, async () => {
            await api("DELETE", `${base}/members/${m.user_id}`);
            status.textContent = `${m.email} was removed.`;
            await loadMembers();
          });
        });
        actions.push(remove);
      }
      if (isMe && m.role !== "owner") {
        const leave = h("button", { type: "button", class: "danger small" }, "Leave workspace");
        leave.addEventListener("click", () => {
          if (!window.confirm(`Leave ${tenant.name}? You lose access at once.`)) return;
          act(leave, status, async () => {
            await api("POST", `${base}/leave`);
            state.tenants = null;
            await loadTenants(true);
            navigate("/tenants");
          });
        });
        actions.push(leave);
      }
      return h(
        "tr",
        {},
        h("td", {}, m.name || "—", isMe ? " (you)" : ""),
        h("td", {}, m.email),
        h("td", {}, roleCell),
        h("td", {}, time(m.joined_at)),
        h("td", { class: "actions-cell" }, actions),
      );
    });
    replace(membersBox, table("Members", ["Name", "E-mail", "Role", "Joined", "Actions"], rows));
    if (can(tenant, "ownership:transfer")) drawTransfer(pageData.items);
  }

  function drawTransfer(members) {
    const others = members.filter((m) => m.user_id !== me.id);
    if (!others.length) {
      replace(transferBox);
      return;
    }
    replace(
      transferBox,
      h("h2", {}, "Transfer ownership"),
      h("p", {}, "The new owner gets every right; you become an admin."),
      form(
        {
          submitLabel: "Transfer ownership",
          busyLabel: "Transferring…",
          onSubmit: async (v) => {
            const target = others.find((m) => m.user_id === v.user_id);
            if (!window.confirm(`Make ${target ? target.email : "this member"} the owner of ${tenant.name}?`)) return;
            await api("POST", `${base}/transfer-ownership`, { json: { user_id: v.user_id } });
            await loadTenants(true);
            navigate(location.pathname, { replace: true });
          },
        },
        selectField({ label: "New owner", name: "user_id", options: others.map((m) => [m.user_id, `${m.name || m.email} (${m.email})`]) }),
      ),
    );
  }

  async function loadInvites() {
    const pageData = await api("GET", `${base}/invitations`, { query: { size: 100 } });
    const rows = pageData.items.map((inv) => {
      const actions = [];
      if (inv.status !== "accepted") {
        const resend = h("button", { type: "button", class: "small" }, "Resend");
        resend.addEventListener("click", () => act(resend, status, async () => {
          await api("POST", `${base}/invitations/${inv.id}/resend`);
          status.textContent = `A new invitation was mailed to ${inv.email}.`;
          await loadInvites();
        }));
        const revoke = h("button", { type: "button", class: "danger small" }, "Withdraw");
        revoke.addEventListener("click", () => act(revoke, status, async () => {
          await api("DELETE", `${base}/invitations/${inv.id}`);
          status.textContent = `The invitation to ${inv.email} was withdrawn.`;
          await loadInvites();
        }));
        actions.push(resend, revoke);
      }
      return h(
        "tr",
        {},
        h("td", {}, inv.email),
        h("td", {}, inv.role),
        h("td", {}, inv.status),
        h("td", {}, time(inv.expires_at)),
        h("td", { class: "actions-cell" }, actions),
      );
    });
    replace(
      invitesBox,
      rows.length
        ? table("Invitations", ["E-mail", "Role", "Status", "Expires", "Actions"], rows)
        : h("p", {}, "No invitations yet."),
    );
  }

  if (manage) {
    add(root, 
      h("h2", {}, "Invite someone"),
      form(
        {
          submitLabel: "Send invitation",
          busyLabel: "Sending…",
          onSubmit: async (v, f) => {
            const inv = await api("POST", `${base}/invitations`, { json: { email: v.email, role: v.role } });
            f.reset();
            status.textContent = "";
            f.after(notice(`An invitation was mailed to ${inv.email}; the link works for 7 days.`, "success"));
            announce(`Invitation sent to ${inv.email}`);
            await loadInvites();
          },
          errorOpts: { fieldFor: { 409: "email" } },
        },
        field({ label: "E-mail address", name: "email", type: "email", required: true, autocomplete: "off" }),
        selectField({ label: "Role", name: "role", options: ROLES, value: "member" }),
      ),
      h("h2", {}, "Invitations"),
      invitesBox,
    );
  }
  add(root, transferBox);
  try {
    await loadMembers();
    if (manage) await loadInvites();
  } catch (err) {
    status.textContent = err.message;
  }
}
