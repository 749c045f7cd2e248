// What the page says when the API refuses: one sentence per status, with the next step.

import { ApiError } from "./api.js";
import { $ } from "./dom.js";

function clock(seconds) {
  return new Date(Date.now() + seconds * 1000).toLocaleTimeString();
}

/** A sentence for an error (ApiError or anything thrown). */
export function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong in the page: ${error.message || error}`;
  const detail = error.problem.detail || error.problem.title || "";
  const wait = error.retryAfter;
  switch (error.status) {
    case 0:
      return `The API did not answer: ${detail}. Check your connection and try again.`;
    case 401:
      return `Not signed in, or your API key or token was refused (401): ${detail}. Paste a valid key or log in again.`;
    case 403:
      return `Not allowed (403): ${detail}.`;
    case 404:
      return `Not found (404): ${detail}. It may have been deleted, or it is not yours.`;
    case 409:
      return `Not possible now (409): ${detail}.`;
    case 413:
      return `Too large (413): ${detail}.`;
    case 422: {
      const fields = error.fieldErrors.map((e) => `${e.field}: ${e.message}`);
      return `Please check ${fields.length === 1 ? "this field" : "these fields"} (422): ${fields.join("; ") || detail}.`;
    }
    case 429:
      return wait !== null
        ? `Too many requests (429): ${detail}. Retry in ${wait} s (at ${clock(wait)}).`
        : `Too many requests (429): ${detail}. Wait a moment before retrying.`;
    case 503:
      return wait !== null
        ? `The service is unavailable for now (503): ${detail}. Retry in ${wait} s (at ${clock(wait)}).`
        : `The service is unavailable for now (503): ${detail}. Retry shortly.`;
    default:
      return `The server failed (${error.status}): ${detail}.`;
  }
}

/** Show an error (or a notice, kind "info") in the page's alert region and move focus to it. */
export function report(error, { focus = true } = {}) {
  const alert = $("alert");
  alert.textContent = typeof error === "string" ? error : describe(error);
  alert.dataset.status = error instanceof ApiError ? String(error.status) : "";
  alert.hidden = false;
  if (focus) alert.focus();
}

export function dismiss() {
  const alert = $("alert");
  alert.hidden = true;
  alert.textContent = "";
  alert.dataset.status = "";
}
