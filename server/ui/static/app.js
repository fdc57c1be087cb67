// The playground: the form, the input images and mask, the live results and the session history.
// Everything stays in this tab; the only requests are to this server's public API (and /ui/config.json,
// which describes the server).

import { ApiError, EXTENSIONS, STAGES, describeError, fetchJson, runImageRequest } from "./api.js";
import { MaskPainter } from "./mask.js";
import { curlCommand, pythonCode } from "./snippets.js";

const $ = (id) => document.getElementById(id);
// sessionStorage, not localStorage: the key survives a reload of this tab but is gone when the tab
// closes, and no other tab or later visitor of this browser profile sees it. The page's strict
// Content-Security-Policy keeps other scripts from running here to read it.
const KEY_STORAGE = "stepimage.apiKey";
const HISTORY_LIMIT = 30;

const state = {
  config: null,
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  inputs: [], // {blob, name, url, width, height}
  running: null, // AbortController of the request in flight
  lastSeed: null,
  history: [],
  nextEntry: 1,
};

const form = $("request-form");
const painter = new MaskPainter($("mask-canvas"), { onChange: showMaskStatus });

// -- small helpers --------------------------------------------------------------------------------

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function button(text, onclick, className = "secondary") {
  return element("button", { type: "button", class: className, text, onclick });
}

function blobFromBase64(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: `image/${format}` });
}

// File names travel into curl and Python snippets: keep them to characters no shell or form parser minds.
function safeName(name, fallback) {
  const cleaned = (name || "").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-.]+/, "");
  return cleaned || fallback;
}

async function copyText(text, what) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // navigator.clipboard exists only in secure contexts (https, localhost); over plain http on a LAN
    // address fall back to the older selection-based copy.
    const scratch = element("textarea", { class: "scratch", "aria-hidden": "true" });
    scratch.value = text;
    document.body.append(scratch);
    scratch.select();
    document.execCommand("copy");
    scratch.remove();
  }
  setStatus(`Copied ${what}.`);
}

function setStatus(text, { busy = false } = {}) {
  const status = $("status");
  status.replaceChildren(text);
  if (busy) status.append(element("progress", { "aria-label": "Working" }));
}

// -- the server's description and the key ---------------------------------------------------------

async function loadConfig() {
  for (;;) {
    try {
      state.config = await fetchJson("/ui/config.json");
      if (state.config.ready) break;
      $("model-status").textContent = "The model is loading…";
    } catch (error) {
      $("model-status").textContent = "Cannot reach the server; retrying…";
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  applyConfig(state.config);
}

function option(value, text = value) {
  return element("option", { value, text });
}

function applyConfig(config) {
  const fields = config.fields;
  const model = config.model || {};
  $("model-status").textContent = `Model ${config.model_name}` + (model.backend ? ` (${model.backend} backend)` : "");
  // The same warning the server logs at start-up: nobody should mistake the noise for a broken model.
  if (model.random_weights) {
    const notes = model.notes?.length ? model.notes.join("; ") : "this model has random weights: its images are noise";
    $("model-notice").textContent = `${notes.charAt(0).toUpperCase()}${notes.slice(1)}.`;
    $("model-notice").hidden = false;
  }
  $("size").replaceChildren(...config.sizes.map((size) => option(size)));
  $("size").value = config.default_size;
  $("output-format").replaceChildren(...fields.output_format.enum.map((format) => option(format)));
  $("output-format").value = fields.output_format.default;
  $("seed").max = fields.seed.maximum;
  for (const [id, name] of [["steps", "steps"], ["cfg-scale", "cfg_scale"]]) {
    $(id).min = fields[name].minimum;
    $(id).max = fields[name].maximum;
    $(id).value = fields[name].default;
  }
  $("n").max = config.max_n;
  const most = fields.partial_images.maximum;
  const choices = [option("0", "Off")];
  for (let count = 1; count <= most; count += 1) choices.push(option(String(count), `${count} per image`));
  $("partial-images").replaceChildren(...choices);
  $("partial-images").value = String(Math.min(2, most));
  updateMode();
  $("submit").disabled = false;
  if (config.keys_required && !state.key) askForKey();
  else if (config.keys_required) checkKey();
}

function askForKey(message = "") {
  $("key-panel").hidden = false;
  $("key-message").textContent = message;
  $("forget-key").hidden = true;
  $("api-key").focus();
}

// A key is checked against /v1/models, which takes the same key as the image endpoints.
async function checkKey() {
  try {
    await fetchJson("/v1/models", state.key);
    $("key-panel").hidden = true;
    $("forget-key").hidden = false;
    return true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      forgetKey();
      askForKey(describeError(error));
    } else {
      setStatus(describeError(error));
    }
    return false;
  }
}

function forgetKey() {
  state.key = "";
  sessionStorage.removeItem(KEY_STORAGE);
  $("forget-key").hidden = true;
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  $("api-key").value = "";
  if (!state.key) return askForKey("Enter the key the server's operator gave you.");
  sessionStorage.setItem(KEY_STORAGE, state.key);
  if (await checkKey()) {
    setStatus("Key accepted.");
    $("prompt").focus();
  }
});

