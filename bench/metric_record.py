"""Cost of recording a metric from the robot's service: ModelRuntime.count() / .gauge().

The service's hot path calls `rt.count(name, n)` or `rt.gauge(name, v)` per frame. This
times those calls (the real ModelRuntime, flushing aggregated deltas every 0.25 s to a
real agent LiveStats listening in another process) against a bare counter increment
(`d[name] += 1` on a plain dict) in the same run, in the same loop shape. Each figure is
the loop's time / calls; `--runs` repeats, medians and the ratio to the bare increment.

    .venv/bin/python bench/metric_record.py [--calls 200000] [--runs 7]

Goal (issue 15): under 2 µs per call.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.livestats import LiveStats
from agent.runtime import ModelRuntime


class _NoEngine:
    """Nothing is inferred here: only the metric calls are timed."""

    def close(self) -> None:
        pass


def _agent(sock: str, ready: Any, stop: Any) -> None:
    with LiveStats(Path(sock)) as live:
        ready.set()
        while not stop.wait(0.5):
            live.take_metrics("bench")


def _data_dir(root: Path) -> Path:
    (root / "models/bench/versions/1.0.0").mkdir(parents=True)
    os.symlink("versions/1.0.0", root / "models/bench/current")
    return root


def _per_call_ns(body: Callable[[int], None], calls: int) -> float:
    t0 = time.perf_counter_ns()
    body(calls)
    return (time.perf_counter_ns() - t0) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = _data_dir(Path(tmp))
        ready, stop = mp.Event(), mp.Event()
        agent = mp.Process(target=_agent, args=(str(root / "run/live.sock"), ready, stop))
        agent.start()
        assert ready.wait(10), "the agent's LiveStats did not start"
        rt = ModelRuntime("bench", root, engine_loader=lambda *a, **k: _NoEngine())
        d = {"detections": 0}

        def bare(n: int) -> None:
            for _ in range(n):
                d["detections"] += 1

        def count(n: int) -> None:
            for _ in range(n):
                rt.count("detections", 3)

        def gauge(n: int) -> None:
            for i in range(n):
                rt.gauge("mean_confidence", 0.5 + (i & 7) / 16)

        results: dict[str, list[float]] = {"bare": [], "count": [], "gauge": []}
        for _ in range(args.runs):
            for name, body in (("bare", bare), ("count", count), ("gauge", gauge)):
                results[name].append(_per_call_ns(body, args.calls))
        rt.close()
        stop.set()
        agent.join(5)
    base = statistics.median(results["bare"])
    print(f"python {sys.version.split()[0]}, {args.calls} calls x {args.runs} runs")
    for name, ns in results.items():
        med = statistics.median(ns)
        print(f"{name:6s} median {med:7.1f} ns/call  (min {min(ns):7.1f})  x{med / base:5.1f}")
    worst = max(statistics.median(results["count"]), statistics.median(results["gauge"]))
    print(f"goal < 2000 ns/call: {'met' if worst < 2000 else 'MISSED'}")
    return 0 if worst < 2000 else 1


if __name__ == "__main__":
    raise SystemExit(main())
