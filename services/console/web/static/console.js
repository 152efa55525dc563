// Stoker console: renders one page from /console/api/* and keeps it current from the event stream.
// Plain browser JavaScript, no build step; Chart.js draws the charts and the trace waterfall,
// Cytoscape.js the workflow DAGs.
"use strict";

const app = document.getElementById("app");
const PAGE = app.dataset.page;
const ARG = app.dataset.arg;
const charts = {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ms(v) { return v === null || v === undefined ? "–" : `${Number(v).toFixed(v < 10 ? 2 : 0)} ms`; }
function pct(v) { return v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`; }
function clock(at) { return at ? new Date(at).toLocaleTimeString() : "–"; }

async function api(path, options = {}) {
  const response = await fetch(`/console/api${path}`, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status}`;
    throw new Error(message);
  }
  return body;
}

function notice(text, kind = "info") {
  const box = el("div", { class: `notice ${kind}`, role: "status" }, text);
  document.body.append(box);
  setTimeout(() => box.remove(), 4000);
}

async function action(path, body) {
  try {
    const result = await api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: body === undefined ? "" : JSON.stringify(body),
    });
    notice("done");
    return result;
  } catch (error) {
    notice(error.message, "error");
    return null;
  }
}

// ----- the event stream -----------------------------------------------------------------------

const handlers = {};
function on(event, fn) { (handlers[event] = handlers[event] || []).push(fn); }

function connect() {
  const source = new EventSource("/console/api/stream");
  const badge = document.getElementById("broker");
  for (const name of ["cluster", "functions", "invocations", "runs", "broker"]) {
    source.addEventListener(name, (msg) => {
      const data = JSON.parse(msg.data);
      for (const fn of handlers[name] || []) fn(data);
    });
  }
  // A browser holds at most six connections to one host: a page left behind (or kept in the
  // back-forward cache) must give its stream back, and take a new one if it is shown again.
  window.addEventListener("pagehide", () => source.close(), { once: true });
  window.addEventListener("pageshow", (e) => { if (e.persisted) location.reload(); }, { once: true });
  source.onopen = () => { badge.dataset.console = "up"; };
  source.onerror = () => {
    // EventSource reconnects by itself; say so meanwhile.
    badge.textContent = "console unreachable, reconnecting…";
    badge.className = "broker down";
  };
  on("broker", (b) => {
    badge.textContent = b.up ? "broker connected" : "broker unreachable: showing the last known state";
    badge.className = b.up ? "broker up" : "broker down";
    badge.dataset.up = b.up ? "yes" : "no";
  });
}

// ----- cluster --------------------------------------------------------------------------------

