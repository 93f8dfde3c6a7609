// Forms: labelled fields, submission, and the API's validation messages next to each field.
//
// Forms are `novalidate`: the server is the one validator, and its messages (422 `detail[].loc`
// → field name) are shown under the field they concern, linked with aria-describedby.

import { ApiError, errorText, messageOf } from "./api.js";
import { h, nextId, announce } from "./dom.js";

function describedBy(...ids) {
  return ids.filter(Boolean).join(" ") || null;
}

/**
 * A labelled input (or textarea / select through `control`).
 * @param {{label: string, name: string, type?: string, value?: string, hint?: string,
 *   required?: boolean, autocomplete?: string, attrs?: object, control?: HTMLElement}} spec
 */
export function field(spec) {
  const { label, name, type = "text", value = "", hint, required, autocomplete, attrs = {} } = spec;
  const id = nextId(name);
  const errorId = `${id}-error`;
  const hintId = hint ? `${id}-hint` : null;
  let control = spec.control;
  if (!control) {
    control = type === "textarea"
      ? h("textarea", { rows: 4, ...attrs }, value)
      : h("input", { type, value, autocomplete, ...attrs });
  }
  control.id = id;
  control.name = name;
  if (required) control.setAttribute("aria-required", "true");
  control.setAttribute("aria-describedby", describedBy(hintId, errorId));
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label, required ? h("span", { class: "req" }, " (required)") : null),
    hint ? h("p", { class: "hint", id: hintId }, hint) : null,
    control,
    h("p", { class: "field-error", id: errorId, "data-error-for": name }),
  );
}

/** A labelled <select>. `options` is a list of [value, label]. */
export function selectField({ label, name, options, value, hint }) {
  const select = h(
    "select",
    {},
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
  );
  return field({ label, name, hint, control: select });
}

/** A fieldset of checkboxes sharing `name`; `options` is a list of [value, label]. */
export function checkboxGroup({ legend, name, options, checked = [], hint }) {
  const errorId = nextId(`${name}-error`);
  const hintId = hint ? nextId(`${name}-hint`) : null;
  return h(
    "fieldset",
    { class: "field checkboxes", "aria-describedby": describedBy(hintId, errorId) },
    h("legend", {}, legend),
    hint ? h("p", { class: "hint", id: hintId }, hint) : null,
    options.map(([v, text]) => {
      const id = nextId(name);
      return h(
        "div",
        { class: "check" },
        h("input", { type: "checkbox", id, name, value: v, checked: checked.includes(v) }),
        h("label", { for: id }, text),
      );
    }),
    h("p", { class: "field-error", id: errorId, "data-error-for": name }),
  );
}

/** The form's values: strings, and arrays for names used by several checkboxes. */
export function values(form) {
  const out = {};
  const data = new FormData(form);
  const multi = new Set(
    [...form.querySelectorAll("input[type=checkbox]")].map((el) => el.name),
  );
  for (const key of new Set(data.keys())) {
    const all = data.getAll(key);
    out[key] = multi.has(key) ? all : all[0];
  }
  for (const name of multi) if (!(name in out)) out[name] = [];
  return out;
}

/** Remove every error message from a form. */
export function clearErrors(form) {
  for (const el of form.querySelectorAll("[data-error-for]")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  const box = form.querySelector(".form-error");
  if (box) {
    box.textContent = "";
    box.hidden = true;
  }
}

function fieldFromLoc(loc) {
  if (!Array.isArray(loc)) return null;
  const start = loc[0] === "body" || loc[0] === "query" ? 1 : 0;
  const name = loc.slice(start).find((part) => typeof part === "string");
  return name || null;
}

function setFieldError(form, name, message) {
  const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
  if (!slot) return false;
  slot.textContent = slot.textContent ? `${slot.textContent} ${message}` : message;
  for (const control of form.querySelectorAll(`[name="${CSS.escape(name)}"]`)) {
    control.setAttribute("aria-invalid", "true");
  }
  return true;
}

function targetField(fieldFor, err) {
  const target = fieldFor[err.status];
  return typeof target === "function" ? target(err) : target;
}

/**
 * Show an error from the API on a form: validation messages next to their fields, the rest
 * in the form's alert box.
 * @param {HTMLFormElement} form
 * @param {unknown} err
 * @param {{fieldFor?: Object<number, string>, rename?: Object<string, string>}} [opts]
 *   `fieldFor`: put errors of this HTTP status under this field (e.g. {409: "email"}), or a
 *   function of the error that names the field;
 *   `rename`: API field name → form field name.
 */
export function showErrors(form, err, opts = {}) {
  const { fieldFor = {}, rename = {} } = opts;
  const general = [];
  if (err instanceof ApiError) {
    const detail = err.detail;
    if (err.status === 422 && Array.isArray(detail)) {
      for (const item of detail) {
        const name = fieldFromLoc(item.loc);
        const message = item.msg || "This value is not valid.";
        if (!(name && setFieldError(form, rename[name] || name, message))) general.push(message);
      }
    } else if (detail && typeof detail === "object" && !Array.isArray(detail) && detail.field) {
      const name = rename[detail.field] || detail.field;
      if (!setFieldError(form, name, messageOf(detail))) general.push(messageOf(detail));
    } else if (targetField(fieldFor, err) && setFieldError(form, targetField(fieldFor, err), err.message)) {
      // shown next to the field
    } else {
      general.push(err.message);
    }
  } else {
    general.push(errorText(err));
  }
  const box = form.querySelector(".form-error");
  if (general.length && box) {
    box.textContent = general.join(" ");
    box.hidden = false;
  }
  const firstInvalid = form.querySelector("[aria-invalid=true]");
  if (firstInvalid) firstInvalid.focus();
  else if (box && !box.hidden) box.focus();
  announce(form.querySelector("[data-error-for]:not(:empty)")?.textContent || box?.textContent || "");
}

/**
 * A form that submits through `onSubmit(values, form)`; API errors are shown on the form.
 * @param {{onSubmit: Function, submitLabel: string, busyLabel?: string, errorOpts?: object,
 *   class?: string, label?: string}} spec
 * @param {...any} children the fields
 */
export function form(spec, ...children) {
  const { onSubmit, submitLabel, busyLabel, errorOpts, label } = spec;
  const submit = h("button", { type: "submit", class: "primary" }, submitLabel);
  const box = h("div", { class: "form-error", role: "alert", tabindex: "-1", hidden: true });
  const el = h(
    "form",
    { novalidate: true, class: spec.class || "stack", "aria-label": label || null },
    box,
    children,
    h("div", { class: "actions" }, submit),
  );
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (el.getAttribute("aria-busy") === "true") return;
    clearErrors(el);
    el.setAttribute("aria-busy", "true");
    submit.disabled = true;
    if (busyLabel) submit.textContent = busyLabel;
    try {
      await onSubmit(values(el), el);
    } catch (err) {
      showErrors(el, err, errorOpts);
    } finally {
      el.removeAttribute("aria-busy");
      submit.disabled = false;
      submit.textContent = submitLabel;
    }
  });
  return el;
}

/** A notice (success or information) that screen readers announce. */
export function notice(text, kind = "info") {
  announce(typeof text === "string" ? text : "");
  return h("div", { class: `notice notice-${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}
