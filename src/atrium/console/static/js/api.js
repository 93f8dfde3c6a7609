// The API client and the browser side of the session.
//
// The access token lives in this module's memory only: never in localStorage, sessionStorage or
// a cookie. The refresh token is in an HttpOnly cookie this script cannot read; the
// /console/session/* routes trade it for access tokens. Those routes want the CSRF cookie's value
// echoed in a header (double submit).

const CSRF_COOKIE = "__Host-atrium_csrf";
const CSRF_HEADER = "X-CSRF-Token";

let accessToken = null;
let refreshTimer = null;
let refreshing = null;

/** Fires "ended" when the session is lost (refresh refused), so the app can show the login. */
export const sessionEvents = new EventTarget();

/** An error answer of the API: `status`, `error` (its name) and `detail` as the API sent them. */
export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && typeof body === "object" && "detail" in body ? body.detail : body;
    super(messageOf(detail) || `The request failed (HTTP ${status}).`);
    this.status = status;
    this.body = body;
    this.detail = detail;
    this.error = body && typeof body === "object" ? body.error : undefined;
  }
}

/** A sentence from an API error detail (a string, a list of validation errors, or an object). */
export function messageOf(detail) {
  if (detail === null || detail === undefined || detail === "") return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg) || "").filter(Boolean).join(" ");
  }
  if (typeof detail === "object") return detail.message || detail.msg || "";
  return String(detail);
}

/** The message to show for any thrown value. */
export function errorText(err) {
  if (err instanceof ApiError) return err.message;
  if (err && err.name === "AbortError") return "Stopped.";
  return "The server could not be reached. Check your connection and try again.";
}

function readCookie(name) {
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === name) return decodeURIComponent(rest.join("="));
  }
  return null;
}

async function parse(response) {
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }
  const text = await response.text();
  return text ? { detail: text } : null;
}

async function csrfToken() {
  const fromCookie = readCookie(CSRF_COOKIE);
  if (fromCookie) return fromCookie;
  const response = await fetch("/console/session/csrf", { credentials: "same-origin" });
  const body = await parse(response);
  return body && body.csrf_token;
}

async function sessionCall(path, body) {
  const headers = { Accept: "application/json", [CSRF_HEADER]: await csrfToken() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await parse(response);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function setToken(token, expiresIn) {
  accessToken = token;
  clearTimeout(refreshTimer);
  refreshTimer = null;
  if (token && expiresIn) {
    // Renew a minute before the access token expires.
    const seconds = Math.max(10, expiresIn - 60);
    refreshTimer = setTimeout(() => { refresh().catch(() => {}); }, seconds * 1000);
  }
}

/** Whether an access token is held. */
export function isLoggedIn() {
  return accessToken !== null;
}

/** Log in through the cookie route; the access token stays in memory. */
export async function login(username, password) {
  const data = await sessionCall("/console/session/login", { username, password });
  setToken(data.access_token, data.expires_in);
  return data;
}

function withLock(fn) {
  // Tabs share the refresh cookie. Two refreshes at once would present one refresh token twice,
  // which the server takes for theft and answers by ending the session: a Web Lock serialises
  // refreshes across the tabs of this origin, so the second one sends the rotated cookie.
  if (navigator.locks && navigator.locks.request) {
    return navigator.locks.request("atrium-refresh", fn);
  }
  return fn();
}

/** Get a new access token from the refresh cookie. Resolves to false when not logged in. */
export function refresh() {
  if (!refreshing) {
    refreshing = withLock(async () => {
      try {
        const data = await sessionCall("/console/session/refresh");
        setToken(data.access_token, data.expires_in);
        return true;
      } catch (err) {
        if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
          const had = accessToken !== null;
          setToken(null);
          if (had) sessionEvents.dispatchEvent(new Event("ended"));
          return false;
        }
        throw err;
      }
    }).finally(() => { refreshing = null; });
  }
  return refreshing;
}

/** End this session on the server and forget the token. */
export async function logout() {
  try {
    await sessionCall("/console/session/logout");
  } finally {
    setToken(null);
  }
}

/** Clear the cookie after the session was ended by other means (logout-all, deletion). */
export async function forgetSession() {
  setToken(null);
  try {
    await sessionCall("/console/session/logout");
  } catch {
    // The session is over either way.
  }
}

/** Headers that authenticate a request made outside {@link api} (XHR uploads, streams). */
export function authHeaders() {
  return accessToken ? { Authorization: `Bearer ${accessToken}` } : {};
}

function queryString(query) {
  if (!query) return "";
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === null || value === undefined || value === "") continue;
    for (const v of [value].flat()) params.append(key, String(v));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

/**
 * Call the API. Throws {@link ApiError} for an error answer.
 * @param {string} method
 * @param {string} path e.g. "/v1/tenants"
 * @param {{json?: any, query?: object, headers?: object, raw?: boolean, signal?: AbortSignal}} [opts]
 *   `raw`: resolve to the Response (for streams) once it is known to be a success.
 */
export async function api(method, path, opts = {}) {
  const { json, query, headers = {}, raw = false, signal } = opts;
  const send = () => {
    const h = { Accept: "application/json", ...headers, ...authHeaders() };
    let body;
    if (json !== undefined) {
      h["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    return fetch(path + queryString(query), { method, headers: h, body, signal });
  };
  let response = await send();
  if (response.status === 401 && accessToken !== null) {
    // The access token expired or was revoked: renew it once and try again.
    if (await refresh()) response = await send();
  }
  if (raw && response.ok) return response;
  const data = await parse(response);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * Upload a FormData with XMLHttpRequest, whose upload events report progress (fetch has none).
 * @param {string} path
 * @param {FormData} formData
 * @param {(loaded: number, total: number) => void} onProgress
 * @returns {{promise: Promise<any>, abort: () => void}}
 */
export function upload(path, formData, onProgress) {
  let xhr = null;
  const once = () => new Promise((resolve, reject) => {
    xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Accept", "application/json");
    for (const [key, value] of Object.entries(authHeaders())) xhr.setRequestHeader(key, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        body = { detail: xhr.responseText };
      }
      resolve({ status: xhr.status, body });
    });
    xhr.addEventListener("error", () => reject(new TypeError("network error")));
    xhr.addEventListener("abort", () => reject(new DOMException("Stopped", "AbortError")));
    xhr.send(formData);
  });
  const promise = (async () => {
    let result = await once();
    if (result.status === 401 && accessToken !== null && (await refresh())) {
      result = await once();
    }
    if (result.status >= 400) throw new ApiError(result.status, result.body);
    return result.body;
  })();
  return { promise, abort: () => xhr && xhr.abort() };
}