function renderCluster(view) {
  const nodes = el("section", { id: "nodes", class: "grid" });
  for (const node of view.nodes) {
    const states = Object.entries(node.by_state || {}).map(([s, n]) => el("span", { class: `pill ${s}` }, `${s} ${n}`));
    const buttons = node.up && !node.stopped ? [
      node.cordoned
        ? el("button", { onclick: () => action(`/nodes/${node.name}/uncordon`), "data-action": "uncordon" }, "Uncordon")
        : el("button", { onclick: () => action(`/nodes/${node.name}/cordon`), "data-action": "cordon" }, "Cordon"),
    ] : [];
    nodes.append(el("article", { class: `node ${node.up ? "up" : "down"}`, "data-node": node.name, "data-cordoned": node.cordoned ? "yes" : "no" },
      el("h3", {}, node.name, " ", el("small", {}, node.role || ""), node.cordoned ? el("span", { class: "pill cordon" }, "cordoned") : null,
        node.up ? null : el("span", { class: "pill down" }, "down")),
      el("div", { class: "meta" },
        `labels: ${Object.entries(node.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–"}`, el("br"),
        `taints: ${(node.taints || []).join(", ") || "–"}`, el("br"),
        `cpu: ${node.cpu_millis === null || node.cpu_millis === undefined ? "–" : node.cpu_millis + " m"} · memory: ${node.memory_mb === null || node.memory_mb === undefined ? "–" : node.memory_mb + " MB"} · in flight: ${node.in_flight ?? 0}`),
      el("div", { class: "states" }, states),
      el("table", { class: "instances" },
        el("tr", {}, el("th", {}, "instance"), el("th", {}, "state"), el("th", {}, "function@version"), el("th", {}, "uses")),
        (node.instances || []).map((i) => el("tr", { class: i.state },
          el("td", {}, i.instance), el("td", {}, i.state), el("td", {}, i.function ? `${i.function}@${i.version}` : "–"), el("td", {}, i.uses)))),
      el("div", { class: "actions" }, buttons)));
  }
  const isolations = el("section", { id: "isolations" }, el("h2", {}, "Isolated functions"),
    view.isolations.length ? el("table", {},
      el("tr", {}, el("th", {}, "function"), el("th", {}, "until"), el("th", {}, "by"), el("th", {}, "reason"), el("th", {}, "")),
      view.isolations.map((i) => el("tr", { "data-isolated": i.function },
        el("td", {}, i.function), el("td", {}, clock(i.until_ms)), el("td", {}, i.by), el("td", {}, i.reason),
        el("td", {}, el("button", { onclick: () => action(`/functions/${i.function}/release`), "data-action": "release" }, "Release")))))
      : el("p", { class: "muted" }, "none"));
  const decisions = el("section", { id: "decisions" }, el("h2", {}, "Throttle decisions"),
    view.decisions.length ? el("table", {},
      el("tr", {}, el("th", {}, "at"), el("th", {}, "function"), el("th", {}, "action"), el("th", {}, "where"), el("th", {}, "rule"), el("th", {}, "figures")),
      view.decisions.map((d) => el("tr", {},
        el("td", {}, clock(d.at_ms)), el("td", {}, d.function), el("td", {}, d.action), el("td", {}, `${d.node || ""} ${d.instance || ""}`),
        el("td", {}, d.rule), el("td", { class: "muted" }, Object.entries(d.figures || {}).map(([k, v]) => `${k}=${Number(v).toFixed(1)}`).join(" ")))))
      : el("p", { class: "muted" }, "none"));
  app.replaceChildren(el("h1", {}, "Cluster"), nodes, isolations, decisions);
}

// ----- functions ------------------------------------------------------------------------------

function lineChart(canvas, series) {
  const labels = series.map((p) => new Date(p.at_ms).toLocaleTimeString());
  const data = {
    labels,
    datasets: [
      { label: "per s", data: series.map((p) => p.per_s), yAxisID: "rate", borderWidth: 1.5, pointRadius: 0 },
      { label: "p99 ms", data: series.map((p) => p.p99_ms), yAxisID: "ms", borderWidth: 1.5, pointRadius: 0 },
      { label: "cold", data: series.map((p) => p.cold), yAxisID: "rate", borderWidth: 1, pointRadius: 0, borderDash: [4, 3] },
      { label: "errors", data: series.map((p) => p.errors), yAxisID: "rate", borderWidth: 1, pointRadius: 0, borderDash: [2, 2] },
    ],
  };
  if (charts[canvas.id]) {
    charts[canvas.id].data = data;
    charts[canvas.id].update("none");
    return;
  }
  charts[canvas.id] = new Chart(canvas, {
    type: "line",
    data,
    options: {
      animation: false, responsive: false, plugins: { legend: { display: true, labels: { boxWidth: 10 } } },
      scales: { x: { ticks: { maxTicksLimit: 4 } }, rate: { position: "left", beginAtZero: true }, ms: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } } },
    },
  });
}

const kept = {};

