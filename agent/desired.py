"""Desired state (issue 13): accept signed releases and pins, converge to them.

The broker delivers each group's release and this device's pins retained, on every
connect. Each is verified (operator role, this group / this device) and kept in state.db
only if its version is higher than the one accepted before; anything else is refused with
a REJECTED report that names the refused bytes (refused_sha256), as for commands.

Convergence: desired = the pin for a model, else what the groups' releases say (two groups
that disagree: a conflict, reported, and that model is left alone). For each model whose
active version differs, a deploy job is queued through the same store and journal as an
operator's deploy (origin `release` or `pin` on its events), so it is persisted, resumed
after a crash and run by the one worker. A job already queued or running for the model
wins (a rollout is never fought). A desired version that failed here is held back, with
its reason, until a release names another one.

Runs in its own thread: documents are handed over by paho's thread, and convergence
starts a jittered delay (`desired.jitter_s`) after the agent starts or a document
changes, so a fleet back from a power cut does not download all at once.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from agent.activation import ModelStore
from agent.commands import TokenBucket, reason_code
from agent.journal import Journal
from agent.store import JobRecord, Store
from agent.truststore import TrustStore
from protocol.dsse import Envelope
from protocol.errors import ProtocolError
from protocol.messages import (
    DeployBody,
    DesiredSummary,
    HeldBack,
    JobState,
    ReasonCode,
)
from protocol.release import DesiredModel, Pins, Release, verify_pins, verify_release
from protocol.topics import Topics

log = structlog.get_logger("jetfleet.agent.desired")

KV_RELEASE = "desired.release."  # + group name
KV_PINS = "desired.pins"
KV_HELD = "desired.held"
KV_JOBS = "desired.jobs"  # model -> command id of the converge job in flight
# A converge job cut short by the agent stopping (code interrupted) is started again, this
# many times: a version whose activation kills the agent must not loop forever.
MAX_INTERRUPTED = 3
SETTLE_EVERY_S = 1.0
REFUSAL_BURST = 10
REFUSAL_EVERY_S = 5.0
MAX_REMEMBERED = 1024  # digests of documents already reported: bounded memory under junk

Ack = Callable[[], None]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def document_topics(topics: Topics, device_id: str, groups: list[str]) -> tuple[str, ...]:
    """The retained topics the agent subscribes to for its desired state."""
    return (*(topics.group_release(g) for g in groups), topics.device_pins(device_id))


@dataclass(frozen=True)
class Want:
    """A model's desired version and which document says so."""

    model: DesiredModel
    origin: str  # "release" | "pin"
    source: str  # for people: "group lab release 3", "pins 2"
    accepted_at: float = 0.0  # when this device accepted that document (time.time())


