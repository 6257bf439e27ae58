// The search page's script, served from /static/app.js: the page's CSP allows no inline script.
"use strict";
const $ = (id) => document.getElementById(id);
// query: {id} or {file}; crop: {x, y, w, h} of it in its own pixels, or null; positives, negatives: ids of results
// marked "more like this" / "less like this" (the server combines them with the query: mean of the positives, minus
// half the mean of the negatives, and leaves them out of the results).
const state = { collections: [], query: null, crop: null, positives: [], negatives: [], maxUpload: 0, busy: 0 };
const MIN_CROP = 16;  // pixels a side: the server refuses smaller regions

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function show(message) { $("message").textContent = message || ""; }

function collectionInfo() { return state.collections.find((c) => c.name === $("collection").value); }

function fillEngines() {
  const info = collectionInfo(), chosen = $("engine").value;
  $("engine").replaceChildren(...Object.entries(info.engines).map(([name, problem]) => {
    const option = new Option(problem ? `${name} (not ready)` : name, name);
    option.title = problem || "";
    return option;
  }));
  const ready = Object.keys(info.engines).filter((e) => !info.engines[e]);
  $("engine").value = chosen in info.engines ? chosen : (ready[0] || "pgvector");
}

async function fillLabels() {
  const labels = await api(`/api/collections/${encodeURIComponent($("collection").value)}/labels`);
  $("label").replaceChildren(new Option("any label", ""), ...labels.map((l) => new Option(`${l.label} (${l.images})`, l.label)));
}

function engineProblem() { return collectionInfo().engines[$("engine").value]; }

function params() {
  const p = new URLSearchParams({ k: $("k").value || "12", engine: $("engine").value || "pgvector" });
  if ($("label").value) p.set("label", $("label").value);
  return p;
}

async function search() {
  if (!state.query) { show((collectionInfo() && engineProblem()) || ""); return; }  // the server has the last word on engines when asked
  const ticket = ++state.busy;
  $("status").textContent = "searching…";
  showRefine();
  try {
    const asked = state.query, answer = await ask(`/api/collections/${encodeURIComponent($("collection").value)}`);
    if (asked.file && answer.query.id !== null && state.query === asked) state.query = { id: answer.query.id };  // stored: by id from now on
    if (ticket === state.busy) render(answer);
  } catch (error) {
    if (ticket === state.busy) { show(error.message); $("status").textContent = ""; $("results").replaceChildren(); }
  }
}

function cropText() { return state.crop && `${state.crop.x},${state.crop.y},${state.crop.w},${state.crop.h}`; }

