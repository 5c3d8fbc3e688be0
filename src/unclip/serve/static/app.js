// The unclip page: generate, vary and inpaint through the server's OpenAI Images API.
// Each request carries an Unclip-Job header; /api/jobs/<id> tells its queue position and
// sampling step while it runs. Cancel (or leaving the page) closes the request, and the
// server cancels its work. upload.js puts the user's own pictures in the gallery.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, key: localStorage.getItem("unclip-key") || "", busy: null, waiting: false, editing: null };

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

function jobId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `job-${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
  if (message) showNotice("");
}

function showNotice(message) {  // the server's warnings: the images came, but read this
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

async function loadInfo() {
  const response = await fetch("/api/info", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model").textContent = "this server needs an API key";
    showError(state.key ? "the server refused this API key" : "");
    return;
  }
  showError("");
  const info = await response.json();
  state.info = info;
  $("model").textContent = `${info.model} · makes ${info.native_sizes.join(", ")}`;
  $("max-prompt").textContent = info.limits.prompt;
  $("prompt").placeholder = info.example_prompt || "describe the image to draw";
  $("n").max = info.limits.n;
  $("steps").max = info.limits.steps;
  $("steps").placeholder = `${info.defaults.steps}`;
  $("guidance").placeholder = `${info.defaults.guidance_scale}`;
  if (info.defaults.prior_guidance_scale !== null) $("prior-guidance").placeholder = `${info.defaults.prior_guidance_scale}`;
  const select = $("size");
  select.replaceChildren();
  for (const size of info.sizes) {
    const native = info.native_sizes.includes(size);
    const option = new Option(native ? `${size} (native)` : `${size} (resized)`, size);
    option.selected = size === info.default_size;
    select.append(option);
  }
  updateCounter();
}

// Thai text is marked lang="th" (the page is "en"), so that screen readers and fonts read it as Thai
function langOf(text) {
  return /[\u0E00-\u0E7F]/.test(text || "") ? "th" : "en";
}

function updateCounter() {
  $("prompt").lang = langOf($("prompt").value);
  const limit = state.info ? state.info.limits.prompt : 1000;
  const length = Array.from($("prompt").value).length;  // characters, as the server counts: an emoji is one
  $("count").textContent = length;
  $("count").parentElement.classList.toggle("over", length > limit);
  const example = state.info && state.info.example_prompt;  // an empty box draws its placeholder: the example
  $("generate").disabled = state.busy !== null || (length === 0 && !example) || length > limit;
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// seed, steps and guidance from the form's fields, or (prefix "edit-") from the inpainting panel's own
function extras(prefix = "") {
  const fields = { seed: numberField(`${prefix}seed`), steps: numberField(`${prefix}steps`),
                   guidance_scale: numberField(`${prefix}guidance`) };
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
}

// what Reuse seed puts back so that Generate draws the same image: the form as it was sent
function settings() {
  return { size: $("size").value, steps: $("steps").value, guidance: $("guidance").value,
           prior: $("prior-guidance").value };
}

// --- one request, with live progress --------------------------------------------------------------

async function run(path, body, meta) {
  const id = jobId();
  const controller = new AbortController();
  state.busy = controller;
  updateCounter();
  showError("");
  $("announce").textContent = "";
  $("progress").hidden = false;
  $("progress-text").textContent = "sending…";
  $("progress-bar").value = 0;
  const poll = setInterval(() => pollProgress(id), 200);
  const isForm = body instanceof FormData;
  try {
    for (;;) {
      const response = await fetch(path, {
        method: "POST",
        headers: headers(isForm ? { "Unclip-Job": id } : { "Unclip-Job": id, "Content-Type": "application/json" }),
        body: isForm ? body : JSON.stringify(body),
        signal: controller.signal,
      });
      // a proxy's or a stopping server's error page is no JSON: say what came, not a JSON parse error
      const answer = await response.json().catch(() => null);
      if (response.status === 429) {  // a full queue: wait as long as the server says, then send again
        state.waiting = true;  // no job to follow meanwhile
        try { await waitOut(Number(response.headers.get("Retry-After")) || 5, controller.signal); }
        finally { state.waiting = false; }
        continue;
      }
      if (!response.ok || !answer) {
        const message = answer && answer.error ? answer.error.message
          : `the server answered ${response.status} ${response.statusText} (is it still running?)`;
        const upload = meta.source && meta.source.upload;
        if (upload && response.status === 400 && answer && answer.error && answer.error.param === "image") {
          showError(`the server refused your upload "${upload.name}": ${message}`);
          const caption = meta.source.card.querySelector(".seed");
          const refused = " · refused by the server";
          if (!caption.textContent.endsWith(refused)) caption.textContent += refused;
        } else {
          showError(message);
        }
        if (response.status === 401) $("key-row").hidden = false;
        return;
      }
      answer.data.slice().reverse().forEach((item) => addCard(item, meta, answer.size)); // newest first, in order
      showNotice((answer.warnings || []).join(" "));
      const count = answer.data.length;
      $("announce").textContent = `${count} ${count === 1 ? "image" : "images"} added to the gallery`;
      return;
    }
  } catch (err) {
    showError(err.name === "AbortError" ? "cancelled" : `the request failed: ${err.message}`);
  } finally {
    clearInterval(poll);
    state.busy = null;
    $("progress").hidden = true;
    updateCounter();
  }
}

// the countdown of a busy server's Retry-After; Cancel ends it
function waitOut(seconds, signal) {
  return new Promise((resolve, reject) => {
    let left = Math.max(1, Math.ceil(seconds));
    const show = () => { $("progress-text").textContent = `the server is busy: trying again in ${left} s`; };
    const stop = () => { clearInterval(timer); signal.removeEventListener("abort", cancelled); };
    const cancelled = () => { stop(); reject(new DOMException("cancelled", "AbortError")); };
    const timer = setInterval(() => { left -= 1; if (left > 0) show(); else { stop(); resolve(); } }, 1000);
    signal.addEventListener("abort", cancelled);
    show();
  });
}

async function pollProgress(id) {
  if (state.waiting) return;
  const response = await fetch(`/api/jobs/${id}`, { headers: headers() }).catch(() => null);
  if (!response || !response.ok || state.busy === null || state.waiting) return;
  const job = await response.json();
  if (job.state === "queued") {
    $("progress-text").textContent = `waiting in the queue (position ${job.position})`;
  } else if (job.state === "running" && job.stage) {
    $("progress-text").textContent = `${job.stage}: step ${job.step} of ${job.total} · seed ${job.seed}`;
    $("progress-bar").value = job.total ? job.step / job.total : 0;
  }
}

// --- gallery ------------------------------------------------------------------------------------------

// `meta.upload` marks the user's own picture (upload.js): { name, side, width, height }, no seed, no size asked
function addCard(item, meta, size) {
  const label = meta.label;
  const upload = meta.upload || null;
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const img = card.querySelector("img");
  card.classList.toggle("upload", upload !== null);  // a photo is smoothed when shrunk, the model's pixels are not
  img.src = item.url;
  img.alt = upload ? `your upload ${upload.name}` : label;
  card.querySelector(".label").textContent = label;
  card.querySelector(".label").lang = img.lang = langOf(label);
  card.querySelector(".seed").textContent = upload ? uploadCaption(upload) : `seed ${item.seed} · ${size}`;
  const download = card.querySelector(".download");
  download.href = item.url;
  download.download = upload ? `${upload.name.replace(/\.[^.]*$/, "")}.png` : `unclip-${item.seed}.png`;
  const entry = { url: item.url, seed: item.seed, size, label, prompt: meta.prompt, settings: meta.settings,
                  upload, card };
  const reuseButton = card.querySelector(".reuse");
  reuseButton.hidden = !meta.settings;  // a generation's; a variation or an edit is not redrawn from a prompt
  reuseButton.addEventListener("click", () => reuse(entry));
  card.querySelector(".vary").addEventListener("click", () => vary(entry));
  card.querySelector(".inpaint").addEventListener("click", () => openEditor(entry));
  $("gallery").prepend(card);
  $("empty").hidden = true;
}

function reuse(entry) {
  $("seed").value = entry.seed;
  $("prompt").value = entry.prompt;
  $("size").value = entry.settings.size;
  $("steps").value = entry.settings.steps;
  $("guidance").value = entry.settings.guidance;
  $("prior-guidance").value = entry.settings.prior;
  $("n").value = 1;
  updateCounter();
  $("prompt").focus();
}

const EXPIRED = "this image is no longer on the server (it keeps images for a while, and forgets them when it "
  + "restarts): generate it again to vary or edit it";

async function imageBlob(url) {
  const response = await fetch(url).catch(() => null);
  if (!response || !response.ok) throw new Error(EXPIRED);
  return response.blob();
}

async function vary(entry) {
  if (state.busy) return;
  let image;
  try { image = await imageBlob(entry.url); } catch (err) { return showError(err.message); }
  const form = new FormData();
  form.append("image", image, "image.png");
  form.append("n", $("n").value || "1");
  form.append("size", entry.size || $("size").value);  // an upload's variations: the size the form asks
  for (const [key, value] of Object.entries(extras())) form.append(key, String(value));
  const of = entry.upload ? entry.label : `seed ${entry.seed}`;
  await run("/v1/images/variations", form, { label: `variation of ${of}`, prompt: null, source: entry });
}

// --- inpainting: a brush paints the mask (transparent = repaint) ------------------------------------
// The mask is painted with a mouse or a finger, or from the keyboard: the arrows move a brush cursor, Space
// (or Enter) puts the brush down to paint as it moves and lifts it again, E does the same to erase, Delete
// clears. Positions are fractions of the side (0..1), the same on the 320² view and on the image-sized mask.

const VIEW = 320;     // the editor's canvases, in CSS and canvas pixels alike
const KEY_STEP = 8;   // view pixels an arrow moves the brush; Shift moves it 4 times as far
const PEN_STATES = {
  up: "brush lifted: the arrows move it without painting",
  paint: "painting: the arrows paint as they move, Space stops",
  erase: "erasing: the arrows erase as they move, E stops",
};

function openEditor(entry) {
  const img = new Image();
  img.onload = () => {
    const mask = document.createElement("canvas");
    mask.width = img.naturalWidth;
    mask.height = img.naturalHeight;
    const m = mask.getContext("2d");
    m.fillStyle = "#fff";
    m.fillRect(0, 0, mask.width, mask.height);
    state.editing = { entry, img, mask, last: null, cursor: { x: 0.5, y: 0.5 }, pen: "up" };
    const view = $("edit-image").getContext("2d");
    view.imageSmoothingEnabled = img.naturalWidth > VIEW;  // the model's pixels stay sharp, a photo is smoothed
    view.drawImage(img, 0, 0, VIEW, VIEW);
    clearPaint();
    $("edit-prompt").value = entry.prompt || "";
    $("edit-prompt").lang = langOf(entry.prompt);
    editSettings(entry);
    $("brush-state").textContent = "";
    $("editor").hidden = false;
    $("editor").scrollIntoView({ behavior: "smooth" });
    $("edit-paint").focus({ preventScroll: true });  // the next thing to do is paint, from the keyboard too
  };
  img.onerror = () => showError(EXPIRED);
  img.src = entry.url;
}

// Fill's images, size, steps, guidance and seed start as the form's when the editor opens (the size as
// the image's own, an upload's as the form's), and are then the panel's: what it shows is what Fill sends
function editSettings(entry) {
  $("edit-n").max = $("n").max;
  $("edit-n").value = $("n").value || "1";
  const size = $("edit-size");
  size.replaceChildren(...[...$("size").options].map((option) => new Option(option.text, option.value)));
  size.value = entry.size || $("size").value;
  if (!size.value) size.value = $("size").value;
  for (const name of ["steps", "guidance", "seed"]) {
    const field = $(`edit-${name}`);
    field.value = $(name).value;
    field.placeholder = $(name).placeholder;
    if ($(name).max) field.max = $(name).max;
  }
}

function clearPaint() {
  const paint = $("edit-paint").getContext("2d");
  paint.clearRect(0, 0, VIEW, VIEW);
  if (!state.editing) return;
  const m = state.editing.mask.getContext("2d");
  m.globalCompositeOperation = "source-over";
  m.fillStyle = "#fff";
  m.fillRect(0, 0, state.editing.mask.width, state.editing.mask.height);
}

// one stroke of the brush from its last point to (x, y): painted pixels of the mask become fully
// transparent, erased ones opaque again; the view shows the paint in pink over the image
function brushTo(x, y, mode = "paint") {
  const editing = state.editing;
  const from = editing.last || { x, y };
  const brush = Number($("brush").value) / VIEW;
  const line = (context, side, style, operation) => {
    context.globalCompositeOperation = operation;
    context.strokeStyle = style;
    context.lineCap = "round";
    context.lineWidth = Math.max(1, brush * side);
    context.beginPath();
    context.moveTo(from.x * side, from.y * side);
    context.lineTo(x * side + 0.01, y * side);
    context.stroke();
  };
  const painting = mode === "paint";
  line($("edit-paint").getContext("2d"), VIEW, painting ? "rgba(255, 0, 200, 0.55)" : "#000",
       painting ? "source-over" : "destination-out");
  line(editing.mask.getContext("2d"), editing.mask.width, "#fff", painting ? "destination-out" : "source-over");
  editing.last = { x, y };
}

function stroke(event) {
  const canvas = $("edit-paint");
  brushTo(event.offsetX / canvas.clientWidth, event.offsetY / canvas.clientHeight);
}

function showCursor(shown = true) {
  const cursor = $("brush-cursor");
  const editing = state.editing;
  cursor.classList.toggle("shown", shown && editing !== null);
  if (!editing) return;
  const size = Number($("brush").value);
  cursor.style.left = `${editing.cursor.x * VIEW}px`;
  cursor.style.top = `${editing.cursor.y * VIEW}px`;
  cursor.style.width = cursor.style.height = `${size}px`;
  cursor.classList.toggle("paint", editing.pen === "paint");
  cursor.classList.toggle("erase", editing.pen === "erase");
}

function setPen(pen, { quiet = false } = {}) {
  const editing = state.editing;
  editing.pen = pen;
  editing.last = null;
  if (pen !== "up") brushTo(editing.cursor.x, editing.cursor.y, pen);
  if (!quiet) $("brush-state").textContent = PEN_STATES[pen];
}

function maskKey(event) {
  const editing = state.editing;
  if (!editing || event.altKey || event.ctrlKey || event.metaKey) return;
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (key in moves) {
    const step = (event.shiftKey ? 4 : 1) * KEY_STEP / VIEW;
    const clamp = (v) => Math.min(1, Math.max(0, v));
    editing.cursor.x = clamp(editing.cursor.x + moves[key][0] * step);
    editing.cursor.y = clamp(editing.cursor.y + moves[key][1] * step);
    if (editing.pen !== "up") brushTo(editing.cursor.x, editing.cursor.y, editing.pen);
  } else if (key === " " || key === "Enter") {
    if (!event.repeat) setPen(editing.pen === "paint" ? "up" : "paint");
  } else if (key === "e") {
    if (!event.repeat) setPen(editing.pen === "erase" ? "up" : "erase");
  } else if (key === "Delete" || key === "Backspace") {
    setPen("up", { quiet: true });
    clearPaint();
    $("brush-state").textContent = "mask cleared; brush lifted";
  } else if (key === "Escape") {
    setPen("up");
  } else {
    return;
  }
  event.preventDefault();  // Space and the arrows would scroll the page
  showCursor();
}

function maskHasHole(mask) {
  const alpha = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i] === 0) return true;
  return false;
}

async function fill() {
  const editing = state.editing;
  if (!editing || state.busy) return;
  if (!maskHasHole(editing.mask)) {  // the server refuses a mask without a fully transparent pixel
    return showError("paint over the region to repaint first: the mask covers no whole pixel of the image yet "
      + "(a wider brush covers more)");
  }
  const prompt = $("edit-prompt").value;
  const maskBlob = await new Promise((resolve) => editing.mask.toBlob(resolve, "image/png"));
  let image;
  try { image = await imageBlob(editing.entry.url); } catch (err) { return showError(err.message); }
  const form = new FormData();
  form.append("image", image, "image.png");
  form.append("mask", maskBlob, "mask.png");
  form.append("prompt", prompt);
  form.append("n", $("edit-n").value || "1");
  form.append("size", $("edit-size").value);
  for (const [key, value] of Object.entries(extras("edit-"))) form.append(key, String(value));
  await run("/v1/images/edits", form, { label: `inpainted: ${prompt}`, prompt, source: editing.entry });
}

// --- wiring -------------------------------------------------------------------------------------------

function generate(event) {
  event.preventDefault();
  if (state.busy || $("generate").disabled) return;
  if (!$("prompt").value.trim() && state.info && state.info.example_prompt) {  // a first visit: draw the example shown
    $("prompt").value = state.info.example_prompt;
    updateCounter();
  }
  const prompt = $("prompt").value;
  const body = { prompt, n: Number($("n").value || 1), size: $("size").value, response_format: "url", ...extras() };
  const prior = numberField("prior-guidance");
  if (prior !== undefined) body.prior_guidance_scale = prior;
  run("/v1/images/generations", body, { label: prompt, prompt, settings: settings() });
}

window.addEventListener("DOMContentLoaded", () => {
  $("prompt").addEventListener("input", updateCounter);
  // Enter generates, as in a search box (a prompt is one line); Shift+Enter still breaks the line. The
  // Enter that confirms an input method's composition is not one (Safari reports it as keyCode 229
  // with isComposing false)
  const submits = (e) => e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229;
  $("prompt").addEventListener("keydown", (e) => {
    if (submits(e)) { e.preventDefault(); $("generate-form").requestSubmit(); }
  });
  $("edit-prompt").addEventListener("input", (e) => { e.target.lang = langOf(e.target.value); });
  $("edit-prompt").addEventListener("keydown", (e) => {
    if (submits(e)) { e.preventDefault(); fill(); }
  });
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => state.busy && state.busy.abort());
  $("random-seed").addEventListener("click", () => { $("seed").value = ""; });
  $("api-key").value = state.key;
  $("api-key").addEventListener("change", () => {
    state.key = $("api-key").value.trim();
    localStorage.setItem("unclip-key", state.key);
    loadInfo().catch((err) => showError(err.message));
  });
  const paint = $("edit-paint");
  paint.addEventListener("pointerdown", (e) => {
    if (!state.editing) return;
    paint.setPointerCapture(e.pointerId);
    setPen("up", { quiet: true });  // the keyboard's brush lifts when a mouse or finger paints
    showCursor(false);
    stroke(e);
  });
  paint.addEventListener("pointermove", (e) => { if (e.buttons & 1 && state.editing) stroke(e); });
  paint.addEventListener("pointerup", () => { if (state.editing) state.editing.last = null; });
  paint.addEventListener("keydown", maskKey);
  paint.addEventListener("focus", () => { if (paint.matches(":focus-visible")) showCursor(); });
  paint.addEventListener("blur", () => {  // leaving the mask lifts the brush: coming back paints nothing unasked
    if (state.editing) setPen("up", { quiet: true });
    $("brush-state").textContent = "";
    showCursor(false);
  });
  $("brush").addEventListener("input", () => showCursor($("brush-cursor").classList.contains("shown")));
  $("clear-mask").addEventListener("click", clearPaint);
  $("close-editor").addEventListener("click", () => {
    const card = state.editing && state.editing.entry.card;
    $("editor").hidden = true;
    state.editing = null;
    if (card && card.isConnected) card.querySelector(".inpaint").focus();  // back where the editing began
  });
  $("fill").addEventListener("click", fill);
  loadInfo().catch((err) => showError(`cannot reach the server: ${err.message}`));
});