function renderFunctions(list) {
  const rows = list.map((f) => {
    const id = `chart-${f.name}`;
    let canvas = document.getElementById(id);
    if (!canvas) canvas = el("canvas", { id, width: 480, height: 140 });
    const source = f.source.kind === "git" ? `git ${f.source.git_url || ""} ${f.source.git_branch || ""} ${f.source.git_path || ""} @ ${(f.source.git_commit || "").slice(0, 10)}` : `${f.source.kind} ${(f.source.digest || "").slice(0, 12)}`;
    const starts = Object.entries(f.start_share || {}).map(([k, v]) => `${k} ${pct(v)}`).join(" · ") || "–";
    const builds = (f.builds || []).map((b) => el("li", { class: b.status },
      `${b.build} ${b.status} ${b.duration_ms ? ms(b.duration_ms) : ""} ${b.reason || ""} `,
      b.has_log ? el("a", { href: `/console/api/functions/${f.name}/builds/${b.build}/log`, target: "_blank" }, "log") : null));
    // Kept across refreshes: what the user typed and the last answer stay put.
    const payload = kept[`payload-${f.name}`] ||= el("input", { class: "payload", value: "null", "aria-label": `JSON body for ${f.name}` });
    const out = kept[`out-${f.name}`] ||= el("pre", { class: "output" });
    return el("article", { class: "function", "data-function": f.name },
      el("h3", {}, f.name, " ", el("small", {}, `v${f.version} · ${f.reuse}`)),
      el("div", { class: "cols" },
        el("div", {},
          el("div", { class: "meta" },
            `source: ${source}`, el("br"),
            `instances: ${f.instances.length} (${f.instances.map((i) => `${i.node}/${i.state}`).join(", ") || "none"})`, el("br"),
            `${f.per_s}/s · p50 ${ms(f.p50_ms)} · p99 ${ms(f.p99_ms)} · errors ${pct(f.error_rate)}`, el("br"),
            `starts: ${starts}`),
          el("div", { class: "actions" },
            payload,
            el("button", { "data-action": "invoke", onclick: async () => {
              let body;
              try { body = JSON.parse(payload.value || "null"); } catch (e) { notice(`the body is not JSON: ${e.message}`, "error"); return; }
              const result = await action(`/functions/${f.name}/invoke`, body);
              if (result) out.replaceChildren(el("a", { href: `/console/invocations/${result.id}` }, `${result.status}: `), JSON.stringify(result.output ?? result.error));
            } }, "Invoke"),
            el("button", { "data-action": "prewarm", onclick: () => action(`/functions/${f.name}/prewarm`, { count: 1 }) }, "Prewarm")),
          out,
          el("ul", { class: "builds" }, builds)),
        canvas));
  });
  const section = el("section", { id: "functions" }, rows.length ? rows : el("p", { class: "muted" }, "no functions yet"));
  app.replaceChildren(el("h1", {}, "Functions"), section);
  for (const f of list) lineChart(document.getElementById(`chart-${f.name}`), f.series);
}

// ----- invocations ----------------------------------------------------------------------------

const filters = { function: "", status: "", start: "" };
let stream = [];

function matches(inv) {
  return (!filters.function || inv.function === filters.function)
    && (!filters.status || inv.status === filters.status)
    && (!filters.start || inv.start === filters.start);
}

function invocationRow(inv) {
  return el("tr", { class: inv.status, "data-invocation": inv.id },
    el("td", {}, clock(inv.completed_ms)),
    el("td", {}, el("a", { href: `/console/invocations/${inv.id}` }, inv.id)),
    el("td", {}, inv.function), el("td", {}, inv.status), el("td", {}, inv.start || "–"),
    el("td", {}, ms(inv.total_ms)), el("td", {}, inv.node || "–"), el("td", {}, inv.error || ""));
}

function renderStream() {
  const body = document.getElementById("stream-body");
  if (!body) return;
  body.replaceChildren(...stream.filter(matches).slice(0, 200).map(invocationRow));
}