$("forget-key").addEventListener("click", () => {
  forgetKey();
  askForKey();
});

// -- mode and input images ------------------------------------------------------------------------

function mode() {
  return form.elements.mode.value;
}

function setMode(value) {
  form.elements.mode.value = value;
  updateMode();
}

function updateMode() {
  const editing = mode() === "edit";
  $("submit").textContent = editing ? "Edit" : "Generate";
  $("inputs").hidden = !editing;
  $("size-field").hidden = editing;
  $("edit-size-note").hidden = !editing;
  // The mask is painted at the first image's size, so it needs a picture this browser can show.
  $("mask-editor").hidden = !editing || !state.inputs[0]?.width;
}

for (const radio of form.elements.mode) radio.addEventListener("change", updateMode);

function imageSize(url) {
  return new Promise((resolve, reject) => {
    const probe = new Image();
    probe.onload = () => resolve({ width: probe.naturalWidth, height: probe.naturalHeight });
    probe.onerror = () => reject(new Error("not an image this browser can read"));
    probe.src = url;
  });
}

async function addInputs(blobs, { replace = false } = {}) {
  const added = [];
  const skipped = [];
  for (const blob of blobs) {
    if (!blob.type.startsWith("image/")) {
      skipped.push(blob.name || "a file");
      continue;
    }
    const url = URL.createObjectURL(blob);
    let size = { width: 0, height: 0 };
    try {
      size = await imageSize(url);
    } catch {
      // The server decides what it can read (it knows more formats than some browsers); send it anyway.
    }
    const fallback = `image-${state.inputs.length + added.length + 1}.${EXTENSIONS[blob.type.slice(6)] || "png"}`;
    added.push({ blob, url, name: safeName(blob.name, fallback), ...size });
  }
  if (skipped.length) setStatus(`Not an image, so not added: ${skipped.join(", ")}.`);
  if (!added.length) return;
  const firstChanged = replace || !state.inputs.length;
  if (replace) releaseInputs();
  state.inputs = [...state.inputs, ...added];
  // The same name twice would make the curl and Python snippets ambiguous.
  const seen = new Set();
  for (const input of state.inputs) {
    let name = input.name;
    for (let copy = 2; seen.has(name); copy += 1) name = input.name.replace(/(\.[^.]*)?$/, `-${copy}$1`);
    input.name = name;
    seen.add(name);
  }
  if (firstChanged) resetMask();
  setMode("edit");
  renderInputs();
}

function releaseInputs() {
  // Object URLs still shown in the history stay alive; only the input list's own ones are revoked.
  for (const input of state.inputs) if (!input.inHistory) URL.revokeObjectURL(input.url);
  state.inputs = [];
}

function removeInput(index) {
  const [removed] = state.inputs.splice(index, 1);
  if (!removed.inHistory) URL.revokeObjectURL(removed.url);
  if (index === 0) resetMask();
  renderInputs();
}

