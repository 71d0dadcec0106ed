"""Build progress: what a backend reports while it builds, and where the reports go.

A build on an Orin takes minutes with nothing to show for it; backends report phases
(TensorRT's IProgressMonitor phases, ONNX Runtime's one "optimizing graph" phase) through
`report(phase, fraction)`. The engine child (agent/enginejob.py) installs the sink that
sends them to the worker, which turns them into BUILDING events; anywhere else (tests,
`jetfleet-agent doctor`) there is no sink and reports go nowhere.

`phase` is always a top-level phase; `fraction` is how far that phase is, nested phases
included. How often reports travel on is agent.enginejob.Throttle's rule.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

Sink = Callable[[str, float], None]

_lock = threading.Lock()
_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    global _sink
    with _lock:
        _sink = sink


def report(phase: str, fraction: float) -> None:
    """Forward one report to the installed sink. Never raises: TensorRT calls this from
    C++ (an exception there ends the process) and progress is never worth a build."""
    with _lock:
        sink = _sink
    if sink is None:
        return
    # A broken pipe to the worker shows up as the child's end, not here.
    with contextlib.suppress(Exception):
        sink(phase, max(0.0, min(1.0, fraction)))


@dataclass
class _Phase:
    name: str
    parent: str | None
    steps: int
    done: int = 0
    children: list[str] = field(default_factory=list)


class PhaseTracker:
    """Nested phases with step counts (TensorRT's model) -> reports of the top-level phase.

    A phase's fraction is (steps done + the running child phase's fraction) / steps, so a
    long inner phase moves its parent's figure instead of freezing it.
    """

    def __init__(self) -> None:
        self._phases: dict[str, _Phase] = {}

    def start(self, name: str, parent: str | None, steps: int) -> None:
        if parent is not None and parent not in self._phases:
            parent = None  # a parent we never saw start: treat as top-level
        self._phases[name] = _Phase(name, parent, max(int(steps), 0))
        if parent is not None:
            self._phases[parent].children.append(name)
        self._report(name)

    def step(self, name: str, step: int) -> None:
        phase = self._phases.get(name)
        if phase is None:
            return
        # TensorRT numbers steps from 0: step k done means k + 1 steps done.
        phase.done = min(max(phase.done, int(step) + 1), phase.steps)
        self._report(name)

    def finish(self, name: str) -> None:
        phase = self._phases.get(name)
        if phase is None:
            return
        phase.done = phase.steps
        self._report(name, finished=True)
        self._phases.pop(name, None)
        if phase.parent in self._phases:
            siblings = self._phases[phase.parent].children
            if name in siblings:
                siblings.remove(name)

    def _fraction(self, phase: _Phase) -> float:
        if phase.steps <= 0:
            return 0.0
        running = [self._phases[c] for c in phase.children if c in self._phases]
        inner = self._fraction(running[-1]) if running else 0.0
        return min(1.0, (phase.done + inner) / phase.steps)

    def _top(self, phase: _Phase) -> _Phase:
        while phase.parent is not None and phase.parent in self._phases:
            phase = self._phases[phase.parent]
        return phase

    def _report(self, name: str, *, finished: bool = False) -> None:
        phase = self._phases[name]
        top = self._top(phase)
        fraction = 1.0 if finished and top is phase else self._fraction(top)
        report(top.name, fraction)
