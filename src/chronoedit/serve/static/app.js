// The ChronoEdit web UI: a plain ES module with no dependencies, talking to the /v1 API of the server that serves it.
// Every URL is relative to the page, so the UI also works behind a reverse proxy under a path prefix.

const POLL_MS = 500;
const RETRY_MS = 2000;
const HISTORY_KEY = "chronoedit.history";
const TOKEN_KEY = "chronoedit.token";
const HISTORY_MAX = 50;
const H264 = 'video/mp4; codecs="avc1.42E01E"';
const JOB_ID = /^[A-Za-z0-9_-]{16,64}$/;
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "video/mp4": "mp4" };

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function authHeaders() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** fetch `v1/<path>` with the stored token; an ApiError carrying the server's `detail` unless the answer is 2xx. */
async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(`v1/${path}`, { ...init, headers: { ...authHeaders(), ...init.headers } });
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  if (response.ok) return response;
  const detail = await detailOf(response);
  if (response.status === 401) showAuth(detail);
  throw new ApiError(response.status, detail);
}

async function detailOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body?.detail !== undefined) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    // not JSON: show the text itself
  }
  return text.trim().slice(0, 500) || `HTTP ${response.status} ${response.statusText}`.trim(); // e.g. a proxy's page
}

const getJson = async (path) => (await api(path)).json();

// Files need the Authorization header, so they are fetched as blobs and shown through object URLs. A job's files never
// change, so each is fetched once and shared by the result view, the downloads and the history thumbnails.
const blobs = new Map(); // API path -> Promise<{url, type}>

function blobUrl(path) {
  if (!blobs.has(path)) {
    const promise = api(path)
      .then((response) => response.blob())
      .then((blob) => ({ url: URL.createObjectURL(blob), type: blob.type }));
    promise.catch(() => blobs.delete(path));
    blobs.set(path, promise);
  }
  return blobs.get(path);
}

function forgetBlobs(id) {
  for (const [path, promise] of blobs) {
    if (path.startsWith(`edits/${id}/`)) {
      blobs.delete(path);
      promise.then(({ url }) => URL.revokeObjectURL(url), () => {});
    }
  }
}

// ---------------------------------------------------------------- server config and health

let config = { presets: [], limits: {}, defaults: {} };

async function loadConfig() {
  config = await getJson("config");
  fillPresets(config.presets);
  $("enhance-row").hidden = !config.prompt_enhancer;
  updateStepHints();
}

/** The header's server line (model, worker state, queue); true when the model is ready. */
async function updateHealth() {
  try {
    const health = await getJson("health");
    const { state, error } = health.worker;
    const queue = health.queue.queued + health.queue.running;
    $("server-status").textContent = error
      ? `model ${health.model}: ${error}`
      : `model ${health.model} · ${state} · ${queue} in queue`;
    return state === "ready";
  } catch (err) {
    $("server-status").textContent = err.message;
    return false;
  }
}

async function watchHealth() {
  for (;;) await sleep((await updateHealth()) ? 10 * RETRY_MS : RETRY_MS);
}

// ---------------------------------------------------------------- auth

function showAuth(message) {
  $("auth-box").hidden = false;
  const refused = localStorage.getItem(TOKEN_KEY) ? "The stored token was refused: " : "";
  $("auth-message").textContent = refused + message;
  if (!document.activeElement || document.activeElement === document.body) $("token-input").focus();
}

function saveToken(event) {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("auth-box").hidden = true;
  hideError();
  start();
}

// ---------------------------------------------------------------- the form

let selectedFile = null;
let previewUrl = null;

function fillPresets(presets) {
  const select = $("preset");
  select.replaceChildren(new Option("none", ""));
  for (const preset of presets) select.add(new Option(`${preset.name} — ${preset.summary}`, preset.name));
}

function chosenPreset() {
  return config.presets.find((preset) => preset.name === $("preset").value) || null;
}