function renderInputs() {
  const items = state.inputs.map((input, index) =>
    element("li", { class: "input-item" }, [
      element("img", { src: input.url, alt: `Input image ${index + 1}: ${input.name}` }),
      element("span", {
        text: `${index === 0 ? "Edited" : "Reference"} · ${input.name}${input.width ? ` · ${input.width}x${input.height}` : ""}`,
      }),
      button(`Remove ${input.name}`, () => removeInput(index)),
    ]),
  );
  $("input-list").replaceChildren(...items);
  updateMode();
}

function resetMask() {
  const first = state.inputs[0];
  if (!first) return;
  $("mask-image").src = first.url;
  painter.reset(first.width || 1, first.height || 1);
}

function showMaskStatus(fraction) {
  $("mask-status").textContent = fraction
    ? `Mask: ${(fraction * 100).toFixed(1)}% of the image will change; the rest is kept.`
    : "No mask: the whole image may change.";
}

$("image-input").addEventListener("change", async (event) => {
  await addInputs([...event.target.files]);
  event.target.value = "";
});
$("brush-size").addEventListener("input", (event) => (painter.brush = Number(event.target.value)));
$("brush-erase").addEventListener("change", (event) => (painter.erase = event.target.checked));
$("mask-clear").addEventListener("click", () => painter.clear());

// Files may be dropped anywhere on the page (a drop the page ignored would make the browser open the file
// in place of the page, and the session with it); they become input images, in edit mode.
const dropZone = $("inputs");
const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
document.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dropZone.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.target === document.documentElement || event.target === dropZone) dropZone.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dropZone.classList.remove("dragging");
  addInputs([...event.dataTransfer.files]);
});
// Pasting an image anywhere adds it; pasting text into a text box stays ordinary pasting.
document.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData?.files || [])].filter((file) => file.type.startsWith("image/"));
  if (!files.length) return;
  event.preventDefault();
  addInputs(files);
});

// -- seed -----------------------------------------------------------------------------------------

$("seed-random").addEventListener("click", () => {
  $("seed").value = "";
  $("seed").focus();
});
$("seed-reuse").addEventListener("click", () => {
  if (state.lastSeed !== null) $("seed").value = state.lastSeed;
});

function rememberSeed(seed) {
  state.lastSeed = seed;
  $("seed-reuse").disabled = false;
  $("seed-reuse").textContent = `Reuse ${seed}`;
}

$("output-format").addEventListener("change", () => {
  $("quality-field").hidden = $("output-format").value === "png";
});

// -- the request ----------------------------------------------------------------------------------

// The fields the page sends, in the order snippets show them. Empty optional boxes are left out so the
// server's defaults apply; everything else goes as typed, and the server's validation has the last word
// (its messages are the ones a script would see).
function collectFields() {
  const value = (id) => $(id).value.trim();
  const number = (id) => (value(id) === "" ? undefined : Number(value(id)));
  const fields = {
    model: state.config.model_name,
    prompt: $("prompt").value,
    negative_prompt: value("negative-prompt") ? $("negative-prompt").value : undefined,
    seed: number("seed"),
    steps: number("steps"),
    cfg_scale: number("cfg-scale"),
    text_mode: $("text-mode").checked,
    size: mode() === "generate" ? value("size") : undefined,
    n: number("n"),
    response_format: "b64_json",
    output_format: value("output-format"),
    output_compression: value("output-format") === "png" ? undefined : number("output-compression"),
  };
  const partials = Number(value("partial-images"));
  if (partials > 0) {
    fields.stream = true;
    fields.partial_images = partials;
  }
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
}

async function buildSpec() {
  const spec = { mode: mode(), fields: collectFields(), images: [], mask: null };
  if (spec.mode === "edit") {
    spec.images = state.inputs.map((input) => ({ ...input }));
    for (const input of state.inputs) input.inHistory = true;
    const maskBlob = state.inputs.length ? await painter.toBlob() : null;
    if (maskBlob) spec.mask = { blob: maskBlob, name: "mask.png", url: URL.createObjectURL(maskBlob) };
  }
  return spec;
}

function clearFieldErrors() {
  for (const invalid of form.querySelectorAll("[aria-invalid]")) invalid.removeAttribute("aria-invalid");
  $("error").hidden = true;
  $("error").replaceChildren();
}

