// Collections and their documents: create, upload with progress, live processing status.

import { api, errorText, upload } from "../api.js";
import { add, announce, badge, fmtBytes, fmtNumber, h, replace, time } from "../dom.js";
import { field, form, notice } from "../forms.js";
import { navigate } from "../router.js";
import { can, loadMeta } from "../state.js";
import { act, currentTenant, heading, table } from "./common.js";

const BUSY = new Set(["queued", "processing", "deleting"]);
const POLL_MS = 1000;

/** The tenant's collections and a form to create one. */
export async function list(ctx) {
  const tenant = await currentTenant(ctx);
  if (!tenant) return;
  const { root } = ctx;
  const base = `/v1/tenants/${tenant.id}/collections`;
  const listBox = h("div", {}, h("p", {}, "Loading collections…"));
  add(root, heading(tenant, "Collections"));
  if (can(tenant, "collections:write")) {
    add(root, 
      h("h2", {}, "Create a collection"),
      form(
        {
          submitLabel: "Create collection",
          busyLabel: "Creating…",
          errorOpts: { fieldFor: { 409: "name" } },
          onSubmit: async (v) => {
            const created = await api("POST", base, { json: { name: v.name, description: v.description } });
            navigate(`/tenants/${tenant.id}/collections/${created.id}`);
          },
        },
        field({ label: "Name", name: "name", required: true, autocomplete: "off" }),
        field({ label: "Description", name: "description", type: "textarea", attrs: { rows: 2 } }),
      ),
    );
  }
  add(root, h("h2", {}, "Your collections"), listBox);
  try {
    const data = await api("GET", base, { query: { size: 100 } });
    replace(
      listBox,
      data.items.length
        ? table(
          "Collections",
          ["Name", "Documents", "Chunks", "Size", "Status", "Created"],
          data.items.map((c) => h(
            "tr",
            {},
            h("td", {}, h("a", { href: `/tenants/${tenant.id}/collections/${c.id}` }, c.name)),
            h("td", { class: "num" }, fmtNumber(c.document_count)),
            h("td", { class: "num" }, fmtNumber(c.chunk_count)),
            h("td", { class: "num" }, fmtBytes(c.total_bytes)),
            h("td", {}, badge(c.status)),
            h("td", {}, time(c.created_at)),
          )),
        )
        : h("p", {}, "No collections yet."),
    );
  } catch (err) {
    replace(listBox, notice(errorText(err), "error"));
  }
}

function uploadErrorField(err) {
  return /metadata/i.test(err.message) ? "metadata" : /title/i.test(err.message) ? "title" : "files";
}

