// Rollouts, newest first; rows change as the rollouts move.
import { api, live, el, when, stateClass, counts } from "./common.js";

const tbody = document.querySelector("#rollouts tbody");
const rows = new Map();

function cells(r) {
  return [
    el("td", {}, el("a", { href: `/rollouts/${encodeURIComponent(r.id)}` }, r.id)),
    el("td", { class: stateClass(r.state), "data-field": "state" }, r.state),
    el("td", {}, r.kind), el("td", {}, `${r.model} ${r.version}`), el("td", {}, r.target),
    el("td", { "data-field": "counts" }, counts(r.counts)),
    el("td", { class: "num" }, `${(r.failure_rate * 100).toFixed(0)} %`),
    el("td", {}, when(r.created_at)),
  ];
}

function put(r) {
  let tr = rows.get(r.id);
  if (!tr) {
    tr = el("tr", { "data-rollout": r.id });
    rows.set(r.id, tr);
    tbody.prepend(tr);
  }
  tr.replaceChildren(...cells(r));
}

api("/api/rollouts").then((list) => {
  list.slice().reverse().forEach(put);
  document.body.dataset.ready = "1";
}).catch((e) => tbody.replaceChildren(el("tr", {}, el("td", { class: "error" }, e.message))));
live(["rollouts"], { rollouts: ({ changed }) => changed.slice().reverse().forEach(put) });
