"""SLO verdicts over many simulated cohorts: false aborts and detection, per bake length.

Each trial simulates one bake of a wave on a fleet: every device has its own level of the
metric (unit-to-unit spread `--device-sd`, e.g. 3%: different scenes, sensors,
calibrations), and each telemetry sample is that level times sample noise (`--sample-sd`:
one interval's mean over a few hundred frames still wanders). The canary devices run
the new version: unchanged (level × 1.0) or degraded (× 0.9 for confidence, × 1.1 for
latency). Baselines: the rest of the fleet over the same window (waves of 1 and 3
devices), or for the last wave the same devices' window before their switch (`paired`).
Every device also has a window of the same length before the switch (what a bake reads).
controller/rollouts/slo.py judges each trial exactly as a bake does; a FAIL is an abort.
`--levels-only` judges the bake window alone, to show what the windows before buy.

    .venv/bin/python bench/slo_verdicts.py [--trials 2000] [--fleet 10] [--seed 1]

Goal (issue 15): false aborts on an unchanged version <= 1%, detection of a 10%
degradation >= 95%, and the bake (samples per device) that needs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.rollouts.slo import FAIL, NOT_ENOUGH_DATA, Slo, judge, parse_slo

CASES = (
    # (SLO, level, degraded factor, sample sd): confidence drops 10%, latency grows 10%.
    ("confidence_mean >= -2%", 0.80, 0.90, 0.05),
    ("latency_p99 <= +5%", 12.0, 1.10, 0.15),
)


def trial(
    rng: np.random.Generator,
    slo: Slo,
    level: float,
    factor: float,
    *,
    fleet: int,
    canary: int,
    samples: int,
    device_sd: float,
    sample_sd: float,
    levels_only: bool,
) -> str:
    levels = level * (1 + rng.normal(0, device_sd, fleet))

    def draw(lv: float, f: float) -> list[float]:
        return list(lv * f * (1 + rng.normal(0, sample_sd, samples)))

    new = {f"d{i}": draw(levels[i], factor) for i in range(canary)}
    new_before = {f"d{i}": draw(levels[i], 1.0) for i in range(canary)}
    if canary == fleet:
        changes = {} if levels_only else {"canary_before": new_before}
        return judge(slo, new, new_before, paired=True, **changes).verdict
    old = {f"d{i}": draw(levels[i], 1.0) for i in range(canary, fleet)}
    old_before = {f"d{i}": draw(levels[i], 1.0) for i in range(canary, fleet)}
    if levels_only:
        return judge(slo, new, old).verdict
    return judge(slo, new, old, canary_before=new_before, baseline_before=old_before).verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--fleet", type=int, default=10)
    ap.add_argument("--device-sd", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--samples", default="5,10,20,40,80,160")
    ap.add_argument("--only", default="", help="the SLOs whose expression contains this")
    ap.add_argument(
        "--levels-only",
        action="store_true",
        help="judge on the bake window's levels alone (no window before the switch)",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    design = "levels only" if args.levels_only else "change from each device's own past"
    print(
        f"fleet {args.fleet}, device sd {args.device_sd:.0%}, {args.trials} trials each, {design}"
    )
    print(
        "| SLO | canary vs baseline | samples/device | false aborts | not enough data | "
        "detection of 10% |"
    )
    print("|---|---|---|---|---|---|")
    for expr, level, factor, sample_sd in CASES:
        if args.only not in expr:
            continue
        slo = parse_slo(expr)
        for canary in (1, 3, args.fleet):
            for samples in (int(s) for s in args.samples.split(",")):
                kw = {
                    "fleet": args.fleet,
                    "canary": canary,
                    "samples": samples,
                    "device_sd": args.device_sd,
                    "sample_sd": sample_sd,
                    "levels_only": args.levels_only,
                }
                same = [trial(rng, slo, level, 1.0, **kw) for _ in range(args.trials)]
                worse = [trial(rng, slo, level, factor, **kw) for _ in range(args.trials)]
                label = (
                    f"{canary} vs {args.fleet - canary}"
                    if canary < args.fleet
                    else f"{canary} vs themselves before"
                )
                print(
                    f"| `{expr}` | {label} | {samples} | {same.count(FAIL) / len(same):.2%} | "
                    f"{same.count(NOT_ENOUGH_DATA) / len(same):.1%} | "
                    f"{worse.count(FAIL) / len(worse):.1%} |"
                )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
