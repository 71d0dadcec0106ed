"""Live inference latencies from the robot's own service, over a unix datagram socket.

The robot's inference process (agent/runtime.py ModelRuntime) sends small binary
datagrams to data_dir/run/live.sock; the agent runs one LiveStats that keeps, per model,
a bounded window of the latest latencies. During probation the agent compares the live
p99 with the gate's p99 and rolls back when it exceeds it by the allowed margin.

Datagram (little-endian):  b"JFL1" | u8 len + model | u8 len + version | u16 n | n x f32 ms

The same socket takes a consumer's acknowledgement that it loaded a version (the
activation contract, docs/integration.md), and a latency report of a version counts as one:

    b"JFA1" | u8 len + model | u8 len + version | u8 healthy (1/0) | u8 len + reason

and the service's own metrics (b"JFM1", agent/metrics.py), kept per model version until
the telemetry loop drains them with take_metrics().

Datagrams are fire-and-forget: a lost one costs a few samples, a malformed one is counted
and dropped, and nothing a client sends can stop or grow the server beyond its bounds.

Stdlib only (no numpy): this module is imported by the agent daemon, whose idle memory
budget is tight (issue 3); a window is at most a few thousand floats, so sorting it for
a snapshot costs well under a millisecond.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.metrics import MAX_METRICS_DATAGRAM, METRICS_MAGIC, MetricsBook, decode_metrics
from protocol.errors import CodedError

log = structlog.get_logger(__name__)

MAGIC = b"JFL1"
ACK_MAGIC = b"JFA1"
MAX_SAMPLES_PER_DATAGRAM = 512
MAX_DATAGRAM = max(4 + 1 + 255 + 1 + 255 + 2 + 4 * MAX_SAMPLES_PER_DATAGRAM, MAX_METRICS_DATAGRAM)


class LiveStatsError(CodedError, ValueError):
    """A datagram that is not a latency report."""

    code = "live_stats"


def encode_report(model: str, version: str, latencies_ms: Sequence[float]) -> bytes:
    m, v = model.encode()[:255], version.encode()[:255]
    lat = [float(x) for x in latencies_ms[:MAX_SAMPLES_PER_DATAGRAM]]
    return b"".join(
        [MAGIC, bytes([len(m)]), m, bytes([len(v)]), v, struct.pack("<H", len(lat)),
         struct.pack(f"<{len(lat)}f", *lat)]
    )  # fmt: skip


def decode_report(data: bytes) -> tuple[str, str, array[float]]:
    try:
        if data[:4] != MAGIC:
            raise LiveStatsError("bad magic")
        pos = 4
        ml = data[pos]
        model = data[pos + 1 : pos + 1 + ml].decode()
        pos += 1 + ml
        vl = data[pos]
        version = data[pos + 1 : pos + 1 + vl].decode()
        pos += 1 + vl
        (n,) = struct.unpack_from("<H", data, pos)
        pos += 2
        if len(data) != pos + 4 * n or not model:
            raise LiveStatsError(f"length {len(data)} does not match {n} samples")
        lat = array("d", struct.unpack_from(f"<{n}f", data, pos))
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise LiveStatsError(f"truncated or garbled report: {e}") from e
    if not all(math.isfinite(x) and x >= 0 for x in lat):
        raise LiveStatsError("latencies must be finite and non-negative")
    return model, version, lat


@dataclass(frozen=True)
class Ack:
    """A consumer's word that it loaded `version` of `model` (healthy) or failed to."""

    model: str
    version: str
    healthy: bool
    reason: str
    source: str  # "socket" (a JFA1 datagram), "report" (latencies), or the ack file's path


def encode_ack(model: str, version: str, healthy: bool = True, reason: str = "") -> bytes:
    m, v, r = model.encode()[:255], version.encode()[:255], reason.encode()[:255]
    return b"".join(
        [ACK_MAGIC, bytes([len(m)]), m, bytes([len(v)]), v, bytes([1 if healthy else 0]),
         bytes([len(r)]), r]
    )  # fmt: skip


def decode_ack(data: bytes) -> Ack:
    try:
        if data[:4] != ACK_MAGIC:
            raise LiveStatsError("bad magic")
        pos = 4
        fields = []
        for _ in range(2):
            n = data[pos]
            fields.append(data[pos + 1 : pos + 1 + n].decode())
            pos += 1 + n
        healthy = data[pos]
        n = data[pos + 1]
        reason = data[pos + 2 : pos + 2 + n].decode("utf-8", "replace")
        pos += 2 + n
    except (IndexError, UnicodeDecodeError) as e:
        raise LiveStatsError(f"truncated or garbled acknowledgement: {e}") from e
    if len(data) != pos or not fields[0] or not fields[1] or healthy not in (0, 1):
        raise LiveStatsError("malformed acknowledgement")
    return Ack(fields[0], fields[1], healthy == 1, reason, "socket")


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted data."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class LiveWindow:
    count: int  # samples since the last reset (the percentiles use the latest `window`)
    p50_ms: float
    p99_ms: float
    window: int
    version: str | None  # the version the samples came from (the one reset() expects)
    since: float  # epoch seconds of the last reset
    last_at: float  # epoch seconds of the newest sample