function showError(error) {
  const box = $("error");
  box.replaceChildren(element("p", { text: describeError(error) }));
  if (error.requestId) box.append(element("p", { class: "hint", text: `Request id ${error.requestId}` }));
  box.hidden = false;
  const field = error.param && form.querySelector(`[name="${CSS.escape(error.param)}"]`);
  if (field) {
    field.setAttribute("aria-invalid", "true");
    field.setAttribute("aria-describedby", "error");
    field.focus();
  }
  if (error instanceof ApiError && error.status === 401) {
    forgetKey();
    askForKey(describeError(error));
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    send();
  }
});
$("cancel").addEventListener("click", () => state.running?.abort());

async function send() {
  if (state.running || !state.config) return;
  if (state.config.keys_required && !state.key) return askForKey("Enter the API key first.");
  clearFieldErrors();
  const spec = await buildSpec();
  const entry = { number: state.nextEntry++, spec, started: new Date(), results: [], error: null, timings: {} };
  const controller = new AbortController();
  state.running = controller;
  $("submit").disabled = true;
  $("cancel").hidden = false;
  const started = performance.now();
  const verb = spec.mode === "edit" ? "Editing" : "Generating";
  const tick = () => setStatus(`${verb}… ${((performance.now() - started) / 1000).toFixed(1)} s`, { busy: true });
  tick();
  const timer = setInterval(tick, 200);
  const previews = new Map();
  $("results").replaceChildren();
  // On a phone the results sit below the form: bring them into view.
  if ($("output-title").getBoundingClientRect().top > window.innerHeight) $("output-title").scrollIntoView();
  try {
    const outcome = await runImageRequest(spec, {
      key: state.key,
      signal: controller.signal,
      onPartial: (partial) => {
        entry.firstPreviewMs ??= performance.now() - started;
        showPartial(previews, partial, spec.fields.n || 1);
      },
    });
    entry.elapsedMs = performance.now() - started;
    entry.results = outcome.images.map((image) => ({ ...image, blob: blobFromBase64(image.b64, image.format) }));
    for (const result of entry.results) {
      result.url = URL.createObjectURL(result.blob);
      delete result.b64;
    }
    entry.timings = outcome.timings;
    entry.usage = outcome.usage;
    entry.requestId = outcome.requestId;
    rememberSeed(entry.results[0].seed);
    renderResults(entry);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`Done in ${seconds} s: ${entry.results.length} image${entry.results.length === 1 ? "" : "s"}.`);
  } catch (error) {
    if (error.name === "AbortError") {
      entry.error = "Cancelled.";
      setStatus("Cancelled: the server stops the work at its next step.");
      $("results").replaceChildren();
    } else {
      entry.error = describeError(error);
      entry.requestId = error.requestId;
      setStatus("The request failed.");
      $("results").replaceChildren();
      showError(error);
    }
  } finally {
    clearInterval(timer);
    for (const preview of previews.values()) URL.revokeObjectURL(preview.url);
    state.running = null;
    $("submit").disabled = false;
    $("cancel").hidden = true;
    addHistory(entry);
  }
}

function showPartial(previews, partial, total) {
  let preview = previews.get(partial.index);
  if (!preview) {
    const img = element("img", { class: "preview" });
    const caption = element("figcaption");
    preview = { img, caption, url: null };
    previews.set(partial.index, preview);
    $("results").append(element("figure", { class: "result partial" }, [img, caption]));
  }
  if (preview.url) URL.revokeObjectURL(preview.url);
  preview.url = URL.createObjectURL(blobFromBase64(partial.b64, partial.format));
  preview.img.src = preview.url;
  const which = total > 1 ? ` of image ${partial.index + 1}` : "";
  preview.img.alt = `Preview ${partial.partialIndex + 1}${which}, still being made`;
  preview.caption.textContent = `Preview ${partial.partialIndex + 1}${which} · seed ${partial.seed}`;
}

// -- results --------------------------------------------------------------------------------------

