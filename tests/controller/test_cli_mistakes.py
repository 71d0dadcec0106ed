"""Mistakes an operator makes on the command line are cheap: refused up front with one
line and exit 2, or undone without waiting out a timeout (issue 19). Real `jetfleet`
subprocesses (or the typer runner for offline commands), a real broker, simulated
devices speaking the real protocol."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from fleet import (
    CommandCounter,
    SimFleet,
    make_devices,
    run_cli,
    wait_until,
)
from models import make_mlp
from typer.testing import CliRunner

from controller.cli.main import app
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet


def rollouts(env: dict[str, str]) -> list[str]:
    if not Path(env["JETFLEET_DB"]).exists():
        return []
    conn = sqlite3.connect(env["JETFLEET_DB"])
    try:
        return [r[0] for r in conn.execute("SELECT id FROM rollouts")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def test_a_typo_in_the_target_is_refused_before_anything_is_stored_or_sent(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)):
        started = time.monotonic()
        out = run_cli(
            env, "rollout", "start", str(bundle), "--target", "robot-0000,robot-4", "--wait"
        )
        assert out.returncode == 2, out.stderr
        assert time.monotonic() - started < 30  # not the 900 s wave timeout
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "never seen: robot-4 " in lines[0]
        assert "known: robot-0000, robot-0001" in lines[0] and "--allow-unseen" in lines[0]
        rollback = run_cli(
            env, "rollback", "--model", "detector", "--to-version", "1.0.0", "--target", "robot-4"
        )
        assert rollback.returncode == 2 and "never seen: robot-4 " in rollback.stderr
        push = run_cli(env, "keys", "push", "--target", "robot-4")
        assert push.returncode == 2 and "never seen: robot-4 " in push.stderr
        assert rollouts(env) == []
        time.sleep(0.3)
        assert counter.per_device() == {}


def test_abort_ends_a_rollout_whose_devices_never_answered_without_the_wave_timeout(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(1)):
        # Provisioning: a robot that has not connected yet, named on purpose.
        out = run_cli(
            env, "rollout", "start", str(bundle), "--target", "robot-new", "--allow-unseen",
            "--waves", "100%", "--wave-timeout", "900", "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["rollout"]["id"]
        # Its command went out (a device never commanded is not one that never answered).
        wait_until(lambda: "robot-new" in counter.per_device(), timeout=20, what="the command")
        started = time.monotonic()
        aborted = run_cli(env, "rollout", "abort", rid, "--wait", "--output", "json")
        assert aborted.returncode == 1, aborted.stderr
        assert time.monotonic() - started < 30
        data = json.loads(aborted.stdout)
        assert data["rollout"]["state"] == "aborted"
        (device,) = data["devices"]
        assert device["state"] == "TIMED_OUT" and "never answered" in device["reason"]
        # Nothing holds the id any more: the next rollout to it is not refused as held.
        again = run_cli(
            env, "rollout", "start", str(bundle), "--target", "robot-new", "--allow-unseen",
            "--wave-timeout", "900",
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "still being driven" not in again.stderr


def test_rollback_of_a_model_the_devices_do_not_have_is_refused_up_front(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)):
        out = run_cli(
            env, "rollback", "--model", "detecter", "--to-version", "1.0.0", "--target", "all"
        )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "2 target device(s) have no model 'detecter'" in lines[0]
    assert "their models: detector" in lines[0]
    assert rollouts(env) == []
    time.sleep(0.3)
    assert counter.per_device() == {}


# -- offline commands: the typer runner --------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("JETFLEET_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("JETFLEET_KEYS", raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_dash_o_is_the_output_format_everywhere_and_global_options_go_anywhere(
    cli: CliRunner, keys: KeySet, tmp_path: Path
) -> None:
    model = make_mlp(tmp_path / "mlp.onnx", in_dim=8, hidden=16, out_dim=4)
    # `--keys` after the sub-command, as `bundle build --help` tells the operator.
    r = cli.invoke(
        app,
        ["bundle", "build", str(model), "--name", "m", "--version", "1.0.0",
         "--out", str(tmp_path / "m.jfb"), "--keys", str(tmp_path / "keys"), "-o", "json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["manifest"]["name"] == "m"
    assert not (tmp_path / "json").exists()
    assert (tmp_path / "m.jfb").is_file()
    r = cli.invoke(app, ["bundle", "verify", str(tmp_path / "m.jfb"), "-o", "json",
                         f"--keys={tmp_path / 'keys'}"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == "1.0.0"


def test_verifying_something_that_is_not_a_bundle_says_so(
    cli: CliRunner, keys: KeySet, tmp_path: Path
) -> None:
    model = make_mlp(tmp_path / "mlp.onnx", in_dim=8, hidden=16, out_dim=4)
    for path in (model, tmp_path / "tiny"):
        if path.name == "tiny":
            path.write_bytes(b"hello")
        r = cli.invoke(app, ["bundle", "verify", str(path), "--keys", str(tmp_path / "keys")])
        assert r.exit_code == 3, r.output
        assert "not a jetfleet bundle" in r.output
        assert "octal" not in r.output and "truncated" not in r.output
