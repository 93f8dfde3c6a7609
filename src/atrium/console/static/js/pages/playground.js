// The search and answer playground. Answers stream: POST /answer with `stream: true` answers
// with Server-Sent Events, read from fetch's body stream (EventSource cannot send a POST).

import { api, errorText } from "../api.js";
import { add, announce, h, replace } from "../dom.js";
import { checkboxGroup, clearErrors, field, notice, selectField, showErrors, values } from "../forms.js";
import { readEvents } from "../sse.js";
import { currentTenant, heading } from "./common.js";

/** Text with [n] markers as links to the numbered sources. */
function withCitations(text) {
  const out = [];
  const re = /\[(\d+)\]/g;
  let last = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(h("a", { href: `#source-${m[1]}`, class: "cite", "aria-label": `source ${m[1]}` }, `[${m[1]}]`));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function sourceList(sources) {
  return h(
    "ol",
    { class: "sources" },
    sources.map((s) => h(
      "li",
      { id: `source-${s.number}`, value: s.number, tabindex: "-1" },
      h("p", { class: "source-title" }, s.title || "Untitled", h("span", { class: "muted" }, ` · score ${Number(s.score).toFixed(3)}`)),
      h("blockquote", {}, s.text),
    )),
  );
}

function resultList(results) {
  if (!results.length) return h("p", {}, "Nothing matched.");
  return h(
    "ol",
    { class: "sources" },
    results.map((r) => h(
      "li",
      {},
      h("p", { class: "source-title" }, r.title || "Untitled", h("span", { class: "muted" }, ` · score ${Number(r.score).toFixed(3)}`)),
      h("blockquote", {}, r.text),
    )),
  );
}

export async function page(ctx) {
  const tenant = await currentTenant(ctx);
  if (!tenant) return;
  const { root, query } = ctx;
  const base = `/v1/tenants/${tenant.id}`;
  add(root, heading(tenant, "Playground"));
  let collections = [];
  try {
    collections = (await api("GET", `${base}/collections`, { query: { size: 100 } })).items;
  } catch (err) {
    add(root, notice(errorText(err), "error"));
    return;
  }
  if (!collections.length) {
    add(root, 
      h("p", {}, "Create a collection and upload documents first. ", h("a", { href: `/tenants/${tenant.id}/collections` }, "Go to collections"), "."),
    );
    return;
  }
  const preselected = query.get("collection");
  const askButton = h("button", { type: "submit", class: "primary", value: "answer", id: "ask" }, "Ask");
  const searchButton = h("button", { type: "submit", value: "search", id: "search" }, "Search only");
  const stopButton = h("button", { type: "button", hidden: true }, "Stop");
  const errorBox = h("div", { class: "form-error", role: "alert", tabindex: "-1", hidden: true });
  const f = h(
    "form",
    { novalidate: true, class: "stack", "aria-label": "Ask or search" },
    errorBox,
    field({ label: "Question", name: "query", type: "textarea", required: true, attrs: { rows: 3 } }),
    checkboxGroup({
      legend: "Collections",
      name: "collection_ids",
      options: collections.map((c) => [c.id, c.name]),
      checked: preselected ? [preselected] : [],
      hint: "None ticked: every collection.",
    }),
    h(
      "div",
      { class: "row" },
      selectField({ label: "Ranking", name: "mode", options: [["vector", "Semantic (vector)"], ["hybrid", "Hybrid (semantic + full text)"]], value: "vector" }),
      field({ label: "Sources", name: "top_k", type: "number", value: "5", attrs: { min: 1, max: 50, inputmode: "numeric" } }),
    ),
    h("div", { class: "actions" }, askButton, searchButton, stopButton),
  );
  const output = h("section", { class: "output", "aria-label": "Result" });
  add(root, f, output);
  let controller = null;
  ctx.onCleanup(() => controller && controller.abort());
  stopButton.addEventListener("click", () => controller && controller.abort());

  const setBusy = (busy) => {
    askButton.disabled = busy;
    searchButton.disabled = busy;
    stopButton.hidden = !busy;
    f.setAttribute("aria-busy", busy ? "true" : "false");
  };

  function requestBody(v) {
    const body = { query: v.query, mode: v.mode };
    if (v.collection_ids.length) body.collection_ids = v.collection_ids;
    if (v.top_k !== "") {
      const n = Number(v.top_k);
      body.top_k = Number.isInteger(n) ? n : v.top_k;
    }
    return body;
  }

  async function search(body) {
    const res = await api("POST", `${base}/search`, { json: body, signal: controller.signal });
    replace(
      output,
      h("h2", {}, "Results"),
      h("p", { class: "muted" }, `${res.results.length} results · ${res.timings.total_ms.toFixed(0)} ms${res.cache_hit ? " · from the cache" : ""}`),
      resultList(res.results),
    );
    announce(`${res.results.length} results.`);
  }

  async function answer(body) {
    const response = await api("POST", `${base}/answer`, {
      json: { ...body, stream: true },
      raw: true,
      signal: controller.signal,
      headers: { Accept: "text/event-stream" },
    });
    const answerText = h("p", { id: "answer", class: "answer", "aria-busy": "true", "data-state": "streaming", "data-deltas": "0" });
    const sourcesBox = h("div");
    const citationsBox = h("div");
    const metaLine = h("p", { class: "muted", id: "answer-meta" }, "Finding sources…");
    replace(
      output,
      h("h2", {}, "Answer"),
      metaLine,
      answerText,
      citationsBox,
      h("h2", {}, "Sources"),
      sourcesBox,
    );
    let text = "";
    let deltas = 0;
    for await (const event of readEvents(response)) {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        continue;
      }
      if (event.event === "retrieval") {
        replace(sourcesBox, data.sources.length ? sourceList(data.sources) : h("p", {}, "No sources matched."));
        metaLine.textContent = "Writing the answer…";
      } else if (event.event === "delta") {
        text += data.text;
        deltas += 1;
        answerText.textContent = text;
        answerText.dataset.deltas = String(deltas);
      } else if (event.event === "done") {
        replace(answerText, withCitations(data.answer));
        answerText.dataset.state = "done";
        answerText.setAttribute("aria-busy", "false");
        const cited = data.citations || [];
        replace(
          citationsBox,
          cited.length
            ? h(
              "div",
              { id: "citations" },
              h("h3", {}, "Citations"),
              h("ul", {}, cited.map((c) => h("li", {}, h("a", { href: `#source-${c.number}` }, `[${c.number}] ${c.title || "Untitled"}`)))),
            )
            : h("p", { class: "muted" }, "The answer cites no source."),
        );
        const tokens = data.usage && data.usage.total_tokens ? ` · ${data.usage.total_tokens} tokens` : "";
        metaLine.textContent = `${data.mode}${data.model ? ` (${data.model})` : ""}${tokens} · ${Math.round(data.timings.total_ms)} ms`;
        announce(`Answer: ${data.answer}`);
      } else if (event.event === "error") {
        answerText.dataset.state = "error";
        answerText.setAttribute("aria-busy", "false");
        answerText.after(notice(data.detail ? String(data.detail) : "The answer could not be completed.", "error"));
      }
    }
    if (answerText.dataset.state === "streaming") {
      answerText.dataset.state = "incomplete";
      answerText.setAttribute("aria-busy", "false");
      metaLine.textContent = "The answer stopped before it was complete.";
    }
  }

  f.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return;
    clearErrors(f);
    const mode = event.submitter && event.submitter.value === "search" ? "search" : "answer";
    const body = requestBody(values(f));
    controller = new AbortController();
    setBusy(true);
    try {
      if (mode === "search") await search(body);
      else await answer(body);
    } catch (err) {
      if (err && err.name === "AbortError") {
        add(output, notice("Stopped.", "info"));
      } else {
        showErrors(f, err);
      }
    } finally {
      controller = null;
      setBusy(false);
    }
  });
}
