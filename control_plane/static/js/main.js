// The Sfumato playground: sign in, generate, follow, browse your jobs, publish.

import * as api from "./api.js";
import { ApiError, credentials } from "./api.js";
import { $, clear, h, show } from "./dom.js";
import { GenerationForm } from "./form.js";
import { MaskEditor } from "./mask.js";
import { describe, dismiss, report } from "./messages.js";
import { FINAL, follow, previewSource } from "./progress.js";

const PAGE_SIZE = 8;
const NAME_KEY = "sfumato.credential.name";

const state = {
  features: { events: false, content: false, recommendations: false },
  form: null,
  editor: null,
  current: null, // {id, abort}
  history: { cursors: [null], index: 0, next: null },
  submitBlockedUntil: 0,
};

// --------------------------------------------------------------------------- errors

/** Report an error; a 422 also marks the fields it names, a 401 brings back the sign-in form. */
function handle(error) {
  if (error?.name === "AbortError") return;
  if (error instanceof ApiError && error.status === 422) {
    let first = null;
    for (const { field, message } of error.fieldErrors) {
      const name = String(field).split(".")[0];
      if (state.form.showError(name, message)) first = first || name;
      else if (name === "image" || name === "mask") {
        const box = $("source-error");
        box.textContent = `${name}: ${message}`;
        box.hidden = false;
      }
    }
    report(error, { focus: first === null });
    if (first) state.form.focus(first);
    return;
  }
  if (error instanceof ApiError && [429, 503].includes(error.status) && error.retryAfter) blockSubmit(error.retryAfter);
  report(error);
  if (error instanceof ApiError && error.status === 401) show($("auth"));
}

function blockSubmit(seconds) {
  state.submitBlockedUntil = Date.now() + seconds * 1000;
  const button = $("submit");
  button.disabled = true;
  $("submit-note").textContent = `You can submit again at ${new Date(state.submitBlockedUntil).toLocaleTimeString()}.`;
  setTimeout(() => {
    if (Date.now() >= state.submitBlockedUntil) {
      button.disabled = false;
      $("submit-note").textContent = "";
    }
  }, seconds * 1000 + 50);
}

// --------------------------------------------------------------------------- sign in / out

function signedIn() {
  const kind = credentials.kind();
  const name = sessionStorage.getItem(NAME_KEY);
  $("who").textContent =
    kind === "token" ? `Signed in as ${name} (token in this tab only)` : "Signed in with an API key (this tab only)";
  show($("sign-out"));
  show($("auth"), false);
  show($("generate"));
  show($("history"));
  // One request after the other: a busy API sheds concurrent ones.
  loadHistory(0)
    .catch(handle)
    .then(() => detectContent())
    .catch(() => {})
    .then(() => openFromHash());
}

function signOut() {
  state.current?.abort.abort();
  credentials.clear();
  sessionStorage.removeItem(NAME_KEY);
  api.forgetImages();
  $("who").textContent = "Not signed in";
  for (const id of ["sign-out", "generate", "job", "history", "gallery", "recommendations"]) show($(id), false);
  clear($("history-list"));
  clear($("images"));
  show($("auth"));
  $("api-key").focus();
}

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  credentials.set(key, "key");
  $("api-key").value = "";
  dismiss();
  try {
    await api.getJson("/v1/generations?limit=1"); // does the API take it?
  } catch (error) {
    credentials.clear();
    handle(error);
    return;
  }
  signedIn();
}

async function logIn(event) {
  event.preventDefault();
  const username = $("login-user").value.trim();
  const password = $("login-password").value;
  dismiss();
  try {
    const token = await api.login(username, password);
    credentials.set(token.access_token, "token");
    sessionStorage.setItem(NAME_KEY, username);
    $("login-password").value = "";
  } catch (error) {
    handle(error);
    return;
  }
  signedIn();
}

// --------------------------------------------------------------------------- generating

