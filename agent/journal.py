"""Job states and their events, persisted together: the state row and the event with its
seq are written in one SQLite transaction before the agent acts on that state. A move the
transition table (`protocol.messages.TRANSITIONS`) does not allow is refused before
anything is written (IllegalTransitionError)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.store import JobData, JobRecord, Store
from protocol.errors import IllegalTransitionError
from protocol.messages import JobEvent, JobState, bound_reason
from protocol.topics import Topics

log = structlog.get_logger("jetfleet.agent.journal")

# Test-only hook (documented in docs/agent.md): JETFLEET_AGENT_TEST_PAUSE_AT=STATE makes the
# worker hold right after persisting STATE, so a test can kill -9 the agent there.
PAUSE_ENV = "JETFLEET_AGENT_TEST_PAUSE_AT"


class Journal:
    def __init__(
        self,
        store: Store,
        topics: Topics,
        device_id: str,
        *,
        on_event: Callable[[], None] = lambda: None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.topics = topics
        self.device_id = device_id
        self._on_event = on_event
        self._on_change = on_change
        self._stop = threading.Event()

    def _fields(
        self,
        job: JobRecord | None,
        command_id: str,
        state: JobState,
        *,
        progress: float = 0.0,
        code: str | None = None,
        reason: str | None = None,
        gate: dict[str, Any] | None = None,
        kind: str | None = None,
        rollout_id: str | None = None,
        phase: str | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "command_id": command_id,
            "device_id": self.device_id,
            "state": state,
            "progress": max(0.0, min(1.0, progress)),
            "rollout_id": job.rollout_id if job else rollout_id,
            "kind": job.kind if job else kind,
            "model": job.model if job else None,
            "version": job.version if job else None,
        }
        if code is not None:
            fields["code"] = code
        if reason is not None:
            fields["reason"] = reason
        if gate is not None:
            fields["gate"] = gate
        if phase is not None:
            fields["phase"] = phase
        if job is not None and job.data.get("origin"):
            fields["origin"] = job.data["origin"]  # a converge job (agent/desired.py)
        return fields

    def transition(
        self,
        job: JobRecord,
        state: JobState,
        *,
        progress: float | None = None,
        code: str | None = None,
        reason: str | None = None,
        gate: dict[str, Any] | None = None,
        data: JobData | None = None,
    ) -> JobEvent:
        """Persist `state` for the job and queue its event, atomically; then publish."""
        with self.store.tx() as db:
            event = self.record(
                db, job, state, progress=progress, code=code, reason=reason, gate=gate, data=data
            )
        self.notify()
        self._maybe_pause(state)
        return event

    def record(
        self,
        db: sqlite3.Connection,
        job: JobRecord,
        state: JobState,
        *,
        progress: float | None = None,
        code: str | None = None,
        reason: str | None = None,
        gate: dict[str, Any] | None = None,
        data: JobData | None = None,
        event_only: bool = False,
    ) -> JobEvent:
        """`transition` inside the caller's transaction (several steps that must commit
        together, such as a command's intake); the caller calls notify() after commit.
        `event_only`: code and reason annotate the event, not the job's row."""
        if not job.state.can_move_to(state):
            raise IllegalTransitionError(
                f"job {job.command_id} ({job.kind}) cannot move from {job.state.value} "
                f"to {state.value}"
            )
        if progress is None:
            progress = 1.0 if state.terminal else 0.0
        if data is not None:
            job.data = data
        self.store.update_job(
            db,
            job.command_id,
            state=state,
            data=job.data,
            model=job.model,
            version=job.version,
            code=None if event_only else code,
            reason=None if event_only or reason is None else bound_reason(reason),
        )
        event = self.store.add_event(
            db,
            self.topics.events(self.device_id),
            self._fields(
                job, job.command_id, state, progress=progress, code=code, reason=reason, gate=gate
            ),
        )
        job.state = state
        if not event_only:
            job.code, job.reason = code, event.reason
        log.info(
            "job_state",
            command_id=job.command_id,
            kind=job.kind,
            state=state.value,
            seq=event.seq,
            code=code,
            reason=reason,  # the log keeps the full text
        )
        return event

    def notify(self) -> None:
        """After a commit: publish the new events, refresh the status."""
        self._on_event()
        self._on_change()

    def progress(self, job: JobRecord, progress: float, *, phase: str | None = None) -> None:
        """A progress event within the current state (not a new state); `phase` names the
        build phase a BUILDING progress is of."""
        with self.store.tx() as db:
            self.store.add_event(
                db,
                self.topics.events(self.device_id),
                self._fields(job, job.command_id, job.state, progress=progress, phase=phase),
            )
        self._on_event()

    def _maybe_pause(self, state: JobState) -> None:
        self.maybe_pause_named(state.value)

    def maybe_pause_named(self, point: str) -> None:
        """Test-only: hold here while PAUSE_ENV names this point (a state, or a named
        point inside one such as ACTIVATING:switched)."""
        if os.environ.get(PAUSE_ENV, "").upper() == point.upper():
            log.warning("test_pause", point=point, env=PAUSE_ENV)
            while not self._stop.is_set():
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
