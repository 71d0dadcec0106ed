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
import errno
import hashlib
import json
import queue
import sqlite3
import threading
import time
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
    CodedError,
    CommandRejected,
    ProtocolError,
)
from protocol.messages import (
    BODY_BY_KIND,
    CANCELABLE_STATES,
    ActivateBody,
    CancelBody,
    Command,
    CommandKind,
    DeployBody,
    DeviceFault,
    JobState,
    PingBody,
    ReasonCode,
    RollbackBody,
    TrustUpdateBody,
    WindowsBody,
)
from protocol.trust import verify_command

log = structlog.get_logger("jetfleet.agent.commands")

_CODES = {c.value for c in ReasonCode}
STORE_BACKOFF_MAX_S = 5.0
# Refusals a hostile broker can make us write: a burst of REFUSAL_BURST, then one every
# REFUSAL_EVERY_S; and none while the outbox (unacknowledged events) is this long.
REFUSAL_BURST = 20
REFUSAL_EVERY_S = 3.0
MAX_OUTBOX_FOR_REFUSALS = 200


KV_WINDOWS = "windows"  # the WindowsBody of the last windows command (agent/hold.py)


def reason_code(err: BaseException) -> str:
    """A ReasonCode value for any error (scripts match on these)."""
    if isinstance(err, CodedError):
        return err.code if err.code in _CODES else err.job_code
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


