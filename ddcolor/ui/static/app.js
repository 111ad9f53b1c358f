// DDColor playground page: vanilla JS, no external resources. Talks to /api/models, /api/samples, /api/colorize.
"use strict";

const state = {
  catalogue: null,       // GET /api/models
  images: [],            // [{name, file}] in upload order
  selected: [],          // model specs, in the order they were ticked
  custom: [],            // specs typed by the user: [{id, label, kind: "custom"}]
  run: null,             // {images: [name], models: [spec], cells: {"i|spec": result}, inputs: {i: dataURL}, info: {spec: model}}
};

const $ = (id) => document.getElementById(id);
const METRICS = ["fid", "colorfulness", "delta_colorfulness", "psnr", "lpips"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(child));
  }
  return node;
}

function megabytes(bytes) { return (bytes / 1e6).toFixed(1) + " MB"; }

// --- errors and status -----------------------------------------------------------------------------------
function showError(message) {
  const box = $("errors");
  for (const p of box.children) if (p.textContent === message) return;  // the same file fails for every model
  box.append(el("p", {class: "error", text: message}));
}
function clearErrors() { $("errors").replaceChildren(); }
function setStatus(text) { $("status").textContent = text; }

async function readJson(response) {
  const text = await response.text();
  try { return JSON.parse(text); } catch { return {error: `HTTP ${response.status}: ${text.slice(0, 200) || response.statusText}`}; }
}

// --- catalogue -------------------------------------------------------------------------------------------
async function loadCatalogue() {
  const response = await fetch("/api/models");
  const data = await readJson(response);
  if (!response.ok) { showError(`cannot load the model list: ${data.error}`); return; }
  state.catalogue = data;
  renderRegistryStatus();
  renderSizes();
  renderSamples();
  renderModels();
  $("upload-limit").textContent = `up to ${data.max_files} files, ${megabytes(data.max_upload_bytes)} each`;
}

function renderRegistryStatus() {
  const reg = state.catalogue.registry;
  const status = $("registry-status");
  if (reg.error) {
    status.textContent = `registry: ${reg.error}`;
    status.className = "muted";
    return;
  }
  const aliases = Object.entries(reg.aliases).map(([a, v]) => `${a} = v${v}`).join(", ") || "no aliases";
  status.textContent = `registry: ${reg.model_name} at ${reg.tracking_uri}: ${reg.versions.length} version(s), ${aliases}`;
}

function renderSizes() {
  const select = $("size");
  select.replaceChildren(...state.catalogue.input_sizes.map((s) => el("option", {value: s, text: String(s)})));
  select.value = String(state.catalogue.default_input_size);
  if (!select.value) select.selectedIndex = 0;
}

function renderSamples() {
  const box = $("samples");
  box.replaceChildren(el("span", {class: "muted", text: "samples:"}));
  for (const name of state.catalogue.samples) {
    box.append(el("button", {type: "button", "data-sample": name, text: name, onclick: () => addSample(name)}));
  }
}

const KIND_TITLES = {alias: "Registry aliases", version: "Registered versions", release: "Official releases",
  checkpoint: "Checkpoint files", random: "Random init (no weights)", custom: "Added by you"};

function allModels() { return [...(state.catalogue?.models || []), ...state.custom]; }
function modelById(id) { return allModels().find((m) => m.id === id); }

function renderModels() {
  const box = $("models");
  box.replaceChildren();
  let kind = null;
  for (const model of allModels()) {
    if (model.kind !== kind) { kind = model.kind; box.append(el("div", {class: "group", text: KIND_TITLES[kind] || kind})); }
    const checkbox = el("input", {type: "checkbox", value: model.id, "data-kind": model.kind,
      disabled: model.available === false, checked: state.selected.includes(model.id)});
    checkbox.addEventListener("change", () => toggleModel(model.id, checkbox.checked));
    const classes = [model.available === false ? "disabled" : "", model.random_init ? "random" : ""].join(" ");
    box.append(el("label", {class: classes, title: model.note || model.id},
      checkbox, el("span", {}, model.label, model.note && model.available === false ? el("small", {text: model.note}) : null)));
  }
  if (!allModels().length) box.append(el("p", {class: "muted", text: "no models available"}));
}

