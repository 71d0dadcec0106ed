"""The console's reads: one object over the controller's stores, every read through
their methods, serialised by one lock (the stores share one SQLite connection)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.desired.drift import released, wanted
from controller.desired.releases import rollout_release
from controller.desired.store import current_documents, read_history, read_rollout_releases
from controller.fleet.registry import DeviceRecord, Registry
from controller.rollouts.store import RolloutStore
from controller.telemetry.store import METRICS, TelemetryStore, TelemetryStoreError
from protocol.errors import CodedError

SORT_KEYS = ("id", "last_seen", "online", "groups", "job")
MAX_PAGE = 1000
MAX_WINDOW_S = 30 * 24 * 3600
# How stale a finished rollout's brief in the list may be. Its counts rarely move after
# the end (a rollback's late answer), and counting one costs 20-60 ms at 10,000 devices:
# 50 of them on every one-second poll would keep a core busy.
FINISHED_BRIEF_TTL_S = 60.0
# A rollout page's device table: every device up to this many, else the ones that changed
# last (its failures are listed apart, whatever their number).
DEVICES_SHOWN = 500


class QueryError(CodedError, ValueError):
    """A console query the API refuses (a bad filter, sort or window): 400."""

    code = "console_query"


@dataclass(frozen=True)
class FleetQuery:
    q: str = ""
    group: str = ""
    online: bool | None = None
    drift: bool | None = None
    sort: str = "id"
    desc: bool = False
    offset: int = 0
    limit: int = 100

    @classmethod
    def parse(cls, params: dict[str, str]) -> FleetQuery:
        try:
            query = cls(
                q=params.get("q", ""),
                group=params.get("group", ""),
                online=_tristate(params.get("online")),
                drift=_tristate(params.get("drift")),
                sort=params.get("sort", "id"),
                desc=params.get("order", "asc") == "desc",
                offset=int(params.get("offset", 0)),
                limit=int(params.get("limit", 100)),
            )
        except ValueError as e:
            raise QueryError(f"bad fleet query: {e}") from e
        if query.sort not in SORT_KEYS:
            raise QueryError(f"unknown sort {query.sort!r}; choose one of: {', '.join(SORT_KEYS)}")
        if query.offset < 0 or not 1 <= query.limit <= MAX_PAGE:
            raise QueryError(f"offset must be >= 0 and limit within 1..{MAX_PAGE}")
        return query


def _tristate(v: str | None) -> bool | None:
    if v in (None, ""):
        return None
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def robot_row(d: DeviceRecord, want: dict[str, str]) -> dict[str, Any]:
    """One robot as the fleet list shows it."""
    active = {name: (m or {}).get("active") for name, m in d.models.items()}
    drift = {
        name: {"want": v, "have": active.get(name)}
        for name, v in sorted(want.items())
        if active.get(name) != v
    }
    job = d.job or None
    return {
        "id": d.id,
        "online": d.online,
        "last_seen": d.last_seen,
        "groups": d.groups,
        "agent_version": d.agent_version,
        "hardware": {k: v for k, v in d.hardware.items() if v is not None},
        "models": active,
        "drift": drift,
        "job": job,
    }


def _matches(row: dict[str, Any], q: FleetQuery) -> bool:
    if q.q and q.q.lower() not in row["id"].lower():
        return False
    if q.group and q.group not in row["groups"]:
        return False
    if q.online is not None and row["online"] != q.online:
        return False
    return q.drift is None or bool(row["drift"]) == q.drift


def _sort_key(row: dict[str, Any], key: str) -> Any:
    if key == "last_seen":
        return row["last_seen"] or 0.0
    if key == "groups":
        return ",".join(row["groups"])
    if key == "job":
        return (row["job"] or {}).get("state") or ""
    return row[key]


def select_fleet(rows: list[dict[str, Any]], q: FleetQuery) -> dict[str, Any]:
    """Filter, sort (ties by id) and cut one page; the totals count the whole fleet."""
    kept = [r for r in rows if _matches(r, q)]
    kept.sort(key=lambda r: r["id"])
    kept.sort(key=lambda r: _sort_key(r, q.sort), reverse=q.desc)
    return {
        "total": len(rows),
        "matched": len(kept),
        "online": sum(1 for r in rows if r["online"]),
        "drifting": sum(1 for r in rows if r["drift"]),
        "offset": q.offset,
        "limit": q.limit,
        "groups": sorted({g for r in rows for g in r["groups"]}),
        "robots": kept[q.offset : q.offset + q.limit],
    }


def latency_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """From raw telemetry payloads: "model@version" -> {p50_ms|p99_ms: [[ts, ms]...]},
    and "metric:model@version:name" -> {"value": [[ts, v]...]} for custom metrics."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for r in rows:
        try:
            models = json.loads(r["payload"]).get("models") or {}
        except (ValueError, AttributeError):
            continue
        for name, m in models.items():
            _add_model_points(out, r["ts"], name, m)
    return out