class DesiredState:
    def __init__(
        self,
        store: Store,
        journal: Journal,
        trust: TrustStore,
        models: ModelStore,
        *,
        device_id: str,
        groups: list[str],
        topics: Topics,
        jitter_s: float,
        wake_worker: Callable[[], None],
        on_change: Callable[[], None] = lambda: None,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.journal = journal
        self.trust = trust
        self.models = models
        self.device_id = device_id
        self.groups = list(groups)
        self.topics = topics
        self.jitter_s = jitter_s
        self._wake_worker = wake_worker
        self._on_change = on_change
        self._now = now
        self._queue: queue.Queue[tuple[str, bytes, Ack] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._due: float | None = None  # monotonic time of the next convergence
        self._reported: set[str] = set()  # digests of refusals and conflicts already told
        self._budget = TokenBucket(REFUSAL_BURST, REFUSAL_EVERY_S)
        self._topic_group = {topics.group_release(g): g for g in self.groups}

    # ---- wiring -------------------------------------------------------------------------
    def enqueue(self, topic: str, payload: bytes, ack: Ack) -> None:
        """Called on paho's thread: hand over, nothing else."""
        self._queue.put((topic, payload, ack))

    def start(self) -> None:
        self._schedule(jitter=True)  # what state.db already holds, e.g. after a power cut
        self._thread = threading.Thread(target=self._run, name="desired", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread:
            self._thread.join(timeout=10)

    def _schedule(self, *, jitter: bool) -> None:
        delay = random.uniform(0.0, self.jitter_s) if jitter else 0.0
        due = time.monotonic() + delay
        if self._due is None or due < self._due:
            self._due = due

    def _run(self) -> None:
        while not self._stop.is_set():
            left = SETTLE_EVERY_S if self._due is None else self._due - time.monotonic()
            try:
                item = self._queue.get(timeout=min(max(left, 0.0), SETTLE_EVERY_S))
            except queue.Empty:
                item = None
            if item is not None:
                self._take(*item)
            try:
                self._tick()
            except (sqlite3.Error, OSError) as e:
                log.error("converge_store_failed", error=str(e))
                self._due = time.monotonic() + SETTLE_EVERY_S
            except Exception:
                log.exception("converge_failed")
                self._due = time.monotonic() + SETTLE_EVERY_S

    def _tick(self) -> None:
        if self._settle_jobs():
            self._schedule(jitter=False)
        if self._due is not None and time.monotonic() >= self._due:
            self._due = None
            self.converge()

    def _take(self, topic: str, payload: bytes, ack: Ack) -> None:
        try:
            if payload and self.accept(topic, payload):
                self._on_change()
                self._schedule(jitter=True)
        except (sqlite3.Error, OSError) as e:
            # Not acknowledged: retained, it comes again on the next connect.
            log.error("desired_store_failed", topic=topic, error=str(e))
            return
        except Exception:
            log.exception("desired_document_failed", topic=topic)
        ack()

    # ---- documents ----------------------------------------------------------------------
    def accept(self, topic: str, payload: bytes) -> bool:
        """Verify one document and keep it if it is newer; True when it changed anything."""
        group = self._topic_group.get(topic)
        key = KV_PINS if group is None else KV_RELEASE + group
        try:
            envelope = Envelope.decode(payload)
            now = self._now()
            doc: Release | Pins = (
                verify_pins(envelope, self.trust.root, device_id=self.device_id, now=now)
                if group is None
                else verify_release(envelope, self.trust.root, group=group, now=now)
            )
        except ProtocolError as e:
            self._refuse(payload, reason_code(e), f"{topic}: {e.reason}")
            return False
        except Exception as e:  # pydantic corner cases: never crash on a payload
            self._refuse(payload, ReasonCode.MALFORMED.value, f"{topic}: unreadable: {e}")
            return False
        digest = hashlib.sha256(envelope.payload_bytes()).hexdigest()
        held = self._load(key)
        if held is not None:
            if doc.version == held["version"] and digest == held["digest"]:
                return False  # the retained copy again
            if doc.version <= held["version"]:
                what = "older than" if doc.version < held["version"] else "as old as"
                self._refuse(
                    payload,
                    ReasonCode.RELEASE_STALE.value,
                    f"{topic}: version {doc.version} is {what} version {held['version']} "
                    "already accepted (a document's version only goes up)",
                )
                return False
        record = {
            "version": doc.version,
            "digest": digest,
            "doc": doc.to_dict(),
            "accepted_at": time.time(),
        }
        with self.store.tx() as db:
            self.store.put_kv(db, key, json.dumps(record))
            if isinstance(doc, Release) and doc.retry:
                self._forget_held(db, set(doc.models))
        log.info("desired_accepted", topic=topic, version=doc.version)
        return True

    def _forget_held(self, db: sqlite3.Connection, names: set[str]) -> None:
        """An explicit retry (`jetfleet release retry`): held-back versions may run again."""
        held = {n: h for n, h in self._held_records().items() if n not in names}
        self.store.put_kv(db, KV_HELD, json.dumps(held))

    def _load(self, key: str) -> dict[str, Any] | None:
        raw = self.store.get(key)
        return json.loads(raw) if raw else None

    def _refuse(self, payload: bytes, code: str, reason: str) -> None:
        """A REJECTED report naming the refused bytes, once per distinct document (the
        broker redelivers a retained one on every connect), within a budget."""
        digest = hashlib.sha256(payload).hexdigest()
        log.warning("desired_refused", code=code, reason=reason[:300])
        if digest in self._reported or not self._budget.take():
            return
        self._remember(digest)
        self._report(code, reason, refused_sha256=digest)

    def _report(self, code: str, reason: str, **fields: Any) -> None:
        with self.store.tx() as db:
            self.store.add_event(
                db,
                self.topics.events(self.device_id),
                {
                    "command_id": str(uuid.uuid4()),
                    "device_id": self.device_id,
                    "state": JobState.REJECTED,
                    "progress": 1.0,
                    "code": code,
                    "reason": reason,
                    **fields,
                },
            )
        self.journal.notify()

    def _remember(self, digest: str) -> None:
        if len(self._reported) >= MAX_REMEMBERED:
            self._reported.clear()  # at worst a refusal is reported again, within the budget
        self._reported.add(digest)

    # ---- what this device should run ----------------------------------------------------
    def releases(self) -> dict[str, Release]:
        out = {}
        for g in self.groups:
            rec = self._load(KV_RELEASE + g)
            if rec is not None:
                out[g] = Release.model_validate(rec["doc"])
        return out

    def pins(self) -> Pins | None:
        rec = self._load(KV_PINS)
        return Pins.model_validate(rec["doc"]) if rec is not None else None

    def desired(self) -> tuple[dict[str, Want], dict[str, str]]:
        """Per model: what to run and why; and the models whose groups disagree."""
        wants: dict[str, Want] = {}
        conflicts: dict[str, str] = {}
        for g, rel in sorted(self.releases().items()):
            at = self._accepted_at(KV_RELEASE + g)
            for name, m in rel.models.items():
                other = wants.get(name)
                if other is not None and other.model != m:
                    conflicts[name] = (
                        f"{other.source} says {name} {other.model.version}, group {g} release "
                        f"{rel.version} says {m.version}"
                    )
                wants.setdefault(name, Want(m, "release", f"group {g} release {rel.version}", at))
        for name in conflicts:
            wants.pop(name, None)
        pins = self.pins()
        at = self._accepted_at(KV_PINS)
        for name, m in (pins.models if pins else {}).items():
            wants[name] = Want(m, "pin", f"pins {pins.version if pins else 0}", at)
            conflicts.pop(name, None)  # the pin decides for this device
        return wants, conflicts

    def _accepted_at(self, key: str) -> float:
        rec = self._load(key)
        return float(rec.get("accepted_at") or 0.0) if rec else 0.0

    def following(self, name: str, want: Want) -> str | None:
        """The rollout this model follows rather than its desired state: one whose command
        arrived after the document that names the model was accepted. A rollout drives
        its robots wave by wave; the release catches up when it completes (the controller
        then publishes it), and a newer document takes over again."""
        job = self.store.latest_rollout_job(name)
        if job is None or job.created_at <= want.accepted_at:
            return None
        return job.rollout_id

    def _held_records(self) -> dict[str, dict[str, Any]]:
        raw = self.store.get(KV_HELD)
        return dict(json.loads(raw)) if raw else {}

    def held_back(self) -> dict[str, HeldBack]:
        """Versions not to try again (entries marked `retry` only count interruptions)."""
        return {
            k: HeldBack.model_validate(v)
            for k, v in self._held_records().items()
            if not v.get("retry")
        }

    def summary(self) -> DesiredSummary | None:
        releases = self.releases()
        pins = self.pins()
        if not releases and pins is None:
            return None
        wants, conflicts = self.desired()
        held = self.held_back()
        return DesiredSummary(
            releases={g: r.version for g, r in releases.items()},
            pins_version=pins.version if pins else None,
            models={n: w.model.version for n, w in wants.items()},
            held_back={
                n: h
                for n, h in held.items()
                if n in wants
                and (wants[n].model.version, wants[n].model.sha256) == (h.version, h.sha256)
                and self.models.slot(n).active != h.version  # an operator deploy got it there
            },
            conflicts=conflicts,
            rollouts={
                n: rid for n, w in wants.items() if (rid := self.following(n, w)) is not None
            },
        )

    # ---- convergence --------------------------------------------------------------------
    def converge(self) -> list[JobRecord]:
        """Queue a converge job for each model that differs from its desired version."""
        wants, conflicts = self.desired()
        self._report_conflicts(conflicts)
        busy = self._busy_models()
        if busy is None:
            self._due = time.monotonic() + SETTLE_EVERY_S  # a job of unknown model: later
            return []
        held = self.held_back()
        started = []
        for name, want in sorted(wants.items()):
            m = want.model
            if self.models.slot(name).active == m.version or name in busy:
                continue
            if self.following(name, want) is not None:
                continue
            h = held.get(name)
            if h is not None and (h.version, h.sha256) == (m.version, m.sha256):
                continue
            started.append(self._start_job(name, want))
        if started:
            self._wake_worker()
        return started

    def _busy_models(self) -> set[str] | None:
        """Models with a job queued or running; None if some job's model is not known yet."""
        busy: set[str] = set()
        for job in self.store.active_jobs():
            if job.kind not in ("deploy", "rollback"):
                continue
            name = job.model or (job.data.get("body") or {}).get("name")
            if not name:
                return None
            busy.add(name)
        return busy

    def _start_job(self, name: str, want: Want) -> JobRecord:
        m = want.model
        body = DeployBody(url=m.url, sha256=m.sha256, size=m.size, name=name, version=m.version)
        job = JobRecord(
            command_id=str(uuid.uuid4()),
            kind="deploy",
            state=JobState.RECEIVED,
            rollout_id=None,
            model=name,
            version=m.version,
            envelope=None,
            data={"body": body.model_dump(mode="json"), "origin": want.origin},
        )
        tracked = self._tracked()
        tracked[name] = job.command_id
        with self.store.tx() as db:
            self.store.insert_job(db, job)
            self.journal.record(db, job, JobState.RECEIVED, reason=f"converging: {want.source}")
            self.journal.record(db, job, JobState.QUEUED)
            self.store.put_kv(db, KV_JOBS, json.dumps(tracked))
        self.journal.notify()
        log.info("converge_started", model=name, version=m.version, source=want.source)
        return job

    def _tracked(self) -> dict[str, str]:
        raw = self.store.get(KV_JOBS)
        return dict(json.loads(raw)) if raw else {}

    def _settle_jobs(self) -> bool:
        """Record how converge jobs that ended did; True if any ended."""
        tracked = self._tracked()
        ended = {}
        for name, cid in tracked.items():
            job = self.store.job(cid)
            if job is None or job.state.terminal:
                ended[name] = job
        if not ended:
            return False
        held = self._held_records()
        for name, job in ended.items():
            del tracked[name]
            if job is not None:
                self._judge(held, name, job)
        with self.store.tx() as db:
            self.store.put_kv(db, KV_JOBS, json.dumps(tracked))
            self.store.put_kv(db, KV_HELD, json.dumps(held))
        self._on_change()
        return True

    def _judge(self, held: dict[str, Any], name: str, job: JobRecord) -> None:
        sha = (job.data.get("body") or {}).get("sha256", "")
        if job.state is JobState.SUCCEEDED:
            held.pop(name, None)
            return
        prev = held.get(name) or {}
        same = (prev.get("version"), prev.get("sha256")) == (job.version, sha)
        tries = int(prev.get("interrupted", 0)) + 1 if same else 1
        entry = {
            "version": job.version or "",
            "sha256": sha,
            "code": job.code or ReasonCode.INTERNAL.value,
            "reason": job.reason or job.state.value,
            "interrupted": tries if job.code == ReasonCode.INTERRUPTED.value else 0,
        }
        # Cut short by a restart (kill -9, power cut): tried again, a bounded number of
        # times (a version whose activation kills the agent must not loop).
        entry["retry"] = 0 < tries < MAX_INTERRUPTED and job.code == ReasonCode.INTERRUPTED.value
        # DEFERRED: the robot was busy, nothing is wrong with the version; it tries again.
        entry["retry"] = entry["retry"] or job.state is JobState.DEFERRED
        if not entry["retry"]:
            log.warning("converge_held_back", model=name, version=job.version, code=job.code)
        held[name] = entry

    def _report_conflicts(self, conflicts: dict[str, str]) -> None:
        for name, why in conflicts.items():
            digest = hashlib.sha256(f"conflict {name} {why}".encode()).hexdigest()
            if digest in self._reported:
                continue
            self._remember(digest)
            log.warning("release_conflict", model=name, reason=why)
            self._report(
                ReasonCode.RELEASE_CONFLICT.value,
                f"{why}: {name} is left as it is",
                refused_sha256=digest,
                model=name,
            )
