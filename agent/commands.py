"""Command intake: verify each stored payload, refuse replays, record the job.

Runs in its own thread (not paho's network thread and not the job worker), so pings and
cancels are answered at once even while a deploy is building an engine. A command's
MQTT message is acknowledged only after its outcome is committed (see agent/mqtt.py).

Never raises on a payload: a command whose id can be read (from the envelope's payload,
parsed unverified for that sole purpose) gets a REJECTED event with code and reason;
anything else gets one structured log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import structlog

from agent.journal import Journal
from agent.store import JobRecord, Store
from agent.truststore import TrustStore
from protocol.dsse import Envelope
from protocol.errors import (
    CommandRejected,
    MessageError,
    ProtocolError,
    TrustRootError,
    VerificationError,
)
from protocol.messages import (
    CancelBody,
    Command,
    CommandKind,
    DeployBody,
    JobState,
    ReasonCode,
    RollbackBody,
    TrustUpdateBody,
)
from protocol.trust import verify_command

log = structlog.get_logger("jetfleet.agent.commands")

_CODES = {c.value for c in ReasonCode}
QUEUED_KINDS = (CommandKind.DEPLOY, CommandKind.ROLLBACK)
STORE_RETRIES = 5


def reason_code(err: BaseException) -> str:
    """A ReasonCode value for any error (scripts match on these)."""
    code = getattr(err, "code", None)
    if isinstance(code, str) and code in _CODES:
        return code
    if isinstance(err, TrustRootError):
        return ReasonCode.TRUST_ROOT.value
    if isinstance(err, MessageError):
        return ReasonCode.MALFORMED.value
    if isinstance(err, VerificationError):
        return ReasonCode.BAD_SIGNATURE.value
    return ReasonCode.INTERNAL.value


def unverified_command_id(payload: bytes) -> str | None:
    """The command_id of an envelope we refuse, read WITHOUT trusting it, only so the
    REJECTED event can name the command. Must be a UUID, else None."""
    try:
        doc = json.loads(payload)
        inner = json.loads(base64.b64decode(doc["payload"], validate=True))
        cid = inner["command_id"]
        return str(uuid.UUID(cid)) if isinstance(cid, str) else None
    except (ValueError, TypeError, KeyError, binascii.Error, RecursionError, AttributeError):
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _no_ack() -> None:
    return None


class CommandProcessor:
    def __init__(
        self,
        store: Store,
        journal: Journal,
        trust: TrustStore,
        *,
        device_id: str,
        groups: list[str],
        wake_worker: Callable[[], None],
        on_cancel: Callable[[str], None] = lambda cid: None,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.journal = journal
        self.trust = trust
        self.device_id = device_id
        self.groups = list(groups)
        self._wake_worker = wake_worker
        self._on_cancel = on_cancel
        self._now = now
        self._queue: queue.Queue[tuple[str, bytes, Callable[[], None], bool] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processed = 0

    # ---- network-thread side ----------------------------------------------------------
    def enqueue(
        self, topic: str, payload: bytes, ack: Callable[[], None] = _no_ack, dup: bool = False
    ) -> None:
        """Called on paho's thread: hand over, nothing else. `ack` sends the PUBACK; it is
        called once the command's outcome is on disk. The queue is bounded by the
        broker's in-flight window, since unacknowledged messages hold it."""
        self._queue.put((topic, payload, ack, dup))

    # ---- processor thread -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                continue
            topic, payload, ack, dup = item
            if getattr(ack, "stale", lambda: False)():
                # Received on a connection that has since dropped, not yet acknowledged:
                # the broker redelivers it on the new one; acting now would double it.
                continue
            if not self._process_durably(topic, payload, dup):
                continue  # not acknowledged: the broker redelivers it after a reconnect
            if self._stop.is_set():
                break  # not acknowledged: redelivered after the restart
            ack()
            self.processed += 1

    def _process_durably(self, topic: str, payload: bytes, dup: bool) -> bool:
        """True when the command's outcome is settled (stored, or refused for good) and
        the message may be acknowledged; False when the store kept failing (disk full,
        I/O error): then it stays unacknowledged rather than lost."""
        for attempt in range(STORE_RETRIES):
            try:
                self.process(payload, dup=dup)
                return True
            except sqlite3.Error as e:
                log.error("command_store_failed", topic=topic, attempt=attempt + 1, error=str(e))
                if self._stop.wait(min(0.5 * 2**attempt, 5.0)):
                    return False
            except Exception:
                log.exception("command_processing_failed", topic=topic)
                return True
        return False

    def process(self, payload: bytes, *, dup: bool = False) -> JobRecord | None:
        """Verify and act on one command; returns the job it created (None if refused).

        `dup`: the broker flagged this delivery as a retransmission (MQTT DUP, sent after a
        reconnect when our PUBACK did not arrive). If it is byte for byte the command we
        already hold, it is the same delivery again: logged, not reported as a replay,
        so the job's own events stay the only ones for its command id. Anything else
        with a known id is a replay and is REJECTED. Either way nothing runs twice."""
        now = self._now()
        try:
            envelope = Envelope.decode(payload)
            command = verify_command(
                envelope, self.trust.root, device_id=self.device_id, groups=self.groups, now=now
            )
        except ProtocolError as e:
            self._refuse(payload, reason_code(e), e.reason)
            return None
        except Exception as e:  # pydantic corner cases etc.: never crash on a payload
            self._refuse(payload, ReasonCode.MALFORMED.value, f"unreadable command: {e}")
            return None
        reset_at = self.store.reset_at()
        if reset_at is not None and command.issued_at.timestamp() < reset_at:
            # The replay table went with the corrupt state.db: an older command may have run.
            self._refuse(
                payload,
                ReasonCode.STATE_RESET.value,
                f"command {command.command_id} was issued before this device's state was "
                "reset (its state.db was corrupt), so it cannot be told from a replay: "
                "issue it again",
            )
            return None
        if self.store.seen(command.command_id):
            held = self.store.job(command.command_id)
            if dup and held is not None and held.envelope == payload:
                log.info("duplicate_delivery_ignored", command_id=command.command_id)
                return None
            self._refuse(
                payload,
                ReasonCode.REPLAY.value,
                f"command {command.command_id} was already received: a device acts on a "
                "command only once",
            )
            return None
        return self._accept(command, payload)

    def _refuse(self, payload: bytes, code: str, reason: str) -> None:
        cid = unverified_command_id(payload)
        log.warning("command_rejected", command_id=cid, code=code, reason=reason[:300])
        if cid is None:
            return
        with self.store.tx() as db:
            self.store.add_event(
                db,
                self.journal.topics.events(self.device_id),
                {
                    "command_id": cid,
                    "device_id": self.device_id,
                    "state": JobState.REJECTED,
                    "progress": 1.0,
                    "code": code,
                    "reason": reason,
                },
            )
        self.journal._on_event()

    def _accept(self, command: Command, payload: bytes) -> JobRecord:
        body = command.body
        model = version = None
        if isinstance(body, DeployBody):
            model, version = body.name, body.version
        elif isinstance(body, RollbackBody):
            model, version = body.model, body.to_version
        job = JobRecord(
            command_id=command.command_id,
            kind=command.kind.value,
            state=JobState.RECEIVED,
            rollout_id=command.rollout_id,
            model=model,
            version=version,
            envelope=payload,
            data={"body": body.model_dump(mode="json")},
        )
        with self.store.tx() as db:
            # Seen only once the signature held: unsigned junk cannot burn a real id.
            self.store.mark_seen(db, command.command_id, command.expires_at.timestamp())
            self.store.insert_job(db, job)
            self.store.add_event(
                db,
                self.journal.topics.events(self.device_id),
                self.journal._fields(job, job.command_id, JobState.RECEIVED),
            )
            if command.kind is CommandKind.PING:
                # Nothing to act on: RECEIVED and SUCCEEDED commit together (one fsync).
                self.store.update_job(db, job.command_id, state=JobState.SUCCEEDED)
                self.store.add_event(
                    db,
                    self.journal.topics.events(self.device_id),
                    self.journal._fields(job, job.command_id, JobState.SUCCEEDED, progress=1.0),
                )
                job.state = JobState.SUCCEEDED
        log.info("command_received", command_id=job.command_id, kind=job.kind)
        self.journal._on_event()
        self.journal.maybe_pause_named(JobState.RECEIVED.value)
        try:
            self._dispatch(command, job)
        except Exception as e:
            log.exception("command_dispatch_failed", command_id=job.command_id)
            if not job.state.terminal:
                self.journal.transition(
                    job, JobState.FAILED, code=reason_code(e), reason=f"internal error: {e}"
                )
        return job

    def _dispatch(self, command: Command, job: JobRecord) -> None:
        kind = command.kind
        if kind in QUEUED_KINDS:
            self.journal.transition(job, JobState.QUEUED)
            self._wake_worker()
        elif kind is CommandKind.PING:
            pass  # settled with its RECEIVED event in _accept
        elif kind is CommandKind.CANCEL:
            assert isinstance(command.body, CancelBody)
            self._cancel(job, command.body.command_id)
        elif kind is CommandKind.TRUST_UPDATE:
            assert isinstance(command.body, TrustUpdateBody)
            self._trust_update(job, command.body.trust_root)

    def _cancel(self, job: JobRecord, target_id: str) -> None:
        target = self.store.job(target_id)
        if target is None:
            self.journal.transition(
                job,
                JobState.REJECTED,
                code=ReasonCode.NOT_CANCELABLE.value,
                reason=f"no job {target_id} on this device",
            )
            return
        cancelable = (
            JobState.RECEIVED,
            JobState.QUEUED,
            JobState.DOWNLOADING,
            JobState.VERIFYING,
            JobState.BUILDING,
            JobState.VALIDATING,
        )
        if target.state not in cancelable:
            self.journal.transition(
                job,
                JobState.REJECTED,
                code=ReasonCode.NOT_CANCELABLE.value,
                reason=f"job {target_id} is {target.state.value}: only a job that has not "
                "started activating can be canceled",
            )
            return
        with self.store.tx() as db:
            self.store.request_cancel(db, target_id)
        self._on_cancel(target_id)
        self._wake_worker()
        self.journal.transition(job, JobState.SUCCEEDED, reason=f"cancel of {target_id} requested")

    def _trust_update(self, job: JobRecord, envelope_doc: dict[str, Any]) -> None:
        try:
            new = self.trust.update(Envelope.decode(envelope_doc), self._now())
        except ProtocolError as e:
            self.journal.transition(job, JobState.REJECTED, code=reason_code(e), reason=e.reason)
            return
        self.journal.transition(job, JobState.SUCCEEDED, reason=f"trust root version {new.version}")


__all__ = ["CommandProcessor", "CommandRejected", "reason_code", "unverified_command_id"]
