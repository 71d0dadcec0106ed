"""Drift: which robots are not on their desired versions, and why (controller/desired/drift.py),
and the Prometheus gauge of them per group and model (controller/telemetry/metrics.py)."""

from __future__ import annotations

from datetime import datetime, timezone

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.db import open_database
from controller.desired.drift import DeviceView, device_drift, wanted
from controller.desired.store import ReleaseStore
from controller.telemetry.metrics import FleetCollector, make_registry
from controller.telemetry.store import default_telemetry_db
from protocol.messages import DesiredSummary, DeviceStatus, HeldBack, ModelSlot
from protocol.release import DesiredModel, Pins, Release

LAB = {"lab": {"detector": "2.0.0", "tracker": "1.0.0"}}


def view(**kw) -> DeviceView:  # type: ignore[no-untyped-def]
    base = dict(id="robot-1", groups=["lab"], online=True, last_seen=1000.0,
                active={"detector": "1.0.0", "tracker": "1.0.0"})  # fmt: skip
    return DeviceView(**{**base, **kw})


def why(d: DeviceView, releases=LAB, pins=None, rollouts=None) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {x.model: x.reason for x in device_drift(d, releases, pins or {}, rollouts or {})}


def test_a_robot_on_its_desired_versions_has_no_drift() -> None:
    assert why(view(active={"detector": "2.0.0", "tracker": "1.0.0"})) == {}


def test_each_reason_a_robot_is_behind() -> None:
    assert why(view()) == {"detector": "pending"}
    assert why(view(online=False)) == {"detector": "offline"}
    assert device_drift(view(online=False), LAB, {}, {})[0].since == 1000.0
    assert why(view(job_model="detector", job_state="BUILDING")) == {"detector": "converging"}
    failed = HeldBack(version="2.0.0", sha256="a" * 64, code="accuracy", reason="top-1 fell")
    held = DesiredSummary(held_back={"detector": failed})
    (x,) = device_drift(view(desired=held), LAB, {}, {})
    assert (x.reason, x.want, x.active) == ("held_back", "2.0.0", "1.0.0")
    assert "[accuracy]: top-1 fell" in x.detail
    # A rollout outranks the release (the controller's view, or the robot's own).
    assert why(view(active={"detector": "3.0.0", "tracker": "1.0.0"}),
               rollouts={"detector": "r-1"}) == {"detector": "in_rollout"}  # fmt: skip
    mine = DesiredSummary(rollouts={"detector": "r-2"})
    assert why(view(desired=mine)) == {"detector": "in_rollout"}


def test_groups_that_disagree_are_a_conflict_unless_a_pin_decides() -> None:
    two = {"lab": {"detector": "2.0.0"}, "field": {"detector": "3.0.0"}}
    d = view(groups=["lab", "field"], active={"detector": "2.0.0"})
    (x,) = device_drift(d, two, {}, {})
    assert (x.reason, x.want) == ("conflict", None)
    assert "group field says 3.0.0, group lab says 2.0.0" in x.detail
    assert why(d, two, pins={"detector": "2.0.0"}) == {}
    assert wanted(["lab"], LAB, {"detector": "1.0.0"})[0]["detector"] == "1.0.0"


def test_the_gauge_counts_drifted_robots_per_group_and_model(db: str) -> None:
    ctl = db  # SQLite, then PostgreSQL
    conn = open_database(ctl)
    history = ReleaseStore(conn)
    now = datetime.now(timezone.utc)
    m = {v: DesiredModel(version=v, sha256="b" * 64, url="http://x/b.jfb", size=1)
         for v in ("1.0.0", "2.0.0")}  # fmt: skip
    for v, version in ((1, "1.0.0"), (2, "2.0.0")):
        doc = Release.new(group="lab", version=v, issued_at=now, models={"detector": m[version]})
        history.record("group:lab", doc, b"-")
    pin = Pins.new(device="robot-3", version=1, issued_at=now, models={"detector": m["1.0.0"]})
    history.record("device:robot-3", pin, b"-")
    conn.close()

    def status(device: str, version: str, online: bool = True) -> DeviceStatus:
        return DeviceStatus.new(device_id=device, online=online, groups=["lab"],
                                models={"detector": ModelSlot(active=version)})  # fmt: skip

    statuses = {
        "robot-1": status("robot-1", "2.0.0"),
        "robot-2": status("robot-2", "1.0.0", online=False),  # behind
        "robot-3": status("robot-3", "1.0.0"),  # pinned: not behind
        "robot-4": status("robot-4", "1.0.0"),  # behind
    }
    collector = FleetCollector(default_telemetry_db(ctl), status=lambda: statuses,
                               controller_db=ctl)  # fmt: skip
    text = generate_latest(make_registry(collector)).decode()
    (fam,) = [
        f for f in text_string_to_metric_families(text) if f.name == "jetfleet_drifted_devices"
    ]
    assert {(s.labels["group"], s.labels["model"]): s.value for s in fam.samples} == {
        ("lab", "detector"): 2.0
    }