function toggleModel(id, on) {
  state.selected = state.selected.filter((s) => s !== id);
  if (on) state.selected.push(id);
  renderModelInfo();
}

function addCustomModel() {
  const input = $("custom-model");
  const spec = input.value.trim();
  if (!spec) return;
  if (!modelById(spec)) {
    state.custom.push({id: spec, label: spec, kind: "custom", available: true, random_init: spec.startsWith("random-init:")});
  }
  if (!state.selected.includes(spec)) state.selected.push(spec);
  input.value = "";
  renderModels();
  renderModelInfo();
}

// --- model info cards ------------------------------------------------------------------------------------
function registryVersion(version) {
  return (state.catalogue?.registry.versions || []).find((v) => v.version === String(version));
}

function versionOf(spec) {
  const model = modelById(spec);
  if (model?.version) return model.version;
  const info = state.run?.info[spec];
  return info?.version || null;
}

function isRandom(spec) {
  return Boolean(modelById(spec)?.random_init || state.run?.info[spec]?.random_init || spec.startsWith("random-init:"));
}

function gateBadge(gate) {
  if (!gate) return el("span", {class: "badge none", text: "no gate decision"});
  return el("span", {class: `badge ${gate.passed ? "pass" : "fail"}`, text: gate.passed ? "gate PASSED" : "gate FAILED"});
}

function modelCard(spec) {
  const model = modelById(spec) || {label: spec};
  const label = state.run?.info[spec]?.label || model.label;
  const card = el("div", {class: "card" + (isRandom(spec) ? " random" : ""), "data-model": spec});
  card.append(el("h3", {text: label}));
  if (isRandom(spec)) {
    card.append(el("span", {class: "badge random", text: "RANDOM-INIT: meaningless colors"}));
    return card;
  }
  const version = versionOf(spec);
  const mv = version ? registryVersion(version) : null;
  if (!mv) {
    card.append(el("div", {class: "muted", text: model.note || (version ? `version ${version}` : "not from the registry: no metrics")}));
    return card;
  }
  card.append(gateBadge(mv.gate), " ", el("span", {class: "muted", text: mv.aliases.length ? `@${mv.aliases.join(", @")}` : ""}));
  const rank = (name) => (METRICS.includes(name) ? METRICS.indexOf(name) : METRICS.length);  // known metrics first
  const rows = Object.keys(mv.metrics).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const table = el("table", {class: "metrics"});
  for (const name of rows) table.append(el("tr", {}, el("td", {text: name}), el("td", {text: Number(mv.metrics[name]).toPrecision(4)})));
  if (!rows.length) table.append(el("tr", {}, el("td", {text: "no metric.* tags on this version"}), el("td")));
  card.append(table);
  if (mv.gate && mv.gate.checks.length) {
    const details = el("details", {}, el("summary", {text: `gate checks${mv.gate.champion_version ? ` (vs champion v${mv.gate.champion_version})` : ""}`}));
    for (const check of mv.gate.checks) details.append(el("div", {text: `${check.passed ? "pass" : "FAIL"} ${check.name}: ${check.reason}`}));
    card.append(details);
  }
  if (mv.model_card) {
    const doc = el("details", {class: "model-card"}, el("summary", {text: "model card"}));
    doc.append(el("pre", {class: "model-card-text", text: mv.model_card}));
    card.append(doc);
  }
  if (mv.run_url) card.append(el("div", {}, el("a", {class: "run-link", href: mv.run_url, target: "_blank", rel: "noopener", text: `MLflow run ${mv.run_id.slice(0, 8)}`})));
  else if (mv.run_hint) card.append(el("div", {class: "muted"}, "run ", el("code", {text: mv.run_id}), ": ", el("code", {class: "run-hint", text: mv.run_hint})));
  return card;
}

function renderModelInfo() {
  const specs = state.selected;
  $("model-info").replaceChildren(...specs.map(modelCard));
  $("random-warning").hidden = !specs.some(isRandom);
}