async function invocationsPage() {
  const input = (name, choices) => {
    const select = el("select", { name, onchange: (e) => { filters[name] = e.target.value; renderStream(); } },
      el("option", { value: "" }, `any ${name}`), choices.map((c) => el("option", { value: c }, c)));
    return select;
  };
  const fnNames = (await api("/functions")).map((f) => f.name);
  app.replaceChildren(el("h1", {}, "Invocations"),
    el("div", { class: "filters" },
      input("function", fnNames), input("status", ["ok", "error", "timeout", "rejected", "lost"]),
      input("start", ["warm", "prewarmed", "pool", "zygote", "spawn"])),
    el("table", { id: "stream" },
      el("thead", {}, el("tr", {}, ["at", "id", "function", "status", "start", "total", "node", "error"].map((h) => el("th", {}, h)))),
      el("tbody", { id: "stream-body" })));
  stream = await api("/invocations?limit=500");
  renderStream();
  on("invocations", (batch) => {
    stream = batch.slice().reverse().concat(stream).slice(0, 2000);
    renderStream();
  });
}

function waterfallChart(canvas, trace) {
  const spans = trace.spans;
  canvas.height = 28 * spans.length + 40;
  return new Chart(canvas, {
    type: "bar",
    data: {
      labels: spans.map((s) => `${"  ".repeat(s.depth)}${s.name} (${s.service})`),
      datasets: [{ label: "ms", data: spans.map((s) => [s.start_ms, s.start_ms + Math.max(s.duration_ms, 0.05)]), backgroundColor: spans.map((s) => s.status === "ERROR" ? "#d9534f" : "#4a7bd0") }],
    },
    options: {
      indexAxis: "y", animation: false, responsive: false,
      plugins: { legend: { display: false }, tooltip: { callbacks: { label: (c) => `+${spans[c.dataIndex].start_ms} ms, ${spans[c.dataIndex].duration_ms} ms` } } },
      scales: { x: { title: { display: true, text: "ms since the first span" }, beginAtZero: true } },
    },
  });
}

function spanTable(trace) {
  return el("details", {}, el("summary", {}, `${trace.spans.length} spans`),
    el("table", { class: "spans" },
      el("tr", {}, ["span", "service", "at", "took", "figures"].map((h) => el("th", {}, h))),
      trace.spans.map((s) => el("tr", { "data-span": s.name, "data-service": s.service || "" },
        el("td", {}, `${"· ".repeat(s.depth)}${s.name}`), el("td", {}, s.service || ""), el("td", {}, `+${s.start_ms} ms`),
        el("td", {}, ms(s.duration_ms)),
        el("td", { class: "muted" }, Object.entries(s.attributes).map(([k, v]) => `${k.replace("stoker.", "")}=${v}`).join(" "))))));
}

