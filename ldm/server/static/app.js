// The server's browser page: a thin client of the AUTOMATIC1111-style API under /sdapi/v1.
// Plain JavaScript, no build step, no external assets.
"use strict";

(() => {
  const API = "/sdapi/v1";
  const POLL_MS = 250;
  const PREVIEW_EVERY = 4;   // the preview image (large) on every 4th poll only, from the 2nd
  const MASK_COLOUR = "#ffffff";   // shown through mix-blend-mode: difference, visible on any image
  const PNG_PREFIX = "data:image/png;base64,";
  const NARROW = window.matchMedia("(max-width: 820px)");   // style.css's one-column layout

  const $ = (id) => document.getElementById(id);
  const state = {
    mode: "txt2img",
    busy: false,
    run: 0,              // increases with every request; a poller stops when it is no longer current
    interrupted: false,
    lastSeed: null,
    model: null,         // model_name of the checkpoint the server has loaded
    made: 0,             // images added to the gallery since the page was opened
    stroke: null,        // the last point of the mask stroke being painted
    maskPainted: false,
  };

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

  function postJSON(path, payload) {
    const headers = { "Content-Type": "application/json" };
    return api(path, { method: "POST", headers, body: JSON.stringify(payload) });
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
      const mask = maskBase64();
      if (!mask) {
        throw new Error("Inpaint is on but the mask is empty: paint over the part to repaint, or switch inpaint off.");
      }
      payload.mask = mask;
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
    state.interrupted = false;
    setBusy(true);
    $("progress-bar").value = 0;
    setStatus("Starting…");
    if (NARROW.matches) $("progress-bar").scrollIntoView({ block: "start", behavior: "smooth" });  // one column
    pollProgress(run, payload.n_iter);
    try {
      const result = await postJSON(`/${state.mode}`, payload);
      const added = addResults(result);
      $("progress-bar").value = 100;
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const what = `${added} image${added === 1 ? "" : "s"} in ${seconds} s`;
      setStatus(state.interrupted || parseInfo(result.info).interrupted ? `Interrupted: ${what}` : `Done: ${what}`);
    } catch (err) {
      $("progress-bar").value = 0;
      setStatus(state.interrupted ? "Interrupted" : "Failed");
      showError(err.message);
    } finally {
      state.run += 1;   // stops this run's poller
      setBusy(false);
      $("preview").hidden = true;
    }
  }

  async function interrupt() {
    if (!state.busy) return;
    state.interrupted = true;
    setStatus("Interrupting…");
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

  async function pollProgress(run, batches) {
    for (let poll = 1; state.run === run; poll += 1) {
      await sleep(POLL_MS);
      if (state.run !== run) return;
      try {
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
      $("preview").src = p.current_image.startsWith("data:") ? p.current_image : PNG_PREFIX + p.current_image;
      $("preview").hidden = false;
    }
  }

  // ---- the gallery -----------------------------------------------------------------------------------------

  function parseInfo(info) {
    if (!info) return {};
    if (typeof info === "object") return info;
    try { return JSON.parse(info); } catch (_) { return {}; }
  }

  // The parameters text of image i when the server sent no infotexts: built from `parameters`.
  function parametersText(params, seed) {
    const line = [
      `Steps: ${params.steps}`, `Sampler: ${params.sampler_name}`, `Schedule type: ${params.scheduler}`,
      `CFG scale: ${params.cfg_scale}`, `Seed: ${seed ?? params.seed}`, `Size: ${params.width}x${params.height}`,
    ];
    if (params.denoising_strength !== undefined) line.push(`Denoising strength: ${params.denoising_strength}`);
    const negative = params.negative_prompt ? `\nNegative prompt: ${params.negative_prompt}` : "";
    return `${params.prompt || ""}${negative}\n${line.join(", ")}`;
  }

  function addResults(result) {
    const info = parseInfo(result.info);
    const texts = info.infotexts || [];
    const seeds = info.all_seeds || [];
    const images = result.images || [];
    images.forEach((image, i) => {
      const text = texts[i] || parametersText(result.parameters || {}, seeds[i]);
      addGalleryItem(image, text, seeds[i] ?? info.seed);
    });
    if (info.seed !== undefined && info.seed !== null) {
      state.lastSeed = info.seed;
      $("seed-reuse").disabled = false;
    }
    return images.length;
  }

  function button(text, className, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = text;
    b.addEventListener("click", onClick);
    return b;
  }

  function addGalleryItem(image, text, seed) {
    state.made += 1;
    const number = state.made;
    const src = image.startsWith("data:") ? image : PNG_PREFIX + image;
    const figure = document.createElement("figure");
    figure.className = "card";
    figure.id = `image-${number}`;
    const img = document.createElement("img");
    img.className = "gallery-image";
    img.src = src;
    img.alt = `Image ${number}: ${text.split("\n")[0]}`;
    const caption = document.createElement("figcaption");
    const params = document.createElement("pre");
    params.className = "infotext";
    params.textContent = text;
    const actions = document.createElement("div");
    actions.className = "card-actions";
    actions.append(button("Send to img2img", "send-img2img secondary", () => sendToImg2img(src)));
    if (seed !== undefined && seed !== null) {
      actions.append(button("Use seed", "use-seed secondary", () => { $("seed").value = seed; }));
    }
    const download = document.createElement("a");
    download.className = "download";
    download.href = src;
    const seedPart = seed !== undefined && seed !== null ? `-${seed}` : "";
    download.download = `ldm-${String(number).padStart(5, "0")}${seedPart}.png`;
    download.textContent = "Download";
    actions.append(download);
    caption.append(params, actions);
    figure.append(img, caption);
    $("gallery").prepend(figure);
    $("gallery-count").textContent = String(state.made);
    $("gallery-empty").hidden = true;
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
      const canvas = $("mask-canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      clearMask();
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

  function maskContext() {
    return $("mask-canvas").getContext("2d", { willReadFrequently: true });
  }

  function clearMask() {
    const canvas = $("mask-canvas");
    maskContext().clearRect(0, 0, canvas.width, canvas.height);
    state.maskPainted = false;
  }

  function canvasPoint(event) {
    const canvas = $("mask-canvas");
    const box = canvas.getBoundingClientRect();
    return {
      x: (event.clientX - box.left) * (canvas.width / box.width),
      y: (event.clientY - box.top) * (canvas.height / box.height),
    };
  }

  function paintTo(point) {
    const ctx = maskContext();
    const from = state.stroke || point;
    ctx.strokeStyle = MASK_COLOUR;
    ctx.fillStyle = MASK_COLOUR;
    ctx.lineWidth = Number($("brush-size").value);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(point.x, point.y);
    ctx.stroke();
    state.stroke = point;
    state.maskPainted = true;
  }

  function startStroke(event) {
    if (!$("inpaint").checked || event.button !== 0) return;
    event.preventDefault();
    $("mask-canvas").setPointerCapture(event.pointerId);
    state.stroke = null;
    paintTo(canvasPoint(event));
  }

  function continueStroke(event) {
    if (state.stroke) paintTo(canvasPoint(event));
  }

  function endStroke() {
    state.stroke = null;
  }

  // The mask as the API wants it: a black and white PNG of the init image's size, white = repaint.
  // Null when nothing is painted.
  function maskBase64() {
    const canvas = $("mask-canvas");
    if (!state.maskPainted || canvas.width < 2) return null;
    const painted = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
    const out = document.createElement("canvas");
    out.width = canvas.width;
    out.height = canvas.height;
    const ctx = out.getContext("2d");
    const pixels = ctx.createImageData(out.width, out.height);
    let any = false;
    for (let i = 0; i < painted.length; i += 4) {
      const on = painted[i + 3] >= 128;
      any = any || on;
      const v = on ? 255 : 0;
      pixels.data[i] = v;
      pixels.data[i + 1] = v;
      pixels.data[i + 2] = v;
      pixels.data[i + 3] = 255;
    }
    if (!any) return null;
    ctx.putImageData(pixels, 0, 0);
    return dataToBase64(out.toDataURL("image/png"));
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
    $("mask-clear").addEventListener("click", clearMask);
    $("inpaint").addEventListener("change", showInpaint);
    const canvas = $("mask-canvas");
    canvas.addEventListener("pointerdown", startStroke);
    canvas.addEventListener("pointermove", continueStroke);
    canvas.addEventListener("pointerup", endStroke);
    canvas.addEventListener("pointercancel", endStroke);
    for (const id of ["prompt", "negative_prompt"]) {
      $(id).addEventListener("keydown", (event) => {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("gen-form").requestSubmit();
      });
    }
    $("sd_model_checkpoint").addEventListener("change", switchModel);
    mirror("denoising_strength");
    mirror("brush-size");
    selectTab("txt2img");
    showInpaint();
    loadChoices();
  }

  // For tests and the console: the mask exactly as it would be sent.
  window.ldmPage = { maskBase64 };
  document.addEventListener("DOMContentLoaded", init);
})();