/** Placeholders and limits of the step fields: what the server will use when they are left blank. */
function updateStepHints() {
  const { defaults, limits } = config;
  const preset = chosenPreset();
  const presetSteps = preset?.num_inference_steps;
  const presetGuidance = preset?.guidance_scale;
  $("steps").placeholder = presetSteps ? `${presetSteps} (preset)` : `${defaults.num_inference_steps ?? ""} (default)`;
  $("guidance").placeholder =
    presetGuidance != null ? `${presetGuidance} (preset)` : `${defaults.guidance_scale ?? ""} (default)`;
  if (limits.max_steps) $("steps").max = limits.max_steps;
  const steps = Number($("steps").value) || presetSteps || defaults.num_inference_steps;
  const maxReasoning = Math.min(steps || Infinity, limits.max_reasoning_steps || Infinity);
  if (Number.isFinite(maxReasoning)) $("reasoning-steps").max = maxReasoning;
  $("reasoning-steps").placeholder = steps ? `all (${steps})` : "all";
  $("preset-summary").textContent = preset ? preset.summary : "";
  if (defaults.seed != null) {  // the server's --seed, used when the field is blank
    $("seed").placeholder = `${defaults.seed} (default)`;
    $("seed-hint").textContent = `Blank: the server's seed ${defaults.seed}.`;
  }
}

function syncReasoning() {
  const on = $("reasoning").checked;
  $("reasoning-steps").disabled = !on;
  $("keep-trajectory").disabled = !on;
  $("keep-trajectory").checked = on; // keeping the trajectory is the default whenever reasoning is on
}

function chooseFile(file) {
  if (!file) return;
  selectedFile = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const preview = $("input-preview");
  preview.hidden = false;
  preview.src = previewUrl;
  $("drop-zone").classList.add("has-image");
  $("image-name").textContent = `${file.name} (${formatBytes(file.size)})`;
  hideError();
}

function previewFailed() {
  $("input-preview").hidden = true;
  $("drop-zone").classList.remove("has-image");
  $("image-name").textContent += " — this browser cannot preview it";
}

function setupDropZone() {
  const zone = $("drop-zone");
  const stop = (event) => event.preventDefault();
  window.addEventListener("dragover", stop); // a file dropped next to the zone must not replace the page
  window.addEventListener("drop", stop);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    chooseFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) chooseFile(file);
  });
}

/** A number field's value, or undefined when blank; integers keep every digit (seeds go up to 2**63 - 1). */
function fieldValue(id, integer = false) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  return integer && /^\d+$/.test(text) && !Number.isSafeInteger(Number(text)) ? BigInt(text) : Number(text);
}

/** The `options` JSON of POST /v1/edits, without the fields left empty (the server then uses its defaults). */
function buildOptions() {
  const options = {};
  const put = (key, value) => {
    if (value !== undefined && value !== "") options[key] = value;
  };
  put("prompt", $("prompt").value.trim());
  put("preset", $("preset").value);
  put("seed", fieldValue("seed", true));
  put("num_inference_steps", fieldValue("steps", true));
  put("guidance_scale", fieldValue("guidance"));
  put("negative_prompt", $("negative-prompt").value.trim());
  if ($("reasoning").checked) {
    options.enable_temporal_reasoning = true;
    put("num_temporal_reasoning_steps", fieldValue("reasoning-steps", true));
    if ($("keep-trajectory").checked) options.return_trajectory = true;
  }
  if (config.prompt_enhancer && $("enhance-prompt").checked) options.enhance_prompt = true;
  put("cache", $("cache").value);
  if ($("no-cfg-batch").checked) options.cfg_batch = false;
  options.output_format = $("output-format").value;
  return options;
}

function toJson(options) {
  return JSON.stringify(options, (_key, value) => (typeof value === "bigint" ? `#big#${value}` : value)).replace(
    /"#big#(\d+)"/g,
    "$1",
  );
}

