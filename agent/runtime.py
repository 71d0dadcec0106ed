"""The library the robot's own inference service uses to run the model jetfleet manages.

    rt = ModelRuntime("detector", "/var/lib/jetfleet")
    outputs = rt.infer({"image": frame})        # named numpy arrays in and out

It loads `data_dir/models/<name>/current/engine` (whatever backend made it: the sidecar
says), notices when the agent repoints `current` (one readlink, at most every
`check_interval_s`), loads the new engine in a background thread while the old one keeps
serving, then switches between two requests: no request is dropped or fails because of a
swap, and the old engine is closed only when its last in-flight request has returned.

Every latency is reported to the agent's LiveStats socket, batched and fire-and-forget:
if the agent is down, restarting or slow, samples are dropped and inference goes on.
Each load is acknowledged on the same socket (loaded, or failed with the reason): this
class follows the consumer contract of docs/integration.md by itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.engines import Engine, EngineError, EngineLoadError, load_engine
from agent.engines.api import ENGINE_FILENAME
from agent.livestats import MAX_SAMPLES_PER_DATAGRAM, encode_ack, encode_report

log = structlog.get_logger(__name__)


class NoModelError(EngineError):
    """`models/<name>/current` does not exist yet (nothing was ever activated)."""

    code = "unknown_version"


@dataclass
class _Slot:
    engine: Engine
    target: str  # what `current` pointed at when loaded
    version: str
    inflight: int = 0
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> None:
        with self.lock:
            self.inflight += 1

    def release(self) -> None:
        with self.lock:
            self.inflight -= 1
            close = self.retired and self.inflight == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self.lock:
            self.retired = True
            close = self.inflight == 0
        if close:
            self._close()

    def _close(self) -> None:
        # A retired engine that fails to close must not fail the request that released
        # it, nor the swap that retired it.
        try:
            self.engine.close()
        except Exception as e:
            log.error("runtime_engine_close_failed", version=self.version,
                      error=f"{type(e).__name__}: {e}")  # fmt: skip


class _Reporter:
    """Batches latencies and sends them as datagrams without ever blocking or raising."""

    def __init__(self, socket_path: Path, model: str, batch: int, interval_s: float) -> None:
        self.path = str(socket_path)
        self.model = model
        self.batch = min(batch, MAX_SAMPLES_PER_DATAGRAM)
        self.interval_s = interval_s
        self.sent = self.dropped = 0
        self._pending: list[float] = []
        self._version = ""
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def add(self, version: str, ms: float) -> None:
        with self._lock:
            if version != self._version and self._pending:
                self._flush_locked()
            self._version = version
            self._pending.append(ms)
            if len(self._pending) >= self.batch or time.monotonic() - self._last >= self.interval_s:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        data = encode_report(self.model, self._version, self._pending)
        n = len(self._pending)
        self._pending = []
        try:
            self._sock.sendto(data, self.path)
            self.sent += n
        except OSError:  # no agent, agent restarting, socket buffer full: drop, go on
            self.dropped += n

    def ack(self, version: str, healthy: bool, reason: str = "") -> None:
        # No agent listening: it learns the version from the latency reports later.
        with contextlib.suppress(OSError):
            self._sock.sendto(encode_ack(self.model, version, healthy, reason), self.path)

    def close(self) -> None:
        self.flush()
        self._sock.close()


class ModelRuntime:
    def __init__(
        self,
        name: str,
        data_dir: Path | str,
        *,
        check_interval_s: float = 0.5,
        report: bool = True,
        report_batch: int = 32,
        report_interval_s: float = 0.25,
        engine_options: dict[str, Any] | None = None,
        engine_loader: Callable[..., Engine] = load_engine,
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.current = self.data_dir / "models" / name / "current"
        self.check_interval_s = check_interval_s
        self.engine_options = dict(engine_options or {})
        # How an engine file becomes an Engine: by its sidecar's backend unless a service
        # brings its own loader (e.g. a backend jetfleet does not ship).
        self._engine_loader = engine_loader
        self._slot_lock = threading.Lock()
        self._loading = threading.Lock()
        self._next_check = 0.0
        self._failed_target: str | None = None
        self._reporter = (
            _Reporter(self.data_dir / "run" / "live.sock", name, report_batch, report_interval_s)
            if report
            else None
        )
        target = self._read_target()
        if target is None:
            raise NoModelError(f"model {name!r} has no active version ({self.current} is missing)")
        self._slot = self._load(target)
        self.swaps = 0
        self._ack(self._slot.version, True)

    # -- public -------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return self._slot.version

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._maybe_check()
        with self._slot_lock:
            slot = self._slot
            slot.acquire()
        try:
            t0 = time.perf_counter()
            out = slot.engine.infer(feeds)
            ms = (time.perf_counter() - t0) * 1e3
        finally:
            slot.release()
        if self._reporter is not None:
            self._reporter.add(slot.version, ms)
        return out

    def refresh(self, wait: bool = True) -> bool:
        """Check `current` now. wait=True loads a new engine in this thread and returns
        whether the engine changed; wait=False loads it in the background."""
        target = self._read_target()
        if target is None or target == self._slot.target or target == self._failed_target:
            return False
        if not wait:
            threading.Thread(target=self._swap, args=(False,), daemon=True).start()
            return False
        return self._swap(True)

    def flush_reports(self) -> None:
        """Send any batched latencies now (e.g. before the service exits)."""
        if self._reporter is not None:
            self._reporter.flush()

    @property
    def reports_dropped(self) -> int:
        """Latency samples that could not be sent (no agent listening, buffer full)."""
        return self._reporter.dropped if self._reporter is not None else 0

    def close(self) -> None:
        if self._reporter is not None:
            self._reporter.close()
        with self._slot_lock:
            self._slot.retire()

    def __enter__(self) -> ModelRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _ack(self, version: str, healthy: bool, reason: str = "") -> None:
        if self._reporter is not None:
            self._reporter.ack(version, healthy, reason)

    def _read_target(self) -> str | None:
        try:
            return os.readlink(self.current)
        except FileNotFoundError:
            return None
        except OSError:  # `current` is a plain directory (a manual install): use its path
            return str(self.current.resolve()) if self.current.is_dir() else None

    def _maybe_check(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval_s
        self.refresh(wait=False)

    def _load(self, target: str) -> _Slot:
        version_dir = (self.current.parent / target).resolve()
        try:
            engine = self._engine_loader(version_dir / ENGINE_FILENAME, **self.engine_options)
        except EngineError:
            raise
        except Exception as e:
            # A TypeError (bf16/fp8 I/O), pycuda's LogicError or a MemoryError is as much a
            # load failure as a corrupt file: the swap must neither die nor retry forever.
            raise EngineLoadError(
                f"loading {version_dir.name} failed: {type(e).__name__}: {e}"
            ) from e
        log.info("runtime_engine_loaded", model=self.name, version=version_dir.name)
        return _Slot(engine=engine, target=target, version=version_dir.name)

    def _swap(self, block: bool) -> bool:
        if not self._loading.acquire(blocking=block):
            return False  # a load is under way; it re-reads `current` when it is done
        try:
            changed = False
            # Re-read under the lock: the target seen by the caller may already be stale,
            # and `current` may move again while a (slow, TensorRT) load runs.
            while True:
                target = self._read_target()
                if target is None or target == self._slot.target:
                    return changed
                if target == self._failed_target:
                    return changed
                try:
                    new = self._load(target)
                except EngineError as e:
                    # Keep serving the old engine; do not retry this target in a hot loop.
                    self._failed_target = target
                    log.error("runtime_swap_failed", model=self.name, target=target,
                              reason=e.reason)  # fmt: skip
                    self._ack(Path(target).name, False, str(e.reason))
                    return changed
                with self._slot_lock:
                    old, self._slot = self._slot, new
                self._failed_target = None
                self.swaps += 1
                changed = True
                old.retire()
                self._ack(new.version, True)
                log.info("runtime_swapped", model=self.name, old=old.version, new=new.version)
        finally:
            self._loading.release()
