// minidiff serve page: upload, plan (selector scores), run through the server's queue, before/after.
// Talks only to its own server's /api/ (see minidiff/serve.py for the endpoints); no framework.
"use strict";

const $ = (id) => document.getElementById(id);
// upload: /api/upload's answer; tasks: picked by hand, in click order; job: the last status polled
const state = { info: null, upload: null, tasks: [], job: null, planSeq: 0, planTimer: null,
                pollTimer: null };

async function api(path, options = {}) {
  // JSON in, JSON out; a non-2xx answer throws its {"error"} message
  let res;
  try {
    res = await fetch(path, options);
  } catch (e) {
    throw new Error("the server does not answer (stopped?)");
  }
  const type = res.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await res.json() : null;
  if (!res.ok) throw new Error((body && body.error) || `HTTP ${res.status}`);
  return body;
}

const postJSON = (path, obj) => api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify(obj) });

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const c of children) node.append(c);
  return node;
}

// ---- set-up from /api/info --------------------------------------------------------------------------
async function init() {
  const info = state.info = await api("/api/info");
  const s = info.settings;
  if (s.warning) { $("warning").textContent = s.warning; $("warning").hidden = false; }
  for (const p of info.presets) {
    const b = el("button", { type: "button", textContent: p.label, title: `"${p.prompt}"` });
    b.dataset.prompt = p.prompt;
    b.addEventListener("click", () => { setPrompt(p.prompt); });
    $("presets").append(b);
  }
  for (const t of info.tasks) {
    const b = el("button", { type: "button", textContent: t });
    b.dataset.task = t;
    b.addEventListener("click", () => toggleTask(t));
    $("tasks").append(b);
  }
  slider("resolution", info.resolution);
  slider("steps", { ...info.steps, step: 1 });
  $("seed").max = info.seed.max;
  $("seed").value = Math.floor(Math.random() * info.seed.max);
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  const mib = Math.round(info.limits.bytes / 2 ** 20), mpx = (info.limits.pixels / 1e6).toFixed(0);
  const shown = { "size rule": s.size_rule, "chain steps": `${s.chain_steps} (every plugin after the first)`,
                  "selector threshold": s.threshold, device: `${s.device} ${s.dtype}`,
                  "upload limit": `${mib} MiB, ${mpx} Mpx` };
  for (const [k, v] of Object.entries(shown)) {
    $("settings").append(el("dt", { textContent: k }), el("dd", { textContent: v }));
  }
  for (const ex of info.examples) {
    const card = el("button", { type: "button", className: "card", title: ex.prompt },
                    [el("img", { src: ex.url, alt: ex.name, loading: "lazy" }),
                     el("span", { textContent: ex.prompt || ex.name })]);
    card.addEventListener("click", () => loadExample(ex));
    $("examples").append(card);
  }
  if (!info.examples.length) {
    $("examples").append(el("p", { className: "muted", textContent: "No example folder." }));
  }
  refreshHistory();
}

function slider(id, r) {
  const input = $(id);
  Object.assign(input, { min: r.min, max: r.max, step: r.step, value: r.default });
  const show = () => { $(id + "-out").textContent = input.value; };
  input.addEventListener("input", () => { show(); schedulePlan(); });
  show();
}

// ---- the photo ----------------------------------------------------------------------------------------
function clearStale() {
  // what belonged to the previous photo: its plan (scores), and the line of a job that ended ("Cancelled.")
  clearTimeout(state.planTimer);
  state.planSeq++;  // a plan request still out is answered for the old photo: dropped
  $("plan").hidden = true;
  if (!(state.job && ["queued", "running"].includes(state.job.state))) {
    $("progress").hidden = true; $("progress-text").textContent = "";
  }
}

function rejected(message) {
  // an upload refused (too large, not an image): no photo, no plan, nothing to run, the reason in one line
  state.upload = null;
  $("photo").hidden = true; $("photo").removeAttribute("src"); $("drop-hint").hidden = false;
  $("photo-info").textContent = "";
  clearStale();
  showError(message);
  updateRun();
}

async function upload(blob, name) {
  showError("");
  const limits = state.info.limits;
  if (blob.size > limits.bytes) {  // refused here rather than after sending it
    rejected(`${name}: ${blob.size} bytes, the limit is ${limits.bytes}`);
    return;
  }
  $("photo").src = URL.createObjectURL(blob);  // at once; replaced by the server's decoded view below
  $("photo").hidden = false; $("drop-hint").hidden = true;
  $("photo-info").textContent = `${name}: uploading…`;
  state.upload = null; clearStale(); updateRun();
  try {
    const up = await api(`/api/upload?name=${encodeURIComponent(name)}`, { method: "POST", body: blob,
                         headers: { "Content-Type": blob.type || "application/octet-stream" } });
    state.upload = up;
    $("photo").src = up.preview;
    const notes = up.notes.length ? ` (${up.notes.join("; ")})` : "";
    $("photo-info").textContent = `${up.name}: ${up.width}×${up.height}${notes}`;
    schedulePlan();
  } catch (e) {
    rejected(e.message);
  }
  updateRun();
}

