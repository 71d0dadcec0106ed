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

The service records its own metrics with one cheap call on the hot path, tagged with the
version now serving, and the agent reports them in telemetry (agent/metrics.py):

    rt.count("detections", len(boxes))      # counter: summed over the interval
    rt.gauge("mean_confidence", conf)       # gauge: last/mean/min/max over the interval

Inferences that raise are counted as the version's `errors`.

While the robot must not have its model swapped (a mission), it holds the busy lock; the
agent then waits to switch (job state ON_HOLD, code busy; agent/busy.py):

    with rt.busy("mission 42"):
        run_mission()
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from agent.busy import BusyHold
from agent.engines import Engine, EngineError, EngineLoadError, load_engine
from agent.engines.api import ENGINE_FILENAME
from agent.livestats import MAX_SAMPLES_PER_DATAGRAM, encode_ack, encode_report
from agent.metrics import COUNTER, GAUGE, Entry, chunks, encode_metrics, valid_name

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
        if self.send(data):
            self.sent += n
        else:
            self.dropped += n

    def send(self, data: bytes) -> bool:
        try:
            self._sock.sendto(data, self.path)
            return True
        except OSError:  # no agent, agent restarting, socket buffer full: drop, go on
            return False

    def ack(self, version: str, healthy: bool, reason: str = "") -> None:
        # No agent listening: it learns the version from the latency reports later.
        with contextlib.suppress(OSError):
            self._sock.sendto(encode_ack(self.model, version, healthy, reason), self.path)

    def close(self) -> None:
        self.flush()
        self._sock.close()


@dataclass
class _Interval:
    """One interval's records of one version."""

    version: str
    counters: dict[str, list[float]] = field(default_factory=dict)  # name -> [n, sum]
    gauges: dict[str, list[float]] = field(default_factory=dict)  # [n, last, sum, min, max]
    errors: int = 0
    dropped: int = 0

    def empty(self) -> bool:
        return not (self.counters or self.gauges or self.errors or self.dropped)


class _MetricsRecorder:
    """The service's counters and gauges, sent to the agent as aggregated deltas.

    The hot path takes no lock: it updates a list in a dict that only the GIL guards.
    A new name, an error and each flush take the lock. A daemon thread retires the
    current interval every `interval_s` and sends the one retired the time before, so a
    record still in flight in a retired interval lands before it is read. Two threads
    adding to the same name at the same instant may lose one of the two adds: the price
    of a lock-free hot path. At most `max_names` distinct names are held per interval;
    records of more are counted as dropped and reported, so a runaway name generator
    grows neither the service nor the agent. Without a reporter (report=False) records
    are discarded at each flush.
    """

    def __init__(
        self, reporter: _Reporter | None, version: str, interval_s: float, max_names: int
    ) -> None:
        self.reporter = reporter
        self.max_names = max_names
        self.sent = self.lost = 0  # datagrams sent / not sent (no agent, buffer full)
        self._lock = threading.Lock()
        self._cur = _Interval(version)
        self._counters, self._gauges = self._cur.counters, self._cur.gauges
        self._retired: list[_Interval] = []
        self._stop = threading.Event()
        if reporter is not None:
            threading.Thread(target=self._run, args=(interval_s,), name="jetfleet-metrics",
                             daemon=True).start()  # fmt: skip

    def count(self, name: str, value: float = 1.0) -> None:
        c = self._counters.get(name)
        if c is None:
            self._new(name, [0, 0.0], False)
            c = self._counters.get(name)
            if c is None:
                return
        c[0] += 1
        c[1] += value

    def gauge(self, name: str, value: float) -> None:
        v = float(value)
        g = self._gauges.get(name)
        if g is None:
            self._new(name, [0, v, 0.0, v, v], True)
            g = self._gauges.get(name)
            if g is None:
                return
        g[0] += 1
        g[1] = v
        g[2] += v
        if v < g[3]:
            g[3] = v
        elif v > g[4]:
            g[4] = v

    def _new(self, name: str, entry: list[float], gauge: bool) -> None:
        with self._lock:
            cur = self._cur
            into = cur.gauges if gauge else cur.counters
            if name in into:
                return  # another thread made it meanwhile
            if len(cur.counters) + len(cur.gauges) < self.max_names:
                into[name] = entry
            else:
                cur.dropped += 1

    def error(self) -> None:
        with self._lock:
            self._cur.errors += 1

    def set_version(self, version: str) -> None:
        """Records from now on belong to `version`."""
        with self._lock:
            self._retire(version)

    def flush(self) -> None:
        """Send everything now (before exit, or when asked)."""
        with self._lock:
            self._retire(self._cur.version)
            self._send_retired()

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with self._lock:
                    self._send_retired()
                    self._retire(self._cur.version)
            except Exception as e:  # the service's metrics must never stop its reporting
                log.error("runtime_metrics_flush_failed", error=f"{type(e).__name__}: {e}")

    def _retire(self, next_version: str) -> None:
        if not self._cur.empty():
            self._retired.append(self._cur)
        self._cur = _Interval(next_version)
        self._counters, self._gauges = self._cur.counters, self._cur.gauges

    def _send_retired(self) -> None:
        retired, self._retired = self._retired, []
        for interval in retired:
            if self.reporter is not None:
                self._send(self.reporter, interval)

    def _send(self, reporter: _Reporter, iv: _Interval) -> None:
        entries, bad = _entries(iv.counters, iv.gauges)
        for i, chunk in enumerate(chunks(entries) if entries else iter([[]])):
            first = i == 0
            data = encode_metrics(reporter.model, iv.version, chunk,
                                  iv.errors if first else 0,
                                  iv.dropped + bad if first else 0)  # fmt: skip
            if reporter.send(data):
                self.sent += 1
            else:
                self.lost += 1


