// Releases per group (and pins per robot): the current document and the history.
import { api, el } from "./common.js";

function models(m) {
  return Object.entries(m).sort().map(([n, d]) => el("span", { class: "pill" }, `${n} ${d.version}`));
}

api("/api/releases").then(({ current, history }) => {
  const box = document.querySelector("#releases");
  if (!history.length) { box.replaceChildren(el("p", { class: "muted" }, "no release signed here yet")); return; }
  const cur = Object.entries(current).sort().map(([scope, d]) => el("tr", {},
    el("td", {}, scope), el("td", {}, `v${d.version}`), el("td", {}, models(d.models)), el("td", {}, d.issued_at)));
  const hist = history.map((d) => el("tr", {}, el("td", {}, d.scope), el("td", {}, `v${d.version}`),
    el("td", {}, models(d.models)), el("td", {}, d.issued_at)));
  const head = () => el("thead", {}, el("tr", {}, ["scope", "version", "models", "issued"].map((h) => el("th", {}, h))));
  box.replaceChildren(el("h3", {}, "Current (groups and pins)"), el("table", {}, head(), el("tbody", {}, cur)),
    el("h3", {}, "History"), el("table", {}, head(), el("tbody", {}, hist)));
}).catch((e) => document.querySelector("#releases").replaceChildren(el("p", { class: "error" }, e.message)));
