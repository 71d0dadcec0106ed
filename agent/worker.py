"""The single job worker: runs deploy and rollback jobs one at a time through the job states
(docs/protocol.md#job-events-and-states).

Every state is persisted (with its event) before the worker acts on it, so that on
restart `recover()` knows what may have happened:

- RECEIVED: the command processor acts on it (CommandProcessor.resume_received, before
  this runs); QUEUED: nothing happened yet; the job is run.
- DOWNLOADING/VERIFYING/BUILDING/VALIDATING: nothing outside data_dir/downloads,
  bundles and the engine cache was touched; temporary files are removed and the job is
  resumed (the download continues with Range, the engine cache makes a rebuild free),
  at most MAX_RESUMES times, then it ends FAILED (code interrupted).
- ON_HOLD: gated, waiting for a maintenance window or the busy lock (agent/hold.py);
  nothing outside data_dir/downloads, bundles and the engine cache was touched. Like
  STAGED, it is parked: later jobs run meanwhile, and it is taken up when its hold lifts
  or a cancel comes. After a restart the job goes on waiting: the bundle is verified
  again from its download and the gated engine checked against its sidecar, without
  building or gating again (when either is gone, the job starts over at DOWNLOADING).
  Waiting is harmless, so it is not counted against MAX_RESUMES, and the job's time
  limit does not apply to it.
- STAGED: a deploy with `stage`, gated, parked until an `activate` command marks it (or
  [activation] stage_ttl_s passes: CANCELED stage_expired). It does not hold the worker:
  later jobs run meanwhile. Activated, it resumes like ON_HOLD (checked, not rebuilt),
  then waits for its window and the busy lock like any deploy.
- ACTIVATING/PROBATION: the switch may be half done, or the new engine may be what
  crashed us: the slot recorded before the switch is restored, the hook runs again,
  and the job ends ROLLED_BACK (code interrupted). A device that had an engine active
  therefore always has one active afterwards.

Engine work (target check, build, gate: onnxruntime or TensorRT) runs in a child process
(agent/enginejob.py): the daemon stays small, a crashing builder fails the job and not
the agent, and a cancel stops a build at once.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from agent import container
from agent.activation import AckChannel, ActivationError, ModelStore, check_health, run_hook
from agent.busy import BusyLock
from agent.commands import KV_WINDOWS, reason_code
from agent.config import AgentConfig
from agent.download import (
    Canceled,
    DownloadError,
    DownloadLimits,
    check_disk,
    fetch,
    remove_partials,
)
from agent.enginejob import (
    EngineJob,
    EngineJobError,
    EngineRequest,
    Interrupted,
    SpeedRequest,
    Throttle,
    check_engine_space,
    is_no_space,
)
from agent.hold import ActivationHold, Clock, Verdict, wall_clock
from agent.journal import Journal
from agent.store import JobData, JobRecord, Store
from agent.telemetry.conditions import describe
from agent.truststore import TrustStore
from agent.windows import Windows
from protocol.errors import CodedError, ProtocolError
from protocol.ids import SemVer
from protocol.messages import (
    HOLD_STATES,
    PRE_ACTIVATION_STATES,
    CommandKind,
    DeployBody,
    JobState,
    ReasonCode,
    RollbackBody,
    WindowsBody,
    WindowsSummary,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # pydantic's dependency; typing has it from 3.11

    from agent.livestats import LiveStats, LiveWindow
    from protocol.bundle import VerifiedBundle
    from protocol.manifest import Manifest

log = structlog.get_logger("jetfleet.agent.worker")

MAX_RESUMES = 2
KEEP_VERSIONS = 3  # per model: current, previous and one more to roll back to
MIN_LIVE_SAMPLES = 20  # live p99 over fewer inferences is noise
MIN_BASELINE_SAMPLES = 50  # the old version's live p99 is a probation baseline from here
STALL_GRACE_S = 5.0
BUILD_PROGRESS_EVERY_S = 5.0  # BUILDING progress events: a phase's start and end, and
# at most one per this interval in between (a build on an Orin reports for minutes)
HOLD_POLL_S = 0.5  # how often a held job looks at the clock and the busy lock again
_CODES = {c.value for c in ReasonCode}


class Stopping(Exception):
    """The agent is shutting down: leave the job in its persisted state."""


class JobEnded(Exception):
    """A step decided the job's terminal state (already persisted)."""