async function submit(event) {
  event.preventDefault();
  dismiss();
  $("source-error").hidden = true;
  if (Date.now() < state.submitBlockedUntil) return;
  if (!state.form.check()) return;
  const body = { ...state.form.values(), ...(await state.editor.payload()) };
  const button = $("submit");
  button.disabled = true;
  try {
    const job = await api.sendJson("POST", "/v1/generations", body, {
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
    track(job, { fresh: true });
    $("job").scrollIntoView({ block: "nearest" });
    loadHistory(0).catch(handle);
  } catch (error) {
    handle(error);
  } finally {
    if (Date.now() >= state.submitBlockedUntil) button.disabled = false;
  }
}

function statusText(job, progress) {
  const prompt = job.params?.prompt ?? "";
  const id = job.id.slice(0, 8);
  if (progress && !FINAL.has(job.status)) {
    return `Job ${id} running: step ${progress.step} of ${progress.total} (${Math.round(progress.progress * 100)}%) — “${prompt}”`;
  }
  const extra = job.status === "failed" && job.error ? `: ${job.error}` : "";
  return `Job ${id} ${job.status}${extra} — “${prompt}”`;
}

/** Show a job in the "Current job" panel and follow it to its end. */
function track(job, { fresh = false } = {}) {
  state.current?.abort.abort();
  const abort = new AbortController();
  state.current = { id: job.id, abort };
  show($("job"));
  show($("preview"), false);
  clear($("images"));
  delete $("job-status").dataset.live;
  const bar = $("job-progress");
  const cancel = $("job-cancel");
  const update = (current, progress) => {
    if (state.current?.id !== job.id) return;
    $("job-status").textContent = statusText(current, progress);
    $("job-status").dataset.status = current.status;
    bar.value = progress ? progress.progress : current.progress;
    bar.setAttribute("aria-valuetext", `${Math.round(bar.value * 100)}%`);
    show(cancel, !FINAL.has(current.status));
  };
  let latest = job;
  update(job);
  if (FINAL.has(job.status)) {
    showImages(job).catch(handle);
    return;
  }
  follow(job.id, {
    events: state.features.events,
    fromStart: fresh,
    signal: abort.signal,
    onOpen: () => {
      if (state.current?.id === job.id) $("job-status").dataset.live = "open";
    },
    onJob: (current) => {
      latest = current;
      update(current);
    },
    onProgress: (progress) => {
      update({ ...latest, status: "running" }, progress);
      const source = previewSource(progress.preview);
      if (source) {
        $("preview-img").src = source;
        show($("preview"));
      }
    },
  })
    .then((final) => {
      if (state.current?.id !== job.id) return;
      update(final);
      show($("preview"), false);
      loadHistory(state.history.index).catch(handle);
      return showImages(final);
    })
    .catch(handle);
}

async function cancelCurrent() {
  if (!state.current) return;
  try {
    const job = await api.sendJson("POST", `/v1/generations/${encodeURIComponent(state.current.id)}/cancel`);
    $("job-status").textContent = statusText(job);
    loadHistory(state.history.index).catch(handle);
  } catch (error) {
    handle(error);
  }
}

async function showImages(job) {
  const list = $("images");
  clear(list);
  for (const image of job.images || []) list.append(await imageCard(job, image));
}

async function imageCard(job, image) {
  const url = await api.imageUrl(image.url);
  const alt = `Image ${image.index + 1} of “${job.params?.prompt ?? ""}” (seed ${image.seed})`;
  const publish = state.features.content
    ? h("button", { type: "button", onclick: () => publishImage(job, image) }, "Publish to the gallery")
    : null;
  return h(
    "li",
    { class: "image" },
    h("img", { src: url, alt, width: image.width, height: image.height }),
    h("p", { class: "note" }, `seed ${image.seed}, ${image.width}×${image.height}`),
    h(
      "div",
      { class: "row" },
      h("a", { class: "button", href: url, download: `sfumato-${job.id}-${image.index}.png` }, "Download"),
      h("button", { type: "button", onclick: () => useAsSource(image.url).catch(handle) }, "Use as source"),
      publish,
    ),
  );
}

// --------------------------------------------------------------------------- the source image

function sourceChanged() {
  const present = state.editor.present;
  show($("editor"), present);
  state.form.setSource(present);
  if (!present) $("source-file").value = "";
}

async function loadSource(blob) {
  try {
    const bitmap = await createImageBitmap(blob);
    state.editor.load(bitmap);
    bitmap.close();
    $("source-error").hidden = true;
  } catch {
    $("source-error").textContent = "This file could not be read as an image.";
    $("source-error").hidden = false;
  }
}

async function useAsSource(path) {
  await loadSource(await api.imageBlob(path));
  $("mask-canvas").focus();
  $("mask-canvas").scrollIntoView({ block: "center" });
}

// --------------------------------------------------------------------------- history

async function loadHistory(index) {
  const cursor = state.history.cursors[index];
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (cursor) query.set("cursor", cursor);
  const page = await api.getJson(`/v1/generations?${query}`);
  state.history.index = index;
  state.history.cursors.length = index + 1;
  if (page.next_cursor) state.history.cursors.push(page.next_cursor);
  $("history-newer").disabled = index === 0;
  $("history-older").disabled = !page.next_cursor;
  $("history-page").textContent = `Page ${index + 1}${page.items.length ? "" : " (no jobs yet)"}`;
  const list = $("history-list");
  clear(list);
  for (const job of page.items) list.append(historyItem(job));
  for (const job of page.items) {
    const first = job.images?.[0];
    if (!first) continue;
    api
      .imageUrl(first.url)
      .then((url) => {
        const slot = list.querySelector(`[data-job="${CSS.escape(job.id)}"] .thumb`);
        if (slot) slot.replaceChildren(h("img", { src: url, alt: "", width: 48, height: 48 }));
      })
      .catch(() => {});
  }
}

function historyItem(job) {
  const prompt = job.params?.prompt ?? "";
  const created = new Date(job.created_at).toLocaleString();
  const actions = [
    h("button", { type: "button", onclick: () => track(job), "aria-label": `Show job ${job.id.slice(0, 8)}` }, "Show"),
  ];
  if (!FINAL.has(job.status)) {
    actions.push(
      h("button", { type: "button", onclick: () => cancelJob(job.id), "aria-label": `Cancel job ${job.id.slice(0, 8)}` }, "Cancel"),
    );
  }
  actions.push(
    h("button", { type: "button", onclick: () => deleteJob(job.id), "aria-label": `Delete job ${job.id.slice(0, 8)}` }, "Delete"),
  );
  return h(
    "li",
    { class: "job", dataset: { job: job.id, status: job.status } },
    h("span", { class: "thumb", "aria-hidden": "true" }),
    h(
      "div",
      { class: "job-text" },
      h("p", { class: "job-prompt" }, prompt),
      h("p", { class: "note" }, h("span", { class: `badge badge-${job.status}` }, job.status), ` ${created} · ${job.id.slice(0, 8)}`),
    ),
    h("div", { class: "row" }, actions),
  );
}

async function cancelJob(id) {
  try {
    await api.sendJson("POST", `/v1/generations/${encodeURIComponent(id)}/cancel`);
    await loadHistory(state.history.index);
  } catch (error) {
    handle(error);
  }
}

async function deleteJob(id) {
  if (!window.confirm("Delete this job and its images?")) return;
  try {
    await api.request("DELETE", `/v1/generations/${encodeURIComponent(id)}`);
    if (state.current?.id === id) {
      state.current.abort.abort();
      state.current = null;
      show($("job"), false);
    }
    await loadHistory(state.history.index);
    report(`Job ${id.slice(0, 8)} deleted.`, { focus: false });
  } catch (error) {
    handle(error);
  }
}

/** ``#job=<id>``: open that job (yours; anyone else's is a 404 like in the API). */
async function openFromHash() {
  const match = /^#job=([A-Za-z0-9_-]{1,64})$/.exec(location.hash);
  if (!match || !credentials.get()) return;
  try {
    track(await api.getJson(`/v1/generations/${match[1]}`));
  } catch (error) {
    handle(error);
  }
}

// --------------------------------------------------------------------------- gallery and recommendations

function routes(doc) {
  return Object.keys(doc.paths || {});
}

/** Show the gallery and the recommendations only where this server has those routes and they answer. */
async function detectContent() {
  if (state.features.content) {
    try {
      await loadGallery();
      show($("gallery"));
    } catch {
      show($("gallery"), false);
    }
  }
  if (state.features.recommendations) {
    try {
      await loadRecommendations();
      show($("recommendations"));
    } catch {
      show($("recommendations"), false);
    }
  }
}

function itemsOf(page) {
  return Array.isArray(page) ? page : page.items || [];
}

/** A gallery item, or a recommendation (``rec``: its reason, and feedback instead of a plain like). */
async function contentCard(item, rec = null) {
  const title = item.title || item.prompt || "untitled";
  const image = item.image_url
    ? h("img", { src: await api.imageUrl(item.image_url), alt: title, width: 96, height: 96 })
    : null;
  const likes = item.counts ? `${item.counts.likes} like${item.counts.likes === 1 ? "" : "s"}` : null;
  const buttons = rec
    ? [
        h("button", { type: "button", onclick: () => feedback(rec.id, "liked") }, "Like"),
        h("button", { type: "button", onclick: () => feedback(rec.id, "dismissed") }, "Not interested"),
      ]
    : [h("button", { type: "button", onclick: () => like(item.id) }, "Like")];
  return h(
    "li",
    { class: "image", dataset: { content: item.id } },
    image,
    h("p", { class: "job-prompt" }, title),
    h("p", { class: "note" }, [rec ? rec.reason : null, likes].filter(Boolean).join(" · ")),
    h("div", { class: "row" }, buttons),
  );
}

async function loadGallery() {
  const page = await api.getJson("/v1/content?limit=12");
  const list = $("gallery-list");
  clear(list);
  for (const item of itemsOf(page)) list.append(await contentCard(item));
}

async function loadRecommendations() {
  const page = await api.getJson("/v1/users/me/recommendations?limit=10");
  const list = $("recs-list");
  clear(list);
  for (const rec of itemsOf(page)) {
    const item = rec.content || (await api.getJson(`/v1/content/${encodeURIComponent(rec.content_id)}`));
    list.append(await contentCard(item, rec));
  }
}

async function publishImage(job, image) {
  try {
    await api.sendJson("POST", "/v1/content", { generation_id: job.id, image_index: image.index });
    report("Published to the gallery.", { focus: false });
    await loadGallery();
    show($("gallery"));
  } catch (error) {
    handle(error);
  }
}

async function feedback(recommendationId, kind) {
  try {
    await api.sendJson("PUT", `/v1/recommendations/${encodeURIComponent(recommendationId)}/feedback`, {
      feedback: kind,
    });
    report(kind === "liked" ? "Liked." : "Noted: fewer like this.", { focus: false });
    await loadRecommendations();
  } catch (error) {
    handle(error);
  }
}

async function like(contentId) {
  try {
    await api.sendJson("POST", "/v1/interactions", { content_id: contentId, type: "like" });
    report("Liked: your recommendations will take it into account.", { focus: false });
    await loadGallery();
    if (state.features.recommendations) await loadRecommendations();
  } catch (error) {
    handle(error);
  }
}

// --------------------------------------------------------------------------- start

async function start() {
  let doc;
  try {
    doc = await api.openapi();
  } catch (error) {
    report(`The API's schema could not be loaded, so the form cannot be built. ${describe(error)}`);
    return;
  }
  const paths = routes(doc);
  state.features.events = paths.some((p) => /^\/v1\/generations\/\{[^}]+\}\/events$/.test(p));
  state.features.content = paths.includes("/v1/content");
  state.features.recommendations = paths.some((p) => /^\/v1\/users\/\{[^}]+\}\/recommendations$/.test(p));
  state.form = new GenerationForm($("fields"), doc.components.schemas.GenerationCreate);
  const preview = state.form.inputs.get("preview_every");
  if (preview && state.features.events) preview.value = "5"; // previews while it runs

  state.editor = new MaskEditor({
    view: $("mask-canvas"),
    brush: $("brush-size"),
    erase: $("brush-erase"),
    summary: $("mask-summary"),
    onChange: sourceChanged,
  });
  $("source-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) loadSource(file);
  });
  $("mask-clear").addEventListener("click", () => state.editor.fill(false));
  $("mask-fill").addEventListener("click", () => state.editor.fill(true));
  $("source-remove").addEventListener("click", () => state.editor.remove());

  $("key-form").addEventListener("submit", useKey);
  $("login-form").addEventListener("submit", logIn);
  $("sign-out").addEventListener("click", signOut);
  $("generate-form").addEventListener("submit", submit);
  $("job-cancel").addEventListener("click", cancelCurrent);
  $("history-refresh").addEventListener("click", () => loadHistory(state.history.index).catch(handle));
  $("history-newer").addEventListener("click", () => loadHistory(state.history.index - 1).catch(handle));
  $("history-older").addEventListener("click", () => loadHistory(state.history.index + 1).catch(handle));
  $("gallery-refresh").addEventListener("click", () => loadGallery().catch(handle));
  $("recs-refresh").addEventListener("click", () => loadRecommendations().catch(handle));
  window.addEventListener("hashchange", openFromHash);

  document.body.dataset.live = state.features.events ? "events" : "polling"; // how jobs are followed
  document.body.dataset.ready = "true";
  if (credentials.get()) signedIn();
  else $("api-key").focus();
}

start();
