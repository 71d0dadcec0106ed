"""The gate's accuracy check on a large model's outputs: each metric against np.allclose.

    .venv/bin/python bench/gate_accuracy.py [--runs 15] [--json]

Outputs shaped like those of large real models, golden values drawn once (seeded), and an
"engine" output made from them as a reduced-precision engine's would be (the golden plus
noise of 0.1% of the output's spread, and 0.1% of the elements far off): a YOLOv8x-seg
head [1, 116, 8400] and its mask prototypes [1, 32, 160, 160], full-resolution
segmentation logits [1, 19, 512, 1024] (10 M elements), classifier logits [256, 1000] and
a detector's boxes [1, 8400, 4] with their scores. For every (output, metric) pair, in one
process and alternating run by run so that both see the same machine, it times
`agent.gate.accuracy.check_accuracy` with that metric and a plain
`np.allclose(got, golden, atol, rtol)` on the same arrays, and prints the medians and their
ratio. The verdicts are not the point (allclose and the gate's elementwise check refuse
these outputs for their tail, the other metrics pass them): the cost is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.gate.accuracy import check_accuracy  # noqa: E402
from protocol.manifest import GateSpec  # noqa: E402

ATOL = RTOL = 1e-3


def _engine_like(golden: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(golden.shape).astype(np.float32) * np.float32(1e-3 * golden.std())
    tail = rng.random(golden.shape) < 1e-3  # a few elements far off, as quantization gives
    return golden + noise + np.where(tail, np.float32(0.5 * golden.std()), np.float32(0))


def _boxes(rng: np.random.Generator, n: int = 8400) -> dict[str, np.ndarray]:
    xy = rng.random((1, n, 2)).astype(np.float32) * 600
    wh = rng.random((1, n, 2)).astype(np.float32) * 60 + 4
    return {"boxes": np.concatenate([xy, xy + wh], axis=2),
            "scores": (rng.random((1, n)) ** 6).astype(np.float32)}  # fmt: skip


def cases(rng: np.random.Generator) -> list[tuple[str, dict, dict, dict[str, Any]]]:
    """(label, golden, engine, the gate.outputs checks) per benchmarked pair."""
    out: list[tuple[str, dict, dict, dict[str, Any]]] = []
    shapes = {
        "yolo_head [1,116,8400]": (1, 116, 8400),
        "mask_protos [1,32,160,160]": (1, 32, 160, 160),
        "seg_logits [1,19,512,1024]": (1, 19, 512, 1024),
    }
    for label, shape in shapes.items():
        g = rng.standard_normal(shape).astype(np.float32) * 3
        e = _engine_like(g, rng)
        for metric, check in (
            ("elementwise", {}),
            ("quantile 0.99", {"metric": "quantile", "atol": 1e-2, "rtol": 1e-2}),
            ("cosine", {"metric": "cosine"}),
        ):
            out.append((f"{label} {metric}", {"y": g}, {"y": e}, {"y": check} if check else {}))
    logits = rng.standard_normal((256, 1000)).astype(np.float32) * 4
    out.append(("logits [256,1000] topk k=5", {"y": logits}, {"y": _engine_like(logits, rng)},
                {"y": {"metric": "topk", "k": 5, "min_agreement": 0.9}}))  # fmt: skip
    det = _boxes(rng)
    jitter = rng.standard_normal(det["boxes"].shape).astype(np.float32) * np.float32(0.5)
    moved = {"boxes": det["boxes"] + jitter, "scores": det["scores"]}
    for thr in (0.25, 0.001):
        above = int((det["scores"] >= thr).sum())
        out.append((f"boxes [1,8400,4] score>={thr:g} ({above} boxes)", det, moved,
                    {"boxes": {"metric": "boxes", "scores": "scores", "score_threshold": thr},
                     "scores": {"metric": "max", "atol": 0.05}}))  # fmt: skip
    return out


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(runs: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(2026)
    rows = []
    for label, golden, got, checks in cases(rng):
        gate = GateSpec.model_validate({"atol": ATOL, "rtol": RTOL, "outputs": checks})

        def gate_check(got: dict = got, golden: dict = golden, gate: GateSpec = gate) -> object:
            return check_accuracy(got, golden, gate)

        def allclose(got: dict = got, golden: dict = golden) -> object:
            return [np.allclose(got[k], golden[k], atol=ATOL, rtol=RTOL) for k in golden]

        gate_check(), allclose()  # warm caches and lazy imports
        ours, base = [], []
        for _ in range(runs):
            ours.append(_time(gate_check))
            base.append(_time(allclose))
        report = check_accuracy(got, golden, gate)
        elements = sum(a.size for a in golden.values())
        rows.append({
            "case": label,
            "elements": elements,
            "gate_ms": statistics.median(ours) * 1e3,
            "allclose_ms": statistics.median(base) * 1e3,
            "ratio": statistics.median(ours) / statistics.median(base),
            "gate_ns_per_element": statistics.median(ours) / elements * 1e9,
            "gate_verdict": "pass" if report.passed else f"fail ({report.failed_metric})",
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = bench(args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"median of {args.runs} runs each, alternating; numpy {np.__version__}")
    print("| output, metric | elements | gate check | np.allclose | ratio | gate verdict |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['elements']:,} | {r['gate_ms']:.2f} ms | "
              f"{r['allclose_ms']:.2f} ms | {r['ratio']:.1f}x | {r['gate_verdict']} |")  # fmt: skip


if __name__ == "__main__":
    main()