class Parked(Exception):
    """The job waits, STAGED for its activate command or ON_HOLD for its window or the busy
    lock; the worker takes the next one."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _hold_key(verdict: Verdict) -> str:
    """What an ON_HOLD event says, to tell news from a repeat: why, and about what."""
    return f"{verdict.code}|{verdict.reason if verdict.forced else verdict.subject}"


class Worker:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        journal: Journal,
        trust: TrustStore,
        *,
        live: LiveStats | None = None,
        on_change: Callable[[], None] = lambda: None,
        on_hardware: Callable[[dict[str, Any], str, str], None] = lambda hw, name, version: None,
        intake_idle: Callable[[], bool] = lambda: True,
        clock: Clock = wall_clock,
    ) -> None:
        self.config = config
        a = config.activation
        self.hold = ActivationHold(
            Windows(a.windows, a.timezone),
            BusyLock(config.busy_lock),
            busy_timeout_s=a.busy_timeout_s,
            busy_timeout_action=a.busy_timeout_action,
            clock=clock,
        )
        self._intake_idle = intake_idle
        self.store = store
        self.reload_windows()  # agent.toml's, or the last signed windows command's
        self.journal = journal
        self.trust = trust
        self.live = live
        self._holding = False  # a job waits ON_HOLD (polled more often)
        self.models = ModelStore(config.data_dir)
        self.acks = AckChannel(config.ack_dir, live)
        if config.activation.ack_timeout_s > 0:
            config.ack_dir.mkdir(parents=True, exist_ok=True)  # consumers write here
        self.downloads = Path(config.data_dir) / "downloads"
        self.bundles = Path(config.data_dir) / "bundles"
        self._on_change = on_change
        self._on_hardware = on_hardware
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancels: set[str] = set()
        self._thread: threading.Thread | None = None
        self.current: JobRecord | None = None
        self.heartbeat = time.monotonic()

    def reload_windows(self) -> None:
        """The windows in force: the last signed `windows` command's, else agent.toml's."""
        a = self.config.activation
        windows = Windows(a.windows, a.timezone)
        summary = WindowsSummary(windows=a.windows, timezone=a.timezone)
        raw = self.store.get(KV_WINDOWS)
        if raw:
            try:
                body = WindowsBody.model_validate_json(raw)
                windows = Windows(body.windows, body.timezone)
                summary = WindowsSummary(
                    windows=body.windows, timezone=body.timezone, source="command"
                )
            except (ValueError, CodedError) as e:  # checked at intake; a zone database change
                log.error("windows_unusable", reason=str(e))
        self.hold.windows = windows  # one assignment: the worker reads it whole
        self.windows = summary  # what the retained status shows
        log.info("windows", windows=windows.describe() if windows.windows else "any time")

    # ---- thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=timeout)

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, command_id: str) -> None:
        self._cancels.add(command_id)
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled(self) -> bool:
        """True when a job made no progress for longer than any step may wait quietly."""
        if self.current is None:
            return False
        c = self.config
        quiet = max(
            c.limits.worker_stall_s,
            c.activation.hook_timeout_s + c.activation.health_timeout_s,
            c.download.read_timeout_s + c.download.connect_timeout_s,
        )
        return time.monotonic() - self.heartbeat > quiet + STALL_GRACE_S

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            job = self._next_job()
            if job is None:
                # A job ON_HOLD looks at the clock and the busy lock more often.
                self._wake.wait(HOLD_POLL_S if self._holding else 1.0)
                self._wake.clear()
                continue
            self.run_job(job)

    def _next_job(self) -> JobRecord | None:
        if not self._intake_idle():
            # Commands already delivered are taken in first: a cancel that sits right
            # behind its deploy (both held up, e.g. by a full disk) wins over it.
            return None
        jobs = self.store.active_jobs()
        self._holding = any(j.state is JobState.ON_HOLD for j in jobs)
        for job in jobs:
            if job.state in HOLD_STATES:  # parked: STAGED or ON_HOLD
                if self._parked_job_due(job):
                    return job
                continue
            # RECEIVED belongs to the command processor until it queues the job (it settles
            # those left by a crash at start), so the worker never races it.
            if job.state is JobState.QUEUED or (
                job.state in PRE_ACTIVATION_STATES | HOLD_STATES and job.data.get("resume")
            ):
                return job
        return None

    def _parked_job_due(self, job: JobRecord) -> bool:
        """Whether a parked job has something to do now: a cancel; for a STAGED one, its
        activate command or its expiry; for an ON_HOLD one, its hold lifted (the busy lock
        is then ours) or given up. A change in why it waits is reported from here, without
        taking the job up (that would verify its bundle again each time)."""
        if self._canceled(job):
            return True
        if job.state is JobState.STAGED:
            return bool(job.data.get("activate")) or self._stage_expired(job)
        if job.data.get("resume"):  # after a restart: checked at once (rebuilt if gone)
            return True
        verdict = self._hold_verdict(job)
        if verdict.go or verdict.give_up:
            return True
        if _hold_key(verdict) != job.data.get("hold_key"):
            self._hold_event(job, verdict, job.data.get("gate") or {})
        return False

    # ---- jobs -----------------------------------------------------------------------
    def run_job(self, job: JobRecord) -> None:
        self.current = job
        self._on_change()
        try:
            if self._canceled(job):
                raise Canceled()
            if job.kind == CommandKind.DEPLOY:
                self._deploy(job)
            elif job.kind == CommandKind.ROLLBACK:
                self._rollback(job)
            else:  # ping/cancel/trust_update are finished by the command processor
                self._end(job, JobState.FAILED, ReasonCode.INTERNAL, f"no worker for {job.kind}")
        except (JobEnded, Stopping, Parked):
            pass
        except Canceled:
            self._cleanup(job)
            if self._timed_out(job):
                limit = self.config.limits.job_timeout_s
                self._end(
                    job,
                    JobState.TIMED_OUT,
                    ReasonCode.TIMED_OUT,
                    f"the job did not reach activation within {limit:g}s "
                    "(limits.job_timeout_s); the previous engine stays active",
                )
            else:
                self._end(
                    job, JobState.CANCELED, ReasonCode.CANCELED, "canceled by an operator command"
                )
        except Exception as e:
            log.exception("job_crashed", command_id=job.command_id)
            code, reason = self._crash_reason(e)
            if job.state in (JobState.ACTIVATING, JobState.PROBATION):
                self._restore(job, code.value, reason)
            elif not job.state.terminal:
                self._cleanup(job)
                self._end(job, JobState.FAILED, code, reason)
        finally:
            self.hold.release()  # held past its job only by a bug: missions must not wait
            self.current = None
            self._cancels.discard(job.command_id)
            self._on_change()

    def _crash_reason(self, err: Exception) -> tuple[ReasonCode, str]:
        """A full disk is named as such wherever it strikes (installing the version,
        switching, restoring); anything else unexpected is internal."""
        if is_no_space(err):
            where = getattr(err, "filename", None) or self.config.data_dir
            return ReasonCode.DISK_FULL, f"disk full: no space left on device ({where})"
        return ReasonCode.INTERNAL, f"internal error: {err}"

    def _end(
        self,
        job: JobRecord,
        state: JobState,
        code: ReasonCode | str | None,
        reason: str | None,
        *,
        gate: dict[str, Any] | None = None,
    ) -> None:
        code_s = code.value if isinstance(code, ReasonCode) else code
        self.journal.transition(job, state, code=code_s, reason=reason, gate=gate)

    def _step(self, job: JobRecord, state: JobState, **data: Unpack[JobData]) -> None:
        if state is JobState.PROBATION:
            # Past the switch a cancel or timeout no longer applies; stopping leaves the
            # job in ACTIVATING, which the next start rolls back.
            if self._stop.is_set():
                raise Stopping()
        else:
            self._check(job)
        job.data.update(data)
        job.data.pop("resume", None)
        # PROBATION's event carries the figures it judges by (gate + baseline).
        gate = data.get("gate") if state is JobState.PROBATION else None
        self.journal.transition(job, state, data=job.data, gate=gate)
        self.heartbeat = time.monotonic()

    def _check(self, job: JobRecord) -> None:
        if self._stop.is_set():
            raise Stopping()
        if self._canceled(job):
            raise Canceled()

    def _timed_out(self, job: JobRecord) -> bool:
        """Past the job's time limit (which ends at ON_HOLD: the wait has its own bounds;
        a STAGED job that must build again once activated counts from its activation)."""
        if job.state in HOLD_STATES:
            return False
        start = max(job.created_at, float(job.data.get("activated_at") or 0))
        return time.time() > start + self.config.limits.job_timeout_s

    def _canceled(self, job: JobRecord) -> bool:
        """A cancel command or the job's time limit: both stop it before activation."""
        if self._timed_out(job):
            return True
        if job.command_id in self._cancels:
            return True
        if self.store.cancel_requested(job.command_id):
            self._cancels.add(job.command_id)
            return True
        return False

    def _body(self, job: JobRecord) -> DeployBody | RollbackBody:
        """The verified command body, stored at intake (an offline install has no envelope)."""
        model = DeployBody if job.kind == CommandKind.DEPLOY else RollbackBody
        return model.model_validate(job.data.get("body") or {})

    # ---- deploy ---------------------------------------------------------------------
    def _deploy(self, job: JobRecord) -> None:
        """DOWNLOADING, VERIFYING, BUILDING, VALIDATING, (ON_HOLD,) ACTIVATING, PROBATION,
        SUCCEEDED: each step persists its state first and ends the job itself when it must."""
        body = self._body(job)
        assert isinstance(body, DeployBody)
        if job.state is JobState.STAGED and not job.data.get("activate"):
            ttl = self.config.activation.stage_ttl_s
            self._fail(job, JobState.CANCELED, ReasonCode.STAGE_EXPIRED,
                       f"staged and never activated within {ttl:g}s ([activation] stage_ttl_s); "
                       "its files are removed")  # fmt: skip
        held = self._resume_held(job, body) if job.state in HOLD_STATES else None
        if held is None:
            self.hold.release()  # taken when its hold lifted: not for a rebuild's minutes
            job.data.pop("busy_since", None)  # a hold that starts over waits afresh
            path = self._download(job, body)
            bundle = self._verify_step(job, body, path)
            engine, figures = self._build_and_gate(job, bundle)
        else:
            bundle, engine, figures = held
        if body.stage and not job.data.get("activate"):
            self._stage(job, bundle.manifest, figures)
        try:
            self._hold_step(job, figures)
            self._activate(job, bundle, engine, figures)
        finally:
            self.hold.release()  # the robot may be busy again once the new engine is up
        self._probation_step(job, bundle.manifest, figures)
        self._succeed(job, figures)

    def _limits(self) -> DownloadLimits:
        d = self.config.download
        return DownloadLimits(
            max_bytes=self.config.max_bundle_bytes,
            min_free_bytes=self.config.limits.min_free_disk_mb * 2**20,
            connect_timeout_s=d.connect_timeout_s,
            read_timeout_s=d.read_timeout_s,
            retries=d.retries,
            min_rate_bytes_s=d.min_rate_bytes_s,
            min_rate_window_s=d.min_rate_window_s,
        )

    def _fail(self, job: JobRecord, state: JobState, code: ReasonCode | str, reason: str,
              *, gate: dict[str, Any] | None = None) -> NoReturn:  # fmt: skip
        """End the job before activation: what it downloaded goes, the old engine stays."""
        self._cleanup(job)
        self._end(job, state, code, reason, gate=gate)
        raise JobEnded()

    def _download(self, job: JobRecord, body: DeployBody) -> Path:
        self._step(job, JobState.DOWNLOADING)
        last = [time.monotonic(), 0.0]

        def progress(done: int, total: int) -> None:
            self.heartbeat = time.monotonic()
            frac = done / total if total else 0.0
            # At most one progress event a second and only for visible steps.
            if time.monotonic() - last[0] >= 1.0 and frac - last[1] >= 0.05:
                last[0], last[1] = time.monotonic(), frac
                self.journal.progress(job, frac)

        try:
            return fetch(body.url, sha256=body.sha256, size=body.size, downloads=self.downloads,
                         limits=self._limits(), progress=progress,
                         canceled=lambda: self._stop.is_set() or self._canceled(job))  # fmt: skip
        except Canceled:
            if self._stop.is_set():
                raise Stopping() from None
            raise
        except DownloadError as e:
            refused = e.code in ("bundle_invalid", "too_large")
            self._fail(job, JobState.REJECTED if refused else JobState.FAILED, e.code, e.reason)

    def _verify_step(self, job: JobRecord, body: DeployBody, path: Path) -> VerifiedBundle:
        self._step(job, JobState.VERIFYING, download=str(path))  # read again by a resumed hold
        limits = self._limits()
        try:
            # Extraction needs the bundle's size again (the engine later comes on top).
            self.bundles.mkdir(parents=True, exist_ok=True)
            check_disk(self.bundles, body.size, limits)
        except DownloadError as e:
            self._fail(job, JobState.FAILED, e.code, e.reason)
        try:
            bundle = self._verify(path, body.sha256, min(body.size, limits.max_bytes))
        except ProtocolError as e:
            self._fail(job, JobState.REJECTED, reason_code(e), f"bundle refused: {e.reason}")
        manifest = bundle.manifest
        if bundle.sha256 != body.sha256:
            self._reject(job, ReasonCode.BUNDLE_INVALID, "bundle changed while it was verified")
        if (body.name and body.name != manifest.name) or (
            body.version and body.version != manifest.version
        ):
            self._reject(
                job,
                ReasonCode.BUNDLE_INVALID,
                f"command names {body.name} {body.version}, the bundle is "
                f"{manifest.name} {manifest.version}",
            )
        job.model, job.version = manifest.name, manifest.version
        active = self.models.slot(manifest.name).active
        if active is not None:
            self._check_against_active(job, manifest, active, body.sha256)
        return bundle

    def _build_and_gate(
        self, job: JobRecord, bundle: VerifiedBundle
    ) -> tuple[Path, dict[str, Any]]:
        """BUILDING and VALIDATING, in the engine child (agent/enginejob.py): the built
        engine and the gate's figures, or the job ended (the old engine stays)."""
        self._step(job, JobState.BUILDING, bundle=str(bundle.root))
        request = self._deploy_request(bundle)
        try:
            check_engine_space(request.cache_root, bundle.model_path, self._limits().min_free_bytes)
        except EngineJobError as e:
            self._fail(job, JobState.FAILED, e.code, f"engine build: {e.reason}")
        engine_job = self._engine_job(
            request, lambda: self._canceled(job), self._build_progress(job)
        )
        try:
            try:
                built = engine_job.build()
            except EngineJobError as e:
                self._build_failed(job, e)
            self._on_hardware(built.hardware, built.backend, built.backend_version)
            self._step(job, JobState.VALIDATING, engine=str(built.engine))
            try:
                result = engine_job.gate(lambda nj: self._not_judged(job, nj))
            except EngineJobError as e:
                self._fail(job, JobState.FAILED, e.code, f"gate could not run: {e.reason}")
        except Interrupted:
            raise Stopping() from None
        finally:
            engine_job.close()
        return built.engine, self._judge(job, bundle.manifest.name, result)

    def _hold_step(self, job: JobRecord, figures: dict[str, Any]) -> None:
        """ON_HOLD while outside the maintenance windows or while the robot is busy: the job
        is parked (the worker goes on with later jobs) and taken up again once its hold
        lifts (`_parked_job_due`). Returns with the busy lock held (kept through the switch
        and health check). A new ON_HOLD event each time the reason changes (window,
        busy, who holds it)."""
        self._check(job)
        verdict = self._hold_verdict(job)
        if verdict.give_up:
            self._fail(job, JobState.DEFERRED, verdict.code or ReasonCode.BUSY,
                       verdict.reason, gate=figures)  # fmt: skip
        if verdict.go and not verdict.forced:
            return
        if _hold_key(verdict) != job.data.get("hold_key") or verdict.forced:
            self._hold_event(job, verdict, figures)
        if not verdict.go:
            raise Parked()

    def _hold_verdict(self, job: JobRecord) -> Verdict:
        # An offline install: the person at the robot chose the moment, not its window.
        return self.hold.check(job.data.get("busy_since"), windows=not job.data.get("offline"))

    def _stage(self, job: JobRecord, manifest: Manifest, figures: dict[str, Any]) -> NoReturn:
        """STAGED: gated, its engine and bundle kept, the old engine serving; the worker
        goes on to other jobs until an activate command marks this one."""
        self._check(job)
        job.data["gate"], job.data["staged_at"] = figures, time.time()
        job.data.pop("resume", None)
        active = self.models.slot(manifest.name).active or "no engine"
        self.journal.transition(job, JobState.STAGED, data=job.data, gate=figures,
                                reason=f"{manifest.name} {manifest.version} staged; {active} "
                                "serves until an activate command")  # fmt: skip
        raise Parked()

    def _stage_expired(self, job: JobRecord) -> bool:
        staged = float(job.data.get("staged_at") or job.created_at)
        return time.time() > staged + self.config.activation.stage_ttl_s

    def _hold_event(self, job: JobRecord, verdict: Verdict, figures: dict[str, Any]) -> None:
        job.data["busy_since"], job.data["gate"] = verdict.busy_since, figures
        job.data["hold_key"] = _hold_key(verdict)
        job.data.pop("resume", None)
        self.journal.transition(job, JobState.ON_HOLD, code=verdict.code,
                                reason=verdict.reason, data=job.data, gate=figures)  # fmt: skip

    def _resume_held(
        self, job: JobRecord, body: DeployBody
    ) -> tuple[VerifiedBundle, Path, dict[str, Any]] | None:
        """A job restarted ON_HOLD: its bundle verified again from the download and its
        gated engine checked, without building or gating anew; None: start over."""
        from agent.engines.sidecar import verify_engine_file

        path = Path(str(job.data.get("download") or ""))  # file:// is read in place
        engine = Path(str(job.data.get("engine") or ""))
        figures = job.data.get("gate")
        if not (path.is_file() and engine.is_file() and isinstance(figures, dict)):
            return None
        try:
            bundle = self._verify(path, body.sha256, min(body.size, self._limits().max_bytes))
        except ProtocolError as e:  # e.g. the trust root rotated away from its signer
            self._fail(job, JobState.REJECTED, reason_code(e), f"bundle refused: {e.reason}")
        if bundle.sha256 != body.sha256:
            log.warning("held_bundle_changed", command_id=job.command_id, path=str(path))
            return None
        try:
            verify_engine_file(engine)
        except (CodedError, OSError, ValueError) as e:
            log.warning("held_engine_unusable", command_id=job.command_id, reason=str(e))
            return None
        active = self.models.slot(bundle.manifest.name).active
        if active is not None:  # a STAGED job waited while other jobs ran
            self._check_against_active(job, bundle.manifest, active, body.sha256)
        return bundle, engine, figures

    def _judge(self, job: JobRecord, name: str, result: dict[str, Any]) -> dict[str, Any]:
        """The gate's verdict: its figures when it passed, else the job ends."""
        figures = dict(result.get("figures") or {})
        active = self.models.slot(name).active or "no engine"
        if result.get("code") == ReasonCode.NOT_JUDGED.value:
            # No verdict on the model: the device could not hold its clocks still.
            self._fail(job, JobState.FAILED, ReasonCode.NOT_JUDGED,
                       f"{active} stays active: {result.get('reason')}", gate=figures)  # fmt: skip
        if not result.get("passed"):
            self._fail(job, JobState.ROLLED_BACK, result.get("code") or ReasonCode.ACCURACY.value,
                       f"gate failed, {active} stays active: {result.get('reason')}",
                       gate=figures)  # fmt: skip
        return figures

    def _activate(
        self, job: JobRecord, bundle: VerifiedBundle, engine: Path, figures: dict[str, Any]
    ) -> None:
        """ACTIVATING: past this point the job cannot be canceled; a failure restores."""
        manifest = bundle.manifest
        slot = self.models.slot(manifest.name)
        prev = {"active": slot.active, "previous": slot.previous}
        self._step(job, JobState.ACTIVATING, prev=prev, gate=figures)
        self.models.install_version(
            manifest.name,
            manifest.version,
            engine,
            manifest.model_dump_json(by_alias=True).encode(),
            bundle.golden_path,
            bundle_sha256=bundle.sha256,
        )
        figures.update(self._probation_baseline(manifest.name, slot.active, figures))
        self._switch(manifest.name, manifest.version)
        self.journal.maybe_pause_named("ACTIVATING:switched")
        try:
            self._hook(job)
            acked_by = self._await_ack(manifest.name, manifest.version)
            self._health(job)  # after the word: a consumer restarted by the hook is up
        except ActivationError as e:
            self._restore(job, e.code, e.reason)
            raise JobEnded() from e
        if acked_by:
            figures["acknowledged_by"] = acked_by

    def _probation_baseline(
        self, name: str, active: str | None, figures: dict[str, Any]
    ) -> dict[str, Any]:
        """Probation compares the new version's live p99 with the old one's under the same
        load (taken before the switch); the gate's single-threaded p99 is only the
        fallback, as a loaded robot's live p99 sits above it and would roll back falsely."""
        baseline = self._live_baseline(name, active)
        if baseline is None:
            return {
                "probation_baseline": "gate",
                "probation_baseline_p99_ms": figures.get("p99_ms"),
            }
        return {
            "probation_baseline": "live",
            "probation_baseline_p99_ms": baseline.p99_ms,
            "probation_baseline_count": baseline.count,
        }

    def _probation_step(self, job: JobRecord, manifest: Manifest, figures: dict[str, Any]) -> None:
        self._step(job, JobState.PROBATION, gate=figures)
        try:
            self._probation(job, manifest, figures)
        except ActivationError as e:
            self._restore(job, e.code, e.reason, gate=figures)
            raise JobEnded() from e

    def _succeed(self, job: JobRecord, figures: dict[str, Any]) -> None:
        assert job.model is not None
        self.models.prune(job.model, KEEP_VERSIONS)
        # The bundle stays while a held version needs it to rebuild its engine (rollback
        # after a TensorRT upgrade); bundles of pruned versions go.
        self._cleanup(job)
        self._gc_bundles()
        self._end(job, JobState.SUCCEEDED, None, None, gate=figures)

    def _engine_request(
        self, manifest: Manifest, model: Path | None, **extra: Any
    ) -> EngineRequest:
        """The engine child's request, for a deploy (with the gate's inputs) or an ensure."""
        engines = Path(self.config.data_dir) / "engines"
        return EngineRequest(
            backend=self.config.backend,
            allow_cpu_fallback=self.config.allow_cpu_fallback,
            cache_root=engines,
            timing_cache_dir=engines / "timing",
            cache_bytes=self.config.limits.engine_cache_mb * 2**20,
            model=model,
            model_sha256=manifest.file(manifest.model).sha256,
            build=manifest.build,
            targets=manifest.targets,
            protect=self.models.protected_engines(),
            memory_bytes=self.config.engine_memory_bytes,
            **extra,
        )

    def _deploy_request(self, bundle: VerifiedBundle) -> EngineRequest:
        m, g = bundle.manifest, self.config.gate
        return self._engine_request(
            m,
            bundle.model_path,
            golden=bundle.golden_path,
            golden_max_bytes=self.config.limits.max_golden_mb * 2**20,
            inputs=m.inputs,
            outputs=m.outputs,
            gate=m.gate,
            active=self.models.active_engine(m.name),
            sysfs_root=g.sysfs_root,
            speed=SpeedRequest(
                attempts=g.speed_attempts,
                retry_wait_s=g.retry_wait_s,
                max_temp_rise_c=g.max_temp_rise_c,
            ),
        )

    def _build_failed(self, job: JobRecord, e: EngineJobError) -> NoReturn:
        refusals = (ReasonCode.TARGET_MISMATCH, ReasonCode.UNSUPPORTED, ReasonCode.BUNDLE_INVALID)
        state = JobState.REJECTED if e.code in {c.value for c in refusals} else JobState.FAILED
        code = e.code if e.code in _CODES else ReasonCode.BUILD_FAILED.value
        # bundle_invalid: the golden file, which the child checks before it builds.
        what = "bundle refused" if code == ReasonCode.BUNDLE_INVALID.value else "engine build"
        self._fail(job, state, code, f"{what}: {e.reason}")

    def _verify(self, path: Path, sha: str, max_size: int) -> VerifiedBundle:
        """Extract to bundles/<sha>/, verified against the trust root held now.

        A bundle an installed version holds (a re-deploy of its sha) is verified into a
        staging directory first and swapped in only when it passes: a bundle that no
        longer verifies (e.g. after a key rotation) keeps the held copy a rollback may
        need to rebuild from.
        """
        from protocol.bundle import VerifiedBundle, extract_bundle

        dest = self.bundles / sha
        if not dest.exists():
            return extract_bundle(
                path, self.trust.root, dest, _now(), max_size=max_size, progress=self._progress
            )
        staging = self.bundles / f".{sha}.verify.partial"
        shutil.rmtree(staging, ignore_errors=True)
        fresh = extract_bundle(
            path, self.trust.root, staging, _now(), max_size=max_size, progress=self._progress
        )
        old = self.bundles / f".{sha}.old.partial"
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return VerifiedBundle(manifest=fresh.manifest, root=dest, sha256=fresh.sha256)

    def _progress(self, done: int, total: int) -> None:
        self.heartbeat = time.monotonic()

    def _check_against_active(
        self, job: JobRecord, manifest: Manifest, active: str, sha: str
    ) -> None:
        """Refuse a downgrade; a bundle is the active one only by its sha256.

        SemVer precedence ignores build metadata, so 1.0.0+build.b is neither older nor
        the same as an active 1.0.0+build.a: it is installed like any upgrade.
        """
        name = manifest.name
        if manifest.semver < SemVer(active):
            self._reject(
                job,
                ReasonCode.DOWNGRADE,
                f"{name} {manifest.version} is older than the active {active}; "
                "going back needs an operator-signed rollback command",
            )
        if manifest.version != active:
            return
        if self.models.bundle_ref(name, active) in (sha, None):  # None: installed before refs
            self._cleanup(job)
            self._end(job, JobState.SUCCEEDED, None, f"{name} {active} is already active")
            raise JobEnded()
        self._reject(
            job,
            ReasonCode.BUNDLE_INVALID,
            f"{name} {active} is already active from another bundle; a different build "
            "needs its own version (e.g. 1.2.3+build.N)",
        )

    def _not_judged(self, job: JobRecord, nj: dict[str, Any]) -> None:
        """A speed run the gate declined to judge: say so on a VALIDATING event."""
        n, of = nj.get("attempt"), nj.get("attempts")
        moved = describe([str(m) for m in nj.get("moved") or []])
        nxt = f"measuring again in {nj.get('retry_in_s'):g} s" if n != of else "no runs left"
        self.journal.transition(
            job,
            JobState.VALIDATING,
            progress=0.0,
            code=ReasonCode.NOT_JUDGED.value,
            reason=f"not judged: {moved}; {nxt} (run {n} of {of})",
        )

    def _build_progress(self, job: JobRecord) -> Callable[[str, float], None]:
        """The engine child's build progress as throttled progress events (BUILDING)."""
        throttle = Throttle(BUILD_PROGRESS_EVERY_S)

        def report(phase: str, fraction: float) -> None:
            if throttle.due(phase, fraction):
                self.journal.progress(job, fraction, phase=phase[:200])

        return report

    def _reject(self, job: JobRecord, code: ReasonCode, reason: str) -> NoReturn:
        self._fail(job, JobState.REJECTED, code, reason)

    def _env(self, job: JobRecord) -> dict[str, str]:
        name = job.model or ""
        slot = self.models.slot(name)
        engine = self.models.current_link(name) / "engine"
        return {
            "JETFLEET_MODEL": name,
            "JETFLEET_VERSION": slot.active or "",
            "JETFLEET_PREVIOUS_VERSION": slot.previous or "",
            "JETFLEET_ENGINE": str(engine),
            "JETFLEET_COMMAND_ID": job.command_id,
            "JETFLEET_ACK_FILE": str(self.acks.path(name)),
        }

    def _hook(self, job: JobRecord) -> None:
        a = self.config.activation
        run_hook(a.hook, timeout=a.hook_timeout_s, env=self._env(job))

    def _health(self, job: JobRecord) -> None:
        a = self.config.activation
        check_health(a.health, timeout=a.health_timeout_s, env=self._env(job))

    def _switch(self, name: str, version: str) -> None:
        if self.config.wants_ack(name):
            self.acks.clear(name)  # only a word sent after the switch counts
        self.models.switch(name, version)
        self._on_change()

    def _await_ack(self, name: str, version: str) -> str | None:
        """The consumer contract: the consumer must say it loaded `version` in time.
        Returns where the word came from (None: no acknowledgement expected)."""
        if not self.config.wants_ack(name):
            return None
        timeout = self.config.activation.ack_timeout_s
        ack = self.acks.wait(name, version, timeout=timeout, stop=self._stop, beat=self._beat)
        if ack is None:
            raise Stopping()
        return ack.source

    def _live_baseline(self, name: str, version: str | None) -> LiveWindow | None:
        """The running version's live latency window, if it has enough samples."""
        if self.live is None or version is None:
            return None
        w = self.live.snapshot(name)
        if w is None or w.count < MIN_BASELINE_SAMPLES or w.version not in (None, version):
            return None
        return w

    def _probation(self, job: JobRecord, manifest: Manifest, figures: dict[str, Any]) -> None:
        spec = manifest.gate
        base_p99 = figures.get("probation_baseline_p99_ms", figures.get("p99_ms"))
        base_kind = figures.get("probation_baseline", "gate")
        limit = (
            float(base_p99) * (1 + spec.max_regression_pct / 100.0)
            if base_p99 is not None
            else None
        )
        if self.live is not None:
            # Only the new version's samples count (stragglers of the old one are dropped).
            self.live.reset(manifest.name, manifest.version)
        a = self.config.activation
        start = time.monotonic()
        end = start + spec.probation_s
        step = min(a.health_interval_s, max(spec.probation_s, 0.05))
        last_progress = start
        while True:
            if self._stop.is_set():
                raise Stopping()
            self.heartbeat = time.monotonic()
            self._health(job)
            if self.config.wants_ack(manifest.name):
                self.acks.check(manifest.name, manifest.version)  # a reported failure
            if self.live is not None and limit is not None:
                window = self.live.snapshot(manifest.name)
                if (
                    window is not None
                    and window.count >= MIN_LIVE_SAMPLES
                    and window.p99_ms > limit
                ):
                    figures["live_p99_ms"] = window.p99_ms
                    figures["live_count"] = window.count
                    raise ActivationError(
                        f"live p99 {window.p99_ms:.2f} ms over {window.count} inferences exceeds "
                        f"the {'previous version live' if base_kind == 'live' else 'gate'} "
                        f"p99 {float(base_p99 or 0):.2f} ms + {spec.max_regression_pct:g}%",
                        code=ReasonCode.PROBATION_LATENCY.value,
                    )
            now = time.monotonic()
            if now >= end:
                return
            if now - last_progress >= 5.0:
                last_progress = now
                self.journal.progress(job, (now - start) / max(spec.probation_s, 1e-9))
            self._stop.wait(min(step, max(end - now, 0.0)))

    def _restore(
        self, job: JobRecord, code: str, reason: str, *, gate: dict[str, Any] | None = None
    ) -> None:
        """Put back the slot recorded before the switch, rerun the hook, end ROLLED_BACK."""
        name = job.model
        prev = job.data.get("prev") or {}
        if name:
            new_version = job.version
            back_to = prev.get("active")
            if back_to and back_to != new_version:
                # The version going back live may not load any more (e.g. a TensorRT
                # upgrade since it was built): rebuild it first when its bundle is held.
                try:
                    problem = self._ensure_engine(job, name, back_to, restoring=True)
                except Stopping:
                    problem = (ReasonCode.INTERRUPTED, "the agent is stopping; not rebuilt")
                if problem is not None:
                    log.error("restore_engine_unusable", model=name, version=back_to,
                              reason=problem[1])  # fmt: skip
            self.models.set_slot(name, prev.get("active"), prev.get("previous"))
            if self.live is not None:
                self.live.reset(name, prev.get("active"))
            if (
                job.kind == CommandKind.DEPLOY
                and new_version
                and new_version not in (prev.get("active"), prev.get("previous"))
            ):
                shutil.rmtree(self.models.version_dir(name, new_version), ignore_errors=True)
            self._on_change()
            try:
                if prev.get("active"):
                    self._hook(job)
            except ActivationError as e:
                log.error("hook_failed_after_restore", command_id=job.command_id, reason=e.reason)
        self._cleanup(job)
        back = prev.get("active") or "no engine"
        self._end(
            job,
            JobState.ROLLED_BACK,
            code,
            f"{reason}; {back} is active again",
            gate=gate if gate is not None else job.data.get("gate"),
        )

    def _cleanup(self, job: JobRecord) -> None:
        """Remove what this job downloaded or extracted (the version dir stays if active)."""
        sha = (job.data.get("body") or {}).get("sha256") if job.kind == CommandKind.DEPLOY else None
        if sha:
            if sha not in self.models.bundle_refs():
                shutil.rmtree(self.bundles / sha, ignore_errors=True)
            for p in (self.downloads / f"{sha}.part", self.downloads / f"{sha}.jfb"):
                p.unlink(missing_ok=True)
        for p in self.bundles.glob(".*.partial") if self.bundles.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)

    def _gc_bundles(self) -> None:
        """Remove extracted bundles no installed version refers to any more."""
        if not self.bundles.is_dir():
            return
        keep = self.models.bundle_refs() | self._held_shas()
        for p in self.bundles.iterdir():
            if not p.name.startswith(".") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _held_shas(self) -> set[str]:
        """Bundles of STAGED and ON_HOLD jobs: kept while another job cleans up."""
        return {
            str((j.data.get("body") or {}).get("sha256"))
            for j in self.store.active_jobs()
            if j.state in HOLD_STATES
        }

    def _ensure_engine(
        self, job: JobRecord, name: str, version: str, *, restoring: bool = False
    ) -> tuple[ReasonCode, str] | None:
        """Make the held version's engine loadable here before it goes live.

        An engine file that is missing or fails its sidecar check, or any TensorRT engine
        (a plan from another TensorRT version does not load), goes through the builder
        child: it keeps a loadable engine and rebuilds an unloadable one from the bundle
        held at bundles/<sha256>/ through the EngineCache (same key as a deploy). Returns
        None when the engine is good, else (code, reason): unknown_version when the bundle
        to rebuild from is gone, build_failed when the rebuild failed. `restoring`: putting
        back the previous version after a failed activation, which neither a cancel nor a
        state change may interrupt.
        """
        from agent.engines.sidecar import verify_engine_file
        from protocol.manifest import Manifest

        engine = self.models.engine_path(name, version)
        try:
            meta = verify_engine_file(engine)
            if meta.backend != "tensorrt":
                return None  # ONNX Runtime engines are portable: the hash check suffices
            why = None
        except CodedError as e:  # EngineLoadError, a bundle that no longer verifies, ...
            why = e.reason
        except Exception as e:
            why = str(e)
        vdir = self.models.version_dir(name, version)
        sha = self.models.bundle_ref(name, version)
        try:
            manifest = Manifest.model_validate_json((vdir / "manifest.json").read_bytes())
        except (OSError, ValueError) as e:
            return (
                ReasonCode.UNKNOWN_VERSION,
                f"{name} {version} has no readable manifest ({e}); it cannot be rebuilt",
            )
        model = self.bundles / sha / manifest.model if sha else None
        if model is None or not model.is_file():
            if why is None:
                model = None  # a TensorRT engine that may still load: let the child check
            else:
                return (
                    ReasonCode.UNKNOWN_VERSION,
                    f"the engine of {name} {version} is unusable ({why}) and its bundle is no "
                    "longer held on this device to rebuild it; deploy it again instead",
                )
        log.info("rollback_engine_check", model=name, version=version, reason=why)
        if not restoring:
            self._step(job, JobState.BUILDING)
        request = self._engine_request(
            manifest, model, mode="ensure", engine=engine if why is None else None
        )
        engine_job = self._engine_job(
            request,
            (lambda: False) if restoring else (lambda: self._canceled(job)),
            # A restore runs inside ACTIVATING/PROBATION: no BUILDING to report progress in.
            (lambda phase, fraction: None) if restoring else self._build_progress(job),
        )
        try:
            built = engine_job.build()
        except EngineJobError as e:
            if model is None:
                return (
                    ReasonCode.UNKNOWN_VERSION,
                    f"the engine of {name} {version} does not load here and its bundle is "
                    f"no longer held on this device to rebuild it ({e.reason})",
                )
            return (
                ReasonCode.BUILD_FAILED,
                f"rebuilding the engine of {name} {version} failed: {e.reason}",
            )
        except Interrupted:
            raise Stopping() from None
        finally:
            engine_job.close()
        self._on_hardware(built.hardware, built.backend, built.backend_version)
        if built.rebuilt:
            self.models.replace_engine(name, version, built.engine)
            log.info("rollback_engine_rebuilt", model=name, version=version, reason=why)
        return None

    def _engine_job(
        self,
        request: EngineRequest,
        canceled: Callable[[], bool],
        on_progress: Callable[[str, float], None] = lambda phase, fraction: None,
    ) -> EngineJob:
        """The engine child, on the host or in the consumer's image ([engine] builder)."""
        command, on_kill = None, lambda: None
        if self.config.engine.builder == "container":
            name = container.new_name()
            container.prepare(self.config)
            command = container.child_command(self.config, name)
            on_kill = lambda: container.kill(self.config, name)  # noqa: E731
        return EngineJob(request, canceled=canceled, stopping=self._stop.is_set,
                         heartbeat=self._beat, on_progress=on_progress, command=command,
                         on_kill=on_kill)  # fmt: skip

    # ---- rollback -------------------------------------------------------------------
    def _rollback(self, job: JobRecord) -> None:
        body = self._body(job)
        assert isinstance(body, RollbackBody)
        name, version = body.model, body.to_version
        if not self.models.has_version(name, version):
            held = ", ".join(self.models.held_versions(name)) or "none"
            self._end(
                job,
                JobState.REJECTED,
                ReasonCode.UNKNOWN_VERSION,
                f"{name} {version} is not held on this device (held: {held})",
            )
            return
        slot = self.models.slot(name)
        if slot.active == version:
            self._end(job, JobState.SUCCEEDED, None, f"{name} {version} is already active")
            return
        problem = self._ensure_engine(job, name, version)
        if problem is not None:
            code, why = problem
            state = JobState.REJECTED if code is ReasonCode.UNKNOWN_VERSION else JobState.FAILED
            self._end(job, state, code, f"{why}; {slot.active or 'no engine'} stays active")
            return
        self._step(
            job, JobState.ACTIVATING, prev={"active": slot.active, "previous": slot.previous}
        )
        self._switch(name, version)
        try:
            self._hook(job)
            self._await_ack(name, version)
            self._health(job)
        except ActivationError as e:
            self._restore(job, e.code, e.reason)
            return
        self._end(job, JobState.SUCCEEDED, None, None)

    # ---- crash recovery -------------------------------------------------------------
    def recover(self) -> None:
        """Called once at start, before the threads: settle every job left in flight."""
        removed = self.models.remove_tmp()
        if self.config.engine.builder == "container":
            container.remove_leftovers(self.config)  # builds the killed agent left running
        resumable: set[str] = set()
        for job in self.store.active_jobs():
            if job.state in (JobState.ACTIVATING, JobState.PROBATION):
                log.warning("recover_rollback", command_id=job.command_id, state=job.state.value)
                self._restore(
                    job,
                    ReasonCode.INTERRUPTED.value,
                    f"the agent stopped during {job.state.value}",
                )
            elif job.state in PRE_ACTIVATION_STATES | HOLD_STATES:
                if job.attempts >= MAX_RESUMES and job.state not in HOLD_STATES:
                    self._cleanup(job)
                    self._end(
                        job,
                        JobState.FAILED,
                        ReasonCode.INTERRUPTED,
                        f"the agent stopped during {job.state.value} {job.attempts + 1} times; "
                        "giving up (the previous engine stays active)",
                    )
                    continue
                tries = job.attempts + (0 if job.state in HOLD_STATES else 1)
                with self.store.tx() as db:
                    job.data["resume"] = True
                    job.data.pop("hold_key", None)  # a held job says it still waits
                    self.store.update_job(db, job.command_id, data=job.data, attempts=tries)
                sha = (job.data.get("body") or {}).get("sha256")
                if isinstance(sha, str):
                    resumable.add(sha)
                log.info("recover_resume", command_id=job.command_id, state=job.state.value)
        # Partial downloads of jobs that will not resume, half-extracted bundles.
        remove_partials(self.downloads, keep=resumable)
        if self.bundles.is_dir():
            keep = resumable | self.models.bundle_refs()  # held versions rebuild from these
            for p in self.bundles.iterdir():
                if p.name.startswith(".") or p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)
        if removed:
            log.info("recover_removed_tmp", count=removed)