async function loadExample(ex) {
  try {
    const res = await fetch(ex.url);
    if (!res.ok) throw new Error(`example ${ex.name}: HTTP ${res.status}`);
    if (ex.prompt) setPrompt(ex.prompt);
    await upload(await res.blob(), ex.name);
  } catch (e) { showError(e.message); }
}

// ---- what to do: prompt, presets, or tasks by hand -----------------------------------------------------
function setPrompt(text) {
  $("prompt").value = text;
  state.tasks = [];
  markChoices();
  schedulePlan();
}

function toggleTask(t) {
  const i = state.tasks.indexOf(t);
  if (i >= 0) state.tasks.splice(i, 1); else state.tasks.push(t);
  if (state.tasks.length) $("prompt").value = "";
  markChoices();
  schedulePlan();
}

function markChoices() {
  for (const b of $("presets").children) {
    b.classList.toggle("on", !state.tasks.length && b.dataset.prompt === $("prompt").value);
  }
  for (const b of $("tasks").children) {
    const k = state.tasks.indexOf(b.dataset.task);
    b.classList.toggle("on", k >= 0);
    const order = k >= 0 ? [el("span", { className: "order", textContent: k + 1 })] : [];
    b.replaceChildren(b.dataset.task, ...order);
  }
  updateRun();
}

function request() {
  const r = { upload: state.upload && state.upload.id, resolution: +$("resolution").value,
              steps: +$("steps").value };
  if (state.tasks.length) r.tasks = [...state.tasks]; else r.prompt = $("prompt").value;
  return r;
}

const ready = () => !!state.upload && (state.tasks.length > 0 || $("prompt").value.trim() !== "");

function updateRun() {
  const busy = state.job && ["queued", "running"].includes(state.job.state);
  $("run").disabled = !ready() || busy;
}

// ---- the plan: the selector's scores before running (the dry run's record) -----------------------------
function schedulePlan() {
  clearTimeout(state.planTimer);
  updateRun();
  if (!ready()) { $("plan").hidden = true; return; }
  state.planTimer = setTimeout(plan, 250);
}

async function plan() {
  const seq = ++state.planSeq;
  try {
    const rec = await postJSON("/api/plan", request());
    if (seq !== state.planSeq) return;  // a newer request went out meanwhile
    showPlan(rec);
    showError("");
  } catch (e) {
    if (seq === state.planSeq) { $("plan").hidden = true; showError(e.message); }
  }
}

function showPlan(rec) {
  $("plan-text").textContent = rec.plan;
  const table = $("scores");
  table.replaceChildren();
  if (rec.scores) {
    const top = Math.max(...Object.values(rec.scores).map((v) => Math.max(v, 0)), 1e-6);
    for (const [name, v] of Object.entries(rec.scores)) {
      const meter = el("div", { className: "meter" });
      meter.style.width = `${Math.max(v, 0) / top * 100}%`;
      const row = el("tr", { className: rec.tasks.includes(name) ? "chosen" : "" },
                     [el("td", { className: "name", textContent: name }), el("td", {}, [meter]),
                      el("td", { className: "value", textContent: v.toFixed(3) })]);
      table.append(row);
    }
  }
  const matches = rec.composite_matches || [];
  const extra = matches.length ? `; composite request: ${matches.join(", ")}` : "";
  const n = rec.tasks.length;
  const steps = n ? `; ${rec.steps + (n - 1) * rec.chain_steps_used} steps` : "";
  $("plan-size").textContent = `${rec.resize}${steps}${extra}`;
  $("plan").hidden = false;
}

// ---- running: submit, poll, cancel -------------------------------------------------------------------
async function run() {
  showError("");
  const body = request();
  body.seed = $("seed-random").checked ? null : +$("seed").value;
  try {
    const job = await postJSON("/api/jobs", body);
    $("seed").value = job.seed;  // the seed drawn: shown, and kept when "random" is unticked
    showJob(job);
    poll();
  } catch (e) { showError(e.message); }
}

async function poll() {
  clearTimeout(state.pollTimer);
  if (!state.job) return;
  try {
    showJob(await api(`/api/jobs/${state.job.id}`));
  } catch (e) { showError(e.message); state.job = null; updateRun(); return; }
  if (["queued", "running"].includes(state.job.state)) state.pollTimer = setTimeout(poll, 300);
}

function fmtTime(s) {
  if (s === null || s === undefined) return "";
  return s < 60 ? `${Math.ceil(s)} s left` : `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s left`;
}

