"""`jetfleet-agent run`: wires config → store → MQTT → command intake → worker → telemetry.

Threads: paho's network thread (hands command payloads over), `commands` (verifies
them, persists the outcome, then acknowledges the MQTT message),
`worker` (one job at a time), `outbox` (publishes events in seq order), `telemetry`,
and the main thread, which publishes the retained status when something changed and
talks to systemd (READY after the first connection, WATCHDOG from the worker's
heartbeat, STATUS with the job in flight). SIGTERM stops everything cleanly; the job in
flight keeps its persisted state and is resumed or rolled back on the next start.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any

import structlog

from agent import sdnotify
from agent.activation import ModelStore
from agent.commands import CommandProcessor
from agent.config import AgentConfig
from agent.desired import DesiredState, document_topics
from agent.hold import clock_from_env
from agent.journal import Journal
from agent.mqtt import AgentMqtt
from agent.outbox import Outbox
from agent.status import StatusBuilder
from agent.store import Store, StoreReset, open_store
from agent.truststore import TrustStore
from agent.worker import Worker
from protocol.errors import CodedError
from protocol.messages import HardwareProfile, JobState, ReasonCode
from protocol.topics import Topics

log = structlog.get_logger("jetfleet.agent.daemon")

# With a job running (an engine build can take many minutes) the worker's own
# liveness is what counts; idle, its loop must tick within this many seconds.
IDLE_HEARTBEAT_S = 15.0
SEEN_PURGE_EVERY_S = 3600.0
STATUS_MIN_INTERVAL_S = 0.2


class AgentLockedError(CodedError, RuntimeError):
    """The local Mosquitto could not be found, configured or started."""

    code = "agent_locked"


def lock_data_dir(data_dir: Path) -> IO[str]:
    """One agent process per data directory (the daemon or an offline install)."""
    run = Path(data_dir) / "run"
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / "agent.lock", "a+")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise AgentLockedError(f"another jetfleet-agent process holds {run / 'agent.lock'}") from e
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def report_reset(store: Store, topics: Topics, device_id: str, reset: StoreReset) -> None:
    """Say that state.db was started fresh: one log line now, one event (a FAILED pseudo-job
    with code state_reset) that the outbox sends once connected."""
    log.error("state_reset", reason=reset.message)
    with store.tx() as db:
        store.add_event(
            db,
            topics.events(device_id),
            {
                "command_id": str(uuid.uuid4()),
                "device_id": device_id,
                "state": JobState.FAILED,
                "progress": 1.0,
                "code": ReasonCode.STATE_RESET.value,
                "reason": reset.message,
            },
        )


def hardware_profile(backend: Any | None = None) -> HardwareProfile:
    """agent.hardware.detect_hardware() in the wire format of DeviceStatus."""
    try:
        from agent.hardware import detect_hardware

        hw = detect_hardware(backend)
    except Exception as e:
        log.warning("hardware_detect_failed", error=str(e))
        return HardwareProfile()
    return HardwareProfile(
        device_model=hw.model,
        jetpack=hw.jetpack,
        l4t=hw.l4t,
        tensorrt=hw.tensorrt,
        gpu=hw.gpu,
        compute_capability=hw.compute_capability,
        backend=getattr(backend, "name", None),
        backend_version=getattr(backend, "version", None),
    )


def open_live_stats(socket_path: Path) -> Any | None:
    try:
        from agent.livestats import LiveStats
    except ImportError:
        log.warning("livestats_unavailable", reason="agent.livestats is not installed")
        return None
    try:
        live = LiveStats(socket_path)
        live.start()
        return live
    except Exception as e:
        log.warning("livestats_failed", error=str(e))
        return None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_data_dir(self.data_dir)
        self.started = time.monotonic()
        self.topics = Topics(config.topic_prefix)
        self.store, reset = open_store(self.data_dir / "state.db")
        if reset is not None:  # before anything else can stop the start: said only once
            report_reset(self.store, self.topics, config.device_id, reset)
        self.trust = TrustStore(config.trust_root, self.data_dir, datetime.now(timezone.utc))
        self.models = ModelStore(self.data_dir)
        self.stop_event = threading.Event()
        self._dirty = threading.Event()
        self._hardware = hardware_profile(None)
        self.live = open_live_stats(self.data_dir / "run" / "live.sock")
        self.status = StatusBuilder(
            config.device_id,
            config.groups,
            self.store,
            self.models,
            hardware=lambda: self._hardware,
            current_job=lambda: self.worker.current,
            trust_version=lambda: self.trust.root.version,
            fault=lambda: self.commands.fault,
            desired=lambda: self.desired.summary(),
            windows=lambda: self.worker.windows,
        )
        self.mqtt = AgentMqtt(
            config,
            on_command=self._on_command,
            will_payload=self.status.offline().encode(),
            on_connected=self._on_connected,
            on_published=self._on_published,
            on_disconnected=self._on_disconnected,
            documents=document_topics(self.topics, config.device_id, config.groups),
            on_document=lambda topic, payload, ack: self.desired.enqueue(topic, payload, ack),
        )
        self.outbox = Outbox(self.store, self._publish_event, self.mqtt.connected.is_set)
        self.journal = Journal(
            self.store,
            self.topics,
            config.device_id,
            on_event=self._on_event,
            on_change=self._dirty.set,
        )
        self.worker = Worker(
            config,
            self.store,
            self.journal,
            self.trust,
            live=self.live,
            on_change=self._dirty.set,
            on_hardware=self._on_hardware,
            intake_idle=lambda: self.commands.idle(),
            clock=clock_from_env(),
        )
        self.commands = CommandProcessor(
            self.store,
            self.journal,
            self.trust,
            device_id=config.device_id,
            groups=config.groups,
            wake_worker=self.worker.wake,
            on_cancel=self.worker.cancel,
            on_windows=self._windows_changed,
        )
        self.desired = DesiredState(
            self.store,
            self.journal,
            self.trust,
            self.models,
            device_id=config.device_id,
            groups=config.groups,
            topics=self.topics,
            jitter_s=config.desired.jitter_s,
            wake_worker=self.worker.wake,
            on_change=self._dirty.set,
        )
        self.telemetry: Any | None = None

    # ---- callbacks --------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes, ack: Callable[[], None], dup: bool) -> None:
        self.commands.enqueue(topic, payload, ack, dup)

    def _on_event(self) -> None:
        # Publish from the committing thread: one thread hop less before RECEIVED.
        self.outbox.pump()

    def _on_connected(self) -> None:
        self._dirty.set()
        self.outbox.wake()

    def _windows_changed(self) -> None:
        """A signed windows command took effect: the worker holds by them, and the
        retained status shows them."""
        self.worker.reload_windows()
        self._dirty.set()

    def _on_hardware(self, hw: dict[str, Any], backend: str, backend_version: str) -> None:
        """What the engine builder learned (GPU, compute capability) joins the status."""
        self._hardware = HardwareProfile(
            device_model=hw.get("model"),
            jetpack=hw.get("jetpack"),
            l4t=hw.get("l4t"),
            tensorrt=hw.get("tensorrt"),
            gpu=hw.get("gpu"),
            compute_capability=hw.get("compute_capability"),
            backend=backend,
            backend_version=backend_version,
            backend_fallback=hw.get("backend_fallback"),
        )
        self._dirty.set()

    def _on_disconnected(self) -> None:
        self.outbox.on_disconnected()

    def _on_published(self, mid: int) -> None:
        self.outbox.on_published(mid)

    def _publish_event(self, topic: str, payload: bytes) -> int:
        return self.mqtt.publish(topic, payload, qos=1)

    def deployment_view(self) -> dict[str, Any]:
        models: dict[str, Any] = {
            name: {"version": slot.active} for name, slot in self.models.slots().items()
        }
        if self.live is not None:
            self._add_live_view(models)
        counts = self.store.counts()
        failed = sum(counts.get(s.value, 0) for s in JobState if s.failed)
        return {
            "device_id": self.config.device_id,
            "uptime_s": time.monotonic() - self.started,
            "models": models,
            "jobs": {
                "done": counts.get(JobState.SUCCEEDED.value, 0),
                "failed": failed,
                "refused": self.commands.refused,
                "refused_unreported": self.commands.refused_unreported,
            },
        }

    def _add_live_view(self, models: dict[str, Any]) -> None:
        """Live latencies of managed models, and the service's metrics of any model
        (LiveStats bounds how many): a service may run a model jetfleet does not manage."""
        assert self.live is not None
        try:
            for name, entry in models.items():
                w = self.live.snapshot(name)
                if w is not None:
                    entry.update(p50_ms=w.p50_ms, p99_ms=w.p99_ms, count=w.count)
            for name in self.live.metric_models():
                models.setdefault(name, {})["metrics"] = self.live.take_metrics(name)
        except Exception as e:  # telemetry must go out without the live part
            log.warning("live_view_failed", error=f"{type(e).__name__}: {e}")

    def _start_telemetry(self) -> None:
        try:
            from agent.telemetry.loop import TelemetryLoop
            from agent.telemetry.sampler import TelemetrySampler

            sampler = TelemetrySampler(
                self.data_dir, self.deployment_view, device_id=self.config.device_id
            )
            self.telemetry = TelemetryLoop(
                sampler, self.mqtt.publish_telemetry, self.config.telemetry.interval_s
            )
            self.telemetry.start()
        except Exception as e:  # telemetry is useful, never essential
            log.warning("telemetry_unavailable", error=str(e))

    # ---- lifecycle --------------------------------------------------------------------
    def run(self) -> None:
        self.commands.resume_received()
        self.worker.recover()
        self.outbox.start()
        self.commands.start()
        self.worker.start()
        self.desired.start()
        self.mqtt.start()
        log.info(
            "agent_started",
            device_id=self.config.device_id,
            broker=self.config.broker.url,
            data_dir=str(self.data_dir),
            trust_version=self.trust.root.version,
        )
        self._start_telemetry()
        ready_sent = False
        started = time.monotonic()
        wd = sdnotify.watchdog_interval()
        last_wd = 0.0
        last_purge = float("-inf")  # at start too: a restart loop must not skip it
        last_status_text = ""
        last_status = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if not ready_sent and self.mqtt.connected.is_set():
                sdnotify.ready("connected to " + self.config.broker.url)
                ready_sent = True
            elif not ready_sent and now - started >= self.config.broker.ready_without_broker_s:
                # A robot that boots out of network reach is still a working agent (its
                # engine stays active, events wait in the outbox, `install` works): tell
                # systemd so, rather than be killed at TimeoutStartSec and restarted forever.
                sdnotify.ready("broker unreachable, retrying: " + self.config.broker.url)
                log.warning("ready_without_broker", broker=self.config.broker.url)
                ready_sent = True
            if (
                self._dirty.is_set()
                and self.mqtt.connected.is_set()
                and now - last_status >= STATUS_MIN_INTERVAL_S
            ):
                self._dirty.clear()
                self._publish_status()
                last_status = now
            if wd and now - last_wd >= wd and self._healthy():
                sdnotify.watchdog()
                last_wd = now
            text = self._status_text()
            if text != last_status_text:
                sdnotify.status(text)
                last_status_text = text
            if now - last_purge > SEEN_PURGE_EVERY_S:
                self.store.purge_seen(time.time())
                self.store.prune_jobs(time.time())
                last_purge = now
            if self._dirty.is_set():
                # Coalesce a burst of changes into one status message.
                self.stop_event.wait(STATUS_MIN_INTERVAL_S)
            else:
                self._dirty.wait(0.5 if not wd else min(0.5, wd / 2))
        self.shutdown()

    def _healthy(self) -> bool:
        if not self.worker.alive():
            return False
        if self.worker.current is not None:
            return not self.worker.stalled()
        return time.monotonic() - self.worker.heartbeat < IDLE_HEARTBEAT_S

    def _status_text(self) -> str:
        job = self.worker.current
        conn = "connected" if self.mqtt.connected.is_set() else "connecting"
        if job is None:
            return f"{conn}; idle"
        what = f"{job.kind} {job.model or ''} {job.version or ''}".strip()
        return f"{conn}; {what}: {job.state.value}"

    def _publish_status(self) -> None:
        try:
            self.mqtt.publish_status(self.status.build(online=True).encode())
        except Exception:
            log.exception("status_publish_failed")

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()
        self._dirty.set()

    def shutdown(self) -> None:
        log.info("agent_stopping")
        sdnotify.stopping("stopping")
        if self.telemetry is not None:
            self.telemetry.stop()
        self.journal.stop()
        self.commands.stop()
        self.desired.stop()
        self.worker.stop()
        # Give in-flight events a moment to be acknowledged; what is left stays in the
        # outbox and goes out on the next start.
        deadline = time.monotonic() + 3.0
        while (
            self.outbox.pending() and self.mqtt.connected.is_set() and time.monotonic() < deadline
        ):
            self.outbox.wake()
            time.sleep(0.05)
        self.outbox.stop()
        self.mqtt.stop(final_status=self.status.build(online=False).encode())
        if self.live is not None:
            with contextlib.suppress(Exception):
                self.live.stop()
        self.store.close()
        self._lock.close()
        log.info("agent_stopped")


def run_agent(config: AgentConfig) -> None:
    agent = Agent(config)

    def _signal(signum: int, frame: FrameType | None) -> None:
        agent.request_stop()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    # `kill -USR1 <pid>`: every thread's stack to stderr (the journal), for a stuck agent.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    agent.run()