/** One collection: upload files and watch each document until it is ready or failed. */
export async function detail(ctx) {
  const tenant = await currentTenant(ctx);
  if (!tenant) return;
  const { root, params } = ctx;
  const base = `/v1/tenants/${tenant.id}/collections/${params.collection}`;
  let collection;
  try {
    collection = await api("GET", base);
  } catch (err) {
    add(root, heading(tenant, "Collection"), notice(errorText(err), "error"));
    return;
  }
  const meta = await loadMeta();
  const stats = h("p", { class: "stats" });
  const status = h("p", { class: "status-line", role: "status" });
  const docsBox = h("div", { id: "documents" });
  const uploadResult = h("div");
  const drawStats = (c) => replace(
    stats,
    `${fmtNumber(c.document_count)} documents · ${fmtNumber(c.chunk_count)} chunks · ${fmtBytes(c.total_bytes)}`,
  );
  drawStats(collection);
  add(root, 
    heading(tenant, collection.name),
    collection.description ? h("p", {}, collection.description) : null,
    stats,
    h("p", {}, h("a", { href: `/tenants/${tenant.id}/playground?collection=${collection.id}` }, "Ask this collection in the playground")),
  );

  const known = new Map();
  let timer = null;
  ctx.onCleanup(() => clearTimeout(timer));

  async function poll() {
    timer = null;
    let data;
    try {
      data = await api("GET", `${base}/documents`, { query: { size: 100 } });
    } catch (err) {
      status.textContent = errorText(err);
      return;
    }
    if (!ctx.alive()) return;
    for (const d of data.items) {
      const before = known.get(d.id);
      if (before && before !== d.status && (d.status === "ready" || d.status === "failed")) {
        announce(d.status === "ready" ? `“${d.title}” is ready.` : `“${d.title}” failed: ${d.error || ""}`);
      }
      known.set(d.id, d.status);
    }
    drawDocuments(data.items);
    if (data.items.some((d) => BUSY.has(d.status))) {
      timer = setTimeout(poll, POLL_MS);
    } else {
      api("GET", base).then(drawStats).catch(() => {});
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, 0);
  }

  function drawDocuments(items) {
    if (!items.length) {
      replace(docsBox, h("p", {}, "No documents yet."));
      return;
    }
    const write = can(tenant, "documents:write");
    const rows = items.map((d) => {
      const state = [badge(d.status)];
      if (d.status === "processing") {
        state.push(
          " ",
          h("progress", { max: 100, value: d.progress, "aria-label": `Processing ${d.title}` }),
          ` ${d.stage || ""} ${d.progress}%`,
        );
      }
      if (d.status === "failed" && d.error) state.push(h("p", { class: "doc-error" }, d.error));
      const actions = [];
      if (write && (d.status === "ready" || d.status === "failed")) {
        const reindex = h("button", { type: "button", class: "small" }, "Re-index");
        reindex.addEventListener("click", () => act(reindex, status, async () => {
          await api("POST", `${base}/documents/${d.id}/reindex`);
          schedule();
        }));
        actions.push(reindex);
      }
      if (write && d.status !== "deleting") {
        const del = h("button", { type: "button", class: "danger small" }, "Delete");
        del.addEventListener("click", () => {
          if (!window.confirm(`Delete “${d.title}”?`)) return;
          act(del, status, async () => {
            await api("DELETE", `${base}/documents/${d.id}`);
            schedule();
          });
        });
        actions.push(del);
      }
      return h(
        "tr",
        { "data-document-id": d.id, "data-status": d.status },
        h("td", {}, d.title, d.filename && d.filename !== d.title ? h("span", { class: "muted" }, ` (${d.filename})`) : null),
        h("td", { class: "doc-status" }, state),
        h("td", { class: "num" }, fmtBytes(d.size_bytes)),
        h("td", { class: "num" }, fmtNumber(d.chunk_count)),
        h("td", {}, time(d.updated_at)),
        h("td", { class: "actions-cell" }, actions),
      );
    });
    replace(docsBox, table("Documents", ["Title", "Status", "Size", "Chunks", "Updated", "Actions"], rows));
  }

  if (can(tenant, "documents:write")) {
    const progress = h("progress", { max: 100, value: 0, id: "upload-progress", "aria-label": "Upload progress" });
    const progressText = h("span", { class: "status-line", "aria-live": "polite" });
    const progressRow = h("div", { class: "progress-row", hidden: true }, progress, progressText);
    const uploadForm = form(
      {
        submitLabel: "Upload",
        busyLabel: "Uploading…",
        label: "Upload documents",
        errorOpts: { fieldFor: { 409: "files", 413: "files", 415: "files", 422: uploadErrorField } },
        onSubmit: async (v, f) => {
          const body = new FormData();
          const input = f.querySelector("input[type=file]");
          for (const file of input.files) body.append("files", file);
          if (v.title && v.title.trim()) body.append("title", v.title);
          if (v.metadata && v.metadata.trim()) body.append("metadata", v.metadata);
          progress.value = 0;
          progressText.textContent = "0%";
          progressRow.hidden = false;
          const job = upload(`${base}/documents`, body, (loaded, total) => {
            const pct = Math.round((loaded / total) * 100);
            progress.value = pct;
            progressText.textContent = `${pct}% (${fmtBytes(loaded)} of ${fmtBytes(total)})`;
          });
          let res;
          try {
            res = await job.promise;
          } finally {
            progressRow.hidden = true;
          }
          const docs = res.documents;
          const dups = docs.filter((d) => d.duplicate).length;
          replace(
            uploadResult,
            notice(
              `${docs.length} document${docs.length === 1 ? "" : "s"} uploaded${dups ? ` (${dups} already in the collection)` : ""}; processing starts now.`,
              "success",
            ),
          );
          for (const d of docs) known.set(d.id, d.status);
          f.reset();
          schedule();
        },
      },
      field({
        label: "Files",
        name: "files",
        type: "file",
        required: true,
        hint: `${meta.supported_types}; up to ${meta.max_files_per_upload} at once.`,
        attrs: { multiple: true },
      }),
      field({ label: "Title", name: "title", hint: "Optional, for a single file. Defaults to the document's own title." }),
      field({
        label: "Metadata (JSON)",
        name: "metadata",
        type: "textarea",
        hint: 'Optional, applied to every file, e.g. {"source": "handbook"}. Search filters use it.',
        attrs: { rows: 2, spellcheck: "false" },
      }),
    );
    add(root, h("h2", {}, "Upload documents"), uploadForm, progressRow, uploadResult);
  }
  add(root, h("h2", {}, "Documents"), status, docsBox);
  if (can(tenant, "collections:write")) {
    const del = h("button", { type: "button", class: "danger" }, "Delete this collection");
    const delStatus = h("p", { class: "status-line", role: "status" });
    del.addEventListener("click", () => {
      if (!window.confirm(`Delete “${collection.name}” with all its documents?`)) return;
      act(del, delStatus, async () => {
        await api("DELETE", base);
        navigate(`/tenants/${tenant.id}/collections`);
      });
    });
    add(root, h("h2", {}, "Danger zone"), h("div", { class: "actions" }, del), delStatus);
  }
  await poll();
}
