// The server's browser page: a thin client of the AUTOMATIC1111-style API under /sdapi/v1.
// Plain JavaScript modules, no build step, no external assets.
import { Gallery, imageSrc, parseInfo } from "./gallery.js";
import { MaskPainter } from "./mask.js";

const API = "/sdapi/v1";
const POLL_MS = 250;
const PREVIEW_EVERY = 4;   // the preview image (large) on every 4th poll only, from the 2nd
const NARROW = window.matchMedia("(max-width: 820px)");   // style.css's one-column layout

const $ = (id) => document.getElementById(id);
const state = {
  mode: "txt2img",
  busy: false,
  run: 0,              // increases with every request; a poller stops when it is no longer current
  interrupted: false,
  lastSeed: null,
  model: null,         // model_name of the checkpoint the server has loaded
  task: null,          // this page's running request: its force_task_id, and the AbortController that withdraws it
};
const gallery = new Gallery($("gallery"), $("gallery-count"), $("gallery-empty"), {
  onSend: (src) => sendToImg2img(src),
  onSeed: (seed) => { $("seed").value = seed; },
});
const mask = new MaskPainter($("mask-canvas"), () => Number($("brush-size").value), () => $("inpaint").checked);

// ---- talking to the server -------------------------------------------------------------------------------

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(API + path, options);
  } catch (err) {
    throw new Error(`Cannot reach the server (${err.message}).`);
  }
  const text = await response.text();
  let body = text;
  try { body = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: keep the text */ }
  if (!response.ok) throw new Error(describeError(response, body));
  return body;
}

function postJSON(path, payload, signal = undefined) {
  const headers = { "Content-Type": "application/json" };
  return api(path, { method: "POST", headers, body: JSON.stringify(payload), signal });
}

// Where this page's request stands (the web UI's /internal/progress): {active, queued, completed, textinfo...};
// null when the server cannot say.
async function taskState(id) {
  try {
    const response = await fetch("/internal/progress", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id_task: id, live_preview: false }),
    });
    return response.ok ? await response.json() : null;
  } catch (_) {
    return null;
  }
}

// A readable sentence from an error response: `detail` when it is a sentence, else the server's one-line
// `message`, else FastAPI's list of validation errors, else the web UI's {error, errors}.
function describeError(response, body) {
  const status = `${response.status} ${response.statusText}`.trim();
  if (body && typeof body === "object") {
    if (typeof body.detail === "string" && body.detail) return body.detail;
    if (typeof body.message === "string" && body.message) return body.message;
    if (Array.isArray(body.detail)) return body.detail.map(validationLine).join("\n");
    for (const key of ["errors", "error"]) {
      const value = body[key];
      if (value) return typeof value === "string" ? value : JSON.stringify(value);
    }
  }
  if (typeof body === "string" && body.trim()) return `${status}: ${body.trim().slice(0, 400)}`;
  return `The server answered ${status}.`;
}

function validationLine(item) {
  if (typeof item !== "object" || item === null) return String(item);
  const where = (item.loc || []).filter((part) => part !== "body").join(".");
  return where ? `${where}: ${item.msg}` : (item.msg || JSON.stringify(item));
}

// ---- errors and status -----------------------------------------------------------------------------------

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
  $("error").scrollIntoView({ block: "nearest" });
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function setStatus(text) {
  $("progress-text").textContent = text;
}

function setBusy(busy, interruptible = true) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("generate").setAttribute("aria-busy", String(busy));
  $("sd_model_checkpoint").disabled = busy;
  $("interrupt").disabled = !(busy && interruptible);
  document.body.classList.toggle("busy", busy);
}

// ---- start-up: fill the choices from the server ----------------------------------------------------------

// Options from `items` ({value, text}); the first item that `chosen` accepts is selected.
function fillSelect(select, items, chosen) {
  select.replaceChildren();
  for (const { value, text } of items) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.append(option);
  }
  const pick = items.find(chosen);
  if (pick) select.value = pick.value;
}

async function loadChoices() {
  const [samplers, schedulers] = await Promise.allSettled([api("/samplers"), api("/schedulers")]);
  const problems = [];
  if (samplers.status === "fulfilled") {
    const items = samplers.value.map((s) => ({ value: s.name, text: s.name }));
    fillSelect($("sampler_name"), items, (item) => item.value.toLowerCase() === "euler a");
  } else problems.push(`samplers: ${samplers.reason.message}`);
  if (schedulers.status === "fulfilled") {
    const items = schedulers.value.map((s) => ({ value: s.label || s.name, text: s.label || s.name }));
    fillSelect($("scheduler"), items, (item) => item.value.toLowerCase() === "automatic");
  } else problems.push(`schedulers: ${schedulers.reason.message}`);
  try {
    await loadModels();
  } catch (err) {
    problems.push(`models: ${err.message}`);
  }
  if (problems.length) showError(`Could not load the choices from the server.\n${problems.join("\n")}`);
  document.body.dataset.ready = "true";   // every list is filled (or its error shown)
}