// The server's stage timings (its server-timing header, or a streamed response's completed event) as a bar and
// a list; for a stream also when the first preview arrived, as the page measured it.
function timingView(entry) {
  const timings = entry.timings;
  const total = timings.total;
  const measured = [`done after ${(entry.elapsedMs / 1000).toFixed(2)} s`];
  if (entry.firstPreviewMs !== undefined) measured.unshift(`first preview after ${(entry.firstPreviewMs / 1000).toFixed(2)} s`);
  if (!total) {
    return element("div", { class: "timing" }, [
      element("p", { class: "timing-title", text: "Time measured by the page" }),
      element("p", { class: "hint", text: `${measured.join(", ")}; the server sent no stage timings.` }),
    ]);
  }
  const bar = element("div", { class: "timing-bar", "aria-hidden": "true" });
  const list = element("dl", { class: "timing-list" });
  for (const stage of [...STAGES, "total"]) {
    if (timings[stage] === undefined) continue;
    list.append(element("dt", { text: stage }), element("dd", { text: `${timings[stage].toFixed(1)} ms` }));
    if (stage === "total") continue;
    const part = element("span", { class: `stage stage-${stage}`, title: stage });
    part.style.width = `${(100 * timings[stage]) / total}%`;
    bar.append(part);
  }
  const parts = [element("p", { class: "timing-title", text: "Server time" }), bar, list];
  if (entry.firstPreviewMs !== undefined) parts.push(element("p", { class: "hint", text: `In this page: ${measured.join(", ")}.` }));
  return element("div", { class: "timing" }, parts);
}

// What the model processed, as the response's usage reports it (tokens: 16x16-pixel patches for images).
function usageView(usage) {
  if (!usage) return null;
  const details = usage.input_tokens_details || {};
  const input = details.text_tokens === undefined
    ? `${usage.input_tokens}`
    : `${usage.input_tokens} (text ${details.text_tokens}, image ${details.image_tokens})`;
  return element("p", { class: "hint usage", text: `Tokens: input ${input}, output ${usage.output_tokens}.` });
}

function resultAlt(entry, result, index) {
  const count = entry.results.length;
  return `Result ${index + 1} of ${count}, seed ${result.seed}: ${entry.spec.fields.prompt.slice(0, 80)}`;
}

function editResult(entry, result) {
  const name = `result-${result.seed}.${EXTENSIONS[result.format] || "png"}`;
  addInputs([new File([result.blob], name, { type: result.blob.type })], { replace: true });
  $("prompt").focus();
  setStatus(`Result with seed ${result.seed} is the new input image: describe the next change.`);
}

function renderResults(entry) {
  const cards = entry.results.map((result, index) => {
    const seed = String(result.seed);
    const name = `result-${seed}.${EXTENSIONS[result.format] || "png"}`;
    return element("figure", { class: "result" }, [
      element("img", { src: result.url, alt: resultAlt(entry, result, index) }),
      element("figcaption", {}, [
        element("p", { class: "seed-line" }, [
          "Seed ",
          element("code", { class: "seed-value", text: seed }),
          button("Copy seed", () => copyText(seed, `seed ${seed}`)),
          button("Use seed", () => ($("seed").value = seed)),
        ]),
        timingView(entry),
        usageView(entry.usage),
        element("p", { class: "result-actions" }, [
          button("Edit this result", () => editResult(entry, result), "primary"),
          element("a", { href: result.url, download: name, class: "button secondary", text: "Download" }),
        ]),
      ]),
    ]);
  });
  $("results").replaceChildren(...cards);
}

// -- history --------------------------------------------------------------------------------------

// The request as a snippet reproduces it: a server-drawn seed is written in, so the code makes the same images.
function snippetSpec(entry) {
  const sent = entry.spec.fields;
  if (sent.seed !== undefined || !entry.results.length) return entry.spec;
  // Written where a typed seed would have been, right after the prompts.
  const fields = {};
  for (const [name, value] of Object.entries(sent)) {
    if (name !== "model" && name !== "prompt" && name !== "negative_prompt" && fields.seed === undefined) {
      fields.seed = entry.results[0].seed;
    }
    fields[name] = value;
  }
  return { ...entry.spec, fields };
}