function showJob(job) {
  const previous = state.job && state.job.id === job.id ? state.job.state : null;
  state.job = job;
  const p = job.progress;
  const active = ["queued", "running"].includes(job.state);
  $("progress").hidden = !active && job.state !== "cancelled";
  $("cancel").hidden = !active;
  $("bar-fill").style.width = `${Math.round(p.fraction * 100)}%`;
  let text;
  if (job.state === "queued") {
    const ahead = job.position - 1;
    text = ahead > 0 ? `Waiting: ${ahead} job${ahead > 1 ? "s" : ""} ahead of yours`
                     : "Waiting: yours is next";
  } else if (job.state === "running") {
    if (p.plugin) {
      text = `${p.plugin} (plugin ${p.plugin_index + 1} of ${p.plugins.length}) · ` +
             `step ${p.step} of ${p.total_steps}`;
      const left = fmtTime(p.eta_s);
      if (left) text += ` · ${left}`;
    } else {
      text = `${p.stage}…`;
    }
  } else if (job.state === "cancelled") {
    text = "Cancelled.";
  } else {
    text = "";
  }
  $("progress-text").textContent = text;
  if (job.state === "failed") showError(`The job failed: ${job.error}`);
  if (job.state === "done" && previous !== "done") { showResult(job); refreshHistory(); }
  if (job.state !== previous && !active) refreshHistory();
  updateRun();
}

async function cancel() {
  if (!state.job) return;
  try { showJob(await postJSON(`/api/jobs/${state.job.id}/cancel`, {})); } catch (e) { showError(e.message); }
}

// ---- the result: before/after, downloads, history ----------------------------------------------------
function showResult(job) {
  const rec = job.record;
  $("after").src = job.files["result.png"];
  $("before").src = job.files["input.png"];
  $("compare").hidden = false; $("split").hidden = false; $("result-empty").hidden = true;
  setSplit(50);
  const stem = rec.outputs.result.replace(/\.png$/, "");  // named as tools/sample.py names its outputs
  $("dl-png").href = job.files["result.png"]; $("dl-png").download = rec.outputs.result;
  $("dl-compare").href = job.files["compare.png"]; $("dl-compare").download = rec.outputs.compare;
  $("dl-json").href = job.files["record.json"]; $("dl-json").download = `${stem}.json`;
  $("downloads").hidden = false;
  if (window.matchMedia("(max-width: 820px)").matches) {  // one column: the result is below the controls
    $("output").scrollIntoView({ behavior: "smooth" });
  }
  $("reuse-seed").onclick = () => {
    $("seed-random").checked = false; $("seed").disabled = false; $("seed").value = job.seed;
  };
  const what = rec.tasks.length ? rec.tasks.join(" then ") : "no plugin applies (photo only resized)";
  const secs = Object.values(rec.timings_s).reduce((a, b) => a + b, 0);
  $("result-info").textContent = `${job.name}: ${what} · ${rec.processed_size.join("×")} · ` +
                                 `seed ${job.seed} · ${job.steps} steps · ${secs.toFixed(1)} s`;
}

function setSplit(percent) {
  const v = Math.min(100, Math.max(0, percent));
  $("before").style.clipPath = `inset(0 ${100 - v}% 0 0)`;
  $("divider").style.left = `${v}%`;
  $("split").value = v;
}

async function refreshHistory() {
  let jobs;
  try { jobs = await api("/api/history"); } catch (e) { return; }
  const done = jobs.filter((j) => j.state === "done");
  const box = $("history");
  box.replaceChildren();
  if (!done.length) { box.append(el("p", { className: "muted", textContent: "No results yet." })); return; }
  for (const j of done) {
    const what = j.record.tasks.join(" + ") || "untouched";
    const title = j.prompt || (j.tasks || []).join(", ");
    const card = el("button", { type: "button", className: "card", title },
                    [el("img", { src: j.files["result.png"], alt: `result ${j.id}` }),
                     el("span", { textContent: j.name }),
                     el("span", { className: "muted", textContent: `${what} · seed ${j.seed}` })]);
    card.addEventListener("click", () => { state.job = j; showResult(j); updateRun(); });
    box.append(card);
  }
}

// ---- wiring ------------------------------------------------------------------------------------------
function wire() {
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    $("file").value = "";  // choosing the same file again is a change too
    if (f) upload(f, f.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) upload(f, f.name);
  });
  $("prompt").addEventListener("input", () => { state.tasks = []; markChoices(); schedulePlan(); });
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", cancel);
  $("split").addEventListener("input", () => setSplit(+$("split").value));
  const cmp = $("compare");
  const follow = (e) => {
    const r = cmp.getBoundingClientRect();
    setSplit((e.clientX - r.left) / r.width * 100);
  };
  cmp.addEventListener("pointerdown", (e) => { cmp.setPointerCapture(e.pointerId); follow(e); });
  cmp.addEventListener("pointermove", (e) => { if (cmp.hasPointerCapture(e.pointerId)) follow(e); });
}

wire();
init().catch((e) => showError(`Could not start: ${e.message}`));
