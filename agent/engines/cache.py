"""Content-addressed engine cache: build once per (model, backend, device, options).

Layout under `root`: `<key>.engine` and its sidecar `<key>.engine.json`. An entry is
complete when both exist; the engine is renamed into place before the sidecar is written,
so a crash leaves at worst an engine without a sidecar, which the next scan removes.

The agent hard-links entries into `models/<name>/versions/<v>/`, so "protected" is
decided by inode as well as by path: the active and previous engines are never evicted
whatever name they are protected under.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.engines.api import (
    ENGINE_FILENAME,
    Backend,
    BuildError,
    EngineError,
    EngineLoadError,
    EngineMeta,
)
from agent.engines.sidecar import (
    SIDECAR_SUFFIX,
    sidecar_path,
    verify_engine_file,
    write_meta,
)
from protocol.fsio import TMP_INFIX, fsync_dir, fsync_file, sha256_file
from protocol.manifest import BuildOptions

if TYPE_CHECKING:
    from agent.hardware import HardwareProfile

log = structlog.get_logger(__name__)

ENGINE_SUFFIX = ".engine"
_BUILD_PREFIX = ".build-"
KEY_SCHEMA = 2  # bump when what goes into a key changes, so old entries stop matching
# 2: + the platform (full TensorRT version, CUDA, L4T/JetPack, nvpmodel power mode)

# Platform: what the device runs besides the backend. A plan is tied to the exact
# TensorRT build and the GPU; CUDA and L4T upgrades change the kernels TensorRT times;
# and the tactics TensorRT picks depend on the clocks it timed them under, so an engine
# built in one nvpmodel power mode is rebuilt (not reused) in another.
PLATFORM_KEYS = ("tensorrt", "cuda", "l4t", "jetpack", "power_mode")


def platform_parts(hardware: HardwareProfile, power_mode: str | None) -> dict[str, str | None]:
    """The platform half of a cache key, from detect_hardware() and the nvpmodel mode."""
    return {
        "tensorrt": hardware.tensorrt_full or hardware.tensorrt,
        "cuda": hardware.cuda_version,
        "l4t": hardware.l4t,
        "jetpack": hardware.jetpack,
        "power_mode": power_mode,
    }


def cache_key(
    backend: Backend,
    model_sha256: str,
    options: BuildOptions,
    platform: Mapping[str, str | None] | None = None,
) -> str:
    """sha256 over everything that makes two engines differ."""
    import hashlib

    doc = {
        "schema": KEY_SCHEMA,
        "model_sha256": model_sha256,
        "backend": backend.name,
        "backend_version": backend.version,
        "device": backend.cache_key_parts(),
        "platform": {k: (platform or {}).get(k) for k in PLATFORM_KEYS},
        "build": options.model_dump(mode="json"),
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path  # the engine file
    size: int  # engine + sidecar bytes
    last_used: float  # epoch seconds (the sidecar's mtime, touched on every hit)


class EngineCache:
    def __init__(
        self, root: Path, max_bytes: int, platform: Mapping[str, str | None] | None = None
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("engine cache max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.platform = dict(platform or {})
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.builds = 0  # builds done by this instance (a hit does not count)
        with self._locked():
            self._sweep()

    # -- public -------------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{ENGINE_SUFFIX}"

    def lookup(self, backend: Backend, model_sha256: str, options: BuildOptions) -> Path | None:
        """The cached engine if present and intact (hash checked), else None."""
        key = cache_key(backend, model_sha256, options, self.platform)
        with self._locked():
            return self._hit(key, backend)

    def get_or_build(
        self,
        backend: Backend,
        model_path: Path,
        model_sha256: str,
        options: BuildOptions,
        *,
        protect: Iterable[Path] = (),
    ) -> Path:
        key = cache_key(backend, model_sha256, options, self.platform)
        protect = list(protect)
        with self._locked():
            hit = self._hit(key, backend)
            if hit is not None:
                log.info("engine_cache_hit", key=key[:16], backend=backend.name)
                return hit
            path = self._build(key, backend, model_path, model_sha256, options)
            self._evict([*protect, path])
            return path

    def entries(self) -> list[CacheEntry]:
        out = []
        for side in self.root.glob(f"*{ENGINE_SUFFIX}{SIDECAR_SUFFIX}"):
            engine = side.with_name(side.name[: -len(SIDECAR_SUFFIX)])
            try:
                st_side, st_engine = side.stat(), engine.stat()
            except FileNotFoundError:
                continue
            out.append(
                CacheEntry(
                    key=engine.name[: -len(ENGINE_SUFFIX)],
                    path=engine,
                    size=st_side.st_size + st_engine.st_size,
                    last_used=st_side.st_mtime,
                )
            )
        return sorted(out, key=lambda e: (e.last_used, e.key))

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def discard(self, engine: Path) -> None:
        """Remove one entry (an engine that no longer loads here), whatever its age; a
        version directory hard-linked to it keeps its own copy."""
        if Path(engine).parent != self.root:
            raise ValueError(f"{engine} is not an entry of the engine cache {self.root}")
        with self._locked():
            self._remove(Path(engine))
        log.warning("engine_cache_entry_discarded", path=str(engine))

    def evict(self, protect: Iterable[Path] = ()) -> list[Path]:
        """Remove least-recently-used entries until under max_bytes; returns what went."""
        with self._locked():
            return self._evict(list(protect))

    # -- internals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The thread lock orders this process; flock orders processes sharing the root.
        with self._lock, open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove what a crash can leave: build temps and half-written entries."""
        for p in self.root.iterdir():
            name = p.name
            if name.startswith(_BUILD_PREFIX) or (name.startswith(".") and TMP_INFIX in name):
                p.unlink(missing_ok=True)
            elif name.endswith(ENGINE_SUFFIX) and not sidecar_path(p).exists():
                log.warning("engine_cache_orphan_removed", path=str(p))
                p.unlink(missing_ok=True)
            elif name.endswith(ENGINE_SUFFIX + SIDECAR_SUFFIX):
                engine = p.with_name(name[: -len(SIDECAR_SUFFIX)])
                if not engine.exists():
                    p.unlink(missing_ok=True)

    def _remove(self, engine: Path) -> None:
        # Sidecar first: an engine without a sidecar is an incomplete entry, never a hit.
        sidecar_path(engine).unlink(missing_ok=True)
        engine.unlink(missing_ok=True)
        fsync_dir(self.root)

    def _hit(self, key: str, backend: Backend) -> Path | None:
        path = self.path_for(key)
        if not sidecar_path(path).exists():
            return None
        try:
            meta = verify_engine_file(path)
            if meta.key != key or meta.backend != backend.name:
                raise EngineLoadError(f"cache entry {path.name} was built under another key")
        except EngineLoadError as e:
            log.warning("engine_cache_entry_corrupt", key=key[:16], reason=e.reason)
            self._remove(path)
            return None
        now = time.time()
        os.utime(sidecar_path(path), (now, now))
        return path

    def _build(
        self,
        key: str,
        backend: Backend,
        model_path: Path,
        model_sha256: str,
        options: BuildOptions,
    ) -> Path:
        path = self.path_for(key)
        tmp = self.root / f"{_BUILD_PREFIX}{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        started = time.monotonic()
        log.info("engine_build_started", key=key[:16], backend=backend.name, model=str(model_path))
        try:
            backend.build(model_path, options, tmp)
            if not tmp.is_file():
                raise BuildError(f"{backend.name} reported success but wrote no engine")
            fsync_file(tmp)
            meta = EngineMeta(
                backend=backend.name,
                backend_version=backend.version,
                sha256=sha256_file(tmp),
                key=key,
                extra={
                    "model_sha256": model_sha256,
                    "build": options.model_dump(mode="json"),
                    "device": backend.cache_key_parts(),
                    "platform": self.platform,
                    "built_at": time.time(),
                    "build_s": round(time.monotonic() - started, 3),
                },
            )
            os.replace(tmp, path)
            write_meta(path, meta)
        except EngineError:
            raise
        except Exception as e:
            raise BuildError(f"{backend.name} build of {model_path.name} failed: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
        self.builds += 1
        log.info(
            "engine_build_done",
            key=key[:16],
            backend=backend.name,
            build_s=meta.extra["build_s"],
            bytes=path.stat().st_size,
        )
        return path

    def _evict(self, protect: list[Path]) -> list[Path]:
        inodes, real = set(), set()
        for p in protect:
            p = Path(p)
            if p.is_dir():
                p = p / ENGINE_FILENAME
            with contextlib.suppress(OSError):
                st = p.stat()
                inodes.add((st.st_dev, st.st_ino))
                real.add(os.path.realpath(p))
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed: list[Path] = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            try:
                st = entry.path.stat()
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in inodes or os.path.realpath(entry.path) in real:
                continue
            self._remove(entry.path)
            total -= entry.size
            removed.append(entry.path)
            log.info("engine_cache_evicted", key=entry.key[:16], bytes=entry.size)
        if total > self.max_bytes:
            log.warning(
                "engine_cache_over_limit", total=total, max_bytes=self.max_bytes,
                why="every remaining entry is protected (active/previous engines)",
            )  # fmt: skip
        return removed
