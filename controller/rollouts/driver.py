"""The rollout engine: waves, failure accounting, abort and automatic rollback.

Planning is pure (`parse_waves`, `plan_waves`). Driving (`RolloutDriver.run`) is one
loop on one thread: MQTT callbacks only enqueue raw messages; the loop applies them to
the registry and the rollout store in batches (one SQLite transaction each), ends waves
when every device is terminal or the wave's deadline passes, checks the failure rate,
and starts the next wave or aborts.

Resume after a crash relies on three things: (1) every command is stored, signed, before
it is published, and an assignment with a command never gets a second one; (2) the
driver's MQTT session is persistent (client id = rollout id), so the broker queued the
devices' events while it was dead; (3) each device's retained status names its last job
and its state, which settles devices whose events were lost anyway. One driver at a time,
on any host sharing the database: the holder of the rollout's lease
(controller/rollouts/lease.py), checked where commands are recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from controller.db import DB_ERRORS
from controller.desired.releases import ReleaseSite, release_after_rollout
from controller.desired.store import ReleaseStore
from controller.fleet.registry import Registry
from controller.mqtt import ControllerMqtt, MqttError, MqttOptions
from controller.rollouts.commands import CommandSigner
from controller.rollouts.lease import DriverLease, LeaseHeldError
from controller.rollouts.policy import RolloutPolicy, Tally, abort_reason, exponential_sizes
from controller.rollouts.policy import crosses as crosses  # re-exported: the planning tests
from controller.rollouts.slo import FAIL as SLO_FAIL
from controller.rollouts.slo import NOT_ENOUGH_DATA, Verdict
from controller.rollouts.slo_bake import BakeWindows, SampleSource, Window, judge_wave
from controller.rollouts.store import (
    ABORTED,
    ABORTING,
    ACTIVATE,
    AT_REST,
    BAKE_FAILED,
    BAKE_INCONCLUSIVE,
    BAKE_PASSED,
    BAKING,
    FINISHED,
    JOB_STAGED,
    PAUSED,
    PENDING,
    REFUSED,
    RUNNING,
    SCHEDULED,
    STAGE,
    STAGED,
    SUCCEEDED,
    WAITING_APPROVAL,
    Assignment,
    JobStep,
    Rollout,
    RolloutStore,
    Wave,
    is_disk_full,
)
from protocol.errors import CodedError, ProtocolError
from protocol.ids import validate_id
from protocol.messages import DeviceStatus, JobEvent, JobState, ReasonCode
from protocol.topics import Topics

log = structlog.get_logger("jetfleet.controller.rollout")


class WaveSpecError(CodedError, ValueError):
    """A `--waves` value the engine cannot plan with."""

    code = "wave_spec"


class RolloutError(CodedError, RuntimeError):
    """A rollout that cannot be driven (unknown id, already driven by a live process…)."""

    code = "rollout"


class DatabaseFullError(RolloutError):
    """The controller database's disk filled up: the driver stopped; every step it took
    before is saved, so `rollout resume` continues once there is space again."""

    code = "database_full"

    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"the controller database's disk is full; rollout {rollout_id} stopped")
        self.rollout_id = rollout_id


# -- planning (pure) -------------------------------------------------------------------
@dataclass(frozen=True)
class WaveStep:
    count: int | None = None  # an absolute cumulative number of devices
    percent: float | None = None  # or a cumulative share of the whole target

    def cumulative(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        # Round up: "10%" of 5 devices is one device, never none.
        return min(total, math.ceil(total * self.percent / 100.0 - 1e-9))


def parse_waves(spec: str, total: int = 1) -> list[WaveStep]:
    """`1,10%,100%` → steps. Counts and percentages are cumulative and must not shrink.
    `exp:BASExFACTOR` (e.g. `exp:1x2`): waves of 1, 2, 4, 8 … devices for a target of
    `total` devices."""
    if spec.strip().startswith("exp:"):
        return _exponential_steps(spec, total)
    steps: list[WaveStep] = []
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise WaveSpecError(f"--waves {spec!r}: expected comma-separated counts or percentages")
    for p in parts:
        try:
            if p.endswith("%"):
                pct = float(p[:-1])
                if not 0 < pct <= 100:
                    raise WaveSpecError(f"--waves {spec!r}: {p} is not in (0%, 100%]")
                steps.append(WaveStep(percent=pct))
            else:
                n = int(p)
                if n < 1:
                    raise WaveSpecError(f"--waves {spec!r}: a wave count must be at least 1")
                steps.append(WaveStep(count=n))
        except ValueError as e:
            if isinstance(e, WaveSpecError):
                raise
            raise WaveSpecError(f"--waves {spec!r}: {p!r} is neither a count nor a %") from e
    return steps


def check_plan(waves_spec: str, max_failure_rate: float, wave_timeout: float) -> None:
    """The rollout options every start checks, before anything is resolved or stored
    (WaveSpecError): the wave sizes, the failure threshold and the wave timeout."""
    parse_waves(waves_spec)
    if not 0 <= max_failure_rate <= 1:
        raise WaveSpecError(f"--max-failure-rate {max_failure_rate:g} must be within 0..1")
    if wave_timeout <= 0:
        raise WaveSpecError("--wave-timeout must be positive")


def _exponential_steps(spec: str, total: int) -> list[WaveStep]:
    base, sep, factor = spec.strip()[4:].partition("x")
    try:
        b, f = int(base), float(factor)
    except ValueError:
        raise WaveSpecError(
            f"--waves {spec!r}: expected exp:BASExFACTOR, e.g. exp:1x2 (waves of 1, 2, 4 …)"
        ) from None
    if not sep or b < 1 or not 1 <= f <= 100:
        raise WaveSpecError(
            f"--waves {spec!r}: the first wave must be at least 1 device and the factor "
            "within 1..100"
        )
    return [WaveStep(count=n) for n in exponential_sizes(b, f, max(total, 1))]


def plan_waves(
    device_ids: list[str], steps: list[WaveStep], canary: str | None = None
) -> list[list[str]]:
    """Split the target into waves: devices in sorted id order (`canary` first), each step
    a cumulative size; the last wave always takes the rest, empty waves are dropped."""
    if len(set(device_ids)) != len(device_ids):
        raise WaveSpecError("the target names a device twice")
    ordered = sorted(device_ids)
    if canary is not None:
        if canary not in ordered:
            raise WaveSpecError(f"--canary {canary!r} is not in the target")
        ordered.remove(canary)
        ordered.insert(0, canary)
    total = len(ordered)
    waves: list[list[str]] = []
    done = 0
    for step in steps:
        upto = step.cumulative(total)
        if upto < done:
            raise WaveSpecError("--waves must not shrink (each entry is cumulative)")
        if upto > done:
            waves.append(ordered[done:upto])
            done = upto
    if done < total:
        waves.append(ordered[done:])
    return waves


# -- driving -------------------------------------------------------------------------
ProgressCallback = Callable[[RolloutStore, str], None]
# The abort's last phase counts what is still open at most this often (`_count_abort_open`).
ABORT_RECOUNT_S = 0.25


class RolloutDriver:
    """Drives one rollout to its end (or until `stop` is set)."""

    def __init__(
        self,
        store: RolloutStore,
        registry: Registry,
        signer: CommandSigner,
        mqtt_options: MqttOptions,
        rollout_id: str,
        *,
        topics: Topics | None = None,
        on_progress: ProgressCallback | None = None,
        tick_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        slo_source: SampleSource | None = None,
        lease: DriverLease | None = None,
        standby: bool = False,
    ) -> None:
        """`lease`: this process's hold on the rollout (controller/rollouts/lease.py; one is
        made). `standby`: when another live process drives the rollout, wait (following
        its progress) and take over if its lease expires, instead of refusing."""
        self.store = store
        self.lease = lease or DriverLease(store, rollout_id)
        self.standby = standby
        self.registry = registry
        self.signer = signer
        self.topics = topics or registry.topics
        self.rollout_id = rollout_id
        self.on_progress = on_progress
        self.tick_s = tick_s
        self.clock = clock
        self.stop = threading.Event()
        self.inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self.options = MqttOptions(
            broker=mqtt_options.broker,
            protocol=mqtt_options.protocol,
            ca=mqtt_options.ca,
            cert=mqtt_options.cert,
            key=mqtt_options.key,
            client_id=f"jetfleet-rollout-{rollout_id}",
            persistent=True,
        )
        self.mqtt: ControllerMqtt | None = None
        # A private topic: our own message on it comes back after everything the broker
        # had for us (queued session messages, retained statuses) when we subscribed.
        self._marker = f"{self.topics.prefix}/controller/sync/{uuid.uuid4().hex}"
        self._caught_up = False
        self._canceled_waves: set[int] = set()
        self._rollout: Rollout | None = None  # as first read, for its model and version
        self.messages_handled = 0
        # Event log rows of the batch being applied, written with its commit.
        self._events: list[tuple[Any, ...]] = []
        self.busy_s = 0.0  # time spent applying messages: messages_handled / busy_s = capacity
        self._dirty = True
        self.slo_source = slo_source
        self._next_judgement = 0.0
        # The abort's last phase: what was still open when last counted, and when.
        self._abort_open: tuple[int, int, int] | None = None
        self._abort_counted: tuple[int, float] = (-1, 0.0)  # (messages_handled, monotonic)
        # This rollout's deploy command ids -> device ids: events on them go as runs.
        self._deploys: dict[str, str] = {}

    # MQTT network thread: only enqueue.
    def _enqueue(self, topic: str, payload: bytes, retained: bool) -> None:
        self.inbox.put((topic, payload))

    def run(self) -> Rollout:
        rollout = self.store.get(self.rollout_id)
        if rollout is None:
            raise RolloutError(f"no rollout {self.rollout_id!r}")
        if rollout.state in AT_REST:
            return rollout
        if not self._take_lease():
            return self.store.get(self.rollout_id) or rollout
        self.mqtt = ControllerMqtt(self.options, self._enqueue)
        try:
            self.mqtt.connect()
            self.mqtt.subscribe([self.topics.all_status(), self.topics.all_events(), self._marker])
            self._deploys = self.store.deploy_commands(self.rollout_id)
            self._catch_up()
            self._recover()
            while not self.stop.is_set():
                self.lease.renew_if_due()
                self._drain()
                rollout = self._step()
                if self.on_progress and self._dirty:
                    self.on_progress(self.store, self.rollout_id)
                    self._dirty = False
                if rollout.state in AT_REST:
                    if rollout.state in FINISHED:
                        self._set_release(rollout)
                    break
            return rollout
        except DB_ERRORS as e:
            if is_disk_full(e):
                raise DatabaseFullError(self.rollout_id) from None
            raise
        finally:
            self._release()

    def _take_lease(self) -> bool:
        """Become the rollout's one driver (LeaseHeldError if another live process is).
        A standby waits for the lease instead, following the rollout, until it gets the
        lease (True) or the rollout ends or `stop` is set (False)."""
        while True:
            in_the_way = self.lease.try_acquire()
            if in_the_way is None:
                log.info("driver_lease_taken", rollout_id=self.rollout_id,
                         holder=self.lease.holder.id, ttl_s=self.lease.ttl_s)  # fmt: skip
                return True
            if not self.standby:
                raise LeaseHeldError(self.rollout_id, in_the_way)
            rollout = self.store.get(self.rollout_id)
            if rollout is None or rollout.state in AT_REST:
                return False
            if self.on_progress:
                self.on_progress(self.store, self.rollout_id)
            if self.stop.wait(self.lease.wait_poll_s(in_the_way)):
                return False

    def _release(self) -> None:
        """Give up the lease and the broker session. On a full disk the lease stays: it
        expires (and names a dead process here), so `status` says nobody drives it."""
        try:
            self.lease.release()
        except DB_ERRORS as e:
            log.warning("driver_lease_kept", rollout_id=self.rollout_id, error=str(e))
        final = self.store.get(self.rollout_id)
        if self.mqtt is not None:
            # Staged too: the activation needs none of what the devices say meanwhile (an
            # `activate` finds out which staged jobs are gone).
            if final is not None and final.state in AT_REST:
                self._end_session()
            else:
                self.mqtt.close()

    def _set_release(self, rollout: Rollout) -> None:
        """A completed deploy rollout becomes its groups' release
        (controller/desired/releases.py)."""
        opts = MqttOptions(**{**self.options.__dict__, "client_id": "", "persistent": False})
        site = ReleaseSite(
            opts, self.topics, ReleaseStore(self.registry.conn), self.signer.operator_keys
        )
        release_after_rollout(site, rollout)

    def _end_session(self) -> None:
        """A finished rollout needs its broker session no more: reconnect clean to drop it."""
        assert self.mqtt is not None
        self.mqtt.close()
        try:
            opts = MqttOptions(**{**self.options.__dict__, "persistent": False})
            ControllerMqtt(opts).connect(timeout=5).close()
        except MqttError as e:
            log.warning("session_cleanup_failed", rollout_id=self.rollout_id, reason=str(e))

    @contextmanager
    def _fenced(self) -> Iterator[None]:
        """A write transaction that records commands, only while this driver still holds
        the lease (checked inside it: a takeover cannot slip in before the commit)."""
        with self.store.transaction():
            self.lease.check()
            yield

    # -- inbox ---------------------------------------------------------------------------
    def _drain(self) -> None:
        deadline = time.monotonic() + self.tick_s
        batch: list[tuple[str, bytes]] = []
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(self.inbox.get(timeout=timeout))
            except queue.Empty:
                break
            if len(batch) >= 2000:
                break
        if not batch:
            return
        started = time.perf_counter()
        try:
            with self.store.transaction():
                self._apply_batch(batch)
                self.store.record_events(self._events)
        finally:
            self._events.clear()
        self.busy_s += time.perf_counter() - started
        self.messages_handled += len(batch)
        self._dirty = True

    def _catch_up(self, timeout: float = 10.0) -> None:
        """Apply what the broker holds for us before the first decision, so a resume
        after a long outage does not time out devices whose results are queued."""
        assert self.mqtt is not None
        self.mqtt.publish(self._marker, b"sync")
        deadline = time.monotonic() + timeout
        while not self._caught_up and time.monotonic() < deadline:
            self.lease.renew_if_due()
            self._drain()

    def _apply_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """Each message in order. Consecutive events that are steps of our own deploy
        commands (most of a rollout's traffic) go as one run: their registry writes in
        one statement, their jobs' moves in another (`_apply_run`). Anything else ends
        the run first, so no message is applied ahead of one that came before it."""
        run: list[tuple[str, bytes, JobEvent]] = []
        for topic, payload in batch:
            event = self._deploy_step(topic, payload)
            if event is not None:
                run.append((topic, payload, event))
                continue
            self._apply_run(run)
            self._apply(topic, payload)
        self._apply_run(run)

    def _deploy_step(self, topic: str, payload: bytes) -> JobEvent | None:
        """The event, when it reports on one of this rollout's deploy commands from the
        device it was sent to; None for anything else (`_apply` then takes it whole)."""
        try:
            event = self.registry.read_event(topic, payload)
        except Exception:  # `_apply` takes it whole and logs why
            return None
        if event is None or event.is_refusal:
            return None
        return event if self._deploys.get(event.command_id) == event.device_id else None

    def _apply_run(self, run: list[tuple[str, bytes, JobEvent]]) -> None:
        """What `_apply` does for each event of the run, in two statements for all of them
        (an event that was not progress then takes the per-event path, which settles it
        as before: its job cannot have moved back meanwhile)."""
        if not run:
            return
        events = [e for _, _, e in run]
        try:
            self.registry.apply_events(events)
            moved = self.store.advance_jobs(
                [
                    JobStep(e.command_id, e.state.value, e.device_id, e.seq, e.reason, e.code,
                            e.gate)
                    for e in events
                ]
            )  # fmt: skip
        except DB_ERRORS:
            raise
        except Exception:  # a bug: each message then goes the per-message way, isolated
            log.exception("run_failed", events=len(run))
            for topic, payload, _ in run:
                self._apply(topic, payload)
            run.clear()
            return
        for event, to in zip(events, moved, strict=True):
            if to is not None:
                self._record_event(to[0], event, event.state.value)
            else:
                self._guarded(event.device_id, functools.partial(self._apply_event, event))
        run.clear()

    def _apply(self, topic: str, payload: bytes) -> None:
        if topic == self._marker:
            self._caught_up = True
            return
        self._guarded(topic, lambda: self._apply_message(self.registry.handle(topic, payload)))

    def _apply_message(self, message: DeviceStatus | JobEvent | None) -> None:
        if isinstance(message, JobEvent):
            self._apply_event(message)
        elif isinstance(message, DeviceStatus):
            self._apply_status(message)

    @staticmethod
    def _guarded(what: str, work: Callable[[], None]) -> None:
        try:
            work()
        except ProtocolError as e:
            # A daemon never dies on bad input: log it with the reason and go on.
            log.warning("bad_message_ignored", topic=what, reason=e.reason, code=e.code)
        except DB_ERRORS:
            raise  # the database failed, not the message: the batch must not half-commit
        except Exception:
            # Nor on a message that trips a bug: one device's report must not stop the
            # rollout for the fleet.
            log.exception("message_failed", topic=what)

    def _apply_event(self, event: JobEvent) -> None:
        state, seq, reason, code = event.state.value, event.seq, event.reason, event.code
        # Most events are a deploy's next step: one statement. The rest (a rollback's, a
        # repeat, another device's or rollout's) are looked up first.
        moved = None
        if not event.is_refusal:
            moved = self.store.advance_job(
                event.command_id, state, device_id=event.device_id, seq=seq, reason=reason,
                code=code, gate=event.gate,
            )  # fmt: skip
        if moved is not None:
            rollout_id = moved[0]
        else:
            job = self.store.job(event.command_id)
            if job is None:
                self._apply_answer(event)
                return
            if job.device_id != event.device_id:
                return  # another rollout's, a manual command's, or a device lying about others
            if event.is_refusal:
                self._apply_refusal(event, job.rollout_id)
                return
            self.store.apply_job_state(
                event.command_id, state, seq=seq, reason=reason, code=code, gate=event.gate,
                device_id=event.device_id, known=job,
            )  # fmt: skip
            rollout_id = job.rollout_id
        self._record_event(rollout_id, event, state)

    def _record_event(self, rollout_id: str, event: JobEvent, state: str) -> None:
        """Into the rollout's event log with the batch's commit (`_drain`): nothing reads
        the log while a batch is applied."""
        self._events.append(
            (rollout_id, event.device_id, event.command_id, event.seq, state, event.reason,
             event.code, event.at.isoformat())
        )  # fmt: skip

    def _apply_refusal(self, event: JobEvent, rollout_id: str) -> None:
        """A device refused a message naming one of our commands. It is that command's
        outcome only when it is the refusal of the very bytes we sent (e.g. a device
        whose trust root lacks our operator key), and not as a replay: a repeat of a
        command the device already holds (our own re-publish, or a broker's) or junk
        carrying our command's id says nothing about the job, which reports for itself.
        Either way it is kept in the rollout's event log, as REFUSED."""
        sent = self.store.sent_envelope(event.command_id)
        ours = (
            event.refused_sha256 is not None
            and sent is not None
            and hashlib.sha256(sent).hexdigest() == event.refused_sha256
        )
        # Only a command the device never reported a step of: once it did, the job exists
        # there and reports its own end (e.g. our re-publish refused after a key rotation).
        settled = (
            ours
            and event.code != ReasonCode.REPLAY.value
            and self.store.apply_job_state(
                event.command_id,
                event.state.value,
                seq=event.seq,
                reason=event.reason,
                code=event.code,
                device_id=event.device_id,
                only_from=PENDING,
            )
        )
        if not settled:
            log.warning(
                "refusal_noted",
                rollout_id=rollout_id,
                device_id=event.device_id,
                command_id=event.command_id,
                code=event.code,
                reason=event.reason,
            )
        self._record_event(rollout_id, event, event.state.value if settled else REFUSED)

    def _apply_answer(self, event: JobEvent) -> None:
        """An event of none of our deploy or rollback commands: the answer to one of our
        `activate` or `cancel` commands, or nothing of ours."""
        if self.store.activate_owner(event.command_id) is not None:
            self._apply_activate_event(event)
        else:
            self._apply_cancel_answer(event)

    def _apply_cancel_answer(self, event: JobEvent) -> None:
        """The answer to one of our cancels. For a job we still know as STAGED, never
        sent an `activate`, it is the cancel's acknowledgement, as the job's own CANCELED
        event is (whichever comes first; the agent sends this one first): SUCCEEDED, the
        cancel is stored and the parked job can no longer switch (or the device has no
        such job: it never will); REJECTED not_cancelable, the staged job had already
        ended there (expired, its end reported while nobody listened). Either way the
        robot holds no staged engine of ours: the assignment ends CANCELED. An activated
        job may be switching: only its own events tell."""
        owner = self.store.cancel_owner(event.command_id)
        if owner is None or owner[1] != event.device_id or event.is_refusal:
            return  # a refused message says nothing of the job: the deadline judges it
        settled = False
        if event.state is JobState.SUCCEEDED:
            settled = self.store.settle_staged_cancel(
                event.command_id, code=ReasonCode.CANCELED.value,
                reason=f"canceled by the abort: the robot acknowledged the cancel ({event.reason})",
            )  # fmt: skip
        elif event.state is JobState.REJECTED:
            settled = self.store.settle_staged_cancel(
                event.command_id, code=event.code,
                reason=f"its staged job had already ended on the robot: {event.reason}",
            )  # fmt: skip
        if settled:  # in the event log only then: the answer that ended the job here
            log.info("staged_cancel_acknowledged", rollout_id=owner[0],
                     device_id=event.device_id, answer=event.state.value)  # fmt: skip
            self._record_event(owner[0], event, event.state.value)

    def _apply_activate_event(self, event: JobEvent) -> None:
        """The answer to one of our `activate` commands. Its SUCCEEDED only says the switch
        was requested: the deploy's own events tell how it goes. A refusal of it (code
        not_staged: the staged job expired or is gone; or the bytes we sent) ends the
        device's assignment, still STAGED, so: reported, not waited for."""
        owner = self.store.activate_owner(event.command_id)
        if owner is None or owner[1] != event.device_id:
            return
        if event.is_refusal:  # as for a deploy: only the refusal of the bytes we sent
            sent = self.store.activate_envelope(event.command_id)
            refused = (
                sent is not None
                and event.refused_sha256 == hashlib.sha256(sent).hexdigest()
                and event.code != ReasonCode.REPLAY.value
            )
        else:
            refused = event.state.terminal and event.state is not JobState.SUCCEEDED
        state = REFUSED if event.is_refusal and not refused else event.state.value
        if refused and self.store.settle_activate(
            event.command_id, event.state.value, code=event.code, reason=event.reason
        ):
            log.warning("activate_refused", rollout_id=owner[0], device_id=event.device_id,
                        code=event.code, reason=event.reason)  # fmt: skip
        self._record_event(owner[0], event, state)

    def _apply_status(self, status: DeviceStatus) -> None:
        """Settle outcomes whose events were lost (published while this controller was
        dead and beyond its session): the retained status names the device's job in
        flight, and once the device is idle, which version it runs."""
        job = status.job
        ours = self.store.job(job.command_id) if job is not None else None
        if job is not None and ours is not None:
            self.store.apply_job_state(
                job.command_id, job.state.value, device_id=status.device_id, known=ours
            )
            return
        # Idle, or busy with a job that is none of ours (a cancel, a ping): what it runs
        # still tells.
        # The rollout's model and version never change: read once, not per status.
        rollout = self._rollout or self.store.get(self.rollout_id)
        if rollout is None:
            return
        self._rollout = rollout
        a = self.store.assignment(rollout.id, status.device_id)
        if a is None:
            return
        active = (status.models.get(rollout.model) or None) and status.models[rollout.model].active
        reason = "inferred from the device's status (its events were not received)"
        # Only success can be inferred: an idle device on the old version may simply not
        # have received its command yet.
        if a.command_id and a.published_at and active == rollout.version:
            self.store.apply_job_state(
                a.command_id, JobState.SUCCEEDED.value, reason=reason, device_id=status.device_id
            )
        if a.rb_command_id and a.rb_published_at and active == a.rb_to_version:
            self.store.apply_job_state(
                a.rb_command_id, JobState.SUCCEEDED.value, reason=reason, device_id=status.device_id
            )

    # -- the state machine ---------------------------------------------------------------
    def _step(self) -> Rollout:
        rollout = self.store.get(self.rollout_id)
        assert rollout is not None
        if rollout.state in FINISHED:
            return rollout
        now = self.clock()
        if rollout.state == SCHEDULED:
            if now < (rollout.policy.start_at or now):
                return rollout
            if self.store.transition(rollout.id, SCHEDULED, RUNNING):
                log.info("rollout_scheduled_start", rollout_id=rollout.id)
            self._dirty = True
            rollout = self.store.get(rollout.id) or rollout
        waves = self.store.waves(rollout.id)
        running = next((w for w in waves if w.state == "running"), None)
        rollback_wave = next((w for w in waves if w.state == "rollback"), None)

        if rollback_wave is not None:
            return self._step_rollback(rollout, rollback_wave.idx, rollback_wave.deadline or now)
        if running is not None:
            rollout, goes_on = self._step_wave(rollout, running, waves, now)
            if goes_on:
                return rollout
        return self._between_waves(rollout, waves, now)

    def _step_wave(
        self, rollout: Rollout, running: Wave, waves: list[Wave], now: float
    ) -> tuple[Rollout, bool]:
        """Drive the running wave; (rollout, True) while it goes on."""
        if rollout.state == ABORTING and running.idx not in self._canceled_waves:
            self._cancel_in_flight(rollout, running.idx)
            self._give_up_on_silent(rollout, running.idx)
        if rollout.policy.device_timeout and rollout.state != ABORTING:
            self._time_out_stuck(rollout, running.idx, now, rollout.policy.device_timeout)
        if (
            rollout.policy.retries
            and rollout.state in (RUNNING, PAUSED)
            and rollout.phase != ACTIVATE
        ):
            self._schedule_retries(rollout, running.idx, now)
        if rollout.state != ABORTING and self._unreleased(rollout, running.idx):
            # A paced wave, or one with retries due: it goes on until every device got
            # its command (a pause holds the rest back; an abort leaves them
            # uncommanded).
            if rollout.state == RUNNING:
                self._release_next(rollout, running.idx, now)
            return rollout, True
        settled = rollout.settled_states
        if self.store.open_count(rollout.id, running.idx, settled) > 0 and now < (
            running.deadline or now
        ):
            return rollout, True  # the wave goes on
        if self._held_past_deadline(rollout, running):
            return rollout, True
        self._end_wave(rollout, running, waves)
        return self.store.get(rollout.id) or rollout, False

    def _held_past_deadline(self, rollout: Rollout, running: Wave) -> bool:
        """Past its deadline the wave goes on while devices of it are ON_HOLD (their wait is
        bounded on the device: its windows, busy_timeout_s); the others time out now. The
        deadline moves along with the hold, so a device released from it has the wave
        timeout to activate and pass probation, not an instant."""
        if rollout.state == ABORTING or not self.store.held_count(rollout.id, running.idx):
            return False
        reason = f"did not finish within the wave timeout of {rollout.wave_timeout:g}s"
        if self.store.time_out(rollout.id, running.idx, reason, settled=rollout.settled_states):
            self._dirty = True
        self.store.extend_deadline(rollout.id, running.idx, time.time() + rollout.wave_timeout)
        return True

    def _end_wave(self, rollout: Rollout, running: Wave, waves: list[Wave]) -> None:
        self._leave_offline_to_release(rollout, running.idx)
        late = self.store.time_out(
            rollout.id,
            running.idx,
            f"did not finish within the wave timeout of {rollout.wave_timeout:g}s",
            settled=rollout.settled_states,
        )
        if late:
            log.warning("wave_timed_out", rollout_id=rollout.id, wave=running.idx, devices=late)
        self.store.end_wave(rollout.id, running.idx)
        self._dirty = True
        log.info("wave_done", rollout_id=rollout.id, wave=running.idx)
        reason = self._abort_reason(rollout, running.idx)
        if rollout.state != ABORTING and reason is not None:
            self.store.request_abort(rollout.id, reason, rollout.auto_rollback)
            log.warning("rollout_aborting", rollout_id=rollout.id, reason=reason)
        elif self._needs_approval(rollout, waves) and self.store.transition(
            rollout.id, RUNNING, WAITING_APPROVAL
        ):
            log.info("wave_awaits_approval", rollout_id=rollout.id, wave=running.idx)

    def _between_waves(self, rollout: Rollout, waves: list[Wave], now: float) -> Rollout:
        """No wave running: roll back an abort, bake the last wave, or start the next."""
        if rollout.state == ABORTING:
            return self._begin_rollback(rollout)
        # The bake goes on while paused or awaiting approval: the next wave waits for both.
        if rollout.policy.slos and not self._baked(rollout, now):
            return self.store.get(rollout.id) or rollout
        if rollout.state in (PAUSED, WAITING_APPROVAL):
            return rollout
        pending = [w for w in waves if w.state == "pending"]
        if not pending and rollout.phase == STAGE:
            self.store.set_state(rollout.id, STAGED)
            self._dirty = True
            log.info("rollout_staged", rollout_id=rollout.id)
            return self.store.get(rollout.id) or rollout
        if not pending:
            self.store.set_state(rollout.id, SUCCEEDED)
            self._dirty = True
            log.info("rollout_succeeded", rollout_id=rollout.id)
            return self.store.get(rollout.id) or rollout
        self._start_wave(rollout, pending[0].idx)
        return self.store.get(rollout.id) or rollout

    # -- SLO bake ------------------------------------------------------------------------
    def _baked(self, rollout: Rollout, now: float) -> bool:
        """Whether the last finished wave has baked and its SLOs hold (or the operator let
        inconclusive ones through). A violated SLO requests the abort."""
        done = [w for w in self.store.waves(rollout.id) if w.state == "done"]
        if not done or rollout.kind != "deploy" or rollout.phase == STAGE:
            return True
        wave = done[-1]
        bake = self.store.bake(rollout.id, wave.idx)
        if bake is None:
            self.store.start_bake(rollout.id, wave.idx, now)
            self._dirty = True
            log.info("wave_baking", rollout_id=rollout.id, wave=wave.idx)
            return False
        if bake.state != BAKING:
            return bake.state in (BAKE_PASSED, BAKE_INCONCLUSIVE)
        assert rollout.policy.bake is not None
        if now < bake.started_at + rollout.policy.bake or now < self._next_judgement:
            return False
        # Judged again at most every tenth of the bake while data is short.
        self._next_judgement = now + max(0.2, rollout.policy.bake / 10)
        verdicts = self._judge_bake(rollout, wave, bake.started_at, now)
        self.store.record_verdicts(rollout.id, wave.idx, [v.to_dict() for v in verdicts], now)
        self._dirty = True
        return self._settle_bake(rollout, wave.idx, bake.started_at, verdicts, now)

    def _judge_bake(self, rollout: Rollout, wave: Wave, since: float, now: float) -> list[Verdict]:
        """The devices of the waves so far on the new version, against the target's devices
        still on the old one over the same window; each device also against its own
        window of the same length before its wave started (controller/rollouts/slo.py)."""
        if self.slo_source is None:
            raise RolloutError(f"rollout {rollout.id} has SLOs but the driver has no metrics")
        assignments = self.store.assignments(rollout.id)
        switched = [
            a for a in assignments if a.wave <= wave.idx and a.state == JobState.SUCCEEDED.value
        ]
        old = [a for a in assignments if a.wave > wave.idx and a.command_id is None]
        span = now - since
        starts = {w.idx: w.started_at or since for w in self.store.waves(rollout.id)}
        this = starts[wave.idx]
        windows = BakeWindows(
            canary=[Window(a.device_id, rollout.version, since, now) for a in switched],
            canary_before=[
                Window(a.device_id, a.prev_version or "", starts[a.wave] - span, starts[a.wave])
                for a in switched
            ],
            baseline=[Window(a.device_id, a.prev_version or "", since, now) for a in old],
            baseline_before=[
                Window(a.device_id, a.prev_version or "", this - span, this) for a in old
            ],
        )
        return judge_wave(self.slo_source, rollout.policy.slos, rollout.model, windows)

    def _settle_bake(
        self, rollout: Rollout, idx: int, started: float, verdicts: list[Verdict], now: float
    ) -> bool:
        failed = [v for v in verdicts if v.verdict == SLO_FAIL]
        short = [v for v in verdicts if v.verdict == NOT_ENOUGH_DATA]
        policy = rollout.policy
        assert policy.bake_max is not None
        if failed:
            reason = f"wave {idx + 1} baked: " + "; ".join(v.summary() for v in failed)
        elif short and now < started + policy.bake_max:
            return False  # the bake goes on for more data
        elif short and policy.slo_inconclusive == "abort":
            reason = (
                f"wave {idx + 1} baked {now - started:.0f}s (--bake-max) without enough data: "
                + "; ".join(v.summary() for v in short)
            )
        else:
            state = BAKE_INCONCLUSIVE if short else BAKE_PASSED
            self.store.end_bake(rollout.id, idx, state, now)
            log.info("wave_baked", rollout_id=rollout.id, wave=idx, result=state)
            return True
        self.store.end_bake(rollout.id, idx, BAKE_FAILED if failed else BAKE_INCONCLUSIVE, now)
        if self.store.request_abort(rollout.id, reason, rollout.auto_rollback):
            log.warning("rollout_aborting", rollout_id=rollout.id, reason=reason)
        return False

    def _abort_reason(self, rollout: Rollout, idx: int) -> str | None:
        """Whether the rollout's abort criteria, judged on every device so far, say stop."""
        tally = Tally()
        assignments = self.store.assignments(rollout.id)
        for a in assignments:
            if a.terminal or a.state in rollout.settled_states:
                tally.finished += 1
            if a.command_id is not None:
                tally.commanded += 1
                if not a.excused:  # no verdict on the model: not a failure of it
                    tally.states[a.state] = tally.states.get(a.state, 0) + 1
        return abort_reason(rollout.policy, rollout.max_failure_rate, tally, len(assignments), idx)

    def _time_out_stuck(self, rollout: Rollout, idx: int, now: float, limit_s: float) -> None:
        """--device-timeout: a device stuck in one state that long counts as TIMED_OUT and
        gets a signed cancel (a job already activating refuses it and finishes)."""
        stuck = self.store.time_out_stuck(rollout.id, idx, now - limit_s, limit_s)
        if stuck:
            log.warning("devices_stuck", rollout_id=rollout.id, wave=idx, devices=stuck)
            self._cancel_timed_out(rollout, only=set(stuck))
            self._dirty = True

    @staticmethod
    def _needs_approval(rollout: Rollout, waves: list[Wave]) -> bool:
        """--approve-waves: a running rollout with waves still to start waits for
        `promote` (a paused one waits for `resume`, which is that approval)."""
        return (
            rollout.policy.approve_waves
            and rollout.state == RUNNING
            and any(w.state == "pending" for w in waves)
        )

    def _start_wave(self, rollout: Rollout, idx: int) -> None:
        self.store.start_wave(rollout.id, idx, self.clock() + rollout.wave_timeout)
        log.info("wave_started", rollout_id=rollout.id, wave=idx)
        if not rollout.policy.max_per_minute:
            self._command_wave(rollout, idx)

    def _unreleased(self, rollout: Rollout, idx: int) -> bool:
        """Devices of the wave still waiting for their command (their `activate`, once
        the rollout activates)."""
        if rollout.phase == ACTIVATE:
            return any(
                a.ac_command_id is None and a.state == JOB_STAGED
                for a in self.store.assignments(rollout.id, idx)
            )
        return self.store.unreleased(rollout.id, idx)

    def _release_next(self, rollout: Rollout, idx: int, now: float) -> None:
        """Commands due now: with --max-per-minute the next one once 60/N seconds passed
        since the rollout's last one (stored, so the pace holds across waves and
        restarts). The wave's deadline then counts from the last release."""
        paced = bool(rollout.policy.max_per_minute)
        last = self.store.last_commanded_at(rollout.id)
        if paced and last is not None and now - last < rollout.policy.release_interval:
            return
        if self._command_wave(rollout, idx, limit=1 if paced else None, now=now):
            self.store.extend_deadline(rollout.id, idx, now + rollout.wave_timeout)

    def _schedule_retries(self, rollout: Rollout, idx: int, now: float) -> None:
        """--retries: a device whose job ended in a --retry-on type, with retries left,
        waits for a new command after its back-off instead of counting as failed. One
        that timed out never said it stopped: its old job gets a cancel first."""
        policy = rollout.policy
        due = [
            a
            for a in self.store.assignments(rollout.id, idx)
            if a.command_id is not None and a.state in policy.retry_on
            and a.attempts < policy.retries
        ]  # fmt: skip
        timed_out = {a.device_id for a in due if a.state == JobState.TIMED_OUT.value}
        if timed_out:
            self._cancel_timed_out(rollout, only=timed_out)
        for a in due:
            assert a.command_id is not None
            attempt = a.attempts + 1
            reason = f"retry {attempt} of {policy.retries} after {a.state}: {a.reason or a.code}"
            self.store.reset_for_retry(
                rollout.id, a.device_id, a.command_id, now + policy.backoff(attempt), reason
            )
            log.warning("device_retry", rollout_id=rollout.id, device_id=a.device_id,
                        attempt=attempt, after=a.state)  # fmt: skip
            self._dirty = True

    def _command_wave(
        self, rollout: Rollout, idx: int, limit: int | None = None, now: float | None = None
    ) -> int:
        """Sign, record, then publish a command for every device of the wave that has none
        (all of them, unless a crash interrupted this very step before), or for the next
        `limit` of them; a retry only once its back-off ended. Returns how many."""
        if rollout.phase == ACTIVATE:
            return self._activate_wave(rollout, idx, limit)
        to_publish: list[tuple[str, str, bytes]] = []
        skipped: list[str] = []
        now = self.clock() if now is None else now
        with self._fenced():
            for a in self.store.assignments(rollout.id, idx):
                if limit is not None and len(to_publish) >= limit:
                    break
                if a.command_id is not None:  # assigned before a crash: never sign anew
                    continue
                if a.terminal:  # settled without a command (a trust root it already has)
                    continue
                if a.retry_at is not None and a.retry_at > now:
                    continue
                if rollout.policy.offline == "skip" and self._offline(a.device_id):
                    skipped.append(a.device_id)
                    continue
                command_id, envelope = self._sign(rollout, a.device_id)
                if self.store.record_command(
                    rollout.id, a.device_id, command_id, envelope, at=self.clock()
                ):
                    to_publish.append((a.device_id, command_id, envelope))
                    self._deploys[command_id] = a.device_id
            self.store.leave_to_release(
                rollout.id,
                skipped,
                "offline when its wave started (--offline skip): left to "
                "converge through the release",
            )
        self._publish(to_publish, rollback=False)
        self._dirty = True
        return len(to_publish)

    def _activate_wave(self, rollout: Rollout, idx: int, limit: int | None) -> int:
        """Sign, record, then publish an `activate` naming the staged deploy of every
        STAGED device of the wave that has none (or of the next `limit`). A device whose
        job is no longer STAGED as far as we know gets none: its state says why."""
        to_publish: list[tuple[str, str, bytes]] = []
        with self._fenced():
            for a in self.store.assignments(rollout.id, idx):
                if limit is not None and len(to_publish) >= limit:
                    break
                if a.ac_command_id is not None or a.state != JOB_STAGED or a.command_id is None:
                    continue
                signed = self.signer.activate(a.device_id, command_id=a.command_id)
                if self.store.record_activate(
                    rollout.id, a.device_id, signed.command_id, signed.envelope, at=self.clock()
                ):
                    to_publish.append((a.device_id, signed.command_id, signed.envelope))
        self._publish(to_publish, rollback=False, activate=True)
        self._dirty = True
        return len(to_publish)

    def _offline(self, device_id: str) -> bool:
        """Offline as its last status or will says (one never seen is not: its command
        waits in the broker, as --allow-unseen asks)."""
        rec = self.registry.get(device_id)
        return rec is not None and not rec.online

    def _leave_offline_to_release(self, rollout: Rollout, idx: int) -> None:
        """--offline wait: at the wave's end, devices that never answered their command
        and are offline are left to the release (CANCELED, code offline) rather than
        TIMED_OUT; their deploy, queued in the broker, gets a cancel behind it."""
        if rollout.policy.offline != "wait":
            return
        away = [
            a.device_id
            for a in self.store.assignments(rollout.id, idx)
            if a.state == PENDING and self._offline(a.device_id)
        ]
        if not away:
            return
        self.store.leave_to_release(
            rollout.id,
            away,
            "offline through its wave (--offline wait): left to converge through the release",
        )
        self._cancel_timed_out(rollout, only=set(away), state=JobState.CANCELED.value)
        log.info("left_to_release", rollout_id=rollout.id, wave=idx, devices=away)

    def _sign(self, rollout: Rollout, device_id: str) -> tuple[str, bytes]:
        if rollout.kind == "deploy":
            assert rollout.bundle_url and rollout.bundle_sha256 and rollout.bundle_size
            signed = self.signer.deploy(
                device_id,
                url=rollout.bundle_url,
                sha256=rollout.bundle_sha256,
                size=rollout.bundle_size,
                rollout_id=rollout.id,
                name=rollout.model,
                version=rollout.version,
                stage=rollout.phase == STAGE,
            )
        elif rollout.kind == "trust_update":
            assert rollout.payload
            trust_root, chain = trust_payload(rollout.payload)
            signed = self.signer.trust_update(device_id, trust_root=trust_root, chain=chain)
        else:
            signed = self.signer.rollback(
                device_id, model=rollout.model, to_version=rollout.version, rollout_id=rollout.id
            )
        return signed.command_id, signed.envelope

    def _publish(
        self,
        commands: list[tuple[str, str, bytes]],
        *,
        rollback: bool,
        cancel: bool = False,
        activate: bool = False,
    ) -> None:
        assert self.mqtt is not None
        infos = []
        for device_id, _command_id, envelope in commands:
            infos.append(self.mqtt.publish_nowait(self.topics.device_cmd(device_id), envelope))
        try:
            ControllerMqtt.wait_all(infos, timeout=60)
        except MqttError as e:
            # Left unmarked: they are re-published (same envelope) on the next resume.
            log.error("publish_unacknowledged", rollout_id=self.rollout_id, reason=str(e))
        acked = [
            cid for (_, cid, _), info in zip(commands, infos, strict=True) if info.is_published()
        ]
        self.store.mark_published(acked, rollback=rollback, cancel=cancel, activate=activate)

    def _recover(self) -> None:
        """After a crash: commands stored but never acknowledged go out again, unchanged;
        a running wave whose commands were not all recorded gets the missing ones."""
        rollout = self.store.get(self.rollout_id)
        assert rollout is not None
        self._republish_unacknowledged()
        for w in self.store.waves(rollout.id):
            # A paced wave's devices are released by the loop, at its pace.
            if w.state == "running" and not rollout.policy.max_per_minute:
                self._command_wave(rollout, w.idx)

    def _republish_unacknowledged(self) -> None:
        deploy, rollback, cancel, activate = [], [], [], []
        for a in self.store.assignments(self.rollout_id):
            if a.ac_command_id and a.ac_envelope and a.ac_published_at is None:
                activate.append((a.device_id, a.ac_command_id, a.ac_envelope))
            if a.command_id and a.envelope and a.published_at is None:
                deploy.append((a.device_id, a.command_id, a.envelope))
            if a.rb_command_id and a.rb_envelope and a.rb_published_at is None:
                rollback.append((a.device_id, a.rb_command_id, a.rb_envelope))
            if a.cx_command_id and a.cx_envelope and a.cx_published_at is None:
                cancel.append((a.device_id, a.cx_command_id, a.cx_envelope))
        if cancel:
            self._publish(cancel, rollback=False, cancel=True)
        if deploy or rollback:
            log.info(
                "republishing",
                rollout_id=self.rollout_id,
                deploy=len(deploy),
                rollback=len(rollback),
            )
        if deploy:
            self._publish(deploy, rollback=False)
        if activate:  # after the deploys: an activate names a job its device must hold
            self._publish(activate, rollback=False, activate=True)
        if rollback:
            self._publish(rollback, rollback=True)

    # -- abort and rollback --------------------------------------------------------------
    def _begin_rollback(self, rollout: Rollout) -> Rollout:
        """The abort's last phase: cancel the staged jobs never to activate, roll back the
        devices that switched, and wait for both (`_step_rollback`)."""
        self._cancel_timed_out(rollout)
        self._cancel_timed_out(rollout, state=JOB_STAGED)  # staged jobs never to activate
        succeeded = [
            a
            for a in self.store.assignments(rollout.id)
            if a.state == JobState.SUCCEEDED.value and a.rb_command_id is None and not a.rb_state
        ]
        if rollout.kind != "deploy" or not rollout.rollback_on_abort:
            succeeded = []
        canceling = self.store.staged_cancels_open(rollout.id)
        self._skip_pending_waves(rollout)
        if not succeeded and not canceling:
            self.store.set_state(rollout.id, ABORTED)
            self._dirty = True
            log.warning("rollout_aborted", rollout_id=rollout.id, reason=rollout.abort_reason)
            return self.store.get(rollout.id) or rollout
        # The rollbacks and cancels are waited for as a pseudo-wave with its own deadline,
        # so a resume after a crash in this phase knows it is rolling back and until when.
        self.store.add_rollback_wave(
            rollout.id, len(succeeded) + canceling, self.clock() + rollout.wave_timeout
        )
        self._dirty = True
        if canceling:
            log.warning("awaiting_staged_cancels", rollout_id=rollout.id, devices=canceling)
        if not succeeded:
            return self.store.get(rollout.id) or rollout
        to_publish: list[tuple[str, str, bytes]] = []
        with self._fenced():
            for a in succeeded:
                device = self.registry.get(a.device_id)
                to_version = a.prev_version or (
                    device.previous_version(rollout.model) if device else None
                )
                if not to_version or to_version == rollout.version:
                    self.store.mark_rollback_impossible(
                        rollout.id,
                        a.device_id,
                        f"no version of {rollout.model} before {rollout.version} is known on "
                        f"{a.device_id}; it keeps {rollout.version}",
                    )
                    continue
                signed = self.signer.rollback(
                    a.device_id, model=rollout.model, to_version=to_version, rollout_id=rollout.id
                )
                if self.store.record_rollback(
                    rollout.id, a.device_id, signed.command_id, signed.envelope, to_version
                ):
                    to_publish.append((a.device_id, signed.command_id, signed.envelope))
        log.warning("rolling_back", rollout_id=rollout.id, devices=len(to_publish))
        self._publish(to_publish, rollback=True)
        self._dirty = True
        return self.store.get(rollout.id) or rollout

    def _cancel_in_flight(self, rollout: Rollout, idx: int) -> None:
        """An abort does not wait for jobs it no longer wants: every unfinished device of
        the running wave gets a signed cancel (a device already activating refuses it and
        finishes; if it succeeds, the rollback phase returns it to its old version)."""
        self._canceled_waves.add(idx)
        with self._fenced():
            to_publish = self._record_cancels(
                rollout, [a for a in self.store.assignments(rollout.id, idx) if not a.terminal]
            )
        if to_publish:
            log.warning(
                "canceling_in_flight", rollout_id=rollout.id, wave=idx, devices=len(to_publish)
            )
        self._publish(to_publish, rollback=False, cancel=True)
        self._dirty = True

    def _record_cancels(
        self, rollout: Rollout, candidates: list[Assignment]
    ) -> list[tuple[str, str, bytes]]:
        """Sign and store a cancel of each candidate's deploy (inside the caller's fenced
        transaction; one per device: one already canceled, or never commanded, is
        skipped); (device, command id, envelope) of each to publish."""
        to_publish: list[tuple[str, str, bytes]] = []
        for a in candidates:
            if a.command_id is None or a.cx_command_id is not None:
                continue
            signed = self.signer.cancel(a.device_id, command_id=a.command_id)
            if self.store.record_cancel(
                rollout.id, a.device_id, signed.command_id, signed.envelope
            ):
                to_publish.append((a.device_id, signed.command_id, signed.envelope))
        return to_publish

    def _give_up_on_silent(self, rollout: Rollout, idx: int) -> None:
        """An abort does not wait out the wave timeout for devices that never answered
        (offline, or an id that was never a device): their cancel waits in the broker
        behind the deploy, so they count as TIMED_OUT now. Not so in an activation: a
        STAGED device may be switching on its activate while it says nothing yet, and a
        cancel then comes too late; the wave timeout judges it."""
        if rollout.phase == ACTIVATE:
            return
        silent = self.store.time_out(
            rollout.id,
            idx,
            "never answered its command; the abort did not wait (a cancel waits for it "
            "in the broker)",
            only_silent=PENDING,
        )
        if silent:
            log.warning("abort_gave_up_on_silent", rollout_id=rollout.id, devices=silent)

    def _cancel_timed_out(
        self, rollout: Rollout, only: set[str] | None = None, state: str = JobState.TIMED_OUT.value
    ) -> None:
        """Devices the rollout counted as TIMED_OUT never said they stopped: an offline
        one still finds the deploy queued in its broker session when it returns. A signed
        cancel, queued behind it, stops that job before it activates (a job already past
        ACTIVATING refuses it; it never counted as succeeded, so nothing rolls it back)."""
        with self._fenced():
            reported = self.store.terminal_events(rollout.id)
            to_publish = self._record_cancels(
                rollout,
                [
                    a
                    for a in self.store.assignments(rollout.id)
                    if a.state == state
                    and (only is None or a.device_id in only)
                    and (a.device_id, a.command_id) not in reported
                ],
            )
        if to_publish:
            log.warning(
                "canceling_timed_out",
                rollout_id=rollout.id,
                devices=[d for d, _, _ in to_publish],
            )
            self._publish(to_publish, rollback=False, cancel=True)
            self._dirty = True

    def _skip_pending_waves(self, rollout: Rollout) -> None:
        self.store.skip_pending_waves(rollout.id)

    def _step_rollback(self, rollout: Rollout, idx: int, deadline: float) -> Rollout:
        """Until every rollback ended and every staged job's cancel was answered, or the
        deadline: then the rest time out and the rollout is aborted."""
        past = self.clock() >= deadline
        sent, rollbacks_open, cancels_open = self._count_abort_open(rollout, force=past)
        if (rollbacks_open or cancels_open) and not past:
            return rollout
        with self._fenced():  # one transaction, and only while this driver holds the lease
            self.store.time_out_rollbacks(
                rollout.id, f"rollback did not finish within {rollout.wave_timeout:g}s"
            )
            if cancels_open:
                self._time_out_staged_cancels(rollout)
            self.store.end_wave(rollout.id, idx, "rolled_back")
            self.store.set_state(rollout.id, ABORTED)
        self._dirty = True
        log.warning(
            "rollout_aborted", rollout_id=rollout.id, reason=rollout.abort_reason, rolled_back=sent
        )
        return self.store.get(rollout.id) or rollout

    def _count_abort_open(self, rollout: Rollout, *, force: bool) -> tuple[int, int, int]:
        """(rollbacks sent, rollbacks open, staged cancels open): two counts in SQL, taken
        again only once messages were applied since the last (nothing else answers a
        rollback or a cancel), at most every ABORT_RECOUNT_S, or when `force`d. Over
        10,000 assignments a count reads every row of the rollout (tens of ms on SQLite,
        wide rows): not on each 50 ms tick."""
        handled, at = self._abort_counted
        now = time.monotonic()
        fresh = handled == self.messages_handled or now - at < ABORT_RECOUNT_S
        if self._abort_open is not None and fresh and not force:
            return self._abort_open
        sent, rollbacks_open = self.store.rollbacks_open(rollout.id)
        self._abort_open = (sent, rollbacks_open, self.store.staged_cancels_open(rollout.id))
        self._abort_counted = (self.messages_handled, now)
        return self._abort_open

    def _time_out_staged_cancels(self, rollout: Rollout) -> None:
        """STAGED devices that did not answer their cancel by the deadline end TIMED_OUT,
        each with why as far as the registry knows (offline since when, or never seen):
        they may still hold the staged engine until the cancel, queued in their broker
        session, reaches them (or their stage_ttl_s ends the job)."""
        late = self.store.staged_cancels_pending(rollout.id)
        seen = self.registry.presence(late)
        reasons = {
            d: unacknowledged_cancel_reason(rollout.wave_timeout, *seen.get(d, (None, None)))
            for d in late
        }
        timed_out = self.store.time_out_staged_cancels(rollout.id, reasons)
        if timed_out:
            log.warning("staged_cancels_unacknowledged", rollout_id=rollout.id,
                        devices=timed_out)  # fmt: skip


def unacknowledged_cancel_reason(
    timeout: float, online: bool | None, last_seen: float | None
) -> str:
    """Why a STAGED device's cancel went unanswered, for `rollout status`."""
    if online is None:
        where = "never seen by this controller"
    elif not online:
        where = f"offline since {_utc(last_seen)} (its last message)" if last_seen else "offline"
    else:
        where = f"online, last message {_utc(last_seen)}" if last_seen else "online"
    return (
        f"cancel not acknowledged within the wave timeout of {timeout:g}s: {where}; it may "
        "still hold the staged engine until the cancel, waiting in its broker session, "
        "reaches it (or its stage_ttl_s ends the job)"
    )


def _utc(t: float | None) -> str:
    return datetime.fromtimestamp(t or 0, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- creating a rollout ------------------------------------------------------------------
ROLLOUT_KINDS = ("deploy", "rollback", "trust_update")
# What a trust_update rollout shows as its "model" (its version is the trust root's).
TRUST_ROOT_MODEL = "trust-root"


def trust_update_payload(trust_root: bytes, chain: list[bytes]) -> str:
    """What a trust_update rollout stores: the new root and the roots before it (DSSE
    envelopes, oldest first), every device getting the same."""
    return json.dumps(
        {"trust_root": json.loads(trust_root), "chain": [json.loads(e) for e in chain]}
    )


def trust_payload(payload: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(trust root, chain) of a stored payload; rollouts stored before the chain hold the
    bare envelope."""
    doc = json.loads(payload)
    if "trust_root" not in doc:
        return doc, []
    return doc["trust_root"], list(doc.get("chain") or [])


def new_rollout_id() -> str:
    return "r-" + uuid.uuid4().hex[:12]


def create_rollout(
    store: RolloutStore,
    registry: Registry,
    *,
    kind: str,
    model: str,
    version: str,
    device_ids: list[str],
    waves_spec: str,
    max_failure_rate: float,
    wave_timeout: float,
    auto_rollback: bool,
    canary: str | None = None,
    target: str = "",
    bundle_url: str | None = None,
    bundle_sha256: str | None = None,
    bundle_size: int | None = None,
    rollout_id: str | None = None,
    payload: str | None = None,
    force: bool = False,
    policy: RolloutPolicy | None = None,
    stage: bool = False,
) -> Rollout:
    """Plan the waves and store the rollout (nothing is signed or sent yet); `policy`
    (abort criteria, pace, scheduled start) is stored with it. `stage` (a deploy): its
    devices stop STAGED and the rollout ends `staged`, for `rollout activate`
    (controller/rollouts/activation.py).

    kind `trust_update`: `payload` is `trust_update_payload(...)` (JSON text), sent
    to every device as is; `model`/`version` only label it (TRUST_ROOT_MODEL, its version).

    Raises DevicesHeldError when a device is still driven by another unfinished rollout,
    unless `force` (dangerous: both rollouts then command that device)."""
    if kind not in ROLLOUT_KINDS:
        raise ValueError(f"rollout kind {kind!r}")
    if stage and kind != "deploy":
        raise WaveSpecError("--stage stages a deploy: a rollback or trust update has no build")
    if (kind == "trust_update") != (payload is not None):
        raise ValueError("a trust_update rollout, and only one, carries a payload")
    check_plan(waves_spec, max_failure_rate, wave_timeout)
    if not device_ids:
        raise WaveSpecError("the target has no devices")
    for d in device_ids:
        validate_id(d)
    if canary is not None:
        validate_id(canary)
    waves = plan_waves(device_ids, parse_waves(waves_spec, len(device_ids)), canary)
    # The version each device runs now is what an abort returns it to.
    prev: dict[str, str | None] = {}
    done: dict[str, str] = {}
    for d in device_ids:
        rec = registry.get(d)
        prev[d] = rec.active_version(model) if rec else None
        # Its retained status says it holds this trust root or a newer one: a push would
        # only be refused as not newer.
        held = rec.trust_version if rec is not None else None
        if kind == "trust_update" and held is not None and held >= int(version):
            done[d] = f"already up to date: it reports trust root version {held}"
    return store.create(
        rollout_id=rollout_id or new_rollout_id(),
        kind=kind,
        model=model,
        version=version,
        target=target or ",".join(sorted(device_ids)),
        waves_spec=waves_spec,
        waves=waves,
        max_failure_rate=max_failure_rate,
        wave_timeout=wave_timeout,
        auto_rollback=auto_rollback,
        canary=canary,
        bundle_url=bundle_url,
        bundle_sha256=bundle_sha256,
        bundle_size=bundle_size,
        prev_versions=prev,
        payload=payload,
        exclusive=not force,
        already_done=done,
        policy=policy,
        phase=STAGE if stage else None,
    )


def pause(store: RolloutStore, rollout_id: str) -> bool:
    r = store.get(rollout_id)
    if r is None or r.state != RUNNING:
        return False
    store.set_state(rollout_id, PAUSED)
    return True


def promote(store: RolloutStore, rollout_id: str) -> bool:
    """Waiting for approval → running: the driver starts the next wave."""
    return store.transition(rollout_id, WAITING_APPROVAL, RUNNING)


def resume_state(store: RolloutStore, rollout_id: str) -> bool:
    """Paused → running (the driver, live or started by `resume`, picks it up)."""
    r = store.get(rollout_id)
    if r is None or r.state != PAUSED:
        return False
    store.set_state(rollout_id, RUNNING)
    return True


def failed_devices(store: RolloutStore, rollout_id: str) -> tuple[Rollout, list[str]]:
    """What `rollout retry` starts over: a finished rollout and the devices whose job in
    it ended FAILED, REJECTED, ROLLED_BACK or TIMED_OUT."""
    r = store.get(rollout_id)
    if r is None:
        raise RolloutError(f"no rollout {rollout_id!r}")
    if r.state not in FINISHED:
        raise RolloutError(f"rollout {r.id} is {r.state}; retry it once it has finished")
    failed = [a.device_id for a in store.assignments(r.id) if a.failed]
    if not failed:
        raise RolloutError(f"rollout {r.id} has no failed devices to retry")
    return r, failed
