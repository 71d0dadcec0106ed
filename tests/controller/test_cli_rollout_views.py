"""What `jetfleet rollout status|list|pause|resume|abort` show and answer (issue 19):
the latest rollout without an id, a per-device table, full ids, and one answer for a
rollout that has ended. Real `jetfleet` subprocesses, a real broker, simulated devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet import SimFleet, build_bundle, cli_env, make_devices, run_cli

from controller.cli.common import RedrawPacer
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet


@pytest.fixture
def env(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> dict[str, str]:
    # A narrow terminal: nothing an operator copies may be cut to fit it.
    return {**cli_env(tmp_path, mosquitto.url, tmp_path / "keys"), "COLUMNS": "80"}


def test_status_list_and_steering_of_an_ended_rollout(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], tmp_path: Path
) -> None:
    bundle = build_bundle(tmp_path / "build", keys.release, version="2.0.0")
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)):
        done = run_cli(env, "rollout", "start", str(bundle), "--target", "all", "--wait",
                       "--waves", "100%", "-o", "json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        rid = json.loads(done.stdout)["rollout"]["id"]

    # No id: the latest rollout, with one row per device (state, the version it came
    # from, the gate's figures).
    status = run_cli(env, "rollout", "status")
    assert status.returncode == 0, status.stderr
    assert f"rollout {rid}" in status.stdout
    rows = [line for line in status.stdout.splitlines() if "robot-000" in line]
    assert len(rows) == 2, status.stdout
    assert all("SUCCEEDED" in r and "1.0.0" in r and "p99 1.00 ms" in r for r in rows), rows

    # Full ids in `rollout list`, also at 80 columns; `-o wide` adds the plan.
    listed = run_cli(env, "rollout", "list")
    assert listed.returncode == 0 and rid in listed.stdout, listed.stdout
    wide = run_cli(env, "rollout", "list", "-o", "wide")
    assert wide.returncode == 0 and rid in wide.stdout
    assert "wave timeout" in wide.stdout and "900s" in wide.stdout

    # pause, resume and abort of the ended rollout all answer the same way: one line,
    # the rollout's own outcome (0: it succeeded), and the summary with -o json.
    for verb in ("pause", "resume", "abort"):
        out = run_cli(env, "rollout", verb, rid[:6])
        assert out.returncode == 0, (verb, out.stderr)
        assert out.stderr.strip() == f"jetfleet: rollout {rid} already ended: succeeded", verb
        as_json = run_cli(env, "rollout", verb, rid, "-o", "json")
        assert as_json.returncode == 0, (verb, as_json.stderr)
        assert json.loads(as_json.stdout)["rollout"]["state"] == "succeeded", verb


def test_a_rollout_followed_on_a_terminal_is_drawn_live_to_its_end(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], tmp_path: Path
) -> None:
    bundle = build_bundle(tmp_path / "build", keys.release, version="2.0.0")
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)):
        # FORCE_COLOR: a terminal to rich, so `--wait` follows the rollout in a live view.
        done = run_cli({**env, "FORCE_COLOR": "1"}, "rollout", "start", str(bundle),
                       "--target", "all", "--wait", "--waves", "1,100%")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b[" in done.stdout and "SUCCEEDED" in done.stdout, done.stdout
    assert "SUCCEEDED 1" in done.stdout and "failure rate 0% (0/2" in done.stdout, done.stdout


def test_a_live_view_redraws_a_quarter_second_or_twenty_summary_costs_apart() -> None:
    pacer = RedrawPacer()
    assert pacer.due(0.0)
    pacer.drawn(10.0, 10.0078125)  # a cheap summary (8 ms): four redraws a second
    assert not pacer.due(10.2) and pacer.due(10.25)
    pacer.drawn(16.0, 16.125)  # a slow database (125 ms): 2.5 s apart, 5 % of the time
    assert not pacer.due(18.4) and pacer.due(18.5)
