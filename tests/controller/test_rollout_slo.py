"""SLO bakes in the rollout engine: simulated devices on a real Mosquitto, their
telemetry written to a real telemetry database as `jetfleet serve` would, each sample
tagged with the version the device runs at that moment (the must-show test with real
agents and a real service process is tests/controller/test_rollout_slo_agents.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fleet import CommandCounter, ControllerHarness, SimFleet, make_devices
from prometheus_client import generate_latest
from rich.console import Console

from controller.cli.common import render
from controller.rollouts.policy import make_policy
from controller.rollouts.slo_bake import TelemetrySource
from controller.rollouts.store import ABORTED, SUCCEEDED
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from controller.telemetry.metrics import FleetCollector, make_registry
from controller.telemetry.store import TelemetryStore, default_telemetry_db, row_from_sample
from protocol.telemetry import MetricStats, ModelStats, TelemetrySample, VersionMetrics

SLO = "confidence_mean >= -2%"


class Telemetry:
    """Every device reports its confidence every 20 ms: 0.80 on version 1 (plus a fixed
    per-device offset and sample noise); version 2 reaches `v2_factor` of that."""

    def __init__(self, path: str | Path, fleet: SimFleet, v2_factor: float) -> None:
        self.store = TelemetryStore(path)
        self.fleet = fleet
        self.v2_factor = v2_factor
        self.rng = random.Random(5)
        self.offsets = {d: self.rng.gauss(0, 0.01) for d in fleet.devices}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, device_id: str) -> TelemetrySample:
        version = self.fleet.devices[device_id].models["detector"]["active"] or ""
        conf = (0.80 + self.offsets[device_id]) * (self.v2_factor if version == "2.0.0" else 1)
        conf += self.rng.gauss(0, 0.02)
        gauge = MetricStats(kind="gauge", n=20, mean=conf, last=conf, min=conf, max=conf)
        return TelemetrySample(
            schema="jetfleet.telemetry/v1",
            device_id=device_id,
            at=datetime.now(timezone.utc),
            uptime_s=10,
            models={
                "detector": ModelStats(
                    version=version,
                    p99_ms=5.0,
                    count=20,
                    metrics={version: VersionMetrics(metrics={"confidence": gauge})},
                )
            },
        )

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            samples = [self._sample(d) for d in self.fleet.devices]
            self.store.insert_batch([row_from_sample(s, s.encode().decode()) for s in samples])

    def __enter__(self) -> Telemetry:
        self.thread.start()
        time.sleep(1.0)  # history before the switch: each device's own past
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.store.close()


@pytest.fixture
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet
) -> ControllerHarness:
    """On SQLite; a test that also takes `db` runs on SQLite and PostgreSQL."""
    use_db = "db" in request.fixturenames
    target = request.getfixturevalue("db") if use_db else tmp_path / "controller.db"
    return ControllerHarness(target, mosquitto.url, keys.operator)


@pytest.fixture
def fleet(mosquitto: LocalMosquitto, keys: KeySet) -> Iterator[SimFleet]:
    with SimFleet(mosquitto.url, keys.trust, make_devices(4)) as f:
        yield f


def _policy(**kw: object) -> object:
    args = {"slos": (SLO, "inference_errors == 0"), "bake": "0.6s", "bake_max": "1.5s"}
    args.update(kw)
    return make_policy(now=time.time(), **args)  # type: ignore[arg-type]


def _drive(harness: ControllerHarness, rid: str, db: str | Path) -> object:
    source = TelemetrySource(db)
    try:
        return harness.driver(rid, slo_source=source).run()
    finally:
        source.close()


def test_a_version_worse_on_live_data_is_caught_by_the_bake_and_the_wave_rolled_back(
    db: str, harness: ControllerHarness, fleet: SimFleet, counter: CommandCounter
) -> None:
    telemetry = default_telemetry_db(db)
    harness.sync()
    rid = harness.create(sorted(fleet.devices), policy=_policy())
    with Telemetry(telemetry, fleet, v2_factor=0.90):
        result = _drive(harness, rid, telemetry)
    assert result.state == ABORTED  # type: ignore[attr-defined]
    reason = result.abort_reason or ""  # type: ignore[attr-defined]
    # About -10% (the figure's own check is below): how many samples the bake saw varies.
    assert reason.startswith(f"wave 1 baked: SLO {SLO} FAIL: change -")
    summary = harness.store.summary(rid)
    assert [w.state for w in summary.waves] == ["done", "skipped", "rolled_back"]
    assert fleet.devices["robot-0000"].models["detector"]["active"] == "1.0.0"
    assert set(counter.per_device()) == {"robot-0000"}
    verdicts = {v["slo"]: v for v in summary.slo_verdicts}
    conf = verdicts[SLO]
    assert conf["verdict"] == "FAIL" and conf["bake"] == "failed"
    assert (conf["canary_devices"], conf["baseline_devices"]) == (1, 3)
    assert "against 3 devices still on the old version" in conf["reason"]
    assert conf["high"] < -0.02 and conf["change"] == pytest.approx(-0.10, abs=0.03)
    assert verdicts["inference_errors == 0"]["verdict"] == "PASS"
    assert summary.to_dict()["slo_verdicts"][0]["reason"]
    console = Console(width=200, record=True)
    console.print(render(summary))
    assert f"SLO wave 1 (failed): {SLO} FAIL" in console.export_text()
    collector = FleetCollector(telemetry, controller_db=db)
    scraped = [
        line
        for line in generate_latest(make_registry(collector)).decode().splitlines()
        if line.startswith("jetfleet_rollout_slo") and SLO in line
    ]
    one = f'rollout="{rid}",slo="{SLO}"'
    assert f'jetfleet_rollout_slo_verdict{{{one},verdict="FAIL",wave="1"}} 1.0' in scraped
    assert f'jetfleet_rollout_slo_verdict{{{one},verdict="PASS",wave="1"}} 0.0' in scraped
    change = next(x for x in scraped if x.startswith("jetfleet_rollout_slo_change_ratio"))
    assert float(change.rsplit(" ", 1)[1]) == pytest.approx(-0.10, abs=0.03)


def test_an_unchanged_version_bakes_through_every_wave_and_completes(
    tmp_path: Path, harness: ControllerHarness, fleet: SimFleet
) -> None:
    harness.sync()
    rid = harness.create(sorted(fleet.devices), policy=_policy())
    with Telemetry(tmp_path / "telemetry.db", fleet, v2_factor=1.0):
        result = _drive(harness, rid, tmp_path / "telemetry.db")
    assert result.state == SUCCEEDED, result.abort_reason  # type: ignore[attr-defined]
    got = [(v["wave"], v["slo"], v["verdict"], v["bake"]) for v in harness.store.slo_verdicts(rid)]
    assert got == [
        (0, SLO, "PASS", "passed"),
        (0, "inference_errors == 0", "PASS", "passed"),
        # The last wave leaves nobody on the old version: the same devices before.
        (1, SLO, "PASS", "passed"),
        (1, "inference_errors == 0", "PASS", "passed"),
    ]
    last = harness.store.slo_verdicts(rid)[2]
    assert (last["canary_devices"], last["baseline_devices"]) == (4, 0)
    assert "against their own past" in last["reason"]


@pytest.mark.parametrize(("choice", "end"), [("abort", ABORTED), ("continue", SUCCEEDED)])
def test_no_telemetry_extends_the_bake_then_follows_the_operators_choice(
    tmp_path: Path, harness: ControllerHarness, fleet: SimFleet, choice: str, end: str
) -> None:
    harness.sync()
    rid = harness.create(sorted(fleet.devices), policy=_policy(slo_inconclusive=choice))
    started = time.monotonic()
    result = _drive(harness, rid, tmp_path / "never-written.db")
    assert result.state == end  # type: ignore[attr-defined]
    assert time.monotonic() - started >= 1.5  # the bake ran to --bake-max
    verdicts = harness.store.slo_verdicts(rid)
    assert {v["verdict"] for v in verdicts} == {"NOT_ENOUGH_DATA"}
    assert {v["bake"] for v in verdicts} == {"inconclusive"}
    assert "is `jetfleet serve` ingesting it?" in verdicts[0]["reason"]
    if choice == "abort":
        assert "without enough data" in (result.abort_reason or "")  # type: ignore[attr-defined]
        assert fleet.devices["robot-0000"].models["detector"]["active"] == "1.0.0"