// The checkpoints, by model_name (a title gains its hash once the model has been loaded), the current selected.
async function loadModels() {
  const [models, options] = await Promise.all([api("/sd-models"), api("/options")]);
  const current = options.sd_model_checkpoint;
  const items = models.map((m) => ({ value: m.model_name, text: m.title, title: m.title }));
  fillSelect($("sd_model_checkpoint"), items, (item) => item.title === current || item.value === current);
  state.model = $("sd_model_checkpoint").value;
}

// ---- the request -----------------------------------------------------------------------------------------

function number(id, label, parse) {
  const raw = $(id).value.trim();
  const value = parse(raw);
  if (raw === "" || Number.isNaN(value)) throw new Error(`${label}: enter a number.`);
  return value;
}

function dataToBase64(url) {
  const comma = url.indexOf(",");
  return comma >= 0 ? url.slice(comma + 1) : url;
}

function buildPayload() {
  const payload = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    steps: number("steps", "Steps", (v) => parseInt(v, 10)),
    cfg_scale: number("cfg_scale", "CFG scale", parseFloat),
    seed: number("seed", "Seed", (v) => parseInt(v, 10)),
    width: number("width", "Width", (v) => parseInt(v, 10)),
    height: number("height", "Height", (v) => parseInt(v, 10)),
    batch_size: number("batch_size", "Batch size", (v) => parseInt(v, 10)),
    n_iter: number("n_iter", "Batch count", (v) => parseInt(v, 10)),
  };
  if (state.mode !== "img2img") return payload;
  const init = $("init-image");
  if (!init.getAttribute("src")) {
    throw new Error("img2img needs an init image: choose a file or send one from the gallery.");
  }
  payload.init_images = [dataToBase64(init.src)];
  payload.denoising_strength = number("denoising_strength", "Denoising strength", parseFloat);
  if ($("inpaint").checked) {
    const painted = mask.toDataURL();
    if (!painted) {
      throw new Error("Inpaint is on but the mask is empty: paint over the part to repaint, or switch inpaint off.");
    }
    payload.mask = dataToBase64(painted);
    payload.mask_blur = number("mask_blur", "Mask blur", (v) => parseInt(v, 10));
    payload.inpaint_full_res = $("inpaint_full_res").checked;
  }
  return payload;
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  clearError();
  let payload;
  try {
    payload = buildPayload();
  } catch (err) {
    showError(err.message);
    return;
  }
  const run = ++state.run;
  const started = performance.now();
  const task = { id: `task(page-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)})`,
                 controller: new AbortController() };
  payload.force_task_id = task.id;
  state.task = task;
  state.interrupted = false;
  setBusy(true);
  $("progress-bar").value = 0;
  setStatus("Starting…");
  if (NARROW.matches) $("progress-bar").scrollIntoView({ block: "start", behavior: "smooth" });  // one column
  pollProgress(run, payload.n_iter, task.id);
  try {
    const result = await postJSON(`/${state.mode}`, payload, task.controller.signal);
    const added = showResults(result);
    $("progress-bar").value = 100;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const what = `${added} image${added === 1 ? "" : "s"} in ${seconds} s`;
    setStatus(state.interrupted || parseInfo(result.info).interrupted ? `Interrupted: ${what}` : `Done: ${what}`);
  } catch (err) {
    $("progress-bar").value = 0;
    if (task.controller.signal.aborted) {
      setStatus("Interrupted: withdrawn from the queue before it started");
    } else {
      setStatus(state.interrupted ? "Interrupted" : "Failed");
      showError(err.message);
    }
  } finally {
    state.task = null;
    state.run += 1;   // stops this run's poller
    setBusy(false);
    $("preview").hidden = true;
  }
}

async function interrupt() {
  if (!state.busy) return;
  state.interrupted = true;
  setStatus("Interrupting…");
  const task = state.task;
  const mine = task ? await taskState(task.id) : null;
  if (task && mine && mine.queued) {   // still waiting behind other jobs: withdraw it, stop nobody else's
    task.controller.abort();
    return;
  }
  try {
    await api("/interrupt", { method: "POST" });
  } catch (err) {
    showError(`Interrupt failed: ${err.message}`);
  }
}

