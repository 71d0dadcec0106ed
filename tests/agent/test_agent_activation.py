"""The models/ layout: atomic symlink swaps, immutable version dirs, cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.activation import ActivationError, ModelStore, check_health, run_hook


def _engine(tmp: Path, text: str) -> Path:
    p = tmp / f"cache-{text}.plan"
    p.write_text(text)
    (tmp / f"cache-{text}.plan.json").write_text("{}")
    return p


def _install(ms: ModelStore, tmp: Path, version: str) -> None:
    golden = tmp / "golden.npz"
    golden.write_bytes(b"g")
    ms.install_version("det", version, _engine(tmp, version), b"{}", golden)


def test_switch_moves_current_to_previous_and_links_are_relative(tmp_path: Path) -> None:
    ms = ModelStore(tmp_path / "data")
    for v in ("1.0.0", "1.1.0"):
        _install(ms, tmp_path, v)
        ms.switch("det", v)
    assert (ms.slot("det").active, ms.slot("det").previous) == ("1.1.0", "1.0.0")
    assert os.readlink(ms.current_link("det")) == "versions/1.1.0"
    assert (ms.current_link("det") / "engine").read_text() == "1.1.0"


def test_engine_is_a_hard_link_not_a_copy(tmp_path: Path) -> None:
    ms = ModelStore(tmp_path / "data")
    _install(ms, tmp_path, "1.0.0")
    src = tmp_path / "cache-1.0.0.plan"
    assert os.stat(src).st_ino == os.stat(ms.engine_path("det", "1.0.0")).st_ino
    src.unlink()  # cache eviction does not touch the installed engine
    assert ms.engine_path("det", "1.0.0").read_text() == "1.0.0"


def test_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    ms = ModelStore(tmp_path / "data")
    _install(ms, tmp_path, "1.0.0")
    ms.switch("det", "1.0.0")
    (ms.versions_dir("det") / ".tmp-1.1.0-abcd").mkdir()
    os.symlink("versions/1.0.0", ms.model_dir("det") / ".tmp-current-abcd")
    assert ms.remove_tmp() == 2
    assert ms.held_versions("det") == ["1.0.0"] and ms.slot("det").active == "1.0.0"


def test_prune_keeps_current_previous_and_newest(tmp_path: Path) -> None:
    ms = ModelStore(tmp_path / "data")
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.10.0", "2.0.0"):
        _install(ms, tmp_path, v)
        ms.switch("det", v)
    ms.switch("det", "1.0.0")  # rolled back: current 1.0.0, previous 2.0.0
    assert ms.prune("det", keep=3) == ["1.1.0", "1.2.0"]
    assert ms.held_versions("det") == ["1.0.0", "1.10.0", "2.0.0"]


def test_hook_failure_carries_exit_code_and_stderr(tmp_path: Path) -> None:
    with pytest.raises(ActivationError, match="exited 3: boom") as e:
        run_hook("echo boom >&2; exit 3", timeout=5, env={})
    assert e.value.code == "hook_failed"


def test_health_over_http_needs_2xx(tmp_path: Path) -> None:
    with pytest.raises(ActivationError) as e:
        check_health("http://127.0.0.1:1/health", timeout=1)
    assert e.value.code == "health_failed"
    check_health("true", timeout=5)
