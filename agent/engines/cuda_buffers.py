"""Every pycuda call of the TensorRT runner lives here: context, streams, buffers, events.

Kept small so that the one dependency that must be built from source on a Jetson (pycuda)
touches one module. The TensorRT runner only needs raw device pointers and a stream
handle; everything it gets from here is a plain int or a numpy array.

The CUDA primary context is retained once and pushed around each operation, because a
pycuda context is current per thread and the runtime library calls us from the robot's
own threads.

Everything here that holds CUDA memory or handles (Stream, EventTimer, DeviceBuffer,
PinnedStaging) has an explicit close()/free(), to be called with the context pushed: a
pycuda object destroyed by the garbage collector on another thread, outside the context,
leaks its handle and prints a warning.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _driver() -> Any:
    import pycuda.driver as cuda

    return cuda


def _primary(device_index: int = 0) -> Any:
    with _lock:
        ctx = _state.get(f"ctx{device_index}")
        if ctx is None:
            cuda = _driver()
            cuda.init()
            ctx = cuda.Device(device_index).retain_primary_context()
            _state[f"ctx{device_index}"] = ctx
        return ctx


@contextlib.contextmanager
def cuda_context(device_index: int = 0) -> Iterator[None]:
    """Make the device's primary context current in this thread for the block."""
    ctx = _primary(device_index)
    ctx.push()
    try:
        yield
    finally:
        _driver().Context.pop()


def cuda_available() -> bool:
    try:
        cuda = _driver()
        cuda.init()
        return bool(cuda.Device.count() > 0)
    except Exception:  # ImportError, or pycuda's LogicError/RuntimeError without a driver
        return False


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "8.7"
    total_memory: int
    integrated: bool  # a Jetson's GPU: it shares the system's RAM


def device_info(device_index: int = 0) -> DeviceInfo:
    cuda = _driver()
    cuda.init()
    dev = cuda.Device(device_index)
    major, minor = dev.compute_capability()
    integrated = bool(dev.get_attribute(cuda.device_attribute.INTEGRATED))
    return DeviceInfo(
        device_index, str(dev.name()), f"{major}.{minor}", int(dev.total_memory()), integrated
    )


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current device (context must be current)."""
    free, total = _driver().mem_get_info()
    return int(free), int(total)


class Stream:
    def __init__(self) -> None:
        self._stream = _driver().Stream()

    @property
    def handle(self) -> int:
        return int(self._stream.handle)

    def synchronize(self) -> None:
        self._stream.synchronize()

    @property
    def raw(self) -> Any:
        return self._stream

    def close(self) -> None:
        """Destroy the stream now (call with the context pushed)."""
        self._stream = None


class DeviceBuffer:
    """Device memory of at least `nbytes`; grows (reallocates) on demand."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = 0
        self._mem: Any = None
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes and self._mem is not None:
            return
        self.free()
        self._mem = _driver().mem_alloc(max(1, nbytes))
        self.nbytes = max(1, nbytes)

    @property
    def address(self) -> int:
        return int(self._mem)

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        if host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        _driver().memcpy_htod_async(self._mem, np.ascontiguousarray(host), stream.raw)

    def download(self, host: np.ndarray, stream: Stream) -> None:
        if host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        if not host.flags["C_CONTIGUOUS"]:
            raise ValueError("download target must be C-contiguous")
        _driver().memcpy_dtoh_async(host, self._mem, stream.raw)

    def free(self) -> None:
        if self._mem is not None:
            self._mem.free()
            self._mem = None
            self.nbytes = 0


def pinned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Page-locked host memory: async copies need it to overlap with compute."""
    return _driver().pagelocked_empty(shape, dtype)  # type: ignore[no-any-return]


class PinnedStaging:
    """A growable page-locked host area, viewed as any shape/dtype that fits."""

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None

    def view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if self._buf is None or self._buf.nbytes < nbytes:
            self._buf = pinned_empty((max(1, nbytes),), np.uint8)
        return self._buf[:nbytes].view(dt).reshape(shape)

    def close(self) -> None:
        """Free the page-locked memory now (call with the context pushed)."""
        self._buf = None


class EventTimer:
    """GPU-side elapsed time between two points on a stream, in milliseconds.

    start() and stop() only record events on the stream; elapsed_ms() reads the time
    once the caller has synchronized the stream anyway (no extra host sync per use).
    """

    def __init__(self, stream: Stream) -> None:
        cuda = _driver()
        self._stream = stream
        self._begin_event: Any = cuda.Event()
        self._finish_event: Any = cuda.Event()

    def start(self) -> None:
        self._begin_event.record(self._stream.raw)

    def stop(self) -> None:
        self._finish_event.record(self._stream.raw)

    def elapsed_ms(self) -> float:
        """After the stream (or the finish event) has been synchronized."""
        self._finish_event.synchronize()  # a no-op wait when the stream already was
        return float(self._begin_event.time_till(self._finish_event))

    def close(self) -> None:
        """Destroy both events now (call with the context pushed)."""
        self._begin_event = self._finish_event = None
