"""Exercise agent/engines/cuda_buffers.py (the TensorRT runner's pycuda layer) on a real GPU.

    python bench/cuda_runner_check.py [--sizes 4096,1048576,16777216,67108864] [--reps 20]

Needs an NVIDIA GPU and pycuda (on a Jetson: built from its sdist). It checks what the
TensorRT runner relies on and prints JSON saying what ran and what it measured:

- the primary context, pushed per thread (the runtime library calls from robot threads);
- device buffers (alloc, grow), pinned staging, H2D then D2H on a stream: byte equality;
- CUDA event timing of copies of several sizes, next to host wall-clock time of the same
  copies (events must not exceed wall time; GB/s from events).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# Loaded by file path: the module needs only numpy and pycuda, so a bare GPU host without
# the agent's other dependencies (pydantic, structlog) can run this check.
_MODULE = Path(__file__).resolve().parent.parent / "agent" / "engines" / "cuda_buffers.py"
_spec = importlib.util.spec_from_file_location("cuda_buffers", _MODULE)
assert _spec is not None and _spec.loader is not None
cb = importlib.util.module_from_spec(_spec)
sys.modules["cuda_buffers"] = cb  # dataclasses look their module up while it executes
_spec.loader.exec_module(cb)


def round_trip(nbytes: int, stream: cb.Stream, rng: np.random.Generator) -> bool:
    n = max(1, nbytes // 4)
    src = rng.standard_normal(n).astype(np.float32)
    up, down = cb.PinnedStaging(), cb.PinnedStaging()
    staged = up.view(src.shape, src.dtype)
    np.copyto(staged, src)
    buf = cb.DeviceBuffer(src.nbytes)
    buf.upload(staged, stream)
    back = down.view(src.shape, src.dtype)
    back.fill(0)
    buf.download(back, stream)
    stream.synchronize()
    buf.free()
    return bool(np.array_equal(src, back))


def time_copies(nbytes: int, reps: int, stream: cb.Stream) -> dict[str, Any]:
    host = cb.PinnedStaging().view((max(1, nbytes // 4),), np.float32)
    host.fill(1.0)
    buf = cb.DeviceBuffer(host.nbytes)
    timer = cb.EventTimer(stream)
    out: dict[str, Any] = {"bytes": int(host.nbytes)}
    for name, op in (("h2d", buf.upload), ("d2h", buf.download)):
        op(host, stream)  # warm-up
        stream.synchronize()
        ev, wall = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            timer.start()
            op(host, stream)
            timer.stop()
            ev.append(timer.elapsed_ms())  # waits for the end event
            wall.append((time.perf_counter() - t0) * 1e3)
        med = float(np.median(ev))
        out[name] = {
            "event_ms_median": round(med, 4),
            "event_ms_min": round(float(np.min(ev)), 4),
            "wall_ms_median": round(float(np.median(wall)), 4),
            "gb_per_s": round(host.nbytes / (med / 1e3) / 1e9, 2) if med > 0 else None,
            "events_within_wall": bool(all(e <= w + 0.05 for e, w in zip(ev, wall, strict=True))),
        }
    buf.free()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="4096,1048576,16777216,67108864")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict[str, Any] = {"ran": [], "ok": False, "host": platform.platform()}
    if not cb.cuda_available():
        report["error"] = "no CUDA device answered through pycuda"
        print(json.dumps(report, indent=2))
        return 1
    import pycuda
    import pycuda.driver as cuda

    info = cb.device_info(0)
    report["device"] = {"name": info.name, "compute_capability": info.compute_capability,
                        "total_memory": info.total_memory}  # fmt: skip
    report["pycuda"] = getattr(pycuda, "VERSION_TEXT", None)
    report["cuda_driver"] = cuda.get_driver_version()
    report["cuda_compiled_for"] = ".".join(str(x) for x in cuda.get_version())
    rng = np.random.default_rng(0)
    checks: dict[str, bool] = {}
    with cb.cuda_context(0):
        stream = cb.Stream()
        report["ran"].append("primary context push/pop, stream")
        checks["round_trip"] = all(round_trip(n, stream, rng) for n in [*sizes, 1, 12345])
        report["ran"].append(f"H2D+D2H round trip, sizes {[*sizes, 1, 12345]} bytes")
        grow = cb.DeviceBuffer(16)
        grow.ensure(1 << 20)
        checks["buffer_grows"] = grow.nbytes >= 1 << 20
        grow.free()
        report["ran"].append("DeviceBuffer.ensure growth")
        free, total = cb.mem_get_info()
        report["mem_free_total"] = [free, total]
        report["copies"] = [time_copies(n, args.reps, stream) for n in sizes]
        report["ran"].append(f"CUDA event timing of H2D/D2H, {args.reps} reps per size")

    other: dict[str, bool] = {}

    def in_thread() -> None:
        with cb.cuda_context(0):
            other["ok"] = round_trip(1 << 16, cb.Stream(), np.random.default_rng(1))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    checks["other_thread_round_trip"] = other.get("ok", False)
    report["ran"].append("round trip from a second thread (context pushed there)")
    checks["events_within_wall"] = all(
        c[d]["events_within_wall"] for c in report["copies"] for d in ("h2d", "d2h")
    )
    report["checks"] = checks
    report["ok"] = all(checks.values())
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