// Load another checkpoint (the server switches after the requests queued before this one).
async function switchModel() {
  const select = $("sd_model_checkpoint");
  const wanted = select.value;
  clearError();
  setBusy(true, false);
  setStatus(`Loading ${wanted}…`);
  try {
    await postJSON("/options", { sd_model_checkpoint: wanted });
    await loadModels();
    setStatus(`Model ${$("sd_model_checkpoint").selectedOptions[0].textContent} loaded`);
  } catch (err) {
    select.value = state.model;
    setStatus("Model not changed");
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

// ---- live progress ---------------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// While the request waits behind other jobs the line says so; the server's /progress describes the running job,
// so it is read only once that job is this page's own.
async function pollProgress(run, batches, taskId) {
  for (let poll = 1; state.run === run; poll += 1) {
    await sleep(POLL_MS);
    if (state.run !== run) return;
    try {
      const mine = await taskState(taskId);
      if (mine && !mine.active) {
        if (mine.queued && !state.interrupted && state.run === run) setStatus(mine.textinfo);
        continue;
      }
      const progress = await api(`/progress?skip_current_image=${poll % PREVIEW_EVERY !== 2}`);
      if (state.run === run) showProgress(progress, batches);
    } catch (_) {
      // A missed poll is not an error worth showing; the request itself reports failures.
    }
  }
}

// `batches` is the request's n_iter: the server's job_no is the batch running, its job_count counts queued jobs.
function showProgress(p, batches) {
  const fraction = Math.max(0, Math.min(1, Number(p.progress) || 0));
  $("progress-bar").value = Math.round(fraction * 1000) / 10;
  const s = p.state || {};
  const parts = [];
  if (s.queue_pending > 0) parts.push(`${s.queue_pending} queued`);
  if (batches > 1) parts.push(`batch ${Math.min((s.job_no || 0) + 1, batches)}/${batches}`);
  if (s.sampling_steps) parts.push(`step ${s.sampling_step}/${s.sampling_steps}`);
  parts.push(`${Math.round(fraction * 100)}%`);
  if (p.eta_relative > 0) parts.push(`ETA ${p.eta_relative.toFixed(1)} s`);
  if (!state.interrupted) setStatus(parts.join(" · "));
  if (p.current_image) {
    $("preview").src = imageSrc(p.current_image);
    $("preview").hidden = false;
  }
}

// ---- results ---------------------------------------------------------------------------------------------

function showResults(result) {
  const added = gallery.addResponse(result);
  const info = parseInfo(result.info);
  if (info.seed !== undefined && info.seed !== null) {
    state.lastSeed = info.seed;
    $("seed-reuse").disabled = false;
  }
  return added;
}

// ---- img2img and the mask --------------------------------------------------------------------------------

function selectTab(mode) {
  state.mode = mode;
  for (const name of ["txt2img", "img2img"]) {
    $(`tab-${name}`).setAttribute("aria-selected", String(name === mode));
  }
  $("panel-img2img").hidden = mode !== "img2img";
  document.body.dataset.mode = mode;
}

function setInitImage(src) {
  const img = $("init-image");
  img.onload = () => {
    mask.resize(img.naturalWidth, img.naturalHeight);
    $("width").value = img.naturalWidth;
    $("height").value = img.naturalHeight;
    $("init-wrap").dataset.empty = "false";
  };
  img.onerror = () => showError("That file could not be read as an image.");
  img.src = src;
}

function sendToImg2img(src) {
  setInitImage(src);
  selectTab("img2img");
  $("panel-img2img").scrollIntoView({ block: "nearest" });
}

function loadInitFile() {
  const file = $("init-image-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.onerror = () => showError("That file could not be read.");
  reader.readAsDataURL(file);
}

function showInpaint() {
  document.body.classList.toggle("inpainting", $("inpaint").checked);
}

// ---- wiring ----------------------------------------------------------------------------------------------

function mirror(inputId) {
  const input = $(inputId);
  const output = $(`${inputId}-value`);
  const update = () => { output.textContent = input.value; };
  input.addEventListener("input", update);
  update();
}

function init() {
  $("gen-form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("tab-txt2img").addEventListener("click", () => selectTab("txt2img"));
  $("tab-img2img").addEventListener("click", () => selectTab("img2img"));
  $("error-close").addEventListener("click", clearError);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("init-image-file").addEventListener("change", loadInitFile);
  $("mask-clear").addEventListener("click", () => mask.clear());
  $("inpaint").addEventListener("change", showInpaint);
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("gen-form").requestSubmit();
    });
  }
  $("sd_model_checkpoint").addEventListener("change", switchModel);
  mirror("denoising_strength");
  mirror("brush-size");
  mirror("mask_blur");
  selectTab("txt2img");
  showInpaint();
  loadChoices();
}

// For tests and the console: the mask exactly as it would be sent (base64 PNG), null when empty.
window.ldmPage = { maskBase64: () => { const url = mask.toDataURL(); return url && dataToBase64(url); } };
init();
