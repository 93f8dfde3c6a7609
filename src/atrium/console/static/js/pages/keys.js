// API keys: create (the secret is shown once, with a copy button and ready-to-paste SDK, CLI and
// MCP snippets), list, rotate, revoke.

import { api } from "../api.js";
import { add, announce, h, replace, time } from "../dom.js";
import { checkboxGroup, field, form, notice } from "../forms.js";
import { can, loadMeta } from "../state.js";
import { act, currentTenant, heading, table } from "./common.js";

const DEFAULT_SCOPES = ["collections:read", "documents:read", "search", "answer"];

/**
 * The ready-to-paste snippets for a new key: the SDK, the `atr` command line and an MCP client
 * config, with this tenant, the key and the console's own origin filled in.
 * (Plain strings: they go into the page as text nodes, never as markup.)
 */
export function snippets(origin, tenantId, secret) {
  const q = (s) => JSON.stringify(s);
  return [
    {
      id: "sdk",
      title: "Python SDK",
      label: "Python SDK",
      text: [
        "from atrium_client import Atrium",
        "",
        "client = Atrium(",
        `    base_url=${q(origin)},`,
        `    api_key=${q(secret)},`,
        `    tenant_id=${q(tenantId)},`,
        ")",
      ].join("\n"),
    },
    {
      id: "cli",
      title: "Command line",
      label: "command line",
      text: [
        `export ATRIUM_URL=${origin} \\`,
        `  ATRIUM_API_KEY=${secret} \\`,
        `  ATRIUM_TENANT=${tenantId}`,
        'atr search "your question"',
      ].join("\n"),
    },
    {
      id: "mcp",
      title: "MCP client config (Cursor and others)",
      label: "MCP config",
      text: JSON.stringify(
        { mcpServers: { atrium: { url: `${origin}/mcp`, headers: { Authorization: `Bearer ${secret}` } } } },
        null,
        2,
      ),
    },
  ];
}

/** One snippet: a heading, the text in a <pre> and a button that copies it. */
function snippetBlock({ id, title, label, text }) {
  // Focusable, so keyboard users can scroll a long line sideways.
  const pre = h("pre", { id: `snippet-${id}`, class: "snippet", tabindex: "0" }, h("code", {}, text));
  const copied = h("span", { class: "status-line", role: "status" });
  const copy = h("button", { type: "button", class: "small", "aria-label": `Copy the ${label} snippet` }, "Copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      copied.textContent = `The ${label} snippet is in the clipboard.`;
    } catch {
      const range = document.createRange();
      range.selectNodeContents(pre);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      copied.textContent = "Select the snippet and copy it (Ctrl+C or ⌘C).";
    }
  });
  return h(
    "div",
    { class: "snippet-block", "data-snippet": id },
    h("div", { class: "snippet-head" }, h("h3", {}, title), copy),
    pre,
    copied,
  );
}

/** The panel that shows a new secret once. */
function secretPanel(key, tenantId, onDone) {
  const id = "new-key-secret";
  const input = h("input", { id, type: "text", readonly: true, value: key.key, class: "secret", spellcheck: "false", autocomplete: "off" });
  const copied = h("span", { class: "status-line", role: "status" });
  const copy = h("button", { type: "button", class: "primary", id: "copy-key" }, "Copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(key.key);
      copied.textContent = "Copied to the clipboard.";
    } catch {
      input.select();
      copied.textContent = "Select the key and copy it (Ctrl+C or ⌘C).";
    }
  });
  const done = h("button", { type: "button" }, "I have stored it");
  const panel = h(
    "section",
    { class: "secret-panel", "aria-labelledby": "new-key-title" },
    h("h2", { id: "new-key-title", tabindex: "-1" }, `Your new key “${key.name}”`),
    h("p", { class: "warning" }, "Copy it now: Atrium keeps only a hash and cannot show it again."),
    h("label", { for: id }, "Secret key"),
    h("div", { class: "copy-row" }, input, copy),
    copied,
    h("h3", { class: "snippets-title" }, "Use it"),
    h(
      "p",
      { class: "hint" },
      "Ready to paste, with this workspace, the key and this server filled in. The SDK and the ",
      h("code", {}, "atr"),
      " command come with the ",
      h("code", {}, "atrium-client"),
      " Python package.",
    ),
    h("div", { class: "snippets" }, snippets(window.location.origin, tenantId, key.key).map(snippetBlock)),
    h("div", { class: "actions" }, done),
  );
  done.addEventListener("click", () => {
    panel.remove();
    onDone();
  });
  return panel;
}