// --- images ----------------------------------------------------------------------------------------------
function addFiles(files) {
  for (const file of files) state.images.push({name: file.name, file});
  renderImages();
}

async function addSample(name) {
  const response = await fetch(`/api/samples/${encodeURIComponent(name)}`);
  if (!response.ok) { showError(`sample ${name}: ${(await readJson(response)).error}`); return; }
  const blob = await response.blob();
  addFiles([new File([blob], `${name}.png`, {type: "image/png"})]);
}

function renderImages() {
  const list = $("image-list");
  list.replaceChildren(...state.images.map((image, i) => el("li", {},
    el("span", {title: image.name, text: `${image.name} (${megabytes(image.file.size)})`}),
    el("button", {type: "button", "aria-label": `remove ${image.name}`, text: "×",
      onclick: () => { state.images.splice(i, 1); renderImages(); }}))));
}

function setupDrop() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => { addFiles(event.target.files); event.target.value = ""; });
  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => addFiles(e.dataTransfer.files));
}

// --- colorize --------------------------------------------------------------------------------------------
async function colorizeWith(spec, images, size) {
  const form = new FormData();
  for (const image of images) form.append("files", image.file, image.name);
  form.append("model", spec);
  form.append("input_size", size);
  let data;
  try {
    const response = await fetch("/api/colorize", {method: "POST", body: form});
    data = await readJson(response);
    if (!response.ok && !data.error) data.error = `HTTP ${response.status}`;
  } catch (err) {
    data = {error: `the server did not answer (${err.message})`};
  }
  const run = state.run;
  const label = data.model?.label || modelById(spec)?.label || spec;
  if (data.model) run.info[spec] = data.model;
  for (const bad of data.errors || []) showError(`${bad.file}: ${bad.reason}`);
  if (data.error && !(data.errors || []).length) showError(`${label}: ${data.error}`);
  for (const result of data.results || []) {
    run.cells[`${result.index}|${spec}`] = result;
    run.inputs[result.index] = result.input;
  }
  for (let i = 0; i < images.length; i++) {
    if (!run.cells[`${i}|${spec}`]) run.cells[`${i}|${spec}`] = {failed: true};
  }
  renderGrid();
  renderModelInfo();
  return data;
}

async function runColorize() {
  clearErrors();
  if (!state.images.length) { showError("no images: choose files or a sample first"); return; }
  if (!state.selected.length) { showError("no model: tick at least one model"); return; }
  const images = state.images.slice();
  const models = state.selected.slice();
  const size = $("size").value;
  state.run = {images: images.map((i) => i.name), models, cells: {}, inputs: {}, info: {}};
  $("run").disabled = true;
  $("empty").hidden = true;
  $("compare").hidden = false;
  renderGrid();
  const start = performance.now();
  setStatus(`colorizing ${images.length} image(s) with ${models.length} model(s) at ${size} px…`);
  // one request per model, all at once: the server runs different models in parallel, each model one at a time
  await Promise.all(models.map((spec) => colorizeWith(spec, images, size)));
  const done = Object.values(state.run.cells).filter((c) => !c.failed).length;
  setStatus(`done: ${done} result(s) in ${((performance.now() - start) / 1000).toFixed(1)} s`);
  $("run").disabled = false;
  renderSliderChoices();
}

// --- results: grid and slider ----------------------------------------------------------------------------
function columnLabel(spec) { return state.run.info[spec]?.label || modelById(spec)?.label || spec; }

