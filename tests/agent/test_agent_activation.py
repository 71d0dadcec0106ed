"""The models/ layout: atomic symlink swaps, immutable version dirs, cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.activation import (
    AckChannel,
    ActivationError,
    ModelStore,
    check_health,
    read_ack_file,
    run_hook,
)
from agent.livestats import Ack


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


def test_each_version_dir_names_its_version_for_consumers(tmp_path: Path) -> None:
    ms = ModelStore(tmp_path / "data")
    _install(ms, tmp_path, "1.0.0")
    ms.switch("det", "1.0.0")
    assert (ms.current_link("det") / "version").read_text() == "1.0.0\n"


def test_ack_file_is_read_strictly_and_a_bad_one_is_named_at_the_deadline(
    tmp_path: Path,
) -> None:
    import threading

    ch = AckChannel(tmp_path / "ack")
    ch.clear("det")
    path = ch.path("det")
    assert read_ack_file(path, "det") is None
    path.write_text('{"version": "1.1.0"}')
    assert read_ack_file(path, "det") == Ack("det", "1.1.0", True, "", str(path))
    for bad, why in (
        ("{", "not JSON"),
        ('{"version": 1}', '"version" string'),
        ('{"model": "other", "version": "1.1.0"}', "names model 'other'"),
        ('{"version": "1.1.0", "healthy": "yes"}', "true or false"),
        ("x" * 5000, "larger than"),
    ):
        path.write_text(bad)
        with pytest.raises(ValueError, match=why):
            read_ack_file(path, "det")
    path.write_text("{")
    with pytest.raises(ActivationError, match="not JSON") as e:
        ch.wait("det", "1.1.0", timeout=0.3, stop=threading.Event())
    assert e.value.code == "not_acknowledged"
    path.write_text('{"version": "1.1.0", "healthy": false, "reason": "CUDA OOM"}')
    with pytest.raises(ActivationError, match=r"reports 1\.1\.0 unhealthy: CUDA OOM") as e:
        ch.wait("det", "1.1.0", timeout=5, stop=threading.Event())
    assert e.value.code == "health_failed"
    stop = threading.Event()
    stop.set()
    assert ch.wait("det", "2.0.0", timeout=5, stop=stop) is None  # the agent is stopping