async function invocationPage() {
  app.replaceChildren(el("h1", {}, `Invocation ${ARG}`), el("p", { class: "muted", id: "waiting" }, "waiting for its result and trace…"));
  // Services write their spans in batches about a second apart: the trace is shown once it has its root
  // and has not grown for three looks in a row.
  let found = null;
  let seen = -1;
  let steady = 0;
  for (let attempt = 0; attempt < 30; attempt++) {
    try {
      found = await api(`/invocations/${ARG}`);
      const spans = found.traces.reduce((n, t) => n + t.spans.length, 0);
      steady = spans === seen ? steady + 1 : 0;
      seen = spans;
      if (found.result && found.traced && found.traces.every((t) => t.complete) && steady >= 2) break;
    } catch (_) { /* not seen yet */ }
    await new Promise((r) => setTimeout(r, 500));
  }
  if (!found) { document.getElementById("waiting").textContent = "the console has not seen this invocation"; return; }
  const r = found.result;
  const parts = [el("h1", {}, `Invocation ${ARG}`)];
  if (r) {
    parts.push(el("section", { id: "result", "data-status": r.status },
      el("div", { class: "meta" }, `${r.function}@${r.function_version || "?"} · ${r.status} · start ${r.start || "–"} · node ${r.node || "–"} · instance ${r.instance || "–"}`, el("br"),
        `queue ${ms(r.timings_ms.queue)} · start ${ms(r.timings_ms.start)} · exec ${ms(r.timings_ms.exec)} · total ${ms(r.timings_ms.total)}`),
      el("pre", {}, JSON.stringify(r.status === "ok" ? r.output : r.error, null, 2)),
      r.logs ? el("pre", { class: "logs" }, r.logs) : null,
      found.run ? el("p", {}, el("a", { href: `/console/runs/${found.run}`, id: "run-link" }, "this workflow run's steps")) : null));
  }
  if (!found.traced) parts.push(el("p", { class: "muted" }, "no trace recorded for it (traces are sampled above STOKER_TRACES_PER_S)"));
  const canvases = [];
  found.traces.forEach((t, i) => {
    const canvas = el("canvas", { id: `waterfall-${i}`, width: 900, height: 100, "data-spans": t.spans.length });
    parts.push(el("h2", {}, `Trace ${t.trace_id}`), canvas, spanTable(t));
    canvases.push([canvas, t]);
  });
  found.linked.forEach((t, i) => {
    const canvas = el("canvas", { id: `linked-${i}`, width: 900, height: 100, "data-spans": t.spans.length });
    parts.push(el("h2", {}, "Linked trace ", el("a", { href: `/console/invocations/${t.trace_id}` }, t.trace_id),
      " (the build and prewarm of the code it ran)"), canvas, spanTable(t));
    canvases.push([canvas, t]);
  });
  app.replaceChildren(...parts);
  for (const [canvas, t] of canvases) waterfallChart(canvas, t);
}

// ----- workflows ------------------------------------------------------------------------------

const STEP_COLORS = { ok: "#3c9d5d", error: "#d9534f", timeout: "#e67e22", running: "#4a7bd0", waiting: "#aaaaaa", skipped: "#cccccc", "not run": "#dddddd", cancelled: "#999999", lost: "#8e44ad", rejected: "#c0392b" };

function dag(container, steps) {
  const elements = [];
  for (const s of steps) {
    elements.push({ data: { id: s.id, label: s.status ? `${s.id}\n${s.status}${s.took_ms !== null && s.took_ms !== undefined ? ` ${s.took_ms} ms` : ""}` : `${s.id}\n${s.function}`, color: STEP_COLORS[s.status] || "#6c8ebf" } });
    for (const before of s.after) elements.push({ data: { id: `${before}->${s.id}`, source: before, target: s.id } });
  }
  return cytoscape({
    container, elements, userZoomingEnabled: false,
    layout: { name: "breadthfirst", directed: true, spacingFactor: 1.1 },
    style: [
      { selector: "node", style: { "background-color": "data(color)", label: "data(label)", "text-wrap": "wrap", "text-valign": "center", color: "#fff", "font-size": 10, shape: "round-rectangle", width: 90, height: 40 } },
      { selector: "edge", style: { width: 2, "line-color": "#999", "target-arrow-color": "#999", "target-arrow-shape": "triangle", "curve-style": "bezier" } },
    ],
  });
}

async function workflowsPage() {
  const list = await api("/workflows");
  const parts = [el("h1", {}, "Workflows")];
  const graphs = [];
  for (const w of list) {
    const box = el("div", { class: "dag", id: `dag-${w.name}` });
    parts.push(el("article", { class: "workflow", "data-workflow": w.name },
      el("h3", {}, w.name, " ", el("small", {}, `revision ${w.revision} · ${w.steps.length} steps`)),
      el("div", { class: "cols" }, box,
        el("table", {}, el("tr", {}, el("th", {}, "run"), el("th", {}, "started"), el("th", {}, "status"), el("th", {}, "took")),
          w.runs.map((r) => el("tr", { class: r.status }, el("td", {}, el("a", { href: `/console/runs/${r.run}` }, r.run)),
            el("td", {}, clock(r.started_ms)), el("td", {}, r.status), el("td", {}, ms(r.took_ms))))))));
    graphs.push([box, w.steps]);
  }
  if (!list.length) parts.push(el("p", { class: "muted" }, "no workflows yet"));
  app.replaceChildren(...parts);
  for (const [box, steps] of graphs) dag(box, steps);
}