class TokenBucket:
    """`burst` at once, then one every `every_s` (monotonic clock)."""

    def __init__(self, burst: int, every_s: float) -> None:
        self.burst = burst
        self.every_s = every_s
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) / self.every_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


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
        on_windows: Callable[[], None] = lambda: None,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.journal = journal
        self.trust = trust
        self.device_id = device_id
        self.groups = list(groups)
        self._wake_worker = wake_worker
        self._on_cancel = on_cancel
        self._on_windows = on_windows
        self._now = now
        self._queue: queue.Queue[tuple[str, bytes, Callable[[], None], bool] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processed = 0
        self._pending = 0  # commands handed over and not yet taken in
        self._count_lock = threading.Lock()
        self.refused = 0  # messages refused (unverifiable, replays), reported or not
        self.refused_unreported = 0  # of those, not reported: past the budget
        self._refusal_budget = TokenBucket(REFUSAL_BURST, REFUSAL_EVERY_S)
        # Set while state.db cannot be written; the status carries it.
        self.fault: DeviceFault | None = None

    # ---- network-thread side ----------------------------------------------------------
    def enqueue(
        self, topic: str, payload: bytes, ack: Callable[[], None] = _no_ack, dup: bool = False
    ) -> None:
        """Called on paho's thread: hand over, nothing else. `ack` sends the PUBACK; it is
        called once the command's outcome is on disk. The queue is bounded by the
        broker's in-flight window, since unacknowledged messages hold it."""
        with self._count_lock:
            self._pending += 1
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
            try:
                self._take(*item)
            finally:
                with self._count_lock:
                    self._pending -= 1
            if self.idle():
                self._wake_worker()  # it waits for an idle intake (see idle())

    def idle(self) -> bool:
        """No command waiting or being taken in. The worker starts a job only then, so a
        cancel delivered right behind its deploy is applied before the deploy starts."""
        with self._count_lock:
            return self._pending == 0

    def _take(self, topic: str, payload: bytes, ack: Callable[[], None], dup: bool) -> None:
        if self._stale(ack):
            # Received on a connection that has since dropped, not yet acknowledged: the
            # broker redelivers it on the new one; acting now would double it.
            return
        if not self._process_durably(topic, payload, dup, ack):
            return  # not acknowledged: the broker redelivers it after a reconnect
        if self._stop.is_set():
            return  # not acknowledged: redelivered after the restart
        ack()
        self.processed += 1

    @staticmethod
    def _stale(ack: Callable[[], None]) -> bool:
        return bool(getattr(ack, "stale", lambda: False)())

    def _process_durably(
        self, topic: str, payload: bytes, dup: bool, ack: Callable[[], None] = _no_ack
    ) -> bool:
        """True when the command's outcome is settled (stored, or refused for good) and
        the message may be acknowledged; False when it must stay unacknowledged (the agent
        is stopping, or the connection it came on dropped: the broker redelivers it).

        While state.db cannot be written (disk full, I/O error) the same message is tried
        again, backing off up to STORE_BACKOFF_MAX_S, for as long as it takes: commands keep
        their order, and the status says why nothing moves (`fault`). An attempt never
        commits half of an intake, so a retry meets nothing of its own to refuse."""
        attempt = 0
        while True:
            try:
                self.process(payload, dup=dup or attempt > 0, late=attempt > 0)
                return True
            except (sqlite3.Error, OSError) as e:  # OSError: a trust root file
                attempt += 1
                self._set_fault(e)
                log.error("command_store_failed", topic=topic, attempt=attempt, error=str(e))
                if self._stop.wait(min(0.5 * 2 ** min(attempt, 8), STORE_BACKOFF_MAX_S)):
                    return False
                if self._stale(ack):
                    return False
            except Exception:
                log.exception("command_processing_failed", topic=topic)
                return True

    # ---- storage faults --------------------------------------------------------------
    def _set_fault(self, err: sqlite3.Error | OSError) -> None:
        if self.fault is None:
            full = getattr(err, "errno", None) == errno.ENOSPC or "full" in str(err).lower()
            self.fault = DeviceFault(
                code=(ReasonCode.DISK_FULL if full else ReasonCode.INTERNAL).value,
                reason=f"{'state.db' if isinstance(err, sqlite3.Error) else 'the data directory'}"
                f" cannot be written ({err}): commands wait unacknowledged in the broker until "
                "it can",
                since=self._now(),
            )
            self.journal.notify()

    def _clear_fault(self) -> None:
        if self.fault is not None:
            self.fault = None
            self.journal.notify()

    # ---- one command -------------------------------------------------------------------
    def process(self, payload: bytes, *, dup: bool = False, late: bool = False) -> JobRecord | None:
        """Verify and act on one command; returns the job it created (None if refused).

        `dup`: the broker flagged this delivery as a retransmission (MQTT DUP, sent after a
        reconnect when our PUBACK did not arrive), or this is our own retry after a failed
        write. If it is byte for byte the command we already hold, it is the same delivery
        again: a job still at RECEIVED (stored by an older agent that stopped before acting
        on it) is acted on now, anything else is logged and dropped. Other repeats of a
        known id are refused as replays. Either way nothing runs twice. `late`: earlier
        attempts failed to write; the RECEIVED event says why it comes late."""
        held = self._held(payload)
        if held is not None:
            return self._repeat(held, payload, dup)
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
            self._refuse_replay(payload, command.command_id)
            return None
        return self._accept(command, payload, self.fault if late else None)

    def _held(self, payload: bytes) -> JobRecord | None:
        """The job stored from these very bytes, if any. Recognised before verification:
        a command verified once is a repeat, even if the trust root rotated since."""
        cid = unverified_command_id(payload)
        job = self.store.job(cid) if cid is not None else None
        return job if job is not None and job.envelope == payload else None

    def _repeat(self, held: JobRecord, payload: bytes, dup: bool) -> JobRecord | None:
        if held.state is JobState.RECEIVED:
            log.info("received_command_resumed", command_id=held.command_id)
            self._dispatch(self._stored_body(held), held)
            return held
        if dup:
            log.info("duplicate_delivery_ignored", command_id=held.command_id)
            return None
        self._refuse_replay(payload, held.command_id)
        return None

    def _refuse_replay(self, payload: bytes, command_id: str) -> None:
        self._refuse(
            payload,
            ReasonCode.REPLAY.value,
            f"command {command_id} was already received: a device acts on a command only once",
        )

    @staticmethod
    def _stored_body(job: JobRecord) -> Any:
        """The verified body stored at intake."""
        model = BODY_BY_KIND[CommandKind(job.kind)]
        return model.model_validate((job.data or {}).get("body") or {})

    # ---- refusals ------------------------------------------------------------------------
    def _refuse(self, payload: bytes, code: str, reason: str) -> None:
        """Report a refused message, as a REJECTED event that names its bytes' digest: it
        is not a step of the job its (unverified) command id names, and the controller
        tells the two apart. A hostile broker can send junk without end, so refusals are
        rate-limited and never fill the outbox: past the budget, or when the write fails,
        they are only counted (telemetry `jobs.refused`, `jobs.refused_unreported`)."""
        cid = unverified_command_id(payload)
        self.refused += 1
        if not self._refusal_budget.take():
            self.refused_unreported += 1
            return
        log.warning("command_rejected", command_id=cid, code=code, reason=reason[:300])
        if cid is None:
            return
        if self.store.outbox_size() >= MAX_OUTBOX_FOR_REFUSALS:
            self.refused_unreported += 1
            return
        try:
            self._report_refusal(cid, payload, code, reason)
        except sqlite3.Error as e:  # a refusal is not worth holding the intake for
            self.refused_unreported += 1
            self._set_fault(e)
            log.error("refusal_not_stored", command_id=cid, error=str(e))

    def _report_refusal(self, cid: str, payload: bytes, code: str, reason: str) -> None:
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
                    "refused_sha256": hashlib.sha256(payload).hexdigest(),
                },
            )
        self._clear_fault()
        self.journal.notify()

    # ---- intake --------------------------------------------------------------------------
    def _accept(
        self, command: Command, payload: bytes, delayed: DeviceFault | None = None
    ) -> JobRecord:
        """Store the command and its first outcome in one transaction: a failed write leaves
        nothing behind (the message stays unacknowledged and comes again)."""
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
        # A trust rotation is a file of its own, written before the job commits; an intake
        # retried after a failed commit finds it done (TrustStore.update is idempotent).
        rotated = self._rotate(body) if isinstance(body, TrustUpdateBody) else None
        with self.store.tx() as db:
            # Seen only once the signature held: unsigned junk cannot burn a real id.
            self.store.mark_seen(db, command.command_id, command.expires_at.timestamp())
            self.store.insert_job(db, job)
            if delayed is None:
                self.journal.record(db, job, JobState.RECEIVED)
            else:  # the event says why it comes late; the job itself is not marked
                self.journal.record(
                    db,
                    job,
                    JobState.RECEIVED,
                    code=delayed.code,
                    reason=self._delay_reason(delayed),
                    event_only=True,
                )
            if rotated is not None:
                self.journal.record(db, job, rotated[0], **rotated[1])
            else:
                self._settle(db, body, job)
        log.info("command_received", command_id=job.command_id, kind=job.kind)
        self._after_commit(body, job)
        return job

    def _delay_reason(self, fault: DeviceFault) -> str:
        held = (self._now() - fault.since).total_seconds()
        return f"stored {held:.0f}s late: {fault.reason}"

    def _dispatch(self, body: Any, job: JobRecord) -> None:
        """Act on a stored job that never got past RECEIVED (an older agent stopped, or a
        write failed after it): the same step `_accept` takes, on its own."""
        if isinstance(body, TrustUpdateBody):
            state, kw = self._rotate(body)
            self.journal.transition(job, state, **kw)
            self._clear_fault()
            return
        with self.store.tx() as db:
            self._settle(db, body, job)
        self._after_commit(body, job)

    def _settle(self, db: sqlite3.Connection, body: Any, job: JobRecord) -> None:
        """The command's first step after RECEIVED, inside the intake's transaction."""
        if isinstance(body, (DeployBody, RollbackBody)):
            canceler = self.store.canceled_by(db, job.command_id)
            if canceler is not None:
                # A cancel came first (its deploy was held up, e.g. by a full disk): the
                # cancel wins, and nothing runs.
                self.journal.record(
                    db,
                    job,
                    JobState.CANCELED,
                    code=ReasonCode.CANCELED.value,
                    reason=f"canceled by command {canceler} before it arrived",
                )
            else:
                self.journal.record(db, job, JobState.QUEUED)
        elif isinstance(body, CancelBody):
            self._cancel(db, job, body.command_id)
        elif isinstance(body, ActivateBody):
            self._activate(db, job, body.command_id)
        elif isinstance(body, WindowsBody):
            self._set_windows(db, job, body)
        elif isinstance(body, PingBody):
            # Nothing to act on: RECEIVED and SUCCEEDED commit together (one fsync).
            self.journal.record(db, job, JobState.SUCCEEDED)

    def _after_commit(self, body: Any, job: JobRecord) -> None:
        self._clear_fault()  # it wrote: whatever kept state.db from it is gone
        self.journal.notify()
        self.journal.maybe_pause_named(JobState.RECEIVED.value)
        if isinstance(body, CancelBody) and job.state is JobState.SUCCEEDED:
            self._on_cancel(body.command_id)
        if isinstance(body, WindowsBody) and job.state is JobState.SUCCEEDED:
            self._on_windows()
        if job.state is JobState.QUEUED or isinstance(body, (CancelBody, ActivateBody)):
            self._wake_worker()

    def _cancel(self, db: sqlite3.Connection, job: JobRecord, target_id: str) -> None:
        target = self.store.job(target_id)
        if target is None:
            # Remembered (this job's row names the target): if the command arrives later,
            # it ends CANCELED at once (see _settle).
            self.journal.record(
                db,
                job,
                JobState.SUCCEEDED,
                reason=f"no job {target_id} on this device yet: it is canceled if it arrives",
            )
            return
        if target.state not in CANCELABLE_STATES:
            self.journal.record(
                db,
                job,
                JobState.REJECTED,
                code=ReasonCode.NOT_CANCELABLE.value,
                reason=f"job {target_id} is {target.state.value}: only a job that has not "
                "started activating can be canceled",
            )
            return
        self.store.request_cancel(db, target_id)
        self.journal.record(db, job, JobState.SUCCEEDED, reason=f"cancel of {target_id} requested")

    def _activate(self, db: sqlite3.Connection, job: JobRecord, target_id: str) -> None:
        """Switch a STAGED deploy: marked here, the worker takes it up (docs/protocol.md)."""
        target = self.store.job(target_id)
        if target is None or target.state is not JobState.STAGED:
            where = f"is {target.state.value}" if target else "is not on this device"
            self.journal.record(db, job, JobState.REJECTED, code=ReasonCode.NOT_STAGED.value,
                                reason=f"job {target_id} {where}: only a STAGED deploy "
                                "can be activated")  # fmt: skip
            return
        self.store.request_activate(db, target_id, job.command_id)
        reason = f"activation of {target_id} requested"
        self.journal.record(db, job, JobState.SUCCEEDED, reason=reason)

    def _set_windows(self, db: sqlite3.Connection, job: JobRecord, body: WindowsBody) -> None:
        """Maintenance windows by signed command (device or group): they replace
        agent.toml's until a `clear`; the last one received wins."""
        from agent.windows import WindowError, Windows

        if body.clear:
            self.store.delete_kv(db, KV_WINDOWS)
            self.journal.record(db, job, JobState.SUCCEEDED, reason="windows of agent.toml apply")
            return
        try:
            shown = Windows(body.windows, body.timezone).describe()
        except WindowError as e:
            self.journal.record(db, job, JobState.REJECTED, code=ReasonCode.BAD_WINDOWS.value,
                                reason=e.reason)  # fmt: skip
            return
        self.store.put_kv(db, KV_WINDOWS, body.model_dump_json())
        self.journal.record(db, job, JobState.SUCCEEDED, reason=f"windows set: {shown}")

    def _rotate(self, body: TrustUpdateBody) -> tuple[JobState, dict[str, Any]]:
        try:
            chain = [Envelope.decode(doc) for doc in body.chain]
            new = self.trust.update(Envelope.decode(body.trust_root), self._now(), chain)
        except ProtocolError as e:
            return JobState.REJECTED, {"code": reason_code(e), "reason": e.reason}
        return JobState.SUCCEEDED, {"reason": f"trust root version {new.version}"}

    # ---- start -------------------------------------------------------------------------
    def resume_received(self) -> None:
        """At start, before the threads: act on every job stored but left at RECEIVED."""
        for job in self.store.active_jobs():
            if job.state is not JobState.RECEIVED:
                continue
            try:
                body = self._stored_body(job)
                log.info("received_command_resumed", command_id=job.command_id, kind=job.kind)
                self._dispatch(body, job)
            except Exception as e:
                log.exception("received_command_failed", command_id=job.command_id)
                self.journal.transition(
                    job, JobState.FAILED, code=reason_code(e), reason=f"internal error: {e}"
                )


__all__ = ["CommandProcessor", "CommandRejected", "reason_code", "unverified_command_id"]
