// The fleet: every robot, filtered, sorted and paged by the server; rows update live.
import { api, live, el, ago, stateClass } from "./common.js";

const state = { q: "", group: "", online: "", drift: "", sort: "id", order: "asc",
  offset: 0, limit: 200 };
// The first view can come from the address: /?group=site-1&limit=1000
for (const [k, v] of new URLSearchParams(location.search)) {
  if (k in state) state[k] = ["offset", "limit"].includes(k) ? Number(v) : v;
}
const rows = new Map();  // robot id -> <tr> on this page
const tbody = document.querySelector("#robots tbody");
const stats = document.querySelector("#stats");

function cells(r) {
  const models = Object.entries(r.models).sort()
    .map(([m, v]) => el("span", { class: "pill" }, `${m} ${v ?? "–"}`));
  const drift = Object.entries(r.drift)
    .map(([m, d]) => el("span", { class: "pill warn" }, `${m} ${d.have ?? "–"} → ${d.want}`));
  const job = r.job ? el("span", { class: stateClass(r.job.state) },
    `${r.job.state ?? ""} ${r.job.model ?? ""} ${r.job.version ?? ""}`) : "";
  const hw = r.hardware.device_model || r.hardware.gpu || "";
  return [
    el("td", {}, el("a", { href: `/robots/${encodeURIComponent(r.id)}` }, r.id)),
    el("td", { class: r.online ? "on" : "off" }, r.online ? "online" : "offline"),
    el("td", { "data-ts": r.last_seen ?? "" }, ago(r.last_seen)),
    el("td", {}, r.groups.map((g) => el("span", { class: "pill" }, g))),
    el("td", {}, hw, r.hardware.jetpack ? ` (JetPack ${r.hardware.jetpack})` : ""),
    el("td", {}, models), el("td", {}, drift), el("td", {}, job),
  ];
}

function row(r) {
  return el("tr", { "data-robot": r.id }, cells(r));
}

function renderStats(page) {
  stats.replaceChildren(
    el("span", {}, `${page.total} robots`), el("span", { class: "on" }, `${page.online} online`),
    el("span", { class: "warn" }, `${page.drifting} drifting`),
    el("span", {}, `showing ${rows.size ? page.offset + 1 : 0}–${page.offset + rows.size} of ${page.matched}`));
}

let total = null;  // robots in the fleet as the page last heard: a change means a new page
let lastPage = {};  // the counts the stats line shows

function render(page) {
  rows.clear();
  tbody.replaceChildren(...page.robots.map((r) => { const tr = row(r); rows.set(r.id, tr); return tr; }));
  total = page.total;
  lastPage = { total: page.total, online: page.online, drifting: page.drifting,
    offset: page.offset, matched: page.matched };
  renderStats(lastPage);
  const groups = document.querySelector("#group");
  if (groups.options.length - 1 !== page.groups.length) {
    groups.replaceChildren(el("option", { value: "" }, "all groups"),
      ...page.groups.map((g) => el("option", { value: g }, g)));
    groups.value = state.group;
  }
  document.querySelector("#prev").disabled = page.offset === 0;
  document.querySelector("#next").disabled = page.offset + page.limit >= page.matched;
  document.body.dataset.ready = "1";
}

async function load() {
  const params = new URLSearchParams(Object.entries(state).filter(([, v]) => v !== ""));
  try {
    render(await api(`/api/fleet?${params}`));
  } catch (e) {
    stats.replaceChildren(el("span", { class: "error" }, e.message));
  }
}

function bind() {
  for (const id of ["q", "group", "online", "drift"]) {
    document.querySelector(`#${id}`).addEventListener("input", (e) => {
      state[id] = e.target.value; state.offset = 0; load();
    });
  }
  document.querySelectorAll("th[data-sort]").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.sort;
    state.order = state.sort === key && state.order === "asc" ? "desc" : "asc";
    state.sort = key; load();
  }));
  document.querySelector("#prev").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); load(); };
  document.querySelector("#next").onclick = () => { state.offset += state.limit; load(); };
}

bind();
load();
// Each change brings the whole fleet's counts. A robot that joined or left changes the
// total: the page itself is fetched again. Under a filter, how many robots match can
// change too: ask the server, at most every two seconds whatever the fleet's churn.
let matchDue = null;
function refreshMatched() {
  if (matchDue) return;
  matchDue = setTimeout(async () => {
    matchDue = null;
    const params = new URLSearchParams(Object.entries({ ...state, limit: 1 }).filter(([, v]) => v !== ""));
    try { lastPage.matched = (await api(`/api/fleet?${params}`)).matched; renderStats(lastPage); }
    catch { /* the next change asks again */ }
  }, 2000);
}

live(["fleet"], {
  robots: ({ changed, counts }) => {
    if (counts.total !== total) { load(); return; }
    for (const r of changed) rows.get(r.id)?.replaceChildren(...cells(r));
    Object.assign(lastPage, counts);
    renderStats(lastPage);
    if (state.q || state.group || state.online || state.drift) refreshMatched();
  },
});
// "last seen" is relative: keep it true without asking the server.
setInterval(() => document.querySelectorAll("td[data-ts]").forEach((td) => {
  td.textContent = ago(Number(td.dataset.ts) || null);
}), 5000);