async function submitEdit(event) {
  event.preventDefault();
  hideError();
  const body = new FormData();
  if (selectedFile) body.append("image", selectedFile, selectedFile.name || "image");
  const options = buildOptions();
  body.append("options", toJson(options));
  setBusy(true);
  try {
    const job = await (await api("edits", { method: "POST", body })).json();
    addToHistory(job);
    openJob(job.id);
    updateHealth();
  } catch (err) {
    showError(err.message, err.status);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("submit").textContent = busy ? "Sending…" : "Edit image";
}

function showError(message, status) {
  const box = $("error");
  box.textContent = message;
  box.dataset.status = status ?? "";
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function rollSeed() {
  $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0] >>> 1);
}

// ---------------------------------------------------------------- one job: progress, result, trajectory

let viewing = 0; // bumped whenever another job is opened: the older loops stop
let shownJob = null; // the last status of the job on view

async function openJob(id) {
  const generation = ++viewing;
  resetJobView(id);
  history.replaceState(null, "", `#${id}`);
  renderHistory();
  let job;
  for (;;) {
    try {
      job = await getJson(`edits/${id}`);
    } catch (err) {
      if (generation !== viewing) return;
      if (err.status === 0) {
        $("status-text").textContent = `${err.message}; retrying…`;
        await sleep(RETRY_MS);
        continue;
      }
      if (err.status === 404) {
        removeFromHistory(id);
        history.replaceState(null, "", location.pathname);
      }
      showJobError(err.status === 404 ? "This edit is no longer on the server." : err.message);
      return;
    }
    if (generation !== viewing) return;
    shownJob = job;
    renderStatus(job);
    if (loadHistory().some((e) => e.id === id)) updateHistory(job);
    else addToHistory(job); // opened from a link: remember it like the others
    if (job.finished) break;
    await sleep(POLL_MS);
  }
  updateHealth();
  if (job.status === "done") await showResult(job, generation);
}

function resetJobView(id) {
  $("job-empty").hidden = true;
  $("job").hidden = false;
  $("job").dataset.id = id;
  $("job").dataset.status = "";
  $("result").hidden = true;
  $("trajectory").hidden = true;
  $("job-error").hidden = true;
  $("cancel-job").hidden = true;
  $("edit-result").hidden = true;
  shownJob = null;
  $("status-text").textContent = "Loading…";
  $("progress").removeAttribute("value");
  const entry = loadHistory().find((e) => e.id === id);
  $("job-prompt").textContent = entry ? `“${entry.prompt}”` : "";
  const video = $("trajectory-video");
  video.pause();
  video.removeAttribute("src");
  video.load();
}

function renderStatus(job) {
  const { step, total } = job.progress;
  const progress = $("progress");
  $("job").dataset.status = job.status;
  $("cancel-job").hidden = job.status !== "queued";
  $("edit-result").hidden = job.status !== "done";
  $("job-prompt").textContent = job.options?.prompt ? `“${job.options.prompt}”` : "";
  let text;
  if (job.status === "queued") {
    text = `Queued — position ${job.position ?? "?"}`;
    progress.removeAttribute("value");
  } else if (job.status === "running") {
    text = step > 0 ? `Running — step ${step} of ${total}` : "Running — starting";
    progress.max = Math.max(total, 1);
    progress.value = step;
  } else if (job.status === "done") {
    const seconds = job.timings?.total_s;
    text = seconds != null ? `Done in ${seconds.toFixed(1)} s` : "Done";
    progress.max = 1;
    progress.value = 1;
  } else {
    text = job.status === "failed" ? "Failed" : "Cancelled";
    progress.max = 1;
    progress.value = 0;
  }
  $("status-text").textContent = text;
  if (job.error) showJobError(job.error);
}

function showJobError(message) {
  $("job-error").textContent = message;
  $("job-error").hidden = false;
}

async function cancelJob() {
  const id = $("job").dataset.id;
  try {
    await api(`edits/${id}`, { method: "DELETE" });
  } catch (err) {
    showJobError(err.message);
  }
}

