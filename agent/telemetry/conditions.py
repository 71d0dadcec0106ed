"""The conditions a speed measurement ran under, and whether they held still.

A latency figure from a Jetson means something only with the power mode (nvpmodel), the
clocks (pinned by `jetson_clocks` or left to DVFS), the temperatures and any thermal
throttling it was taken under; and a comparison is only fair when none of them moved
while it ran (NVIDIA's own advice: measure in the production power mode with the clocks
locked, and distrust a run during which they changed). The speed gate snapshots these
before, between and after its batches; `changes()` names what moved, and the gate then
declines to judge instead of charging the model with the machine's drift.

Everything comes from `JetsonSysfs` (files under a configurable root), so a recorded
tree stands in for a board in the tests. Off a Jetson every field is None/empty and
nothing can change: the gate judges as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent.telemetry.sysfs import Clock, JetsonSysfs

# A governor re-evaluates clocks continuously; under DVFS only the limits it may move
# within are meaningful to compare. A pinned clock must not move at all (1 MHz slack for
# rounding).
_PINNED_SLACK_MHZ = 1.0


@dataclass(frozen=True)
class Conditions:
    power_mode: str | None = None  # nvpmodel name, e.g. "MAXN" / "15W"
    clocks_pinned: bool | None = None  # GPU and every CPU policy at min == max
    gpu: Clock | None = None
    cpus: dict[str, Clock] = field(default_factory=dict)
    temps_c: dict[str, float] = field(default_factory=dict)
    throttling: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_conditions(sysfs: JetsonSysfs) -> Conditions:
    gpu = sysfs.gpu_clock_mhz()
    cpus = sysfs.cpu_clocks_mhz()
    clocks = ([gpu] if gpu is not None else []) + list(cpus.values())
    pins = [c.pinned for c in clocks]
    pinned = None if not pins or None in pins else all(pins)
    return Conditions(
        power_mode=sysfs.nvpmodel(),
        clocks_pinned=pinned,
        gpu=gpu,
        cpus=cpus,
        temps_c=sysfs.temps_c(),
        throttling=sysfs.throttling(),
    )


def _clock_change(name: str, a: Clock, b: Clock, pinned: bool) -> str | None:
    if (a.min, a.max) != (b.min, b.max):
        return f"{name} limits {_span(a)} -> {_span(b)} MHz"
    if pinned and abs(a.cur - b.cur) > _PINNED_SLACK_MHZ:
        return f"{name} {a.cur:g} -> {b.cur:g} MHz"
    return None


def _span(c: Clock) -> str:
    return f"{c.min:g}-{c.max:g}" if c.min is not None and c.max is not None else "?"


def changes(before: Conditions, after: Conditions, *, max_temp_rise_c: float) -> list[str]:
    """What moved between two snapshots, one short phrase each; [] when nothing did."""
    out: list[str] = []
    if before.power_mode != after.power_mode:
        out.append(f"power mode {before.power_mode} -> {after.power_mode}")
    if before.clocks_pinned != after.clocks_pinned:
        word = {True: "pinned", False: "not pinned", None: "unknown"}
        out.append(f"clocks {word[before.clocks_pinned]} -> {word[after.clocks_pinned]}")
    pinned = bool(before.clocks_pinned and after.clocks_pinned)
    pairs = [("gpu", before.gpu, after.gpu)] + [
        (f"cpu {k}", before.cpus.get(k), after.cpus.get(k))
        for k in sorted(set(before.cpus) | set(after.cpus))
    ]
    for name, a, b in pairs:
        if (a is None) != (b is None):
            out.append(f"{name} clock {'appeared' if a is None else 'vanished'}")
        elif a is not None and b is not None and (msg := _clock_change(name, a, b, pinned)):
            out.append(msg)
    started = sorted(set(after.throttling) - set(before.throttling))
    if started:
        out.append("throttling started (" + ", ".join(
            f"{k} {after.throttling[k]}" for k in started) + ")")  # fmt: skip
    for zone in sorted(set(before.temps_c) & set(after.temps_c)):
        rise = after.temps_c[zone] - before.temps_c[zone]
        if rise > max_temp_rise_c:
            out.append(f"{zone} {before.temps_c[zone]:g} -> {after.temps_c[zone]:g} C")
    return out


def _thermal(change: str) -> bool:
    return change.startswith("throttling") or change.endswith(" C")


def describe(moved: list[str]) -> str:
    """ "clocks changed (gpu 1300.5 -> 918 MHz)", "thermal state changed (...)", or both."""
    thermal = [_thermal(m) for m in moved]
    kinds = [k for k, hit in (("clocks", not all(thermal)), ("thermal state", any(thermal))) if hit]
    return f"{' and '.join(kinds) or 'conditions'} changed ({'; '.join(moved)})"


class ConditionsWatch:
    """Snapshots taken along one measurement: `start()`, `check()` between batches."""

    def __init__(self, sysfs: JetsonSysfs, *, max_temp_rise_c: float = 10.0) -> None:
        self.sysfs = sysfs
        self.max_temp_rise_c = max_temp_rise_c
        self.before: Conditions | None = None
        self.after: Conditions | None = None

    def start(self) -> Conditions:
        self.before = self.after = read_conditions(self.sysfs)
        return self.before

    def check(self) -> list[str]:
        """What changed since `start()` (empty when nothing did)."""
        if self.before is None:
            self.start()
        assert self.before is not None
        self.after = read_conditions(self.sysfs)
        return changes(self.before, self.after, max_temp_rise_c=self.max_temp_rise_c)

    def figures(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }
