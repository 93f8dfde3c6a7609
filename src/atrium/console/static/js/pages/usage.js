// Usage this period against the plan's limits, one bar per metric.

import { api, errorText } from "../api.js";
import { add, fmtBytes, fmtDate, fmtNumber, h, nextId } from "../dom.js";
import { notice } from "../forms.js";
import { can } from "../state.js";
import { currentTenant, heading } from "./common.js";

const LABELS = {
  members: "Members",
  collections: "Collections",
  documents: "Documents",
  stored_bytes: "Storage",
  chunks: "Indexed chunks",
  searches: "Searches this period",
  answers: "Answers this period",
  llm_tokens: "LLM tokens this period",
  embedding_tokens: "Embedding tokens this period",
};

function amount(metric, n) {
  return metric === "stored_bytes" ? fmtBytes(n) : fmtNumber(n);
}

function bar(m) {
  const id = nextId(`usage-${m.metric}`);
  const label = LABELS[m.metric] || m.metric;
  const counted = m.used + m.reserved;
  let text;
  let meter = null;
  if (m.limit === null) {
    text = `${amount(m.metric, m.used)} used · no limit`;
  } else {
    const pct = m.limit > 0 ? Math.min(100, (counted / m.limit) * 100) : 100;
    text = `${amount(m.metric, m.used)} of ${amount(m.metric, m.limit)} (${pct.toFixed(pct > 0 && pct < 10 ? 1 : 0)}%)`;
    meter = h("meter", {
      id,
      min: 0,
      max: Math.max(m.limit, 1),
      value: Math.min(counted, Math.max(m.limit, 1)),
      low: Math.round(m.limit * 0.75),
      high: Math.round(m.limit * 0.9),
      optimum: 0,
    });
  }
  if (m.reserved) text += ` · ${amount(m.metric, m.reserved)} in progress`;
  return h(
    "div",
    { class: "usage-row", "data-metric": m.metric },
    h(meter ? "label" : "p", meter ? { for: id, class: "usage-label" } : { class: "usage-label" }, label),
    meter,
    h("p", { class: "usage-text" }, text, m.resets_at ? h("span", { class: "muted" }, ` · resets ${fmtDate(m.resets_at)}`) : null),
  );
}

export async function page(ctx) {
  const tenant = await currentTenant(ctx);
  if (!tenant) return;
  const { root } = ctx;
  add(root, heading(tenant, "Usage"));
  if (!can(tenant, "usage:read")) {
    add(root, notice(`Your role (${tenant.role}) cannot see usage.`, "info"));
    return;
  }
  try {
    const usage = await api("GET", `/v1/tenants/${tenant.id}/usage`);
    const rates = [];
    if (usage.requests_per_minute_per_user !== null) rates.push(`${fmtNumber(usage.requests_per_minute_per_user)} requests per minute per person`);
    if (usage.requests_per_minute_per_key !== null) rates.push(`${fmtNumber(usage.requests_per_minute_per_key)} per API key`);
    if (usage.max_upload_bytes !== null) rates.push(`uploads up to ${fmtBytes(usage.max_upload_bytes)}`);
    add(root, 
      h("p", {}, `Plan `, h("strong", {}, usage.plan), ` · period ${fmtDate(usage.period_start)} to ${fmtDate(usage.period_end)}`),
      rates.length ? h("p", { class: "muted" }, `Limits: ${rates.join(", ")}.`) : null,
      h("div", { class: "usage" }, usage.metrics.map(bar)),
    );
  } catch (err) {
    add(root, notice(errorText(err), "error"));
  }
}