async function showResult(job, generation) {
  const base = `edits/${job.id}`;
  let input;
  let result;
  try {
    [input, result] = await Promise.all([blobUrl(`${base}/input`), blobUrl(`${base}/result`)]);
  } catch (err) {
    if (generation === viewing) showJobError(err.message);
    return;
  }
  if (generation !== viewing) return;
  const stem = `chronoedit-${job.id.slice(0, 8)}`;
  for (const id of ["result-input", "compare-before"]) $(id).src = input.url;
  for (const id of ["result-image", "compare-after"]) $(id).src = result.url;
  setDownload("download-result", result, `${stem}-edited`);
  setSplit($("compare-slider").value);
  renderDetails(job);
  $("result").hidden = false;
  await showTrajectory(job, stem, generation);
}

function setDownload(id, file, stem) {
  const link = $(id);
  link.href = file.url;
  link.download = `${stem}.${EXTENSIONS[file.type] || "bin"}`;
  link.hidden = false;
}

async function showTrajectory(job, stem, generation) {
  $("download-trajectory").hidden = true;
  $("download-sheet").hidden = true;
  if (!job.links.trajectory && !job.links["trajectory-sheet"]) return;
  const base = `edits/${job.id}`;
  try {
    const [video, sheet] = await Promise.all([
      job.links.trajectory ? blobUrl(`${base}/trajectory`) : null,
      job.links["trajectory-sheet"] ? blobUrl(`${base}/trajectory-sheet`) : null,
    ]);
    if (generation !== viewing) return;
    if (video) {
      setDownload("download-trajectory", video, `${stem}-trajectory`);
      playTrajectory(video.url);
    }
    if (sheet) {
      setDownload("download-sheet", sheet, `${stem}-frames`);
      $("trajectory-sheet").src = sheet.url;
    }
    $("trajectory").hidden = false;
  } catch (err) {
    if (generation === viewing) showJobError(err.message);
  }
}

function playTrajectory(url) {
  const video = $("trajectory-video");
  const note = $("video-note");
  note.hidden = true;
  if (!video.canPlayType(H264)) {
    note.textContent = "This browser cannot play H.264 video: download the trajectory, or see its frames below.";
    note.hidden = false;
  }
  video.autoplay = !matchMedia("(prefers-reduced-motion: reduce)").matches;
  video.src = url;
}

function videoFailed() {
  if (!$("trajectory-video").getAttribute("src")) return;
  $("video-note").textContent = "The trajectory video cannot be played here: download it, or see its frames below.";
  $("video-note").hidden = false;
}