export async function page(ctx) {
  const tenant = await currentTenant(ctx);
  if (!tenant) return;
  const { root } = ctx;
  const base = `/v1/tenants/${tenant.id}/api-keys`;
  add(root, heading(tenant, "API keys"));
  if (!can(tenant, "keys:read")) {
    add(root, notice(`Your role (${tenant.role}) cannot see API keys; ask an admin or the owner.`, "info"));
    return;
  }
  const status = h("p", { class: "status-line", role: "status" });
  const secretBox = h("div");
  const listBox = h("div");
  const showRevoked = h("input", { type: "checkbox", id: "show-revoked" });
  const { scopes } = await loadMeta();

  async function loadKeys() {
    const data = await api("GET", base, { query: { size: 100, include_revoked: showRevoked.checked } });
    const rows = data.items.map((k) => {
      const actions = [];
      if (can(tenant, "keys:manage") && k.status !== "revoked" && k.status !== "expired") {
        const rotate = h("button", { type: "button", class: "small" }, "Rotate");
        rotate.addEventListener("click", () => {
          if (!window.confirm(`Rotate “${k.name}”? The old secret stops working at once.`)) return;
          act(rotate, status, async () => {
            const fresh = await api("POST", `${base}/${k.id}/rotate`, { json: { grace_period_seconds: 0 } });
            showSecret(fresh);
            await loadKeys();
          });
        });
        const revoke = h("button", { type: "button", class: "danger small" }, "Revoke");
        revoke.addEventListener("click", () => {
          if (!window.confirm(`Revoke “${k.name}”? Programs using it stop working at once.`)) return;
          act(revoke, status, async () => {
            await api("DELETE", `${base}/${k.id}`);
            status.textContent = `“${k.name}” was revoked.`;
            await loadKeys();
          });
        });
        actions.push(rotate, revoke);
      }
      return h(
        "tr",
        {},
        h("td", {}, k.name),
        h("td", {}, h("code", {}, `${k.prefix}…${k.last_four}`)),
        h("td", {}, k.scopes.join(", ")),
        h("td", {}, k.status),
        h("td", {}, time(k.created_at)),
        h("td", {}, time(k.last_used_at)),
        h("td", {}, k.expires_at ? time(k.expires_at) : "never"),
        h("td", { class: "actions-cell" }, actions),
      );
    });
    replace(
      listBox,
      rows.length
        ? table("API keys", ["Name", "Key", "Scopes", "Status", "Created", "Last used", "Expires", "Actions"], rows)
        : h("p", {}, "No keys yet."),
    );
  }

  function showSecret(key) {
    replace(secretBox, secretPanel(key, tenant.id, () => announce("The secret is hidden.")));
    secretBox.querySelector("h2").focus();
  }

  if (can(tenant, "keys:manage")) {
    add(root, 
      secretBox,
      h("h2", {}, "Create a key"),
      form(
        {
          submitLabel: "Create key",
          busyLabel: "Creating…",
          onSubmit: async (v, f) => {
            const body = { name: v.name, scopes: v.scopes };
            if (v.expires_at) {
              const when = new Date(v.expires_at);
              body.expires_at = Number.isNaN(when.getTime()) ? v.expires_at : when.toISOString();
            }
            if (v.rate_limit_per_minute) {
              const n = Number(v.rate_limit_per_minute);
              body.rate_limit_per_minute = Number.isInteger(n) ? n : v.rate_limit_per_minute;
            }
            const key = await api("POST", base, { json: body });
            f.reset();
            showSecret(key);
            await loadKeys();
          },
        },
        field({ label: "Name", name: "name", required: true, hint: "So people recognise it, e.g. “production backend”.", autocomplete: "off" }),
        checkboxGroup({ legend: "Scopes", name: "scopes", options: scopes.map((s) => [s, s]), checked: DEFAULT_SCOPES, hint: "What the key may do." }),
        field({ label: "Expires", name: "expires_at", type: "datetime-local", hint: "Optional: leave empty for a key that does not expire." }),
        field({ label: "Requests per minute", name: "rate_limit_per_minute", type: "number", hint: "Optional: empty uses the plan's limit.", attrs: { min: 1, inputmode: "numeric" } }),
      ),
    );
  }
  add(root, 
    h("h2", {}, "Keys"),
    h("div", { class: "check" }, showRevoked, h("label", { for: "show-revoked" }, "Show revoked keys")),
    status,
    listBox,
  );
  showRevoked.addEventListener("change", () => loadKeys().catch((err) => { status.textContent = err.message; }));
  await loadKeys().catch((err) => { status.textContent = err.message; });
}
