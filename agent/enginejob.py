"""Engine work (target check, build, gate) in a child process.

TensorRT and ONNX Runtime are large (tens to hundreds of MiB, a CUDA context on a
Jetson), can take minutes, and can crash or be OOM-killed on a model that does not fit.
None of that may happen inside the daemon: the worker starts

    python -m agent.enginejob      (request: one EngineRequest as a JSON line on stdin)

which checks targets and builds (through the EngineCache), prints `{"built": ...}`, waits
for `gate` on stdin (the worker persists VALIDATING first), runs the gate and prints
`{"gate": ...}`; a speed run the gate declines to judge (clocks or thermal state moved)
prints `{"not_judged": ...}` first, once per run. Errors come back as
`{"error": {"code", "reason"}}` (one that happened because the engine cache's disk is
full is `disk_full` whatever the library called it: ONNX Runtime says "Protobuf
serialization failed"); while it builds, `{"progress": {"phase", "fraction"}}`
lines (agent.engines.progress, at most one per PROGRESS_EVERY_S within a phase) go to
`on_progress`.

Plans are deserialized here only, never in the daemon, and only from the engine cache
this agent built (or a version directory linked from it). A cached engine is loaded once
before it is reported built: when that fails (a plan TensorRT no longer accepts although
its sha256 matches), the entry is evicted and rebuilt instead of failing the deploy.

The daemon stays small when idle, a crash of the builder fails the job instead of the
agent, and a cancel or a SIGTERM stops a build at once by killing the child. The child
dies with its parent (PR_SET_PDEATHSIG), so a kill -9 of the agent leaves no orphan build
running.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from agent.download import Canceled
from protocol.errors import CodedError
from protocol.manifest import BuildOptions, GateSpec, Targets, TensorSpec

if TYPE_CHECKING:  # the daemon side stays numpy-free
    from agent.engines.api import Backend
    from agent.engines.cache import EngineCache
    from agent.gate.speed import SpeedSettings


PROGRESS_EVERY_S = 0.5  # child -> worker; the worker throttles events further


class SpeedRequest(BaseModel):
    """The agent's [gate] settings for the speed comparison (agent.gate.SpeedSettings)."""

    model_config = ConfigDict(extra="forbid")
    attempts: int | None = None
    retry_wait_s: float | None = None
    max_temp_rise_c: float | None = None


class EngineRequest(BaseModel):
    """What the worker asks of the engine child: built by the worker in one place
    (Worker._engine_request), sent as one JSON line, parsed by child_main.

    mode "deploy": check targets, build through the cache, then (on "gate") run the gate
    on `golden` against `active`. mode "ensure": make a held version's `engine` loadable
    here, rebuilding it from `model` (None: its bundle is no longer held) when it is not.
    """

    model_config = ConfigDict(extra="forbid")
    mode: str = Field(default="deploy", pattern="^(deploy|ensure)$")
    backend: str
    allow_cpu_fallback: bool = True
    cache_root: Path
    timing_cache_dir: Path | None = None
    cache_bytes: int
    model: Path | None
    model_sha256: str
    build: BuildOptions = Field(default_factory=BuildOptions)
    targets: Targets = Field(default_factory=Targets)
    protect: list[Path] = Field(default_factory=list)
    memory_bytes: int | None = None
    sysfs_root: Path = Path("/")
    engine: Path | None = None  # ensure: the held engine to keep when it loads
    golden: Path | None = None  # deploy: checked before the build, used by the gate
    golden_max_bytes: int = 0
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    gate: GateSpec | None = None
    active: Path | None = None  # deploy: the engine the gate compares speed against
    speed: SpeedRequest = Field(default_factory=SpeedRequest)


class Throttle:
    """The rate rule for build progress (child -> worker, worker -> events): a phase's
    start and its end always pass, once; in between at most one report per `every_s`."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._phase: str | None = None
        self._at = float("-inf")
        self._ended = False

    def due(self, phase: str, fraction: float) -> bool:
        now = time.monotonic()
        ended = fraction >= 1.0
        if phase == self._phase:
            if ended and self._ended:
                return False  # its end went already
            if not ended and not self._ended and now - self._at < self.every_s:
                return False
        self._phase, self._at, self._ended = phase, now, ended
        return True


class EngineJobError(CodedError):
    """What the engine child reported (or what killed it); `code` is a ReasonCode value."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason, code=code)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n // 1024} KiB"