function renderDetails(job) {
  const entry = loadHistory().find((e) => e.id === job.id);
  const settings = { ...(entry?.settings || {}), ...(job.settings || {}) };
  const options = job.options || {};
  const reasoningSteps = options.num_temporal_reasoning_steps ?? settings.num_temporal_reasoning_steps;
  const rows = [
    ["Prompt used", options.enhance_prompt ? settings.prompt_used : undefined],
    ["Seed", options.seed],
    ["Preset", options.preset],
    ["Steps", options.num_inference_steps ?? settings.num_inference_steps],
    ["Guidance", options.guidance_scale ?? settings.guidance_scale],
    ["Size", settings.width ? `${settings.width}×${settings.height}` : undefined],
    ["Reasoning", options.enable_temporal_reasoning ? plural(reasoningSteps, "step") : "off"],
    ["Negative prompt", options.negative_prompt],
    ["Step cache", options.cache],
    ["Time", job.timings?.total_s != null ? `${job.timings.total_s.toFixed(2)} s` : undefined],
  ];
  const list = $("job-details");
  list.replaceChildren();
  for (const [name, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    list.append(Object.assign(document.createElement("dt"), { textContent: name }));
    list.append(Object.assign(document.createElement("dd"), { textContent: String(value) }));
  }
}

/** Fill the form with the shown job's options, and its input (or, with `fromResult`, its edited image). */
async function reuseJob(fromResult) {
  const job = shownJob;
  if (!job) return;
  const options = job.options || {};
  $("prompt").value = fromResult ? "" : options.prompt ?? "";
  $("preset").value = options.preset ?? "";
  $("seed").value = options.seed ?? "";
  $("steps").value = options.num_inference_steps ?? "";
  $("guidance").value = options.guidance_scale ?? "";
  $("negative-prompt").value = options.negative_prompt ?? "";
  $("output-format").value = options.output_format === "jpg" ? "jpeg" : options.output_format || "png";
  $("reasoning").checked = Boolean(options.enable_temporal_reasoning);
  syncReasoning();
  $("reasoning-steps").value = options.num_temporal_reasoning_steps ?? "";
  $("keep-trajectory").checked = Boolean(options.return_trajectory);
  $("enhance-prompt").checked = Boolean(options.enhance_prompt);
  $("cache").value = options.cache ?? "";
  $("no-cfg-batch").checked = options.cfg_batch === false;
  updateStepHints();
  const role = fromResult ? "result" : "input";
  try {
    const file = await blobUrl(`edits/${job.id}/${role}`);
    const blob = await (await fetch(file.url)).blob();
    const name = `chronoedit-${job.id.slice(0, 8)}-${fromResult ? "edited" : "input"}.${EXTENSIONS[blob.type] || "png"}`;
    chooseFile(new File([blob], name, { type: blob.type }));
  } catch (err) {
    showError(err.message, err.status);
  }
  $("prompt").focus();
}

// ---------------------------------------------------------------- before / after slider

/** The divider at `percent` from the left: the input (before) on its left, the edited image (after) on its right. */
function setSplit(percent) {
  const value = Math.min(100, Math.max(0, Number(percent)));
  $("compare-after").style.clipPath = `inset(0 0 0 ${value}%)`;
  $("compare-handle").style.left = `${value}%`;
  $("compare-slider").setAttribute("aria-valuetext", `${Math.round(100 - value)}% edited`);
}

function setupCompare() {
  const slider = $("compare-slider");
  const box = $("compare");
  slider.addEventListener("input", () => setSplit(slider.value));
  const follow = (event) => {
    const rect = box.getBoundingClientRect();
    slider.value = String(Math.round(((event.clientX - rect.left) / rect.width) * 100));
    setSplit(slider.value);
  };
  box.addEventListener("pointerdown", (event) => {
    box.setPointerCapture(event.pointerId);
    follow(event);
  });
  box.addEventListener("pointermove", (event) => {
    if (box.hasPointerCapture(event.pointerId)) follow(event);
  });
  $("compare-after").addEventListener("load", (event) => {
    const { naturalWidth: width, naturalHeight: height } = event.target;
    box.style.aspectRatio = `${width} / ${height}`;
    $("result").classList.toggle("pixelated", width < 256);
  });
}

// ---------------------------------------------------------------- history (this browser's jobs, in localStorage)

function loadHistory() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(list) ? list.filter((entry) => entry && typeof entry.id === "string") : [];
  } catch {
    return [];
  }
}

function saveHistory(list) {
  localStorage.setItem(HISTORY_KEY, JSON.stringify(list.slice(0, HISTORY_MAX)));
  renderHistory();
}

function addToHistory(job) {
  const entry = {
    id: job.id,
    prompt: job.options?.prompt || "",
    created: Date.now(),
    status: job.status,
    settings: job.settings,
  };
  saveHistory([entry, ...loadHistory().filter((e) => e.id !== job.id)]);
}

function updateHistory(job) {
  const list = loadHistory();
  const entry = list.find((e) => e.id === job.id);
  if (entry && entry.status !== job.status) {
    entry.status = job.status;
    saveHistory(list);
  }
}

function removeFromHistory(id) {
  forgetBlobs(id);
  saveHistory(loadHistory().filter((e) => e.id !== id));
}

function clearHistory() {
  for (const entry of loadHistory()) forgetBlobs(entry.id);
  saveHistory([]);
}

