// One rollout: its waves with per-state counts, failures, SLO verdicts, devices; live.
import { api, live, el, when, stateClass, counts } from "./common.js";

const id = decodeURIComponent(location.pathname.split("/").pop());
const main = document.querySelector("#rollout");

function gateText(g) {
  if (!g) return "";
  return Object.entries(g).filter(([, v]) => typeof v !== "object" || v === null)
    .map(([k, v]) => `${k}=${typeof v === "number" ? +v.toFixed(3) : v}`).join(" ");
}

function actions(r, allowed) {
  if (!allowed || ["succeeded", "aborted"].includes(r.state)) return "";
  const out = el("div", { class: "bar" });
  for (const a of ["pause", "resume", "promote", "abort"]) {
    out.append(el("button", { "data-action": a, onclick: () => act(a) }, a));
  }
  out.append(el("span", { id: "action-result", class: "muted" }));
  return out;
}

async function act(action) {
  const shown = document.querySelector("#action-result");
  try {
    const r = await api(`/api/rollouts/${encodeURIComponent(id)}/${action}`,
      { method: "POST", headers: { "X-Jetfleet-Action": "1" } });
    shown.textContent = `${action}: ${r.state}`;
  } catch (e) {
    shown.textContent = e.message; shown.className = "error";
  }
}

let allowActions = false;

function render(s) {
  const r = s.rollout;
  const waves = s.waves.map((w) => el("tr", { "data-wave": w.idx },
    el("td", {}, w.idx), el("td", { class: "num" }, w.size),
    el("td", { class: stateClass(w.state) }, w.state), el("td", { "data-field": "counts" }, counts(w.counts))));
  const failures = s.failures.map((f) => el("tr", {},
    el("td", {}, el("a", { href: `/robots/${encodeURIComponent(f.device_id)}` }, f.device_id)),
    el("td", {}, f.wave), el("td", { class: "bad" }, f.state), el("td", {}, f.code ?? ""),
    el("td", {}, f.reason ?? "")));
  const release = s.release.none ? el("p", { class: "muted", id: "release" }, `none set: ${s.release.none}`)
    : el("p", { id: "release" }, s.release.groups.map((g) => el("span", { class: `pill ${g.outcome === "failed" ? "bad" : "on"}` },
      g.outcome === "failed" ? `group ${g.group}: not set (${g.reason})`
        : `group ${g.group} v${g.version}${g.outcome === "unchanged" ? " (already so)" : ""}`)));
  const slo = s.slo ? el("pre", {}, JSON.stringify(s.slo, null, 1)) : el("p", { class: "muted" }, "no SLO verdicts");
  const devices = s.devices.map((d) => el("tr", {},
    el("td", {}, el("a", { href: `/robots/${encodeURIComponent(d.device_id)}` }, d.device_id)),
    el("td", {}, d.wave), el("td", { class: stateClass(d.state) }, d.state),
    el("td", {}, d.reason ?? ""), el("td", { class: "muted" }, gateText(d.gate))));
  main.replaceChildren(
    el("h1", {}, `Rollout ${r.id} `, el("span", { class: stateClass(r.state), id: "state" }, r.state)),
    el("p", {}, `${r.kind} ${r.model} ${r.version} → ${r.target}; waves ${r.waves_spec}; `,
      `max failure rate ${(r.max_failure_rate * 100).toFixed(0)} %; started ${when(r.created_at)}`,
      r.abort_reason ? el("span", { class: "bad" }, `; ${r.abort_reason}`) : ""),
    actions(r, allowActions),
    el("p", { class: "stats" }, el("span", {}, `${s.assigned} commanded`),
      el("span", { class: "bad" }, `${s.failed} failed (${(s.failure_rate * 100).toFixed(0)} %)`)),
    el("h2", {}, "Waves"),
    el("table", { id: "waves" }, el("thead", {}, el("tr", {}, ["wave", "size", "state", "jobs"].map((h) => el("th", {}, h)))), el("tbody", {}, waves)),
    el("h2", {}, "Failures"),
    failures.length ? el("table", {}, el("tbody", {}, failures)) : el("p", { class: "muted" }, "none"),
    el("h2", {}, "Release"), release,
    el("h2", {}, "SLO verdicts"), slo,
    el("h2", {}, "Devices"),
    s.devices_order === "changed"
      ? el("p", { class: "muted", id: "devices-shown" }, `the ${s.devices.length} that changed last of ${s.devices_total}, newest first; failures are all listed above`)
      : "",
    el("table", { id: "devices" }, el("thead", {}, el("tr", {}, ["robot", "wave", "state", "reason", "gate"].map((h) => el("th", {}, h)))), el("tbody", {}, devices)));
  document.body.dataset.ready = "1";
}

Promise.all([api(`/api/rollouts/${encodeURIComponent(id)}`), api("/api/info")])
  .then(([s, info]) => { allowActions = info.actions; render(s); })
  .catch((e) => main.replaceChildren(el("p", { class: "error" }, e.message)));
live([`rollout:${id}`], { rollout: render });