function ask(base) {
  // The request for the current query: a stored image (GET, maybe cropped), a stored image with feedback (POST JSON),
  // or an upload with its crop and feedback as form fields.
  const crop = cropText(), feedback = state.positives.length + state.negatives.length > 0;
  if (state.query.id !== undefined && !feedback) {
    const p = params();
    if (crop) p.set("crop", crop);
    return api(`${base}/images/${state.query.id}/similar?${p}`);
  }
  if (state.query.id !== undefined) {
    const body = { positives: [state.query.id, ...state.positives], negatives: state.negatives, crop,
                   k: Number($("k").value || 12), engine: $("engine").value || "pgvector", label: $("label").value || null };
    return api(`${base}/similar/feedback`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }
  const form = new FormData();
  form.append("image", state.query.file);
  if (crop) form.append("crop", crop);
  form.append("positives", state.positives.join(","));
  form.append("negatives", state.negatives.join(","));
  return api(`${base}/similar?${params()}`, { method: "POST", body: form });
}

function render(answer) {
  show("");
  const q = answer.query, t = answer.timings;
  const what = (state.query.id !== undefined ? `image #${state.query.id}` : "your picture") + (q.label ? ` (${q.label})` : "")
    + (q.crop ? ", region" : "");
  $("query-text").replaceChildren(Object.assign(document.createElement("strong"), { textContent: what }),
    ` · ${answer.collection} · drop another picture, click a result, or drag on the picture to search part of it`);
  const cnn = q.embedded ? ` · CNN and lookup ${t.query_ms.toFixed(0)} ms` : "";
  $("status").textContent = `${answer.hits.length} neighbours · ${answer.engine}: ${t.search_ms.toFixed(1)} ms${cnn}`
    + (answer.label ? ` · label ${answer.label}` : "") + (q.crop ? ` · region ${q.crop.x},${q.crop.y} ${q.crop.w}×${q.crop.h}` : "")
    + (q.positives.length > 1 || q.negatives.length ? ` · more like ${q.positives.length}, less like ${q.negatives.length}` : "");
  $("results").replaceChildren(...answer.hits.map((hit) => {
    const li = document.createElement("li");
    li.dataset.id = hit.id;
    li.dataset.distance = hit.distance;
    if (hit.id === q.id) li.className = "self";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "pick";
    button.title = `#${hit.id} ${hit.name} — search from this picture`;
    const img = Object.assign(document.createElement("img"), { src: hit.thumbnail, alt: hit.label || hit.name, loading: "lazy" });
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.append(Object.assign(document.createElement("span"), { className: "label", textContent: `${hit.rank}. ${hit.label || hit.name}` }),
      Object.assign(document.createElement("span"), { className: "distance", textContent: hit.distance.toFixed(3) }));
    button.append(img, caption);
    button.addEventListener("click", () => { useQuery({ id: hit.id }); window.scrollTo({ top: 0 }); });
    li.append(button);
    if (hit.id !== state.query.id) li.append(feedbackButtons(hit));
    return li;
  }));
}

function feedbackButtons(hit) {
  const row = document.createElement("div");
  row.className = "feedback";
  const more = Object.assign(document.createElement("button"), { type: "button", className: "more", textContent: "+ more" });
  const less = Object.assign(document.createElement("button"), { type: "button", className: "less", textContent: "− less" });
  more.title = `more like this: search for pictures like #${hit.id} too`;
  less.title = `less like this: move the search away from #${hit.id}`;
  more.setAttribute("aria-label", `more like #${hit.id}`);
  less.setAttribute("aria-label", `less like #${hit.id}`);
  more.addEventListener("click", () => mark(hit.id, state.positives, state.negatives));
  less.addEventListener("click", () => mark(hit.id, state.negatives, state.positives));
  row.append(more, less);
  return row;
}

function mark(id, into, from) {
  if (from.includes(id)) from.splice(from.indexOf(id), 1);
  if (!into.includes(id)) into.push(id);
  search();
}

function showRefine() {
  // The query's crop and feedback, each of which can be undone: "whole picture" drops the crop, "clear" the marks.
  const base = `/api/collections/${encodeURIComponent($("collection").value)}/images`;
  const thumbs = (ids) => ids.map((id) => Object.assign(document.createElement("img"), { src: `${base}/${id}/thumbnail`, alt: `#${id}`, title: `#${id}` }));
  $("positives").replaceChildren(...thumbs(state.positives));
  $("negatives").replaceChildren(...thumbs(state.negatives));
  $("positives-set").hidden = !state.positives.length;
  $("negatives-set").hidden = !state.negatives.length;
  $("clear-feedback").hidden = !(state.positives.length || state.negatives.length);
  $("whole-picture").hidden = !state.crop;
  $("refine").hidden = !state.crop && !state.positives.length && !state.negatives.length;
  showCrop();
}

function useQuery(query) {
  // A new query starts without a crop or marks. A stored picture is shown full size (so a box drawn on it maps to its
  // pixels); if the browser cannot show its format, the thumbnail is shown and boxes are not offered.
  Object.assign(state, { query, crop: null, positives: [], negatives: [] });
  const picture = $("query-picture");
  picture.dataset.crops = "yes";
  picture.onerror = null;
  if (query.file) {
    picture.src = URL.createObjectURL(query.file);
  } else {
    const base = `/api/collections/${encodeURIComponent($("collection").value)}/images/${query.id}`;
    picture.onerror = () => { picture.onerror = null; picture.dataset.crops = "no"; picture.src = `${base}/thumbnail`; };
    picture.src = `${base}/file`;
  }
  $("query-frame").hidden = false;
  search();
}

// Drawing a box on the query picture (mouse, pen or touch: pointer events) searches that region of it.

function scaleOf(picture) { return picture.naturalWidth / picture.getBoundingClientRect().width; }

function pointIn(picture, event) {
  const r = picture.getBoundingClientRect();
  return { x: Math.min(Math.max(event.clientX - r.left, 0), r.width), y: Math.min(Math.max(event.clientY - r.top, 0), r.height) };
}

function placeBox(a, b) {
  const box = $("crop-box");
  Object.assign(box.style, { left: `${Math.min(a.x, b.x)}px`, top: `${Math.min(a.y, b.y)}px`,
                             width: `${Math.abs(b.x - a.x)}px`, height: `${Math.abs(b.y - a.y)}px` });
  box.hidden = false;
}

function showCrop() {
  const picture = $("query-picture"), c = state.crop;
  if (!c || !picture.naturalWidth) { $("crop-box").hidden = true; return; }
  const s = scaleOf(picture);
  placeBox({ x: c.x / s, y: c.y / s }, { x: (c.x + c.w) / s, y: (c.y + c.h) / s });
}

function finishBox(a, b) {
  const picture = $("query-picture"), s = scaleOf(picture);
  if (Math.abs(b.x - a.x) < 4 && Math.abs(b.y - a.y) < 4) { showCrop(); return; }  // a click, not a box
  const x = Math.round(Math.min(a.x, b.x) * s), y = Math.round(Math.min(a.y, b.y) * s);
  const crop = { x, y, w: Math.min(Math.round(Math.abs(b.x - a.x) * s), picture.naturalWidth - x),
                 h: Math.min(Math.round(Math.abs(b.y - a.y) * s), picture.naturalHeight - y) };
  if (crop.w < MIN_CROP || crop.h < MIN_CROP) { show(`draw a larger box: at least ${MIN_CROP} pixels of the picture a side`); showCrop(); return; }
  state.crop = crop;
  search();
}

function listenForBoxes() {
  const frame = $("query-frame"), picture = $("query-picture");
  let start = null;
  frame.addEventListener("pointerdown", (e) => {
    if (!state.query || e.button !== 0 || picture.dataset.crops !== "yes" || !picture.naturalWidth) return;
    e.preventDefault();
    frame.setPointerCapture(e.pointerId);
    start = pointIn(picture, e);
    placeBox(start, start);
  });
  frame.addEventListener("pointermove", (e) => { if (start) placeBox(start, pointIn(picture, e)); });
  frame.addEventListener("pointerup", (e) => {
    if (!start) return;
    const a = start;
    start = null;
    finishBox(a, pointIn(picture, e));
  });
  frame.addEventListener("pointercancel", () => { start = null; showCrop(); });
  picture.addEventListener("load", showCrop);
  window.addEventListener("resize", showCrop);
  $("whole-picture").addEventListener("click", () => { state.crop = null; search(); });
  $("clear-feedback").addEventListener("click", () => { state.positives = []; state.negatives = []; search(); });
}

function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") { show(`${file.name} is not a picture (${file.type})`); return; }
  if (state.maxUpload && file.size > state.maxUpload) { show(`${file.name} is larger than the limit of ${(state.maxUpload / 1048576).toFixed(0)} MB`); return; }
  useQuery({ file });
}

async function changeCollection() {
  Object.assign(state, { query: null, crop: null, positives: [], negatives: [] });
  $("query-frame").hidden = true;
  showRefine();
  $("results").replaceChildren();
  $("status").textContent = "";
  fillEngines();
  try { await fillLabels(); show(""); } catch (error) { show(error.message); }
}

async function start() {
  listen();
  try {
    const status = await api("/api/status");
    state.maxUpload = status.max_upload_bytes;
    state.collections = await api("/api/collections");
    $("collection").replaceChildren(...state.collections.map((c) => new Option(`${c.name} (${c.images} images)`, c.name)));
    $("collection").value = status.default_collection;
    await changeCollection();
  } catch (error) { show(error.message); }
}

function listen() {
  listenForBoxes();
  $("controls").addEventListener("submit", (e) => e.preventDefault());
  $("collection").addEventListener("change", changeCollection);
  $("engine").addEventListener("change", search);
  $("k").addEventListener("change", search);
  $("label").addEventListener("change", search);
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
}
start();
