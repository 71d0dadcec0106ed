"""A rollout's summary at 10,000 devices, as `rollout status`, `rollout list`, the console
and the live view of `rollout start --wait` compute it: folded from every assignment
(`RolloutStore.summary`) against counted by the database (`RolloutStore.light_summary`),
side by side in one process on one database, alternating, after one warm-up of each.

The rollout: waves 1,10%,100% (1 / 999 / 9,000), every device's deploy command really
signed (CommandSigner, the envelope the driver stores), caught late in its last wave with
a mix of job states: succeeded (with gate figures), in flight, PENDING, not yet released
(WAITING), ON_HOLD, failed, not judged, timed out, rolled back, rejected, canceled offline,
STAGED, and rollback commands. A registry of the same devices, 2 % offline, answers
offline_pending as it does in `jetfleet` (1 % of the last wave is PENDING and offline).
Reported per backend: medians of the wall time and of this process's CPU per summary,
their ratio, and on PostgreSQL the server's CPU per summary (a mean: the kernel counts
another process's CPU in 10 ms ticks).

    .venv/bin/python bench/rollout_view.py [--devices 10000] [--reps 9] [--db both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import psutil  # noqa: E402
from rollout_scale import database, tree_cpu_s  # noqa: E402

from controller.fleet.registry import Registry  # noqa: E402
from controller.rollouts.commands import CommandSigner  # noqa: E402
from controller.rollouts.driver import parse_waves, plan_waves  # noqa: E402
from controller.rollouts.store import RolloutStore  # noqa: E402
from controller.security.keystore import init_keys  # noqa: E402
from protocol.messages import DeviceStatus, HardwareProfile, ModelSlot  # noqa: E402

WAVES = "1,10%,100%"
RID = "r-view"
GATE = {"p50_ms": 4.1, "p99_ms": 5.2, "live_p99_ms": 5.0,
        "speed": {"comparison": {"median_change_pct": -3.2, "verdict": "PASS"}}}  # fmt: skip
# The last wave, by device number % 100: (job states the device reported, code). "" is
# a device whose command was not released yet (WAITING); () one that reported nothing.
LAST_WAVE: list[tuple[tuple[str, ...], str | None]] = (
    [(("RECEIVED", "DOWNLOADING", "SUCCEEDED"), None)] * 62
    + [(("DOWNLOADING",), None)] * 4
    + [(("BUILDING",), None)] * 3
    + [(("VALIDATING",), None)] * 3
    + [((), None)] * 10  # PENDING
    + [(("",), None)] * 6  # WAITING
    + [(("ON_HOLD",), "window")] * 2
    + [(("FAILED",), "latency_regression")]
    + [(("FAILED",), "not_judged")]
    + [(("TIMED_OUT",), "timed_out")]
    + [(("ROLLED_BACK",), "probation_failed")]
    + [(("REJECTED",), "bad_signature")]
    + [(("CANCELED",), "offline")]
    + [(("STAGED",), None)]
    + [(("CANCELED",), "canceled")]
    + [(("SUCCEEDED",), None)] * 2
)
assert len(LAST_WAVE) == 100


def mix(i: int, wave: int) -> tuple[tuple[str, ...], str | None]:
    """What device i of `wave` reported: the first waves ended (1 in 50 failed)."""
    if wave == 2:
        return LAST_WAVE[i % 100]
    if i % 50 == 7:
        return ("FAILED",), "latency_regression"
    return ("RECEIVED", "SUCCEEDED"), None


def status(device_id: str, online: bool) -> DeviceStatus:
    return DeviceStatus.new(
        device_id=device_id,
        online=online,
        agent_version="0.1.0",
        groups=["fleet"],
        hardware=HardwareProfile(device_model="Jetson Orin NX", jetpack="6.0"),
        models={"detector": ModelSlot(active="1.0.0")},
    )


def build(target: str, n: int, signer: CommandSigner) -> tuple[RolloutStore, str]:
    """The registry and the rollout as the driver would have left them."""
    registry = Registry.open(target)
    ids = [f"robot-{i:05d}" for i in range(n)]
    with registry.conn.transaction():
        for i, d in enumerate(ids):
            registry.apply_status(status(d, online=i % 50 != 23))
    store = RolloutStore(registry.conn, offline=registry.offline_ids)
    waves = plan_waves(ids, parse_waves(WAVES))
    store.create(
        rollout_id=RID, kind="deploy", model="detector", version="2.0.0", target="all",
        waves_spec=WAVES, waves=waves, max_failure_rate=0.05, wave_timeout=900.0,
        auto_rollback=True, bundle_url="https://bundles.example/detector-2.0.0.jfb",
        bundle_sha256="ab" * 32, bundle_size=48_000_000,
        prev_versions=dict.fromkeys(ids, "1.0.0"),
    )  # fmt: skip
    offline: list[str] = []
    with store.transaction():
        for w, devices in enumerate(waves):
            store.start_wave(RID, w, deadline=time.time() + 900)
            for d in devices:
                states, code = mix(int(d.split("-")[1]), w)
                if code == "offline":
                    offline.append(d)
                elif states != ("",):
                    command(store, signer, d, states, code)
            if w < len(waves) - 1:
                store.end_wave(RID, w)
        store.leave_to_release(RID, offline, "offline when its wave started")
        for i, d in enumerate(waves[1][:40:4]):  # rollback commands, some answered
            store.record_rollback(RID, d, f"rb-{d}", b"rollback " * 60, "1.0.0")
            if i % 2:
                store.apply_job_state(f"rb-{d}", "SUCCEEDED", device_id=d)
    return store, RID


def command(
    store: RolloutStore, signer: CommandSigner, d: str, states: tuple[str, ...], code: str | None
) -> None:
    signed = signer.deploy(
        d, url="https://bundles.example/detector-2.0.0.jfb", sha256="ab" * 32,
        size=48_000_000, rollout_id=RID, name="detector", version="2.0.0",
    )  # fmt: skip
    store.record_command(RID, d, signed.command_id, signed.envelope)
    store.mark_published([signed.command_id])
    for seq, state in enumerate(states, 1):
        final = seq == len(states)
        store.advance_job(
            signed.command_id, state, device_id=d, seq=seq,
            code=code if final else None, reason=f"{state.lower()} ({code})" if code else None,
            gate=GATE if state in ("SUCCEEDED", "FAILED") else None,
        )  # fmt: skip


# Per (wall, this process's CPU, the server's CPU): see the module's docstring.
AVERAGES = (statistics.median, statistics.median, statistics.mean)


def timed(fn: Callable[[], Any], server: psutil.Process | None) -> tuple[float, float, float]:
    """(wall s, this process's CPU s, the database server's CPU s) of one call."""
    s0, c0, t0 = tree_cpu_s(server), time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, tree_cpu_s(server) - s0


def measure(kind: str, n: int, reps: int, tmp: Path, signer: CommandSigner) -> dict[str, Any]:
    server, new_db, server_proc = database(kind, tmp)
    try:
        t0 = time.perf_counter()
        store, rid = build(new_db(), n, signer)
        built = time.perf_counter() - t0
        full, light = store.summary(rid), store.light_summary(rid)  # warm-up, and the check
        if light != full:
            raise SystemExit(f"{kind}: light_summary differs from summary")
        runs: dict[str, list[tuple[float, float, float]]] = {"full": [], "light": []}
        for _ in range(reps):
            runs["full"].append(timed(lambda: store.summary(rid), server_proc))
            runs["light"].append(timed(lambda: store.light_summary(rid), server_proc))
        store.conn.close()
    finally:
        if server is not None:
            server.stop()
    med = {k: [1000 * f(r[i] for r in v) for i, f in enumerate(AVERAGES)]
           for k, v in runs.items()}  # fmt: skip
    print(f"{kind}: built in {built:.1f}s; full {med['full'][0]:.1f} ms, "
          f"light {med['light'][0]:.1f} ms; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return {"kind": kind, "med": med, "summary": full}


def report(n: int, reps: int, results: list[dict[str, Any]]) -> None:
    s = results[0]["summary"]
    counts: dict[str, int] = {}
    for w in s.waves:
        for state, k in w.counts.items():
            counts[state] = counts.get(state, 0) + k
    print(f"\n{n} devices, waves {WAVES}; medians of {reps} alternating runs each")
    print(f"  states {dict(sorted(counts.items()))}; failed {s.failed}/{s.assigned}, "
          f"listed: {len(s.failures)} failures, {len(s.not_judged)} not judged, "
          f"{len(s.offline_pending)} offline pending, {len(s.staged)} staged, "
          f"{len(s.left_to_release)} left to release; rollbacks {s.rollbacks}")  # fmt: skip
    print("| per summary | " + " | ".join(r["kind"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    rows = (
        ("`summary()` wall", "full", 0),
        ("`light_summary()` wall", "light", 0),
        ("`summary()` CPU, this process", "full", 1),
        ("`light_summary()` CPU, this process", "light", 1),
        ("`summary()` CPU, database server", "full", 2),
        ("`light_summary()` CPU, database server", "light", 2),
    )
    for label, key, i in rows:
        # SQLite has no server: its work is this process's.
        cells = [f"{r['med'][key][i]:.1f} ms" if i < 2 or r["kind"] != "sqlite" else "—"
                 for r in results]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + " |")
    ratios = [f"{r['med']['full'][0] / r['med']['light'][0]:.1f}x" for r in results]
    print("| wall, full / light | " + " | ".join(ratios) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rollout-view-"))
    signer = CommandSigner([init_keys(tmp / "keys").operator])
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    results = [measure(k, args.devices, args.reps, tmp, signer) for k in kinds]
    report(args.devices, args.reps, results)


if __name__ == "__main__":
    main()
