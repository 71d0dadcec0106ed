"""Publishing a bundle: the immutable copy devices download, and the URL they fetch it at.

A published name-version is immutable (commands already out carry its sha256); the URL
is the running `jetfleet serve`'s (controller/server/state.py), else a `file://` one."""

from __future__ import annotations

import shutil
from pathlib import Path

from controller.server.state import find_serve_state
from controller.settings import ControllerSettings
from protocol.bundle import bundle_filename
from protocol.errors import CodedError
from protocol.fsio import atomic_file, sha256_file


class BundleConflictError(CodedError, ValueError):
    """A different bundle is already published under the same name and version."""

    code = "bundle_conflict"


def publish_bundle(bundle: Path, s: ControllerSettings, name: str, version: str) -> Path:
    """Copy the bundle into the bundle directory (temp + fsync + rename): what devices
    download must not change if the operator rebuilds their working copy. A published
    name-version is immutable: commands already out carry its sha256."""
    s.bundle_dir.mkdir(parents=True, exist_ok=True)
    dest = s.bundle_dir / bundle_filename(name, version)
    if dest.exists():
        if sha256_file(dest) == sha256_file(bundle):
            return dest
        raise BundleConflictError(
            f"{dest} is already published with different content; a version is immutable "
            "once rolled out: build this one with a new version"
        )
    with atomic_file(dest, 0o644) as out, bundle.open("rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


def serve_base_url(s: ControllerSettings) -> tuple[str | None, str]:
    """The bundle server of a running `jetfleet serve`, from its state file, and why it
    was or was not found (the file sits next to serve's --db, so another --db misses it)."""
    state, why = find_serve_state(s.db.parent)
    return (state.bundle_url_base.rstrip("/") if state else None), why


def choose_bundle_url(
    s: ControllerSettings, published: Path, override: str | None
) -> tuple[str, str]:
    """Where devices fetch the bundle, and why that URL (for the operator)."""
    if override:
        return override, "from --bundle-url"
    base, why = serve_base_url(s)
    if base:
        return f"{base}/{published.name}", why
    why += (
        "; only devices that can read this path can fetch it: run `jetfleet serve` "
        "with the same --db, or pass --bundle-url"
    )
    return published.resolve().as_uri(), why