function describeFields(fields) {
  const shown = ["seed", "steps", "cfg_scale", "text_mode", "size", "n", "output_format", "output_compression",
    "partial_images"];
  return shown.filter((name) => fields[name] !== undefined).map((name) => `${name}=${fields[name]}`).join(", ");
}

function restore(entry) {
  const fields = entry.spec.fields;
  $("prompt").value = fields.prompt;
  $("negative-prompt").value = fields.negative_prompt || "";
  $("seed").value = fields.seed ?? "";
  $("steps").value = fields.steps ?? "";
  $("cfg-scale").value = fields.cfg_scale ?? "";
  $("text-mode").checked = Boolean(fields.text_mode);
  if (fields.size) $("size").value = fields.size;
  $("n").value = fields.n ?? 1;
  $("output-format").value = fields.output_format;
  $("output-compression").value = fields.output_compression ?? "";
  $("quality-field").hidden = fields.output_format === "png";
  $("partial-images").value = String(fields.partial_images || 0);
  if (entry.spec.mode === "edit") {
    state.inputs = entry.spec.images.map((image) => ({ ...image, inHistory: true }));
    resetMask();
    renderInputs();
  }
  setMode(entry.spec.mode);
  $("prompt").focus();
  setStatus(`Settings of request #${entry.number} restored.`);
}

// Object URLs of entries that fall off the history, unless the input list or a kept entry still shows them.
function releaseEntries(dropped) {
  const kept = new Set(state.inputs.map((input) => input.url));
  for (const entry of state.history) for (const file of entryFiles(entry)) kept.add(file.url);
  for (const entry of dropped) {
    for (const file of [...entryFiles(entry), ...entry.results]) if (!kept.has(file.url)) URL.revokeObjectURL(file.url);
  }
}

function entryFiles(entry) {
  return [...entry.spec.images, entry.spec.mask].filter(Boolean);
}

function addHistory(entry) {
  state.history.unshift(entry);
  releaseEntries(state.history.splice(HISTORY_LIMIT));
  const context = { origin: location.origin, keysRequired: state.config.keys_required };
  const spec = snippetSpec(entry);
  const curl = curlCommand(spec, context);
  const python = pythonCode(spec, context);
  const fields = entry.spec.fields;
  const title = `#${entry.number} ${entry.spec.mode === "edit" ? "Edit" : "Text to image"} · ${entry.started.toLocaleTimeString()}`;
  const files = entryFiles(entry);
  const item = element("li", { class: `history-item ${entry.error ? "failed" : "ok"}` }, [
    element("h3", { text: title }),
    element("p", { class: "history-prompt", text: fields.prompt }),
    element("p", { class: "hint history-params", text: describeFields(fields) }),
    // The id the server logged the request under, to find it in the server's log.
    entry.requestId ? element("p", { class: "hint", text: `Request id ${entry.requestId}` }) : null,
    entry.error ? element("p", { class: "history-error", text: entry.error }) : null,
    entry.results.length
      ? element(
          "div",
          { class: "history-thumbs" },
          entry.results.map((result, index) =>
            element("img", { src: result.url, alt: resultAlt(entry, result, index), loading: "lazy" }),
          ),
        )
      : null,
    files.length
      ? element("p", { class: "hint history-files" }, [
          "Input files: ",
          ...files.flatMap((file, index) => [
            index ? ", " : "",
            element("a", { href: file.url, download: file.name, text: file.name }),
          ]),
        ])
      : null,
    element("p", { class: "history-actions" }, [
      button("Use these settings", () => restore(entry)),
      button("Copy as curl", () => copyText(curl, "the curl command")),
      button("Copy as Python", () => copyText(python, "the Python code")),
    ]),
    element("details", {}, [
      element("summary", { text: "Show code" }),
      element("pre", { class: "code code-curl", text: curl }),
      element("pre", { class: "code code-python", text: python }),
    ]),
  ]);
  $("history").prepend(item);
  while ($("history").children.length > HISTORY_LIMIT) $("history").lastElementChild.remove();
  $("history-empty").hidden = true;
}

loadConfig();
