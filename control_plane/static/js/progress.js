// Following a job to its end: the event stream (GET /v1/generations/{id}/events, Server-Sent
// Events read with fetch() so that the Authorization header goes along; EventSource cannot send
// it) where the server has it, else polling GET /v1/generations/{id}.

import { ApiError, getJson, parseJson, request } from "./api.js";

export const FINAL = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 500;

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    });
  });
}

/** Parse a text/event-stream body into {event, data, id} objects (the WHATWG rules, minus retry). */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { event: event.event, data: event.data.join("\n"), id: event.id };
        event = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue; // keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let content = colon < 0 ? "" : line.slice(colon + 1);
      if (content.startsWith(" ")) content = content.slice(1);
      if (field === "event") event.event = content;
      else if (field === "data") event.data.push(content);
      else if (field === "id") event.id = content;
    }
  }
}

/** A preview as an <img> source: a URL or data: URL as given, or base64 PNG. */
export function previewSource(preview) {
  if (typeof preview !== "string" || !preview) return null;
  if (preview.startsWith("data:") || preview.startsWith("/")) return preview;
  return `data:image/png;base64,${preview}`;
}

async function viaEvents(jobId, { onJob, onProgress, onOpen, signal, fromStart }) {
  // fromStart: a job just submitted; "0" replays its stored events from the first, so steps
  // taken before the stream opened still show.
  let lastId = fromStart ? "0" : null;
  for (let attempt = 0; attempt < 5; attempt += 1) {
    const headers = { Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await request("GET", `/v1/generations/${encodeURIComponent(jobId)}/events`, { headers, signal });
    } catch (error) {
      if (error instanceof ApiError && (error.status === 429 || error.status === 503)) {
        await sleep((error.retryAfter ?? 1) * 1000, signal);
        continue;
      }
      throw error;
    }
    onOpen();
    try {
      for await (const message of serverSentEvents(response.body)) {
        if (message.id !== null) lastId = message.id;
        const data = parseJson(message.data);
        if (message.event === "progress") onProgress(data);
        else if (message.event === "status" || message.event === "completed") {
          onJob(data);
          if (message.event === "completed" || FINAL.has(data.status)) return data;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") throw error;
    }
    // The stream ended before the job did (a restart, a proxy): resume from the last event.
  }
  return null; // let polling finish the job
}

async function viaPolling(jobId, { onJob, signal }) {
  for (;;) {
    let job;
    try {
      job = await getJson(`/v1/generations/${encodeURIComponent(jobId)}`, { signal });
    } catch (error) {
      if (error instanceof ApiError && (error.status === 429 || error.status === 503)) {
        await sleep((error.retryAfter ?? 1) * 1000, signal);
        continue;
      }
      throw error;
    }
    onJob(job);
    if (FINAL.has(job.status)) return job;
    await sleep(POLL_MS, signal);
  }
}

/**
 * Follow a job until it is final; returns the final generation resource.
 * ``events``: the server has the event stream; ``fromStart``: replay the job's events from its
 * first (a job just submitted). ``onJob(job)`` for each new state,
 * ``onProgress({step, total, progress, preview?})`` for each step and ``onOpen()`` when the
 * stream is open (events only).
 */
export async function follow(
  jobId,
  { events, onJob, onProgress = () => {}, onOpen = () => {}, signal, fromStart = false },
) {
  if (events) {
    const job = await viaEvents(jobId, { onJob, onProgress, onOpen, signal, fromStart });
    if (job) return job;
  }
  return viaPolling(jobId, { onJob, signal });
}