function renderGrid() {
  const run = state.run;
  const grid = $("grid");
  const head = el("tr", {}, el("th", {text: "input"}),
    run.models.map((spec) => el("th", {class: isRandom(spec) ? "random" : "", "data-model": spec},
      columnLabel(spec), isRandom(spec) ? el("div", {text: "RANDOM-INIT: meaningless colors"}) : null)));
  const rows = run.images.map((name, i) => el("tr", {"data-image": name},
    el("td", {}, run.inputs[i]
      ? el("figure", {}, el("img", {class: "input", src: run.inputs[i], alt: `${name} input`}), el("figcaption", {text: name}))
      : el("div", {class: "pending", text: name})),
    run.models.map((spec, j) => el("td", {}, resultCell(run.cells[`${i}|${spec}`], i, j, spec, name)))));
  grid.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

function resultCell(result, i, j, spec, name) {
  if (!result) return el("div", {class: "pending", text: "working…"});
  if (result.failed) return el("div", {class: "failed", text: `${name}: no result (see the errors above)`});
  const img = el("img", {id: `result-${i}-${j}`, class: "result", src: result.output, alt: `${name} colorized by ${columnLabel(spec)}`,
    "data-model": spec, "data-image": name, "data-width": result.width, "data-height": result.height,
    onclick: () => showInSlider(i, spec)});
  return el("figure", {}, img, el("figcaption", {},
    `${result.width}×${result.height} · `, el("a", {class: "download", href: result.output, download: result.download, text: "download"})));
}

function renderSliderChoices() {
  const run = state.run;
  $("slider-image").replaceChildren(...run.images.map((name, i) => el("option", {value: i, text: name})));
  $("slider-model").replaceChildren(...run.models.map((spec) => el("option", {value: spec, text: columnLabel(spec)})));
  const first = Object.keys(run.cells).find((k) => !run.cells[k].failed);
  if (first) { const [i, ...rest] = first.split("|"); showInSlider(Number(i), rest.join("|")); }
}

function showInSlider(i, spec) {
  const result = state.run.cells[`${i}|${spec}`];
  $("slider-image").value = String(i);
  $("slider-model").value = spec;
  if (!result || result.failed) return;
  $("slider-before").src = state.run.inputs[i];
  $("slider-after").src = result.output;
}

function setupSlider() {
  const range = $("slider-range");
  const update = () => {
    $("slider-after-clip").style.clipPath = `inset(0 0 0 ${range.value}%)`;
    $("slider-handle").style.left = `${range.value}%`;
  };
  range.addEventListener("input", update);
  update();
  const pick = () => showInSlider(Number($("slider-image").value), $("slider-model").value);
  $("slider-image").addEventListener("change", pick);
  $("slider-model").addEventListener("change", pick);
}

function downloadAll() {
  for (const link of document.querySelectorAll("#grid a.download")) link.click();
}

// --- video: per-frame and stabilised side by side --------------------------------------------------------
async function runVideo() {
  clearErrors();
  const file = $("video-file").files[0];
  if (!file) { showError("no video: choose a short clip"); return; }
  if (!state.selected.length) { showError("no model: tick a model (the first ticked one colorizes the video)"); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("model", state.selected[0]);
  form.append("input_size", $("size").value);
  $("video-status").textContent = `colorizing ${file.name} twice (per-frame, then stabilised)…`;
  $("run-video").disabled = true;
  try {
    const response = await fetch("/api/colorize-video", {method: "POST", body: form});
    const body = await readJson(response);
    if (!response.ok) { showError(body.error || `HTTP ${response.status}`); $("video-status").textContent = ""; return; }
    $("video-per-frame").src = body.per_frame;
    $("video-stable").src = body.stabilised;
    $("video-results").hidden = false;
    $("empty").hidden = true;
    const cuts = body.cuts.length ? `scene cuts at frames ${body.cuts.join(", ")}` : "no scene cut";
    $("video-status").textContent = `${body.frames} frames in ${body.seconds.toFixed(1)} s; ${cuts}`;
  } catch (err) {
    showError(`video request failed: ${err.message}`);
  } finally {
    $("run-video").disabled = false;
  }
}

// --- start -----------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  setupDrop();
  setupSlider();
  $("run").addEventListener("click", runColorize);
  $("add-model").addEventListener("click", addCustomModel);
  $("custom-model").addEventListener("keydown", (e) => { if (e.key === "Enter") addCustomModel(); });
  $("download-all").addEventListener("click", downloadAll);
  $("run-video").addEventListener("click", runVideo);
  loadCatalogue().catch((err) => showError(`cannot load the model list: ${err.message}`));
});