function renderRun(run) {
  const box = el("div", { class: "dag big", id: "run-dag" });
  app.replaceChildren(
    el("h1", {}, `Run ${run.run} of ${run.workflow}`),
    el("div", { class: "meta", id: "run-status", "data-status": run.status }, `${run.status} · started ${clock(run.started_ms)} · took ${ms(run.took_ms)}`),
    box,
    el("table", { id: "steps" },
      el("tr", {}, ["step", "function", "status", "attempts", "took", "start", "output / error"].map((h) => el("th", {}, h))),
      run.steps.map((s) => el("tr", { class: s.status, "data-step": s.id, "data-status": s.status },
        el("td", {}, s.id), el("td", {}, s.function), el("td", {}, s.status), el("td", {}, s.attempts),
        el("td", {}, ms(s.took_ms)), el("td", {}, s.start || "–"),
        el("td", {}, el("code", {}, JSON.stringify(s.error ? s.error : s.output)))))));
  dag(box, run.steps);
}

async function runPage() {
  try {
    renderRun(await api(`/runs/${ARG}`));
  } catch (error) {
    app.replaceChildren(el("h1", {}, `Run ${ARG}`), el("p", { class: "muted" }, error.message));
  }
  on("runs", (runs) => { for (const run of runs) if (run.run === ARG) renderRun(run); });
}

// ----- start ----------------------------------------------------------------------------------

function loginPage() {
  const input = el("input", { id: "token", type: "password", placeholder: "stk_…", autocomplete: "off", size: 70 });
  const message = el("p", { id: "login-message", class: "muted" }, "A token with the read scope shows the console; deploy and admin scopes allow its actions.");
  const go = async () => {
    try {
      await api("/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: input.value }) });
      const next = new URLSearchParams(location.search).get("next");
      location.href = next && next.startsWith("/console") ? next : "/console";
    } catch (error) {
      message.textContent = error.message;
      message.className = "notice-inline error";
    }
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  app.replaceChildren(el("h1", {}, "Log in"), el("p", {}, "Paste a Stoker token (`stoker token create --scope read`, or the admin token `stoker up` printed)."),
    input, " ", el("button", { id: "login", onclick: go }, "Log in"), message);
  document.getElementById("broker").textContent = "";
}

async function whoami() {
  try {
    const me = await api("/me");
    const header = document.querySelector("header");
    header.append(el("span", { id: "me", class: "me" }, `${me.name || me.id} · ${me.scopes.join(", ")} `,
      el("button", { onclick: async () => { await api("/logout", { method: "POST" }); location.href = "/console/login"; } }, "Log out")));
  } catch (_) { /* the page itself says what failed */ }
}

window.addEventListener("DOMContentLoaded", async () => {
  if (PAGE === "login") { loginPage(); document.body.dataset.loaded = "yes"; return; }
  connect();
  whoami();
  try {
    if (PAGE === "cluster") { renderCluster(await api("/cluster")); on("cluster", renderCluster); }
    else if (PAGE === "functions") { renderFunctions(await api("/functions")); on("functions", renderFunctions); }
    else if (PAGE === "invocations") await invocationsPage();
    else if (PAGE === "invocation") await invocationPage();
    else if (PAGE === "workflows") await workflowsPage();
    else if (PAGE === "run") await runPage();
  } catch (error) {
    app.replaceChildren(el("p", { class: "notice error" }, `could not load: ${error.message}`));
  }
  document.body.dataset.loaded = "yes";
});