def check_engine_space(cache_root: Path, model: Path, reserve: int) -> None:
    """Before a build: the engine takes about the model's size (ONNX Runtime's optimized
    model; a TensorRT engine is of the same order) on top of the disk reserve."""
    needed = model.stat().st_size
    cache_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_root).free
    if free < needed + reserve:
        raise EngineJobError(
            "disk_full",
            f"not enough disk in {cache_root}: {_size(free)} free, the engine needs about "
            f"{_size(needed)} plus a {_size(reserve)} reserve (limits.min_free_disk_mb)",
        )


def is_no_space(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return "No space left on device" in str(err)


def disk_full_reason(err: BaseException, cache_root: Path, model: Path) -> str | None:
    """The reason to give when engine work failed because the cache's disk is full: an
    ENOSPC, or any failure while less than the engine's size is free there."""
    try:
        free = shutil.disk_usage(cache_root).free
        needed = model.stat().st_size
    except OSError:
        return None
    if not is_no_space(err) and free >= needed:
        return None
    return (
        f"the disk holding {cache_root} is full ({_size(free)} free, the engine needs about "
        f"{_size(needed)}): {err.reason if isinstance(err, CodedError) else err}"
    )


class Interrupted(Exception):
    """The agent is stopping: the child was killed, the job keeps its persisted state."""


@dataclass
class Built:
    engine: Path
    hardware: dict[str, Any]
    backend: str
    backend_version: str
    rebuilt: bool = True  # False: an `ensure` request found the engine it named loadable


class EngineJob:
    """Parent side: one child per deploy job."""

    def __init__(
        self,
        request: EngineRequest,
        *,
        canceled: Callable[[], bool],
        stopping: Callable[[], bool],
        heartbeat: Callable[[], None] = lambda: None,
        on_progress: Callable[[str, float], None] = lambda phase, fraction: None,
        command: list[str] | None = None,
        on_kill: Callable[[], None] = lambda: None,
    ) -> None:
        """`command`: how to start the child (default: this Python; agent/container.py
        runs it in an image); `on_kill`: what else stops it (a container's by name)."""
        self._canceled = canceled
        self._stopping = stopping
        self._heartbeat = heartbeat
        self._on_progress = on_progress
        self._on_kill = on_kill
        self._lines: queue.Queue[str | None] = queue.Queue()
        argv = command or [sys.executable, "-m", "agent.enginejob"]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,  # the child's logs go where the agent's go (journald)
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as e:  # e.g. no docker/podman on this robot: the job fails, cleanly
            why = f"cannot start the engine builder {argv[0]!r}: {e}"
            error = json.dumps({"error": {"code": "build_failed", "reason": why}})
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; print(sys.argv[1])", error],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self._send(request.model_dump_json())

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self._lines.put(line)
        self._lines.put(None)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the child is gone; _next() reports how it ended

    def _next(self) -> dict[str, Any]:
        while True:
            if self._stopping():
                self.kill()
                raise Interrupted()
            if self._canceled():
                self.kill()
                raise Canceled()
            self._heartbeat()
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                rc = self.proc.wait()
                if rc < 0:
                    name = signal.Signals(-rc).name
                    hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
                    raise EngineJobError(
                        "build_failed", f"the engine builder was killed by {name}{hint}"
                    )
                raise EngineJobError("build_failed", f"the engine builder exited {rc}")
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printed to stdout; not ours
            if isinstance(msg, dict):
                if "error" in msg:
                    err = msg["error"]
                    raise EngineJobError(str(err.get("code")), str(err.get("reason")))
                if "progress" in msg:
                    self._progress(msg["progress"])
                    continue
                return msg

    def _progress(self, p: Any) -> None:
        try:
            phase, fraction = str(p["phase"]), float(p["fraction"])
        except (TypeError, KeyError, ValueError):
            return  # a malformed line from our own child: not worth the job
        self._on_progress(phase, max(0.0, min(1.0, fraction)))

    def build(self) -> Built:
        msg = self._next()
        b = msg.get("built")
        if not isinstance(b, dict):
            raise EngineJobError("build_failed", f"unexpected reply from the builder: {msg}")
        return Built(
            Path(b["engine"]),
            b.get("hardware") or {},
            b["backend"],
            b["backend_version"],
            bool(b.get("rebuilt", True)),
        )

    def gate(
        self, on_not_judged: Callable[[dict[str, Any]], None] = lambda _: None
    ) -> dict[str, Any]:
        self._send("gate")
        msg = self._next()
        while isinstance(msg.get("not_judged"), dict):
            on_not_judged(msg["not_judged"])
            msg = self._next()
        g = msg.get("gate")
        if not isinstance(g, dict):
            raise EngineJobError("build_failed", f"unexpected reply from the gate: {msg}")
        return g

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._on_kill()

    def close(self) -> None:
        if self.proc.poll() is None:
            self._send("done")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


# ---- child side ---------------------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


_emit_lock = threading.Lock()


def _emit(msg: dict[str, Any]) -> None:
    line = json.dumps(msg, default=str) + "\n"
    with _emit_lock:  # TensorRT may report progress from its own threads
        sys.stdout.write(line)
        sys.stdout.flush()


def _progress_sink() -> Callable[[str, float], None]:
    throttle = Throttle(PROGRESS_EVERY_S)

    def sink(phase: str, fraction: float) -> None:
        if throttle.due(phase, fraction):
            _emit({"progress": {"phase": phase, "fraction": round(fraction, 4)}})

    return sink


def _loadable_engine(cache: EngineCache, backend: Backend, req: EngineRequest) -> Path:
    """The engine for this request from the cache, built if missing; a cached one that
    does not load (deserialize) here is evicted and rebuilt, once."""
    from agent.engines import EngineLoadError

    def get() -> Path:
        assert req.model is not None
        return cache.get_or_build(backend, req.model, req.model_sha256, req.build,
                                  protect=req.protect)  # fmt: skip

    builds = cache.builds
    engine = get()
    if cache.builds > builds:
        return engine  # built just now: the gate's load is its test
    try:
        backend.load(engine).close()
    except EngineLoadError as e:
        import structlog

        structlog.get_logger(__name__).warning(
            "engine_cache_entry_unloadable_rebuilding", engine=str(engine), reason=e.reason
        )
        cache.discard(engine)
        engine = get()
    return engine


def _check_model_sha256(model: Path, expected: str) -> None:
    """A held bundle was verified when extracted; check the model and its weight files
    did not rot since. Weight files carry their SHA-256 in their name (bundle build names
    them so), and model.onnx's hash covers those names, so a rotted weight is caught."""
    import re

    from protocol.errors import BundleError
    from protocol.fsio import sha256_file
    from protocol.modelio import resolve_model_file

    if sha256_file(model) != expected:
        raise BundleError(f"held model {model} no longer matches its manifest's sha256")
    for name in resolve_model_file(model).data_files:
        named = re.fullmatch(r"weights-([0-9a-f]{64})\.bin", name)
        if named and sha256_file(model.parent / name) != named.group(1):
            raise BundleError(
                f"held weight file {name} of {model} no longer matches the sha256 in its name"
            )


def _cap_memory(limit: int | None) -> None:
    """Cap the child's private writable memory (RLIMIT_DATA: heap and anonymous mmaps,
    which is where numpy arrays and the builders' host buffers live) so that a model or
    golden file that does not fit fails this job with MemoryError instead of waking the
    OOM killer, which may pick the robot's own inference process. RLIMIT_AS would also
    count the address space CUDA reserves without using it."""
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _check_golden(req: EngineRequest) -> None:
    """Before the build (minutes on a Jetson): the golden file is the manifest's."""
    from agent.gate.golden import check_golden

    assert req.golden is not None
    check_golden(req.golden, req.inputs, req.outputs, req.golden_max_bytes)


def _speed_settings(speed: SpeedRequest) -> SpeedSettings:
    from agent.gate import SpeedSettings

    return SpeedSettings(**speed.model_dump(exclude_none=True))


def _emit_not_judged(attempt: int, attempts: int, moved: list[str], wait_s: float) -> None:
    _emit({"not_judged": {"attempt": attempt, "attempts": attempts, "moved": moved,
                          "retry_in_s": wait_s}})  # fmt: skip


def _disk_full(err: BaseException, req: EngineRequest | None) -> str | None:
    if req is None or req.model is None:
        return None
    return disk_full_reason(err, req.cache_root, req.model)


def _built(engine: Path, hardware: Any, backend: Backend, *, rebuilt: bool = True) -> None:
    _emit({"built": {"engine": str(engine), "hardware": hardware.to_dict(),
                     "backend": backend.name, "backend_version": backend.version,
                     "rebuilt": rebuilt}})  # fmt: skip


def _held_engine_loads(req: EngineRequest) -> bool:
    """ensure: a rollback target keeps its engine when it loads here (same file, same
    TensorRT version); it is rebuilt from the held bundle when it does not."""
    from agent.engines import EngineLoadError, load_engine

    if req.engine is None:
        return False
    try:
        load_engine(req.engine)
        return True
    except EngineLoadError as e:
        import structlog

        structlog.get_logger(__name__).warning(
            "engine_unloadable_rebuilding", engine=str(req.engine), reason=e.reason
        )
        return False


def _build(req: EngineRequest, backend: Backend, hardware: Any) -> Path:
    """Targets checked, then the engine from the cache (built when missing)."""
    from agent.engines import progress as build_progress
    from agent.engines.cache import EngineCache, platform_parts
    from agent.engines.targets import check_targets
    from agent.telemetry.sysfs import JetsonSysfs
    from protocol.errors import BundleError
    from protocol.modelio import resolve_model_file

    if req.model is None:
        raise BundleError("the bundle to rebuild the engine from is no longer held")
    if req.mode == "ensure":
        _check_model_sha256(req.model, req.model_sha256)
    # The resolution `bundle build` ran: a model it would refuse is refused here too,
    # whatever the backend, before any build starts.
    resolve_model_file(req.model)
    check_targets(req.targets, hardware, backend, build=req.build)
    platform = platform_parts(hardware, JetsonSysfs(req.sysfs_root).nvpmodel())
    cache = EngineCache(req.cache_root, req.cache_bytes, platform)
    build_progress.set_sink(_progress_sink())
    engine = _loadable_engine(cache, backend, req)
    build_progress.set_sink(None)
    return engine


def _gate(req: EngineRequest, backend: Backend, engine: Path) -> None:
    from agent.gate import ConditionsWatch, run_gate
    from agent.telemetry.sysfs import JetsonSysfs

    assert req.golden is not None and req.gate is not None
    speed = _speed_settings(req.speed)
    result = run_gate(
        backend,
        engine,
        req.active,
        req.golden,
        req.gate,
        speed=speed,
        watch=ConditionsWatch(JetsonSysfs(req.sysfs_root), max_temp_rise_c=speed.max_temp_rise_c),
        on_not_judged=_emit_not_judged,
    )
    _emit({"gate": {"passed": bool(result.passed), "code": result.code,
                    "reason": result.reason, "figures": result.figures}})  # fmt: skip


def _serve(req: EngineRequest) -> None:
    """The request's work: build (or keep) the engine, then the gate when asked for."""
    from agent.engines import choose_backend
    from agent.hardware import detect_hardware

    _cap_memory(req.memory_bytes)
    if req.golden is not None:
        _check_golden(req)
    # TensorRT keeps its timing cache (per TensorRT version and GPU) next to the
    # engine cache, so a rebuild after eviction or a rollback reuses the tactics;
    # ONNX Runtime ignores the option.
    timing = req.timing_cache_dir or req.cache_root / "timing"
    choice = choose_backend(req.backend, timing_cache_dir=timing,
                            allow_cpu_fallback=req.allow_cpu_fallback)  # fmt: skip
    backend = choice.backend
    hardware = detect_hardware(backend, root=req.sysfs_root, backend_fallback=choice.fallback)
    if req.mode == "ensure" and _held_engine_loads(req):
        assert req.engine is not None
        _built(req.engine, hardware, backend, rebuilt=False)
        sys.stdin.readline()
        return
    engine = _build(req, backend, hardware)
    _built(engine, hardware, backend)
    if sys.stdin.readline().strip() == "gate":
        _gate(req, backend, engine)
        sys.stdin.readline()


def child_main() -> int:
    _die_with_parent()
    from agent.logs import configure_logging

    configure_logging(os.environ.get("JETFLEET_AGENT_LOG_LEVEL", "warning"))
    req: EngineRequest | None = None
    try:
        req = EngineRequest.model_validate_json(sys.stdin.readline())
        _serve(req)
        return 0
    except MemoryError as e:
        limit = req.memory_bytes if req is not None else None
        cap = f"the engine child's cap of {limit // 2**20} MiB" if limit else "memory"
        _emit({"error": {"code": "build_failed",
                         "reason": f"out of {cap} (limits.engine_memory_mb): {e}"}})  # fmt: skip
        return 1
    except Exception as e:
        code: str | None = e.code if isinstance(e, CodedError) else None
        reason = e.reason if isinstance(e, CodedError) else f"{type(e).__name__}: {e}"
        full = _disk_full(e, req) if code in (None, "build_failed") else None
        if full is not None:
            code, reason = "disk_full", full
        _emit(
            {"error": {"code": code if isinstance(code, str) else "build_failed", "reason": reason}}
        )
        return 1


if __name__ == "__main__":
    sys.exit(child_main())
