"""Drift (issue 13): robots not on their desired versions, and why.

The desired version of a model on a device is its pin, else what its groups' releases say
(groups that disagree: a conflict, which the device leaves alone) — the rule the agent
applies (agent/desired.py). A device is drifted for a model when what it runs differs.
Why, first match: in a rollout (a rollout's command outranks an older release), offline
since its last status, held back (the version failed its gate or probation there), a
conflict, converging (a job in flight), else not yet converged (e.g. within its jitter,
or it has not received the release yet).

Pure: callers bring the releases (from the broker, or the controller's history), the
devices (registry or statuses) and the rollouts in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.db import Database
from controller.desired.store import latest_documents
from protocol.messages import DesiredSummary

Versions = Mapping[str, str]  # model -> version


@dataclass(frozen=True)
class DeviceView:
    """What drift needs to know of one device."""

    id: str
    groups: list[str]
    online: bool
    last_seen: float | None
    active: Versions  # model -> active version
    job_model: str | None = None
    job_state: str | None = None
    desired: DesiredSummary | None = None


@dataclass(frozen=True)
class Drift:
    device: str
    groups: list[str]
    model: str
    want: str | None  # None: a conflict, nothing wanted
    active: str | None
    reason: str  # in_rollout | offline | held_back | conflict | converging | pending
    detail: str
    since: float | None = None  # offline since
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wanted(
    groups: Iterable[str], releases: Mapping[str, Versions], pins: Versions
) -> tuple[dict[str, str], dict[str, str]]:
    """model -> desired version, and model -> why its groups disagree (no pin for it)."""
    wants: dict[str, str] = {}
    said_by: dict[str, str] = {}
    conflicts: dict[str, str] = {}
    for g in sorted(groups):
        for model, version in (releases.get(g) or {}).items():
            if model in wants and wants[model] != version:
                conflicts[model] = (
                    f"group {said_by[model]} says {wants[model]}, group {g} says {version}"
                )
            wants.setdefault(model, version)
            said_by.setdefault(model, g)
    for model in conflicts:
        wants.pop(model)
    for model, version in pins.items():
        wants[model] = version
        conflicts.pop(model, None)
    return wants, conflicts


def device_drift(
    d: DeviceView,
    releases: Mapping[str, Versions],
    pins: Versions,
    rollouts: Mapping[str, str],
) -> list[Drift]:
    """`rollouts`: model -> id of an unfinished rollout that drives this device."""
    wants, conflicts = wanted(d.groups, releases, pins)
    out = []
    for model in sorted({*wants, *conflicts}):
        want = wants.get(model)
        active = d.active.get(model)
        if model not in conflicts and active == want:
            continue
        reason, detail = _why(d, model, want, conflicts, rollouts)
        out.append(
            Drift(
                device=d.id,
                groups=list(d.groups),
                model=model,
                want=want,
                active=active,
                reason=reason,
                detail=detail,
                since=d.last_seen if reason == "offline" else None,
            )
        )
    return out


def _why(
    d: DeviceView,
    model: str,
    want: str | None,
    conflicts: Mapping[str, str],
    rollouts: Mapping[str, str],
) -> tuple[str, str]:
    summary = d.desired
    rollout = rollouts.get(model) or (summary.rollouts.get(model) if summary else None)
    if rollout:
        return "in_rollout", f"follows rollout {rollout} until a newer release"
    if not d.online:
        return "offline", "offline; converges when it connects"
    held = summary.held_back.get(model) if summary else None
    if held is not None and held.version == want:
        return "held_back", f"{want} held back [{held.code}]: {held.reason}"
    if model in conflicts:
        return "conflict", f"its groups disagree: {conflicts[model]}; left as it is"
    if d.job_model == model and d.job_state:
        return "converging", f"job in flight: {d.job_state}"
    return "pending", "not converged yet (jitter, or the release not received yet)"


# -- the controller's own record of what it released ------------------------------------
def released(conn: Database) -> tuple[dict[str, dict[str, str]], dict[str, Versions]]:
    """The newest release per group and pins per device this controller signed
    (controller/desired/store.py): group -> model -> version, device -> pins."""
    groups: dict[str, dict[str, str]] = {}
    devices: dict[str, Versions] = {}
    for scope, models in latest_documents(conn).items():
        versions = {n: m["version"] for n, m in models.items()}
        kind, _, name = scope.partition(":")
        (groups if kind == "group" else devices)[name] = versions
    return groups, devices


def summarize(drifts: Iterable[Drift]) -> dict[tuple[str, str], int]:
    """(group, model) -> drifted devices (a device in two groups counts in each)."""
    out: dict[tuple[str, str], int] = {}
    for x in drifts:
        for g in x.groups or [""]:
            out[(g, x.model)] = out.get((g, x.model), 0) + 1
    return out
