// One robot: models, job history with state times and gate verdicts, telemetry charts.
import uPlot from "./vendor/uplot-1.6.32/uPlot.esm.js";
import { api, live, el, ago, when, stateClass } from "./common.js";

const id = decodeURIComponent(location.pathname.split("/").pop());
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#57606a"];
const GROUPS = [
  ["CPU / GPU load (%)", ["cpu_pct", "gpu_load", "emc_pct"]],
  ["Temperatures (°C)", ["temp_max", "gpu_temp"]],
  ["Power (W)", ["power_w"]],
  ["Memory (MiB)", ["mem_used", "mem_total", "swap_used"]],
];
const MIB = new Set(["mem_used", "mem_total", "swap_used"]);
const charts = new Map();  // title -> {plot, names, series: {name: [[t, v]...]}}
let windowS = 3600;

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function gate(g) {
  if (!g) return "";
  return el("span", {}, Object.entries(g).map(([k, v]) =>
    el("span", { class: "pill" }, `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)));
}

function renderRobot(r) {
  const models = Object.entries(r.models_detail).sort().map(([m, v]) => el("tr", {},
    el("td", {}, m), el("td", { class: "on" }, v.active ?? "–"), el("td", {}, v.previous ?? "–"),
    el("td", {}, v.staged ?? "–"),
    el("td", { class: "warn" }, r.drift[m] ? `release wants ${r.drift[m].want}` : "")));
  const jobs = r.jobs.map((j) => el("tr", {},
    el("td", {}, el("a", { href: `/rollouts/${j.rollout_id}` }, j.rollout_id)),
    el("td", {}, `${j.kind} ${j.model} ${j.version}`),
    el("td", { class: stateClass(j.state) }, j.state, j.reason ? el("div", { class: "muted" }, j.reason) : ""),
    el("td", {}, j.states.map((s) => el("div", {}, el("span", { class: stateClass(s.state) }, s.state), " ",
      el("span", { class: "muted" }, s.at ?? when(s.received_at))))),
    el("td", {}, gate(j.gate))));
  document.querySelector("#robot").replaceChildren(
    el("h1", {}, `Robot ${r.id} `, el("span", { class: r.online ? "on" : "off" }, r.online ? "online" : "offline")),
    el("p", {}, `last seen ${ago(r.last_seen)} · groups ${r.groups.join(", ") || "none"} · agent ${r.agent_version ?? "?"} · `,
      Object.entries(r.hardware).map(([k, v]) => `${k} ${v}`).join(", ")),
    el("h2", {}, "Models"), table(["model", "active", "previous", "staged", "drift"], models),
    el("h2", {}, "Jobs"), jobs.length ? table(["rollout", "job", "state", "state times", "gate verdict"], jobs)
      : el("p", { class: "muted" }, "none"));
}

function aligned(series, names) {
  const tables = names.map((n) => {
    const pts = series[n] || [];
    return [pts.map((p) => p[0]), pts.map((p) => (MIB.has(n) ? p[1] / 1048576 : p[1]))];
  });
  return tables.length ? uPlot.join(tables) : [[]];
}

function draw(title, series) {
  const names = Object.keys(series).filter((n) => series[n].length);
  if (!names.length) return;
  let c = charts.get(title);
  const data = aligned(series, names);
  if (c && names.join() === c.names.join()) {
    c.series = series;
    c.plot.setData(data);
    c.box.dataset.points = String(data[0].length);  // the points drawn: tests read it
    return;
  }
  if (c) c.box.remove();
  const box = el("div", { class: "chart", "data-chart": title, "data-points": String(data[0].length) },
    el("h3", {}, title));
  document.querySelector("#charts").append(box);
  const plot = new uPlot({
    width: 470, height: 200,
    series: [{}, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true }))],
    axes: [{}, { size: 50 }],
  }, data, box);
  charts.set(title, { plot, names, series, box });
}

function chartSets(t) {
  const sets = GROUPS.map(([title, names]) =>
    [title, Object.fromEntries(names.filter((n) => t.metrics[n]).map((n) => [n, t.metrics[n]]))]);
  const latency = {}; const custom = [];
  for (const [key, s] of Object.entries(t.models)) {
    if (key.startsWith("metric:")) custom.push([key.slice(7), { value: s.value }]);
    else for (const [p, pts] of Object.entries(s)) latency[`${key} ${p}`] = pts;
  }
  sets.push(["Inference latency (ms)", latency]);
  for (const [name, s] of custom) sets.push([name, s]);
  return sets;
}

let telemetry = null;

function renderTelemetry(t) {
  telemetry = t;
  for (const [title, series] of chartSets(t)) draw(title, series);
  document.querySelector("#no-telemetry").hidden = charts.size > 0;
  document.body.dataset.ready = "1";
}

function merge(into, add) {
  for (const [k, pts] of Object.entries(add)) {
    if (Array.isArray(pts)) into[k] = (into[k] || []).concat(pts);
    else merge(into[k] || (into[k] = {}), pts);
  }
}

function trim(t) {
  const lo = Date.now() / 1000 - windowS;
  const cut = (o) => { for (const [k, v] of Object.entries(o)) {
    if (Array.isArray(v)) o[k] = v.filter((p) => p[0] >= lo); else cut(v); } };
  cut(t.metrics); cut(t.models);
}

async function loadTelemetry() {
  charts.forEach((c) => c.box.remove());
  charts.clear();
  renderTelemetry(await api(`/api/robots/${encodeURIComponent(id)}/telemetry?window=${windowS}`));
}

document.querySelector("#window").addEventListener("change", (e) => {
  windowS = Number(e.target.value); loadTelemetry();
});
api(`/api/robots/${encodeURIComponent(id)}`).then(renderRobot)
  .catch((e) => document.querySelector("#robot").replaceChildren(el("p", { class: "error" }, e.message)));
loadTelemetry().catch((e) => document.querySelector("#no-telemetry").textContent = e.message);
live([`robot:${id}`], {
  robot: renderRobot,
  telemetry: (t) => {
    if (!telemetry) return;
    merge(telemetry.metrics, t.metrics); merge(telemetry.models, t.models); trim(telemetry);
    renderTelemetry(telemetry);
  },
});
