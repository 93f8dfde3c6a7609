// Account settings: name, e-mail address, password, sessions, data export, deletion.

import { api, errorText, forgetSession } from "../api.js";
import { add, h, replace, time } from "../dom.js";
import { field, form, notice } from "../forms.js";
import { navigate } from "../router.js";
import { loadMeta, loadUser, resetState } from "../state.js";
import { act, table } from "./common.js";

const EXPORT_POLL_MS = 2000;

export async function page(ctx) {
  const { root } = ctx;
  const user = await loadUser(true);
  const meta = await loadMeta();
  const passwordHint = `At least ${meta.password_min_length} characters; not your e-mail address.`;
  add(root, 
    h("h1", {}, "Account settings"),
    h("p", {}, `Signed in as ${user.email}`, user.is_verified ? "" : " (not verified)", "."),
  );

  // Profile
  const profileOut = h("div");
  add(root, 
    h("h2", {}, "Profile"),
    form(
      {
        submitLabel: "Save name",
        busyLabel: "Saving…",
        onSubmit: async (v) => {
          const updated = await api("PATCH", "/v1/users/me", { json: { name: v.name } });
          replace(profileOut, notice(`Saved: your name is “${updated.name}”.`, "success"));
        },
      },
      field({ label: "Name", name: "name", value: user.name, autocomplete: "name" }),
    ),
    profileOut,
  );

  // E-mail address
  const emailOut = h("div");
  add(root, 
    h("h2", {}, "Change e-mail address"),
    h("p", {}, "We mail a link to the new address; the change happens once you follow it."),
    form(
      {
        submitLabel: "Send the confirmation link",
        busyLabel: "Sending…",
        errorOpts: { fieldFor: { 403: "password" } },
        onSubmit: async (v, f) => {
          const res = await api("POST", "/v1/users/me/email", { json: { new_email: v.new_email, password: v.password } });
          f.reset();
          replace(emailOut, notice(res.detail, "success"));
        },
      },
      field({ label: "New e-mail address", name: "new_email", type: "email", required: true, autocomplete: "email" }),
      field({ label: "Current password", name: "password", type: "password", required: true, autocomplete: "current-password" }),
    ),
    emailOut,
  );

  // Password
  const passwordOut = h("div");
  add(root, 
    h("h2", {}, "Change password"),
    form(
      {
        submitLabel: "Change password",
        busyLabel: "Saving…",
        errorOpts: { fieldFor: { 403: "current_password" } },
        onSubmit: async (v, f) => {
          const res = await api("POST", "/v1/users/me/password", {
            json: { current_password: v.current_password, new_password: v.new_password },
          });
          f.reset();
          replace(passwordOut, notice(res.detail, "success"));
          await drawSessions();
        },
      },
      field({ label: "Current password", name: "current_password", type: "password", required: true, autocomplete: "current-password" }),
      field({ label: "New password", name: "new_password", type: "password", required: true, autocomplete: "new-password", hint: passwordHint }),
    ),
    passwordOut,
  );

  // Sessions
  const sessionsBox = h("div");
  const sessionsStatus = h("p", { class: "status-line", role: "status" });
  const everywhere = h("button", { type: "button", class: "danger" }, "Log out everywhere");
  everywhere.addEventListener("click", () => {
    if (!window.confirm("Log out of every device, this one included?")) return;
    act(everywhere, sessionsStatus, async () => {
      await api("POST", "/v1/auth/logout-all");
      await forgetSession();
      resetState();
      navigate("/login?logged_out=1");
    });
  });
  async function drawSessions() {
    const data = await api("GET", "/v1/users/me/sessions", { query: { size: 100 } });
    const rows = data.items.map((s) => {
      const actions = [];
      if (!s.current) {
        const end = h("button", { type: "button", class: "small" }, "Sign out");
        end.addEventListener("click", () => act(end, sessionsStatus, async () => {
          await api("DELETE", `/v1/users/me/sessions/${s.id}`);
          sessionsStatus.textContent = "That device was signed out.";
          await drawSessions();
        }));
        actions.push(end);
      }
      return h(
        "tr",
        {},
        h("td", {}, s.device || "Unknown device", s.current ? h("strong", {}, " (this one)") : null),
        h("td", {}, s.ip || "—"),
        h("td", {}, time(s.created_at)),
        h("td", {}, time(s.last_used_at)),
        h("td", { class: "actions-cell" }, actions),
      );
    });
    replace(sessionsBox, table("Signed-in devices", ["Device", "IP address", "Signed in", "Last active", "Actions"], rows));
  }
  add(root, h("h2", {}, "Signed-in devices"), sessionsStatus, sessionsBox, h("div", { class: "actions" }, everywhere));

  // Export
  const exportBox = h("div", { class: "status-line", role: "status" });
  const exportButton = h("button", { type: "button" }, "Export my data");
  let exportTimer = null;
  ctx.onCleanup(() => clearTimeout(exportTimer));
  const showExport = (exp) => {
    if (exp.status === "ready" && exp.download_url) {
      replace(exportBox, "Your export is ready: ", h("a", { href: exp.download_url, download: "" }, "download the ZIP"), exp.download_expires_at ? ` (link valid until ${new Date(exp.download_expires_at).toLocaleString()})` : "", ".");
    } else if (exp.status === "failed") {
      replace(exportBox, `The export failed: ${exp.error || "unknown error"}. Try again.`);
    } else {
      replace(exportBox, "Preparing your export… we also mail you when it is ready.");
      exportTimer = setTimeout(async () => {
        try {
          if (ctx.alive()) showExport(await api("GET", `/v1/users/me/exports/${exp.id}`));
        } catch (err) {
          replace(exportBox, errorText(err));
        }
      }, EXPORT_POLL_MS);
    }
  };
  exportButton.addEventListener("click", () => act(exportButton, exportBox, async () => {
    showExport(await api("POST", "/v1/users/me/export"));
  }));
  add(root, 
    h("h2", {}, "Export your data"),
    h("p", {}, "A ZIP of your account and the data of the workspaces you belong to."),
    h("div", { class: "actions" }, exportButton),
    exportBox,
  );

  // Deletion
  add(root, 
    h("h2", {}, "Delete your account"),
    h("p", {}, "This cannot be undone. Workspaces you alone own are deleted with everything in them."),
    form(
      {
        submitLabel: "Delete my account",
        busyLabel: "Deleting…",
        class: "stack danger-zone",
        errorOpts: { fieldFor: { 403: "password" } },
        onSubmit: async (v) => {
          if (!window.confirm("Delete your account for good?")) return;
          await api("DELETE", "/v1/users/me", { json: { password: v.password } });
          await forgetSession();
          resetState();
          navigate("/login?deleted=1");
        },
      },
      field({ label: "Password", name: "password", type: "password", required: true, autocomplete: "current-password" }),
    ),
  );
  await drawSessions().catch((err) => { sessionsStatus.textContent = errorText(err); });
}