class _Window:
    def __init__(self, size: int, version: str | None) -> None:
        self.buf = array("d", bytes(8 * size))  # zeros; a ring of the latest `size`
        self.n = 0  # total since reset
        self.version = version
        self.since = time.time()
        self.last_at = 0.0

    def add(self, lat: array[float]) -> None:
        size = len(self.buf)
        k = len(lat)
        if k >= size:
            self.buf[:] = lat[-size:]
        else:
            start = self.n % size
            end = start + k
            if end <= size:
                self.buf[start:end] = lat
            else:
                cut = size - start
                self.buf[start:] = lat[:cut]
                self.buf[: end - size] = lat[cut:]
        self.n += k
        self.last_at = time.time()


class LiveStats:
    """Server side: `.start()`, `.stop()`, `.snapshot(model)`, `.reset(model, version)`."""

    def __init__(
        self,
        socket_path: Path,
        *,
        window: int = 2048,
        max_models: int = 64,
        max_metric_names: int = 64,
        mode: int = 0o660,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.window = window
        self.max_models = max_models
        self.mode = mode
        self.dropped = 0  # malformed datagrams, or samples of another version
        self._models: dict[str, _Window] = {}
        self._acks: dict[str, Ack] = {}
        self._metrics = MetricsBook(max_names=max_metric_names)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, self.mode)
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="livestats", daemon=True)
        self._thread.start()
        log.info("livestats_started", socket=str(self.socket_path))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> LiveStats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while not self._stop.is_set():
            try:
                data = sock.recv(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("livestats_recv_failed", error=str(e))
                time.sleep(0.05)
                continue
            try:
                self.ingest(data)
            except Exception as e:  # never let a datagram end the thread
                self.dropped += 1
                log.debug("livestats_bad_datagram", error=str(e), size=len(data))

    def ingest(self, data: bytes) -> None:
        """Take one datagram (the server thread calls this; tests may too)."""
        if data[:4] == ACK_MAGIC:
            self._take_ack(decode_ack(data))
            return
        if data[:4] == METRICS_MAGIC:
            self._take_metrics(data)
            return
        model, version, lat = decode_report(data)
        if version:
            # Inferences on a version prove it loaded; an explicit word about it stands.
            held = self._acks.get(model)
            if held is None or held.version != version:
                self._take_ack(Ack(model, version, True, "serving", "report"))
        with self._lock:
            w = self._models.get(model)
            if w is None:
                if len(self._models) >= self.max_models:
                    self.dropped += 1
                    return
                w = self._models[model] = _Window(self.window, None)
            if w.version is None:
                w.version = version or None
            elif version and version != w.version:
                # Stragglers of the version just replaced (or a reset for the new one
                # not yet seen): they must not count towards this version's probation.
                self.dropped += 1
                return
            w.add(lat)

    def _take_ack(self, ack: Ack) -> None:
        with self._lock:
            if ack.model not in self._acks and len(self._acks) >= self.max_models:
                self.dropped += 1
                return
            self._acks[ack.model] = ack

    def _take_metrics(self, data: bytes) -> None:
        report = decode_metrics(data)
        with self._lock:
            if not self._metrics.add(report):
                self.dropped += 1  # past the bound on models or on versions of this one

    def take_metrics(self, model: str) -> dict[str, dict[str, Any]]:
        """The service's metrics of `model` per version since the previous call."""
        with self._lock:
            return self._metrics.drain(model)

    def metric_models(self) -> list[str]:
        """Models with metrics not yet taken."""
        with self._lock:
            return self._metrics.models()

    def ack(self, model: str) -> Ack | None:
        """The latest acknowledgement (or report) for `model` since clear_ack()."""
        with self._lock:
            return self._acks.get(model)

    def clear_ack(self, model: str) -> None:
        """Forget what was acknowledged: called before a switch, so only a word sent
        after it counts."""
        with self._lock:
            self._acks.pop(model, None)

    def reset(self, model: str, version: str | None = None) -> None:
        """Start a fresh window; with `version`, only that version's samples count."""
        with self._lock:
            self._models[model] = _Window(self.window, version)

    def snapshot(self, model: str) -> LiveWindow | None:
        with self._lock:
            w = self._models.get(model)
            if w is None or w.n == 0:
                return None
            held = w.buf[: min(w.n, len(w.buf))]  # a slice of an array is a copy
            n, version, since, last_at = w.n, w.version, w.since, w.last_at
        ordered = sorted(held)
        p50, p99 = _percentile(ordered, 50), _percentile(ordered, 99)
        return LiveWindow(n, round(p50, 4), round(p99, 4), len(ordered),
                          version, since, last_at)  # fmt: skip

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)
