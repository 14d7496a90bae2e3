// The playground: submit a generation, follow its server-sent events, show the images, seed, manifest, timings.
// Every call sends the key as `Authorization: Bearer`, which is why events are read with fetch + a stream
// reader (EventSource cannot send headers) and images are fetched as blobs (an <img src> could not either).
// With an image (and a mask) chosen, the request goes as one multipart/form-data POST: the files as the parts
// `image` and `mask_image`, the other fields as a JSON part named `request` (docs/images.md).
// A refused request marks each control its problem's `errors[].field` names (controls are named as the API's
// fields) with the message beside it, and scrolls the first into view; the summary stays in the error box.
"use strict";

(() => {
  const KEY_STORE = "sdxl.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const STREAM_RETRIES = 5; // reconnects (resuming with Last-Event-ID) before falling back to long-polling
  const LOG_LIMIT = 300;
  const EXT = { "image/png": "png", "image/webp": "webp", "image/jpeg": "jpg" };
  const MODES = { inpaint: "inpainting", img2img: "image to image", text2img: "text to image" };
  const DEFAULT_SIZE = "1024";

  const $ = (id) => document.getElementById(id);
  const run = { id: null, objectUrls: [], previewUrl: null, sizeFromImage: false };

  class ApiError extends Error {
    constructor(status, detail, errors) {
      super(detail);
      this.status = status;
      this.errors = errors; // RFC 9457 problem extension: [{field, message, value}], else []
    }
  }

  function authHeaders(extra) {
    const headers = { Accept: "application/json", ...extra };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  // The problem details' `detail` (every API error has one) and its `errors`, else whatever can be said.
  async function problemOf(res) {
    try {
      const body = await res.json();
      if (body && typeof body.detail === "string") {
        const errors = Array.isArray(body.errors) ? body.errors.filter((e) => e && typeof e.field === "string") : [];
        return { detail: body.detail, errors };
      }
    } catch (_) {
      // not JSON: a proxy's page, say
    }
    return { detail: `HTTP ${res.status} ${res.statusText}`.trim(), errors: [] };
  }

  async function api(method, path, { body, headers } = {}) {
    const init = { method, headers: authHeaders(headers), cache: "no-store" };
    if (body instanceof FormData) {
      init.body = body; // the browser sets the multipart Content-Type with its boundary
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, init);
    if (!res.ok) {
      const problem = await problemOf(res);
      throw new ApiError(res.status, problem.detail, problem.errors);
    }
    return res;
  }

  // Server-sent events from a fetch response: yields {id, event, data} with data parsed as JSON.
  async function* sseEvents(res) {
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let fields = {};
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          let line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (data.length && fields.event) {
              let parsed = null;
              try {
                parsed = JSON.parse(data.join("\n"));
              } catch (_) {
                // skip it: the resource is read again at the end anyway
              }
              if (parsed) yield { id: fields.id || null, event: fields.event, data: parsed };
            }
            fields = {};
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue; // keep-alive comment
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (name === "data") data.push(val);
          else fields[name] = val;
        }
      }
    } finally {
      reader.cancel().catch(() => {}); // leaving early closes the connection
    }
  }

  // --- display -----------------------------------------------------------------------------------
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
    if (!message) clearFieldErrors();
  }

  // --- errors at their fields --------------------------------------------------------------------
  // The control for a problem's field: by name (`width`), else by its first part (`refiner.mode` -> `refiner`).
  function controlFor(field) {
    const els = $("generate-form").elements;
    for (const name of [field, field.split(".")[0]]) {
      const el = els.namedItem(name);
      if (el && !(el instanceof RadioNodeList)) return el;
    }
    return null;
  }

  function markField(el, message) {
    el.setAttribute("aria-invalid", "true");
    let note = document.getElementById(`${el.id}-error`);
    if (!note) {
      note = document.createElement("p");
      note.id = `${el.id}-error`;
      note.className = "field-error";
      el.after(note);
      const described = (el.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
      el.setAttribute("aria-describedby", [...described, note.id].join(" "));
    }
    note.textContent = note.textContent ? `${note.textContent}; ${message}` : message;
  }

  function clearField(el) {
    if (el.getAttribute("aria-invalid") !== "true") return;
    el.removeAttribute("aria-invalid");
    const note = document.getElementById(`${el.id}-error`);
    if (note) note.remove();
    const described = (el.getAttribute("aria-describedby") || "").split(" ").filter((id) => id && id !== `${el.id}-error`);
    if (described.length) el.setAttribute("aria-describedby", described.join(" "));
    else el.removeAttribute("aria-describedby");
  }

  function clearFieldErrors() {
    for (const el of $("generate-form").querySelectorAll('[aria-invalid="true"]')) clearField(el);
  }

  // Show a problem where it can be acted on: the summary in the error box, each field's message beside its
  // control, and the first marked control scrolled into view and focused (else the error box scrolled to).
  function showProblem(message, errors) {
    showError(message);
    clearFieldErrors();
    let first = null;
    for (const e of errors || []) {
      const el = controlFor(e.field);
      if (!el) continue;
      markField(el, e.message || "is invalid");
      if (!first) first = el;
    }
    if (first) {
      first.scrollIntoView({ block: "center" });
      first.focus({ preventScroll: true });
    } else if (message) {
      $("error").scrollIntoView({ block: "nearest" });
    }
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showProgress(gen) {
    const bar = $("progress");
    const p = gen.progress || {};
    $("run").dataset.state = gen.status;
    const total = p.total_steps || 0;
    if (gen.status === "queued" || (gen.status === "running" && !total)) {
      // indeterminate until the worker knows how many steps there are (total_steps is 0 until then)
      bar.removeAttribute("value");
      if (gen.status === "queued") {
        const pos = Number.isInteger(gen.queue_position) ? ` (position ${gen.queue_position + 1})` : "";
        setStatus(`Queued${pos} · waiting for a worker`);
      } else {
        setStatus(`Starting on a worker${p.stage && p.stage !== "queued" ? ` (${p.stage})` : ""}…`);
      }
      return;
    }
    bar.max = total || 1;
    bar.value = Math.min(p.step || 0, total || 1);
    if (gen.status === "running") {
      const eta = typeof p.eta_seconds === "number" && p.eta_seconds > 0 ? ` · about ${p.eta_seconds.toFixed(1)} s left` : "";
      setStatus(`Step ${p.step || 0} of ${total} · ${p.stage || "running"}${eta}`);
    } else if (gen.status === "succeeded") {
      bar.value = bar.max;
      const total_s = gen.timings && gen.timings.total;
      setStatus(typeof total_s === "number" ? `Done in ${total_s.toFixed(1)} s` : "Done");
    } else if (gen.status === "failed") {
      setStatus("Failed");
    } else if (gen.status === "canceled") {
      setStatus("Canceled");
    }
  }

  function logEvent(name, gen) {
    const log = $("event-log");
    const p = gen.progress || {};
    const li = document.createElement("li");
    li.dataset.event = name;
    li.textContent = `${new Date().toLocaleTimeString()}  ${name}  step ${p.step || 0}/${p.total_steps || 0}  ${p.stage || ""}`;
    log.append(li);
    while (log.children.length > LOG_LIMIT) log.firstElementChild.remove();
  }

  function clearResult() {
    for (const url of run.objectUrls) URL.revokeObjectURL(url);
    run.objectUrls = [];
    $("images").replaceChildren();
    $("previews").replaceChildren();
    $("previews-box").hidden = true;
    $("event-log").replaceChildren();
    $("facts").hidden = true;
    $("timings-box").hidden = true;
    $("manifest-box").hidden = true;
    $("manifest").textContent = "";
    $("timings").tBodies[0].replaceChildren();
    showError("");
  }

  async function showImages(gen) {
    const holder = $("images");
    const prompt = (gen.params && gen.params.prompt) || "";
    for (const img of gen.images || []) {
      const res = await api("GET", `/v1/generations/${gen.id}/images/${img.index}`, { headers: { Accept: "*/*" } });
      const url = URL.createObjectURL(await res.blob());
      run.objectUrls.push(url);
      const figure = document.createElement("figure");
      const el = document.createElement("img");
      el.alt = `Generated image ${img.index + 1}: ${prompt}`;
      el.width = img.width;
      el.height = img.height;
      el.dataset.index = img.index;
      el.dataset.seed = img.seed;
      el.src = url;
      const caption = document.createElement("figcaption");
      const link = document.createElement("a");
      link.href = url;
      link.download = `${gen.id}-${img.index}.${EXT[img.content_type] || "img"}`;
      link.textContent = "Download";
      caption.append(`Seed ${img.seed} · ${img.width}×${img.height} · `, link);
      figure.append(el, caption);
      holder.append(figure);
    }
  }

  function showFacts(gen) {
    $("gen-id").textContent = gen.id;
    const seeds = (gen.images || []).map((i) => i.seed);
    const seed = seeds.length ? seeds.join(", ") : gen.params && gen.params.seed;
    $("seed-out").textContent = seed === undefined || seed === null ? "" : String(seed);
    const params = gen.params || {};
    $("mode-out").textContent = MODES[params.mask_image ? "inpaint" : params.image ? "img2img" : "text2img"];
    $("facts").hidden = false;
    const body = $("timings").tBodies[0];
    body.replaceChildren();
    for (const [phase, value] of Object.entries(gen.timings || {})) {
      if (typeof value !== "number" || phase === "batch_images") continue;
      const row = body.insertRow();
      row.insertCell().textContent = phase;
      row.insertCell().textContent = value.toFixed(3);
    }
    $("timings-box").hidden = body.rows.length === 0;
    if (gen.manifest) {
      $("manifest").textContent = JSON.stringify(gen.manifest, null, 2);
      $("manifest-box").hidden = false;
    }
  }

  // A `generation.preview` event: the image as it denoises, inline (base64) or at a URL of this API; one per
  // image of the batch, each replaced by the next. The box folds away when the final images arrive.
  async function showLivePreview(p) {
    const holder = $("previews");
    let el = holder.querySelector(`img[data-index="${p.index}"]`);
    if (!el) {
      el = document.createElement("img");
      el.dataset.index = p.index;
      el.alt = `Live preview of image ${p.index + 1}`;
      holder.append(el);
    }
    let src = p.b64 ? `data:${p.content_type};base64,${p.b64}` : null;
    if (!src && p.url) {
      try {
        const res = await api("GET", p.url, { headers: { Accept: "*/*" } });
        src = URL.createObjectURL(await res.blob());
        run.objectUrls.push(src);
      } catch (_err) {
        return; // previews are best-effort: the next one may arrive
      }
    }
    if (!src) return;
    el.width = p.width;
    el.height = p.height;
    el.dataset.step = p.step;
    el.title = `Step ${p.step} of ${p.total_steps} (${p.stage})`;
    el.src = src;
    $("previews-box").hidden = false;
    $("previews-box").open = true;
  }

  // --- one generation ----------------------------------------------------------------------------
  async function follow(gen) {
    let lastId = null;
    for (let attempt = 0; attempt < STREAM_RETRIES; attempt++) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const res = await api("GET", `/v1/generations/${gen.id}/events`, { headers });
        if (res.status !== 204) {
          for await (const ev of sseEvents(res)) {
            if (ev.id) lastId = ev.id;
            if (ev.event === "generation.preview") {
              // its data is a preview, not the generation
              logEvent(ev.event, { progress: ev.data });
              showLivePreview(ev.data);
              continue;
            }
            gen = ev.data;
            logEvent(ev.event, gen);
            showProgress(gen);
            if (TERMINAL.has(gen.status)) return gen;
          }
        }
      } catch (err) {
        if (err instanceof ApiError) throw err;
        // the connection dropped: see where it stands, then resume after the last event
      }
      gen = await (await api("GET", `/v1/generations/${gen.id}`)).json();
      showProgress(gen);
      if (TERMINAL.has(gen.status)) return gen;
    }
    while (!TERMINAL.has(gen.status)) {
      gen = await (await api("GET", `/v1/generations/${gen.id}`, { headers: { Prefer: "wait=30" } })).json();
      showProgress(gen);
    }
    return gen;
  }

  function requestBody() {
    const num = (id) => ($(id).value.trim() === "" ? undefined : Number($(id).value));
    const body = {
      prompt: $("prompt").value,
      width: num("width"),
      height: num("height"),
      num_inference_steps: num("steps"),
      guidance_scale: num("guidance"),
      seed: num("seed"),
      num_images_per_prompt: num("images-count"),
      scheduler: $("scheduler").value,
      output_format: $("format").value,
    };
    if ($("previews-on").checked) body.previews = true;
    const negative = $("negative-prompt").value;
    if (negative.trim()) body.negative_prompt = negative;
    if ($("refiner").value) body.refiner = { mode: $("refiner").value };
    if (chosen("image")) body.strength = num("strength"); // the API refuses a strength without an image
    if ($("preset").value) {
      body.preset = $("preset").value;
      delete body.scheduler; // the preset's own
    }
    if ($("lora-name").value) body.loras = [{ name: $("lora-name").value, scale: num("lora-scale") ?? 1 }];
    for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
    return body;
  }

  // JSON without an image; with one, multipart: the files as parts, the fields as one JSON `request` part.
  function requestPayload() {
    const body = requestBody();
    const image = chosen("image");
    if (!image) return body;
    const form = new FormData();
    form.append("request", JSON.stringify(body));
    form.append("image", image, image.name);
    const mask = chosen("mask");
    if (mask) form.append("mask_image", mask, mask.name);
    return form;
  }

  // --- image inputs ------------------------------------------------------------------------------
  function chosen(id) {
    const files = $(id).files;
    return files && files.length ? files[0] : null;
  }

  function showPreview(file) {
    if (run.previewUrl) URL.revokeObjectURL(run.previewUrl);
    run.previewUrl = null;
    const thumb = $("image-thumb");
    thumb.removeAttribute("src");
    delete thumb.dataset.width;
    delete thumb.dataset.height;
    $("image-preview").hidden = !file;
    if (!file) return;
    run.previewUrl = URL.createObjectURL(file);
    $("image-info").textContent = file.name;
    thumb.onload = () => {
      // the size a browser shows is EXIF-oriented, as the service reads it
      thumb.dataset.width = thumb.naturalWidth;
      thumb.dataset.height = thumb.naturalHeight;
      $("image-info").textContent = `${file.name} · ${thumb.naturalWidth}×${thumb.naturalHeight}`;
    };
    thumb.onerror = () => {
      $("image-info").textContent = `${file.name} · not an image this browser can show`;
    };
    thumb.src = run.previewUrl;
  }

  // Choosing an image enables the mask and strength, and empties width and height so the output takes the
  // image's size (type a size to have the image resized); removing it puts the text-to-image defaults back.
  function imageChanged() {
    const image = chosen("image");
    for (const id of ["mask", "strength", "clear-image"]) $(id).disabled = !image;
    $("size-help").hidden = !image;
    for (const id of ["width", "height"]) {
      const el = $(id);
      if (image) {
        if (!run.sizeFromImage) el.value = "";
        el.placeholder = "image's";
      } else {
        if (el.value.trim() === "") el.value = DEFAULT_SIZE;
        el.placeholder = "";
      }
    }
    run.sizeFromImage = Boolean(image);
    if (!image) {
      $("mask").value = "";
      $("strength").value = "";
    }
    showPreview(image);
  }

  function clearImage() {
    $("image").value = "";
    imageChanged();
    $("image").focus();
  }

  function setBusy(busy) {
    $("generate").disabled = busy;
    $("cancel").disabled = !busy;
    $("generate-form").setAttribute("aria-busy", String(busy));
  }

  async function generate(event) {
    event.preventDefault();
    saveKey();
    if (!$("prompt").value.trim()) {
      showProblem("Enter a prompt.", [{ field: "prompt", message: "Enter a prompt: it is required." }]);
      return;
    }
    clearResult();
    setBusy(true);
    setStatus("Submitting…");
    try {
      const res = await api("POST", "/v1/generations", { body: requestPayload() });
      let gen = await res.json();
      run.id = gen.id;
      logEvent("submitted", gen);
      showProgress(gen);
      showFacts(gen); // the id and the resolved seed are known from the start
      gen = await follow(gen);
      if (gen.status === "succeeded") {
        showFacts(gen);
        await showImages(gen);
        $("previews-box").open = false; // the images themselves are here: the last previews stay, folded
      } else if (gen.status === "failed") {
        const err = gen.error || {};
        showProblem(`Generation failed: ${err.message || err.type || "unknown error"}`, []);
      }
    } catch (err) {
      setStatus("Stopped.");
      if (err instanceof ApiError) {
        // a key problem belongs to the key field, whatever the problem names
        const errors = err.status === 401 ? [{ field: "api-key", message: err.message }] : err.errors;
        showProblem(err.message, errors);
      } else {
        showProblem(`Cannot reach the service: ${err.message}`, []);
      }
    } finally {
      run.id = null;
      setBusy(false);
    }
  }

  async function cancel() {
    if (!run.id) return;
    $("cancel").disabled = true;
    try {
      await api("POST", `/v1/generations/${run.id}/cancel`);
      setStatus("Canceling…"); // the event stream reports when it has stopped
    } catch (err) {
      showProblem(err.message, []);
      $("cancel").disabled = false;
    }
  }

  function saveKey() {
    const key = $("api-key").value.trim();
    try {
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
    } catch (_) {
      // storage disabled (private mode): the key still works for this page
    }
  }

  // The service says whether it runs the tiny test model (random weights: noise), which nothing else shows.
  async function showModelNote() {
    try {
      const res = await fetch("/playground/config", { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!res.ok) return;
      const config = await res.json();
      $("model-note").hidden = config.tiny_model !== true;
    } catch (_) {
      // an older service without it, or unreachable: say nothing
    }
  }

  // --- adapters and presets (GET /v1/adapters; docs/adapters.md) ----------------------------------
  const adapters = { presets: new Map(), loras: new Map() };

  async function loadAdapters() {
    let listing;
    try {
      if (!$("api-key").value.trim()) {
        // without a key, only an open service answers: ask first rather than log a 401
        const res = await fetch("/playground/config", { headers: { Accept: "application/json" }, cache: "no-store" });
        if (!res.ok || (await res.json()).open !== true) return;
      }
      listing = await (await api("GET", "/v1/adapters")).json();
    } catch (_) {
      return; // a wrong key, or an older service: the pickers stay hidden
    }
    adapters.presets.clear();
    adapters.loras.clear();
    for (const a of listing.data || []) (a.kind === "preset" ? adapters.presets : adapters.loras).set(a.name, a);
    for (const [id, known] of [["preset", adapters.presets], ["lora-name", adapters.loras]]) {
      const select = $(id);
      const keep = select.value;
      select.replaceChildren(new Option("none", ""));
      for (const [name, a] of known) {
        const label = a.kind === "preset" ? `${name} (${a.steps} steps, ${a.scheduler})` : name;
        select.add(new Option(label, name));
      }
      select.value = known.has(keep) ? keep : "";
    }
    $("adapters").hidden = adapters.presets.size + adapters.loras.size === 0;
  }

  // A preset's steps and guidance become the form's (editable within its range); its scheduler replaces ours.
  function presetChanged() {
    const p = adapters.presets.get($("preset").value);
    $("scheduler").disabled = Boolean(p);
    if (!p) {
      $("steps").removeAttribute("max");
      $("steps").min = "1";
      return;
    }
    $("steps").value = String(p.steps);
    $("steps").min = String(p.steps_min);
    $("steps").max = String(p.steps_max);
    $("guidance").value = String(p.guidance_scale);
  }

  function loraChanged() {
    const a = adapters.loras.get($("lora-name").value);
    $("lora-scale").disabled = !a;
    if (a) {
      $("lora-scale").min = String(a.scale_min);
      $("lora-scale").max = String(a.scale_max);
    }
  }

  // Editing a marked control takes its mark away: the message was about the old value.
  function fieldEdited(event) {
    if (event.target instanceof Element && event.target.id) clearField(event.target);
  }

  function init() {
    try {
      $("api-key").value = localStorage.getItem(KEY_STORE) || "";
    } catch (_) {
      // storage disabled
    }
    $("api-key").addEventListener("change", saveKey);
    $("generate-form").addEventListener("submit", generate);
    $("cancel").addEventListener("click", cancel);
    $("image").addEventListener("change", imageChanged);
    $("clear-image").addEventListener("click", clearImage);
    $("generate-form").addEventListener("input", fieldEdited);
    $("generate-form").addEventListener("change", fieldEdited);
    imageChanged(); // a reload may keep a chosen file
    showModelNote();
    $("preset").addEventListener("change", presetChanged);
    $("lora-name").addEventListener("change", loraChanged);
    $("api-key").addEventListener("change", loadAdapters);
    loadAdapters();
  }

  init();
})();