def _entries(
    counters: dict[str, list[float]], gauges: dict[str, list[float]]
) -> tuple[list[tuple[str, Entry]], int]:
    """The wire entries, and how many records had a bad name or value (NaN, infinity,
    an array added to a counter): checked here, once per interval, not per call."""
    raw = [(name, COUNTER, n, [total, 0.0, 0.0, 0.0]) for name, (n, total) in counters.items()]
    raw += [(name, GAUGE, g[0], g[1:]) for name, g in gauges.items()]
    kept: list[tuple[str, Entry]] = []
    bad = 0
    for name, kind, n, values in raw:
        floats = _finite(values)
        if floats is not None and valid_name(name):
            kept.append((name, [kind, int(n), *floats]))
        else:
            bad += int(n)
    return kept, bad


def _finite(values: list[Any]) -> list[float] | None:
    try:
        out = [float(x) for x in values]
    except (TypeError, ValueError, OverflowError):
        return None
    return out if all(map(math.isfinite, out)) else None


class _Count(Protocol):
    def __call__(self, name: str, value: float = 1.0) -> None: ...


class _Gauge(Protocol):
    def __call__(self, name: str, value: float) -> None: ...


class ModelRuntime:
    # The recorder's own bound methods, not wrappers: one Python call less on the hot path
    # counts on Python 3.10 (bench/metric_record.py).
    count: _Count
    """`rt.count(name, value=1.0)`: add to a counter of the version now serving (summed
    per interval)."""
    gauge: _Gauge
    """`rt.gauge(name, value)`: record a gauge (last/mean/min/max per interval)."""

    def __init__(
        self,
        name: str,
        data_dir: Path | str,
        *,
        check_interval_s: float = 0.5,
        report: bool = True,
        report_batch: int = 32,
        report_interval_s: float = 0.25,
        max_metric_names: int = 64,
        engine_options: dict[str, Any] | None = None,
        engine_loader: Callable[..., Engine] = load_engine,
        busy_lock: Path | str | None = None,
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.current = self.data_dir / "models" / name / "current"
        self.check_interval_s = check_interval_s
        # The agent's [activation] busy_lock; data_dir/run/busy.lock unless configured.
        self.busy_lock = Path(busy_lock) if busy_lock else self.data_dir / "run" / "busy.lock"
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
        self._metrics = _MetricsRecorder(
            self._reporter, self._slot.version, report_interval_s, max_metric_names
        )
        self.count, self.gauge = self._metrics.count, self._metrics.gauge
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
        except Exception:
            self._metrics.error()
            raise
        finally:
            slot.release()
        if self._reporter is not None:
            self._reporter.add(slot.version, ms)
        return out

    def busy(self, reason: str = "") -> BusyHold:
        """The busy lock: no engine switch while it is held (`with rt.busy("mission"):`,
        or `.acquire()` ... `.release()`). The kernel drops it if this process dies."""
        return BusyHold(self.busy_lock, reason)

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
        """Send any batched latencies and metrics now (e.g. before the service exits)."""
        self._metrics.flush()
        if self._reporter is not None:
            self._reporter.flush()

    @property
    def reports_dropped(self) -> int:
        """Latency samples that could not be sent (no agent listening, buffer full)."""
        return self._reporter.dropped if self._reporter is not None else 0

    def close(self) -> None:
        self._metrics.close()
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
                    self._metrics.set_version(new.version)
                self._failed_target = None
                self.swaps += 1
                changed = True
                old.retire()
                self._ack(new.version, True)
                log.info("runtime_swapped", model=self.name, old=old.version, new=new.version)
        finally:
            self._loading.release()
