"""The on-disk activation layout and the switch between engine versions.

    data_dir/models/<name>/versions/<version>/  engine, engine.json, manifest.json, golden.npz
    data_dir/models/<name>/current  -> versions/<v>
    data_dir/models/<name>/previous -> versions/<v0>

A version directory is written under a temporary name, fsynced and renamed into place,
and never changed afterwards: the robot's runtime may have the engine open. The
symlinks are replaced with os.replace() of a freshly made temporary symlink (atomic on
POSIX), then the directory is fsynced so the switch survives a power cut.

The consumer contract (docs/integration.md): any process loads `current/engine`, reads
the version from `current/version`, and acknowledges what it loaded, in
data_dir/ack/<model>.json or on the LiveStats socket; with `[activation] ack_timeout_s`
the agent waits for that word after a switch and rolls back without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.livestats import Ack, LiveStats
from protocol.errors import CodedError
from protocol.fsio import fsync_dir, fsync_file
from protocol.ids import SemVer
from protocol.messages import ModelSlot

log = structlog.get_logger("jetfleet.agent.activation")

ENGINE = "engine"
ENGINE_META = "engine.json"
MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
TMP_PREFIX = ".tmp-"
BUNDLE_REF = "bundle.sha256"  # the bundle a version came from (data_dir/bundles/<sha256>/)
VERSION_FILE = "version"  # the version's own name, for consumers that read `current/version`
MAX_ACK_BYTES = 4096


class ActivationError(CodedError):
    """A hook or health check that failed; `code` is a ReasonCode value."""

    code = "hook_failed"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        fsync_file(dst)


@dataclass(frozen=True)
class Slot:
    active: str | None
    previous: str | None


class ModelStore:
    """The models/ tree of a data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "models"

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def versions_dir(self, name: str) -> Path:
        return self.root / name / "versions"

    def version_dir(self, name: str, version: str) -> Path:
        return self.versions_dir(name) / version

    def current_link(self, name: str) -> Path:
        return self.root / name / "current"

    def previous_link(self, name: str) -> Path:
        return self.root / name / "previous"

    def engine_path(self, name: str, version: str) -> Path:
        return self.version_dir(name, version) / ENGINE

    # ---- reading --------------------------------------------------------------------
    def _target_version(self, link: Path) -> str | None:
        try:
            target = os.readlink(link)
        except OSError:
            return None
        version = Path(target).name
        return version if (link.parent / target).is_dir() else None

    def slot(self, name: str) -> Slot:
        return Slot(
            self._target_version(self.current_link(name)),
            self._target_version(self.previous_link(name)),
        )

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def slots(self) -> dict[str, ModelSlot]:
        out: dict[str, ModelSlot] = {}
        for name in self.models():
            s = self.slot(name)
            if s.active or s.previous:
                out[name] = ModelSlot(active=s.active, previous=s.previous)
        return out

    def held_versions(self, name: str) -> list[str]:
        vdir = self.versions_dir(name)
        if not vdir.is_dir():
            return []
        held = [
            p.name
            for p in vdir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / ENGINE).is_file()
        ]
        return sorted(held, key=_semver_key)

    def active_engine(self, name: str) -> Path | None:
        active = self.slot(name).active
        return self.engine_path(name, active) if active else None

    def protected_engines(self) -> list[Path]:
        """Engines of every current/previous version: never evicted from the cache."""
        paths = []
        for name in self.models():
            s = self.slot(name)
            for v in (s.active, s.previous):
                if v:
                    paths.append(self.engine_path(name, v))
        return paths

    # ---- writing --------------------------------------------------------------------
    def has_version(self, name: str, version: str) -> bool:
        """The version was installed here (its engine may since have gone or gone bad)."""
        return (self.version_dir(name, version) / MANIFEST).is_file()

    def bundle_ref(self, name: str, version: str) -> str | None:
        """sha256 of the bundle the version was installed from, if recorded."""
        try:
            ref = (self.version_dir(name, version) / BUNDLE_REF).read_text().strip()
        except OSError:
            return None
        return ref if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref) else None

    def bundle_refs(self) -> set[str]:
        """Bundles some installed version still needs to rebuild its engine."""
        refs: set[str] = set()
        for name in self.models():
            vdir = self.versions_dir(name)
            for p in vdir.iterdir() if vdir.is_dir() else []:
                if p.is_dir() and not p.name.startswith("."):
                    ref = self.bundle_ref(name, p.name)
                    if ref:
                        refs.add(ref)
        return refs

    def replace_engine(self, name: str, version: str, engine: Path) -> None:
        """Put a rebuilt cache entry (engine + sidecar, hard links) into a held version.

        Sidecar first, engine last, each by rename: until the engine lands the old
        engine fails its sidecar check (it is unloadable either way), never half-written.
        """
        vdir = self.version_dir(name, version)
        meta = engine.with_name(engine.name + ".json")
        for src, dst in ((meta, vdir / ENGINE_META), (engine, vdir / ENGINE)):
            if not src.is_file():
                continue
            tmp = vdir / f"{TMP_PREFIX}{dst.name}-{uuid.uuid4().hex[:8]}"
            _link_or_copy(src, tmp)
            os.replace(tmp, dst)
        fsync_dir(vdir)

    def install_version(
        self,
        name: str,
        version: str,
        engine: Path,
        manifest_json: bytes,
        golden: Path,
        *,
        bundle_sha256: str | None = None,
    ) -> Path:
        """Lay out versions/<version>/ from the cache entry (hard links) and the bundle."""
        vdir = self.versions_dir(name)
        vdir.mkdir(parents=True, exist_ok=True)
        final = vdir / version
        tmp = vdir / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _link_or_copy(engine, tmp / ENGINE)
            meta = engine.with_name(engine.name + ".json")
            if meta.is_file():
                _link_or_copy(meta, tmp / ENGINE_META)
            (tmp / MANIFEST).write_bytes(manifest_json)
            fsync_file(tmp / MANIFEST)
            (tmp / VERSION_FILE).write_text(version + "\n")
            fsync_file(tmp / VERSION_FILE)
            _link_or_copy(golden, tmp / GOLDEN)
            if bundle_sha256:
                (tmp / BUNDLE_REF).write_text(bundle_sha256 + "\n")
                fsync_file(tmp / BUNDLE_REF)
            fsync_dir(tmp)
            if final.exists():
                # A version re-installed (e.g. rebuilt engine): move the old one aside first;
                # it is never the active one here (the worker refuses that case earlier).
                trash = vdir / f"{TMP_PREFIX}old-{version}-{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(vdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _set_link(self, link: Path, version: str | None) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        if version is None:
            link.unlink(missing_ok=True)
        else:
            tmp = link.with_name(f"{TMP_PREFIX}{link.name}-{uuid.uuid4().hex[:8]}")
            os.symlink(f"versions/{version}", tmp)
            os.replace(tmp, link)
        fsync_dir(link.parent)

    def set_slot(self, name: str, active: str | None, previous: str | None) -> None:
        """Point current/previous at the given versions. previous first: a crash in between
        leaves current untouched, so what runs is always a whole version."""
        self._set_link(self.previous_link(name), previous)
        self._set_link(self.current_link(name), active)

    def switch(self, name: str, version: str) -> Slot:
        """Make `version` current and the old current previous; returns the old slot."""
        old = self.slot(name)
        previous = old.active if old.active and old.active != version else old.previous
        self.set_slot(name, version, previous)
        return old

    def remove_tmp(self) -> int:
        """Delete leftovers of an interrupted install or link swap (called at start)."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for mdir in self.root.iterdir():
            for p in [
                *mdir.glob(f"{TMP_PREFIX}*"),
                *mdir.glob(f"versions/{TMP_PREFIX}*"),
                *mdir.glob(f"versions/*/{TMP_PREFIX}*"),  # an interrupted replace_engine
            ]:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed += 1
        return removed

    def prune(self, name: str, keep: int) -> list[str]:
        """Remove held versions beyond the `keep` newest, never current or previous."""
        s = self.slot(name)
        held = self.held_versions(name)
        spare = [v for v in held if v not in (s.active, s.previous)]
        room = max(keep - len([v for v in (s.active, s.previous) if v]), 0)
        doomed = spare[: max(len(spare) - room, 0)]
        for v in doomed:
            shutil.rmtree(self.version_dir(name, v), ignore_errors=True)
        return doomed


def _semver_key(v: str) -> tuple[int, object]:
    try:
        return (0, SemVer(v))
    except Exception:
        return (1, v)


def run_hook(command: str, *, timeout: float, env: dict[str, str]) -> None:
    """Run the activation hook (a shell command line); ActivationError unless it exits 0."""
    if not command:
        return
    try:
        proc = subprocess.run(
            command,
            shell=True,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise ActivationError(
            f"activation hook {command!r} did not finish within {timeout:.0f}s"
        ) from e
    except OSError as e:
        raise ActivationError(f"activation hook {command!r} could not run: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip()[-300:]
        raise ActivationError(
            f"activation hook {command!r} exited {proc.returncode}" + (f": {tail}" if tail else "")
        )


def check_health(spec: str, *, timeout: float, env: dict[str, str] | None = None) -> None:
    """Health check: an http(s):// URL that must answer 2xx, or a command that must exit 0.
    Raises ActivationError(code health_failed) with what was seen."""
    if not spec:
        return
    if spec.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(spec, timeout=timeout) as resp:
                status = int(resp.status)
        except urllib.error.HTTPError as e:
            status = int(e.code)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ActivationError(f"health check {spec} failed: {e}", code="health_failed") from e
        if not 200 <= status < 300:
            raise ActivationError(
                f"health check {spec} answered HTTP {status}", code="health_failed"
            )
        return
    try:
        proc = subprocess.run(
            spec,
            shell=True,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise ActivationError(
            f"health check {spec!r} did not answer within {timeout:.0f}s", code="health_failed"
        ) from e
    except OSError as e:
        raise ActivationError(
            f"health check {spec!r} could not run: {e}", code="health_failed"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip()[-300:]
        raise ActivationError(
            f"health check {spec!r} exited {proc.returncode}" + (f": {tail}" if tail else ""),
            code="health_failed",
        )


def read_ack_file(path: Path, model: str) -> Ack | None:
    """The consumer's ack file: {"version": V, "healthy": true, "reason": "..."}.

    None when there is none; ValueError when it is not one (it may be mid-write: a
    consumer should write a temporary file and rename it, but not every one does).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ACK_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror or e}") from e
    if len(data) > MAX_ACK_BYTES:
        raise ValueError(f"it is larger than {MAX_ACK_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"it is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
        raise ValueError('it has no "version" string')
    if doc.get("model", model) != model:
        raise ValueError(f"it names model {doc.get('model')!r}, not {model!r}")
    healthy = doc.get("healthy", True)
    if not isinstance(healthy, bool):
        raise ValueError('"healthy" must be true or false')
    reason = str(doc.get("reason") or "")[:300]
    return Ack(model, doc["version"], healthy, reason, str(path))


class AckChannel:
    """Where consumers say which version they loaded: an ack file per model in
    `ack_dir`, or an acknowledgement (or latency report) on the LiveStats socket."""

    def __init__(self, ack_dir: Path, live: LiveStats | None = None) -> None:
        self.ack_dir = Path(ack_dir)
        self.live = live
        self.problem: str | None = None  # why the ack file was unreadable, last check
        self.heard: str | None = None  # the last version a consumer acknowledged (any)

    def path(self, model: str) -> Path:
        return self.ack_dir / f"{model}.json"

    def clear(self, model: str) -> None:
        """Forget earlier acknowledgements; called before a switch."""
        self.heard = next((a.version for a in self._acks(model)), None)
        self.ack_dir.mkdir(parents=True, exist_ok=True)
        self.path(model).unlink(missing_ok=True)
        if self.live is not None:
            self.live.clear_ack(model)

    def check(self, model: str, version: str) -> Ack | None:
        """The acknowledgement of `version`, if one came; ActivationError if the consumer
        reports that it failed; None while it has not answered (or a bad ack file:
        `problem` says why)."""
        self.problem = None
        for ack in self._acks(model):
            if ack.version != version:
                self.heard = ack.version
                continue
            if not ack.healthy:
                raise ActivationError(
                    f"the consumer of {model} reports {version} unhealthy"
                    + (f": {ack.reason}" if ack.reason else "")
                    + f" ({ack.source})",
                    code="health_failed",
                )
            return ack
        return None

    def _acks(self, model: str) -> list[Ack]:
        found = []
        try:
            ack = read_ack_file(self.path(model), model)
        except ValueError as e:
            self.problem = f"{self.path(model)} is not a valid acknowledgement: {e}"
            ack = None
        if ack is not None:
            found.append(ack)
        live = self.live.ack(model) if self.live is not None else None
        if live is not None:
            found.append(live)
        return found

    def wait(
        self,
        model: str,
        version: str,
        *,
        timeout: float,
        stop: threading.Event,
        beat: Callable[[], None] = lambda: None,
        poll: float = 0.1,
    ) -> Ack | None:
        """Wait for the acknowledgement of `version`; None if `stop` was set first.
        ActivationError: code not_acknowledged past `timeout`, health_failed when the
        consumer reports a failure."""
        end = time.monotonic() + timeout
        while not stop.is_set():
            beat()
            ack = self.check(model, version)
            if ack is not None:
                log.info("consumer_acknowledged", model=model, version=version, source=ack.source)
                return ack
            left = end - time.monotonic()
            if left <= 0:
                raise ActivationError(
                    f"no consumer acknowledged {model} {version} within {timeout:g}s "
                    f"(expected in {self.path(model)} or on the LiveStats socket)"
                    + (f"; the last version acknowledged is {self.heard}" if self.heard else "")
                    + (f"; {self.problem}" if self.problem else ""),
                    code="not_acknowledged",
                )
            stop.wait(min(poll, left))
        return None
