// Shared by the console's pages: the API, live events, and small formatters.

export async function api(path, options = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...options });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

// Server-sent events of the given topics; handlers: {eventName: fn(data)}.
export function live(topics, handlers) {
  const dot = document.querySelector("header .live");
  const src = new EventSource(`/api/events?topics=${encodeURIComponent(topics.join(","))}`);
  for (const [name, fn] of Object.entries(handlers)) {
    src.addEventListener(name, (e) => fn(JSON.parse(e.data)));
  }
  src.onopen = () => { if (dot) dot.textContent = "● live"; };
  src.onerror = () => { if (dot) dot.textContent = "○ reconnecting"; };
  return src;
}

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c != null) e.append(c instanceof Node ? c : String(c));
  return e;
}

export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "";
}

export function stateClass(state) {
  const s = String(state).toLowerCase();
  if (["succeeded", "done", "active"].includes(s)) return "on";
  if (["failed", "rolled_back", "timed_out", "aborted", "aborting", "rejected", "canceled"]
    .includes(s)) return "bad";
  return "warn";
}

export function counts(c) {
  return Object.entries(c || {}).sort().map(([k, n]) =>
    el("span", { class: `pill ${stateClass(k)}`, "data-state": k }, `${k} ${n}`));
}