function renderHistory() {
  const list = loadHistory();
  const current = $("job").hidden ? null : $("job").dataset.id;
  $("history-list").replaceChildren(...list.map((entry) => historyItem(entry, entry.id === current)));
  $("history-empty").hidden = list.length > 0;
  $("history-clear").hidden = list.length === 0;
}

function historyItem(entry, isCurrent) {
  const item = document.createElement("li");
  item.dataset.testid = "history-item";
  item.dataset.id = entry.id;
  item.dataset.status = entry.status;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "history-open";
  if (isCurrent) button.setAttribute("aria-current", "true");
  button.addEventListener("click", () => openJob(entry.id));
  const thumbs = document.createElement("span");
  thumbs.className = "thumbs";
  thumbs.append(thumbnail(`edits/${entry.id}/input`, "input"));
  if (entry.status === "done") thumbs.append(thumbnail(`edits/${entry.id}/result`, "result"));
  const text = document.createElement("span");
  text.className = "history-text";
  const prompt = Object.assign(document.createElement("span"), { className: "history-prompt" });
  prompt.textContent = entry.prompt || "(no prompt)";
  const meta = Object.assign(document.createElement("span"), { className: "history-meta" });
  meta.textContent = `${new Date(entry.created).toLocaleString()} · ${entry.status}`;
  text.append(prompt, meta);
  button.append(thumbs, text);
  item.append(button);
  return item;
}

function thumbnail(path, role) {
  const image = document.createElement("img");
  image.alt = role === "input" ? "input" : "edited";
  image.className = `thumb thumb-${role}`;
  image.decoding = "async";
  blobUrl(path).then(
    ({ url }) => {
      image.src = url;
    },
    () => image.classList.add("missing"),
  );
  return image;
}

/** Ask the server about every remembered job: drop the ones it no longer knows, update the others' status. */
async function refreshHistory(onlyUnfinished = false) {
  const current = $("job").hidden ? null : $("job").dataset.id;
  const entries = loadHistory().filter(
    (e) => e.id !== current && (!onlyUnfinished || ["queued", "running"].includes(e.status)),
  );
  await Promise.all(
    entries.map(async (entry) => {
      try {
        updateHistory(await getJson(`edits/${entry.id}`));
      } catch (err) {
        if (err.status === 404) removeFromHistory(entry.id);
      }
    }),
  );
}

async function watchUnfinished() {
  for (;;) {
    await sleep(5 * RETRY_MS);
    if (loadHistory().some((e) => ["queued", "running"].includes(e.status))) await refreshHistory(true);
  }
}

// ---------------------------------------------------------------- start

function plural(count, noun) {
  if (count === undefined || count === null) return `all ${noun}s`;
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

async function start() {
  try {
    await loadConfig();
  } catch (err) {
    if (err.status !== 401) showError(err.message, err.status);
    return;
  }
  renderHistory();
  await refreshHistory();
  const id = location.hash.slice(1);
  if (JOB_ID.test(id)) openJob(id);
}

function bindEvents() {
  $("edit-form").addEventListener("submit", submitEdit);
  $("auth-box").addEventListener("submit", saveToken);
  $("image-input").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  $("input-preview").addEventListener("error", previewFailed);
  $("reasoning").addEventListener("change", syncReasoning);
  $("preset").addEventListener("change", updateStepHints);
  $("steps").addEventListener("input", updateStepHints);
  $("seed-dice").addEventListener("click", rollSeed);
  $("cancel-job").addEventListener("click", cancelJob);
  $("reuse-settings").addEventListener("click", () => reuseJob(false));
  $("edit-result").addEventListener("click", () => reuseJob(true));
  $("history-clear").addEventListener("click", clearHistory);
  $("trajectory-video").addEventListener("error", videoFailed);
  window.addEventListener("storage", (event) => {
    if (event.key === HISTORY_KEY) renderHistory(); // another tab of this UI
  });
  setupDropZone();
  setupCompare();
}

bindEvents();
syncReasoning();
renderHistory();
start();
watchHealth();
watchUnfinished();
