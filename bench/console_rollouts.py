"""The console's rollout list as its live poll reads it once a second: the briefs of the 50
newest rollouts, one of them running, the others finished, each over N devices.

Side by side in one process on one database, alternating poll by poll:
  baseline  every brief counted on every poll (FINISHED_BRIEF_TTL_S = 0, what the console
            did before finished briefs were kept)
  kept      a finished rollout's brief counted again only when its row changes or when
            FINISHED_BRIEF_TTL_S has passed; the running one's on every poll
Between polls a device of the running rollout moves one step, so each poll has news.
Then the running rollout's own page (`rollout:ID`), the same way:
  baseline  its summary and every assignment read into Python (the whole device table)
  kept      its summary and the DEVICES_SHOWN devices that changed last, picked by the
            database
Reported per backend: medians of the wall time and of this process's CPU per poll, the
ratio, and the share of each second a poll a second would take.

    .venv/bin/python bench/console_rollouts.py [--rollouts 50] [--devices 2000] [--polls 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from rollout_scale import database  # noqa: E402

import controller.console.data as console_data  # noqa: E402
from controller.console.data import ConsoleData  # noqa: E402
from controller.fleet.registry import Registry  # noqa: E402
from controller.rollouts.store import RolloutStore  # noqa: E402

STEPS = ("RECEIVED", "DOWNLOADING", "BUILDING", "GATING", "ACTIVATING", "PROBATION", "SUCCEEDED")


def fill(target: str, rollouts: int, devices: int) -> RolloutStore:
    """`rollouts` rollouts over the same devices, the newest one running (every device
    commanded, PENDING), the rest finished with 97 % SUCCEEDED and 3 % FAILED."""
    store = RolloutStore(Registry.open(target).conn)
    ids = [f"robot-{i:05d}" for i in range(devices)]
    for n in range(rollouts):
        rid = f"r-{n:03d}"
        store.create(
            rollout_id=rid, kind="deploy", model="detector", version=f"1.0.{n}",
            target="all", waves_spec="100%", waves=[ids], max_failure_rate=0.5,
            wave_timeout=30.0, auto_rollback=True,
        )  # fmt: skip
        with store.conn.transaction() as c:
            c.executemany(
                "UPDATE assignments SET command_id=?, state=? WHERE rollout_id=? AND device_id=?",
                [
                    (f"{rid}-{d}", "FAILED" if i % 33 == 0 else "SUCCEEDED", rid, d)
                    for i, d in enumerate(ids)
                ],
            )
        store.set_state(rid, "succeeded")
        if n == rollouts - 1:  # the running one
            with store.conn.transaction() as c:
                c.execute("UPDATE assignments SET state='PENDING' WHERE rollout_id=?", (rid,))
                c.execute(
                    "UPDATE rollouts SET state='running', finished_at=NULL WHERE id=?", (rid,)
                )
    return store


def detail_before(store: RolloutStore, rollout_id: str) -> dict[str, Any]:
    """The rollout page's answer as the console built it before: every assignment."""
    out = store.light_summary(rollout_id).to_dict()
    keys = ("device_id", "wave", "state", "code", "reason", "gate", "rb_state", "updated_at")
    out["devices"] = [{k: a.to_dict()[k] for k in keys} for a in store.assignments(rollout_id)]
    return out


def timed(work: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def poll(data: ConsoleData, ttl: float) -> tuple[float, float, int]:
    console_data.FINISHED_BRIEF_TTL_S = ttl
    wall, cpu = time.perf_counter(), time.process_time()
    briefs = data.rollouts()
    return time.perf_counter() - wall, time.process_time() - cpu, len(briefs)


def measure(kind: str, rollouts: int, devices: int, polls: int, tmp: Path) -> dict[str, Any]:
    server, new_db, _ = database(kind, tmp)
    try:
        target = new_db()
        store = fill(target, rollouts, devices)
        running = f"r-{rollouts - 1:03d}"
        ways = {
            "baseline": (ConsoleData(target, None), 0.0),
            "kept": (ConsoleData(target, None), 60.0),
        }
        for data, ttl in ways.values():
            poll(data, ttl)  # warm-up: the first poll counts every rollout either way
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        for i in range(polls):
            device = f"robot-{i % devices:05d}"
            store.apply_job_state(f"{running}-{device}", STEPS[0], seq=1, device_id=device)
            for name, (data, ttl) in ways.items():
                wall, cpu, n = poll(data, ttl)
                assert n == rollouts
                got[name].append((wall, cpu))
        briefs = {k: {b["id"]: b["counts"] for b in d.rollouts()} for k, (d, _) in ways.items()}
        assert briefs["baseline"] == briefs["kept"], "the kept briefs must equal the counted ones"
        page = ConsoleData(target, None)
        pages: dict[str, list[tuple[float, float]]] = {"baseline": [], "kept": []}
        for i in range(polls):
            device = f"robot-{(polls + i) % devices:05d}"
            store.apply_job_state(f"{running}-{device}", STEPS[0], seq=1, device_id=device)
            pages["baseline"].append(timed(lambda: detail_before(store, running)))
            pages["kept"].append(timed(lambda: page.rollout(running)))
        return {
            "kind": kind,
            **{
                f"{k}_{m}": statistics.median(x[j] for x in v) * 1000
                for k, v in got.items()
                for j, m in enumerate(("wall_ms", "cpu_ms"))
            },
            **{
                f"page_{k}_{m}": statistics.median(x[j] for x in v)
                for k, v in pages.items()
                for j, m in enumerate(("wall_ms", "cpu_ms"))
            },
        }
    finally:
        if server is not None:
            server.stop()


def report(rollouts: int, devices: int, polls: int, results: list[dict[str, Any]]) -> None:
    print(
        f"\n{rollouts} rollouts x {devices} devices (1 running), one poll of the rollout list; "
        f"medians of {polls} polls"
    )
    for r in results:
        print(f"\n  {r['kind']}")
        for k in ("baseline", "kept"):
            print(
                f"    {k:<9} wall {r[k + '_wall_ms']:8.1f} ms   CPU {r[k + '_cpu_ms']:8.1f} ms"
                f"   ({r[k + '_wall_ms'] / 10:.1f} % of each second at one poll a second)"
            )
        print(f"    baseline / kept, wall: {r['baseline_wall_ms'] / r['kept_wall_ms']:.1f}x")
        print(f"  {r['kind']}: the running rollout's page")
        for k in ("baseline", "kept"):
            w, c = r[f"page_{k}_wall_ms"], r[f"page_{k}_cpu_ms"]
            print(f"    {k:<9} wall {w:8.1f} ms   CPU {c:8.1f} ms")
        ratio = r["page_baseline_wall_ms"] / r["page_kept_wall_ms"]
        print(f"    baseline / kept, wall: {ratio:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=50)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--polls", type=int, default=15)
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="console-rollouts-"))
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    results = [measure(k, args.rollouts, args.devices, args.polls, tmp) for k in kinds]
    report(args.rollouts, args.devices, args.polls, results)


if __name__ == "__main__":
    main()
