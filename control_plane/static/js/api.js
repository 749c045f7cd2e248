// The REST API, as the page uses it: credentials in sessionStorage, problem+json errors.

const STORE_KEY = "sfumato.credential";
const STORE_KIND = "sfumato.credential.kind";

/** An answer that was not 2xx (or no answer at all: status 0). */
export class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.retryAfter = retryAfter; // seconds, or null
  }

  /** [{field, message}] of a 422 (the API names each field). */
  get fieldErrors() {
    return Array.isArray(this.problem.errors) ? this.problem.errors : [];
  }
}

/** Seconds from a Retry-After header (delta-seconds or an HTTP date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

/** JSON.parse that keeps seeds beyond 2^53 exact (as their digits), using the source text. */
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    const seedLike = key === "seed" || /^\d+$/.test(key); // a seed, or an item of `seeds`
    if (seedLike && typeof value === "number" && !Number.isSafeInteger(value) && context?.source) {
      return context.source;
    }
    return value;
  });
}

export const credentials = {
  get() {
    return sessionStorage.getItem(STORE_KEY);
  },
  kind() {
    return sessionStorage.getItem(STORE_KIND);
  },
  set(value, kind) {
    sessionStorage.setItem(STORE_KEY, value);
    sessionStorage.setItem(STORE_KIND, kind);
  },
  clear() {
    sessionStorage.removeItem(STORE_KEY);
    sessionStorage.removeItem(STORE_KIND);
  },
};

function authHeaders() {
  const token = credentials.get();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function fail(response) {
  let problem = null;
  try {
    const text = await response.text();
    problem = text ? JSON.parse(text) : null;
  } catch {
    problem = null;
  }
  throw new ApiError(response.status, problem, parseRetryAfter(response.headers.get("Retry-After")));
}

/** fetch() with the page's credentials; throws ApiError on anything but 2xx. */
export async function request(method, path, { body, headers, signal, auth = true } = {}) {
  const init = { method, headers: { Accept: "application/json", ...(auth ? authHeaders() : {}), ...headers }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { title: "No answer", detail: `cannot reach the API (${error.message})` }, null);
  }
  if (!response.ok) await fail(response);
  return response;
}

export async function getJson(path, options) {
  const response = await request("GET", path, options);
  return parseJson(await response.text());
}

export async function sendJson(method, path, body, options = {}) {
  const response = await request(method, path, { ...options, body });
  const text = await response.text();
  return text ? parseJson(text) : null;
}

/** A blob: URL for an authenticated image (an <img src> cannot send the Authorization header). */
const images = new Map(); // API path -> {url, blob}

async function fetchImage(path) {
  if (!images.has(path)) {
    const response = await request("GET", path, { headers: { Accept: "image/png" } });
    const blob = await response.blob();
    images.set(path, { url: URL.createObjectURL(blob), blob });
  }
  return images.get(path);
}

export async function imageUrl(path) {
  return (await fetchImage(path)).url;
}

/** The image itself (for the source-image editor). */
export async function imageBlob(path) {
  return (await fetchImage(path)).blob;
}

export function forgetImages() {
  for (const { url } of images.values()) URL.revokeObjectURL(url);
  images.clear();
}

export async function login(username, password) {
  return sendJson("POST", "/v1/auth/token", { username, password }, { auth: false });
}

/** The API's OpenAPI document: the form's fields and limits, and which routes this server has. */
export async function openapi() {
  return (await request("GET", "/openapi.json", { auth: false })).json();
}