def _add_model_points(
    out: dict[str, dict[str, list[list[float]]]], ts: float, name: str, m: dict[str, Any]
) -> None:
    key = f"{name}@{m.get('version') or '?'}"
    for p in ("p50_ms", "p99_ms"):
        if m.get(p) is not None:
            out.setdefault(key, {}).setdefault(p, []).append([ts, float(m[p])])
    for version, vm in (m.get("metrics") or {}).items():
        for metric, st in (vm.get("metrics") or {}).items():
            value = st.get("sum") if st.get("kind") == "counter" else st.get("mean")
            if value is not None:
                series = out.setdefault(f"metric:{name}@{version}:{metric}", {})
                series.setdefault("value", []).append([ts, float(value)])


@dataclass
class ConsoleData:
    """Reads for the API and the live poller."""

    controller_db: str | Path | None
    telemetry_db: str | Path | None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _registry: Registry | None = None
    _telemetry: TelemetryStore | None = None
    _store: RolloutStore | None = None
    # rollout id -> (when counted, the rollout row's updated_at, its brief)
    _briefs: dict[str, tuple[float, float, dict[str, Any]]] = field(default_factory=dict)

    def _reg(self) -> Registry | None:
        if self._registry is None and self.controller_db is not None:
            self._registry = Registry.open(self.controller_db)
        return self._registry

    def _rollouts(self) -> RolloutStore | None:
        reg = self._reg()
        if self._store is None and reg is not None:
            self._store = RolloutStore(reg.conn, offline=reg.offline_ids)
        return self._store

    def _tele(self) -> TelemetryStore | None:
        if self._telemetry is None and self.telemetry_db is not None:
            try:
                self._telemetry = TelemetryStore(self.telemetry_db, readonly=True)
            except TelemetryStoreError:  # nothing ingested yet
                return None
        return self._telemetry

    # -- fleet -------------------------------------------------------------------------
    def fleet_rows(self) -> list[dict[str, Any]]:
        with self._lock:
            reg = self._reg()
            if reg is None:
                return []
            groups, pins = released(reg.conn)
            return [
                robot_row(d, wanted(d.groups, groups, pins.get(d.id, {}))[0]) for d in reg.devices()
            ]

    def fleet(self, q: FleetQuery) -> dict[str, Any]:
        return select_fleet(self.fleet_rows(), q)

    # -- one robot ---------------------------------------------------------------------
    def robot(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            reg, store = self._reg(), self._rollouts()
            d = reg.get(device_id) if reg is not None else None
            if d is None or store is None or reg is None:
                return None
            groups, pins = released(reg.conn)
            jobs = [
                self._job(store, r.to_dict(), a.to_dict()) for r, a in store.device_history(d.id)
            ]
        return {
            **robot_row(d, wanted(d.groups, groups, pins.get(d.id, {}))[0]),
            "models_detail": d.models,
            "trust_version": d.trust_version,
            "jobs": jobs,
        }

    @staticmethod
    def _job(store: RolloutStore, r: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        events = store.events(r["id"], a["device_id"])
        return {
            "rollout_id": r["id"],
            "kind": r["kind"],
            "model": r["model"],
            "version": r["version"],
            "wave": a["wave"],
            "state": a["state"],
            "code": a["code"],
            "reason": a["reason"],
            "gate": a["gate"],
            "prev_version": a["prev_version"],
            "rollback": a["rb_state"],
            "states": [
                {
                    "state": e["state"],
                    "at": e["at"],
                    "received_at": e["received_at"],
                    "reason": e["reason"],
                    "code": e["code"],
                }
                for e in events
            ],
        }

    def telemetry(self, device_id: str, window_s: float, until: float | None = None) -> dict:
        if not 0 < window_s <= MAX_WINDOW_S:
            raise QueryError(f"window must be within 1..{int(MAX_WINDOW_S)} seconds")
        hi = until if until is not None else time.time()
        return self.telemetry_between(device_id, hi - window_s, hi)

    def telemetry_between(self, device_id: str, lo: float, hi: float) -> dict[str, Any]:
        """Every metric's points in [lo, hi), and latency/custom series per model version."""
        with self._lock:
            store = self._tele()
            if store is None:
                return {"since": lo, "until": hi, "metrics": {}, "models": {}}
            metrics = {m: store.series(device_id, m, lo, hi) for m in METRICS}
            raw = list(store.raw_rows(device_id, lo, hi))
        return {
            "since": lo,
            "until": hi,
            "metrics": {k: [list(p) for p in v] for k, v in metrics.items() if v},
            "models": latency_series(raw),
        }

    def latest_telemetry(self) -> dict[str, float]:
        """device id -> the time of its newest sample."""
        with self._lock:
            store = self._tele()
            return {s.device_id: s.ts for s in store.latest()} if store is not None else {}

    # -- rollouts and releases -----------------------------------------------------------
    def rollouts(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest rollouts' briefs: a running one counted on every call, a finished
        one again only when its row changes or its brief is FINISHED_BRIEF_TTL_S old."""
        now = time.monotonic()
        with self._lock:
            store = self._rollouts()
            if store is None:
                return []
            briefs: dict[str, tuple[float, float, dict[str, Any]]] = {}
            for r in store.recent(limit):
                cached = self._briefs.get(r.id)
                fresh = (
                    cached is not None
                    and r.finished_at is not None
                    and cached[1] == r.updated_at
                    and now - cached[0] < FINISHED_BRIEF_TTL_S
                )
                if cached is None or not fresh:
                    cached = (
                        now,
                        r.updated_at,
                        self._rollout_brief(store.light_summary(r.id).to_dict()),
                    )
                briefs[r.id] = cached
            self._briefs = briefs
            return [b for _, _, b in briefs.values()]

    @staticmethod
    def _rollout_brief(s: dict[str, Any]) -> dict[str, Any]:
        r = s["rollout"]
        counts: dict[str, int] = {}
        for w in s["waves"]:
            for state, n in w["counts"].items():
                counts[state] = counts.get(state, 0) + n
        return {
            "id": r["id"],
            "kind": r["kind"],
            "state": r["state"],
            "model": r["model"],
            "version": r["version"],
            "target": r["target"],
            "created_at": r["created_at"],
            "updated_at": r["updated_at"],
            "finished_at": r["finished_at"],
            "assigned": s["assigned"],
            "failed": s["failed"],
            "failure_rate": s["failure_rate"],
            "counts": counts,
        }

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        with self._lock:
            store = self._rollouts()
            r = store.find(rollout_id) if store is not None else None
            if store is None or r is None:
                return None
            out = store.light_summary(r.id).to_dict()
            out["devices"], everyone = store.device_rows(r.id, DEVICES_SHOWN)
            out["devices_total"] = sum(w["size"] for w in out["waves"])
            out["devices_order"] = "wave" if everyone else "changed"
            slo = getattr(store, "slo_verdicts", None)  # SLO verdicts, where the store has them
            out["slo"] = slo(r.id) if callable(slo) else None
            out["release"] = rollout_release(r, read_rollout_releases(store.conn, r.id))
        return out

    def releases(self) -> dict[str, Any]:
        with self._lock:
            reg = self._reg()
            if reg is None:
                return {"current": {}, "history": []}
            return {"current": current_documents(reg.conn), "history": read_history(reg.conn)}
