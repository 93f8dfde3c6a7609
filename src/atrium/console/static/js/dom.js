// Small DOM helpers. Everything is built with createElement and text nodes, never innerHTML,
// so text from the API (names, document text, answers) can never become markup.

/**
 * Create an element.
 * @param {string} tag
 * @param {Object<string, any>} [props] attributes; `on<event>` functions become listeners,
 *   `class` is the class name, booleans toggle attributes, null/undefined/false are skipped.
 * @param {...any} children strings, nodes, arrays, or null (skipped).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "value" && ("defaultValue" in el)) {
      // The default too, so form.reset() returns to it.
      el.defaultValue = value;
      el.value = value;
    } else if (key === "checked") {
      el.defaultChecked = true;
      el.checked = true;
    } else if (key === "selected") {
      el.defaultSelected = true;
      el.selected = true;
    } else if (key === "disabled") {
      el.disabled = true;
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children (strings, nodes, nested arrays; null and false skipped). */
export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Append children to an element; unlike Element.append, null and false add nothing. */
export function add(el, ...children) {
  return append(el, children);
}

/** Replace an element's content. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let uid = 0;
/** A unique id for label/aria wiring. */
export function nextId(prefix = "f") {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** Say something to screen readers (the polite live region). */
export function announce(text) {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.textContent = "";
  // A fresh text node after a tick makes screen readers read repeated messages too.
  setTimeout(() => { region.textContent = text; }, 50);
}

/** 1536 → "1.5 KB". */
export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let value = Number(n);
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i += 1;
  }
  return i === 0 ? `${value} ${units[0]}` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[i]}`;
}

/** An ISO date as local date and time, or "—". */
export function fmtDate(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** 12345 → "12,345". */
export function fmtNumber(n) {
  if (n === null || n === undefined) return "—";
  return Number(n).toLocaleString();
}

/** A <time> element for an ISO date. */
export function time(iso) {
  return iso ? h("time", { datetime: iso }, fmtDate(iso)) : "—";
}

/** A status badge; the text carries the meaning, the colour only repeats it. */
export function badge(text, kind = text) {
  return h("span", { class: `badge badge-${kind}` }, text);
}
