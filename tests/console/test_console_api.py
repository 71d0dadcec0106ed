"""The console's JSON API over a real server and a real controller database: the fleet
filtered, sorted and paged on the server, drift from a signed release, clear refusals."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from controller.console.data import ConsoleData
from controller.fleet.registry import Registry
from controller.rollouts.store import RolloutStore
from controller.server.serve import JetfleetServer, ServeConfig
from controller.telemetry.store import TelemetryStore, default_telemetry_db, row_from_sample
from protocol.messages import DeviceStatus, ModelSlot
from protocol.telemetry import TelemetrySample


def status(device: str, group: str, version: str, online: bool = True) -> DeviceStatus:
    return DeviceStatus.new(
        device_id=device, online=online, groups=[group],
        models={"detector": ModelSlot(active=version)},
    )  # fmt: skip


WANT = {"detector": {"version": "1.1.0"}}
G2_ONLINE = {"group": "g2", "online": "true", "sort": "id", "order": "desc", "limit": "3"}


def serve_console(db: str | Path, tmp_path: Path, telemetry_db: str | Path) -> JetfleetServer:
    """A console over the controller database `db` with 30 robots, g1 released 1.1.0."""
    registry = Registry.open(db)
    for i in range(30):
        registry.apply_status(status(f"r-{i:02d}", f"g{i % 3}", "1.0.0", online=i % 5 != 0))
    # What `jetfleet release set` records: group g1 should run detector 1.1.0.
    registry.conn.executescript(
        "CREATE TABLE release_history (scope TEXT, version INTEGER, issued_at TEXT, "
        "models TEXT, envelope BLOB, PRIMARY KEY (scope, version))"
    )
    registry.conn.execute(
        "INSERT INTO release_history VALUES (?, ?, ?, ?, ?)",
        ("group:g1", 1, "2026-12-05T00:00:00+00:00", json.dumps(WANT), b""),
    )
    registry.conn.close()
    cfg = ServeConfig(
        broker="mqtt://127.0.0.1:1", telemetry_db=telemetry_db, bundle_dir=tmp_path / "b",
        data_dir=tmp_path, controller_db=db, host="127.0.0.1", http_port=0, ingest=False,
    )  # fmt: skip
    server = JetfleetServer(cfg)
    server.start()
    assert server.http is not None
    return server


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    server = serve_console(tmp_path / "controller.db", tmp_path, tmp_path / "t.db")
    assert server.http is not None
    yield f"http://127.0.0.1:{server.http.port}"
    server.stop()


def test_the_console_reads_fleet_drift_and_telemetry_from_either_engine(
    db: str, tmp_path: Path
) -> None:
    telemetry = TelemetryStore(default_telemetry_db(db))
    now = time.time()
    samples = [
        TelemetrySample.new(device_id="r-01", at=datetime.fromtimestamp(now - 30 + i, timezone.utc),
                            uptime_s=i, cpu={"percent": [10.0 * i]})
        for i in range(3)
    ]  # fmt: skip
    telemetry.insert_batch([row_from_sample(x, x.encode().decode()) for x in samples])
    telemetry.close()
    server = serve_console(db, tmp_path, default_telemetry_db(db))
    assert server.http is not None
    api = f"http://127.0.0.1:{server.http.port}"
    try:
        page = httpx.get(api + "/api/fleet", params=G2_ONLINE).json()
        assert (page["total"], page["online"], page["matched"]) == (30, 24, 8)
        robot = httpx.get(api + "/api/robots/r-01").json()
        assert robot["drift"]["detector"]["want"] == "1.1.0"
        tele = httpx.get(api + "/api/robots/r-01/telemetry", params={"window": 300}).json()
        assert [p[1] for p in tele["metrics"]["cpu_pct"]] == [0.0, 10.0, 20.0]
    finally:
        server.stop()


def test_fleet_is_filtered_sorted_and_paged_by_the_server(api: str) -> None:
    page = httpx.get(api + "/api/fleet", params=G2_ONLINE).json()
    assert page["total"] == 30 and page["online"] == 24
    assert page["matched"] == 8  # g2: ids 2, 5, 8, ..., 29; 5, 20 offline
    assert [r["id"] for r in page["robots"]] == ["r-29", "r-26", "r-23"]
    nxt = httpx.get(api + "/api/fleet", params={**G2_ONLINE, "offset": "3"}).json()
    assert [r["id"] for r in nxt["robots"]] == ["r-17", "r-14", "r-11"]


def test_a_robot_drifts_from_its_groups_release(api: str) -> None:
    drifting = httpx.get(api + "/api/fleet", params={"drift": "true", "limit": 1000}).json()
    assert drifting["matched"] == 10 and all("g1" in r["groups"] for r in drifting["robots"])
    assert drifting["robots"][0]["drift"] == {"detector": {"want": "1.1.0", "have": "1.0.0"}}
    robot = httpx.get(api + "/api/robots/r-01").json()
    assert robot["drift"]["detector"]["want"] == "1.1.0" and robot["jobs"] == []
    releases = httpx.get(api + "/api/releases").json()
    assert releases["current"]["group:g1"]["models"]["detector"]["version"] == "1.1.0"


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/api/fleet?sort=color", 400, "unknown sort 'color'"),
        ("/api/fleet?limit=0", 400, "limit within 1..1000"),
        ("/api/fleet?online=maybe", 400, "expected true or false"),
        ("/api/robots/nobody", 404, "not found"),
        ("/api/robots/r-01/telemetry?window=-5", 400, "window must be within"),
        ("/api/events", 400, "name the topics"),
    ],
)
def test_bad_queries_get_a_one_line_reason(api: str, path: str, status: int, reason: str) -> None:
    r = httpx.get(api + path)
    assert r.status_code == status and reason in r.json()["error"]


def test_the_rollout_list_counts_a_running_rollout_every_poll_and_a_finished_one_when_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "controller.db"
    store = RolloutStore(Registry.open(db).conn)
    for rid, device in (("r-done", "robot-1"), ("r-live", "robot-2")):
        store.create(
            rollout_id=rid, kind="deploy", model="detector", version="2.0.0", target=device,
            waves_spec="100%", waves=[[device]], max_failure_rate=0.5, wave_timeout=30.0,
            auto_rollback=True,
        )  # fmt: skip
        store.start_wave(rid, 0, deadline=2e9)
        assert store.record_command(rid, device, f"c-{rid}", b"signed")
    store.apply_job_state("c-r-done", "SUCCEEDED", seq=1, device_id="robot-1")
    store.set_state("r-done", "succeeded")
    data = ConsoleData(controller_db=db, telemetry_db=None)

    def counts() -> dict[str, dict[str, int]]:
        return {b["id"]: b["counts"] for b in data.rollouts()}

    assert counts() == {"r-done": {"SUCCEEDED": 1}, "r-live": {"PENDING": 1}}
    # A running rollout's progress shows on the next poll.
    store.apply_job_state("c-r-live", "DOWNLOADING", seq=1, device_id="robot-2")
    assert counts()["r-live"] == {"DOWNLOADING": 1}
    # A finished one's late change (here forced) waits for its brief to come due...
    store.conn.execute("UPDATE assignments SET state='FAILED' WHERE rollout_id='r-done'")
    assert counts()["r-done"] == {"SUCCEEDED": 1}
    monkeypatch.setattr("controller.console.data.FINISHED_BRIEF_TTL_S", 0.0)
    assert counts()["r-done"] == {"FAILED": 1}
    # ...and a change of its row (an operator's action) shows at once.
    monkeypatch.setattr("controller.console.data.FINISHED_BRIEF_TTL_S", 3600.0)
    assert counts()["r-done"] == {"FAILED": 1}
    store.conn.execute("UPDATE assignments SET state='SUCCEEDED' WHERE rollout_id='r-done'")
    store.conn.execute("UPDATE rollouts SET updated_at=updated_at+1 WHERE id='r-done'")
    assert counts()["r-done"] == {"SUCCEEDED": 1}


def test_a_big_rollouts_page_lists_the_devices_that_changed_last_and_a_small_ones_lists_all(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RolloutStore(Registry.open(db).conn)
    ids = [f"robot-{i}" for i in range(4)]
    store.create(
        rollout_id="r-big", kind="deploy", model="detector", version="2.0.0", target="all",
        waves_spec="1,100%", waves=[ids[:1], ids[1:]], max_failure_rate=0.5, wave_timeout=30.0,
        auto_rollback=True,
    )  # fmt: skip
    store.start_wave("r-big", 0, deadline=2e9)
    store.start_wave("r-big", 1, deadline=2e9)
    for d in ids:
        assert store.record_command("r-big", d, f"c-{d}", b"signed")
    for d in ("robot-3", "robot-1"):  # robot-1 moves last
        time.sleep(0.01)
        store.apply_job_state(f"c-{d}", "DOWNLOADING", seq=1, device_id=d)
    data = ConsoleData(controller_db=db, telemetry_db=None)
    detail = data.rollout("r-big")
    assert detail is not None
    assert [d["device_id"] for d in detail["devices"]] == ids  # all of them, in wave order
    assert (detail["devices_order"], detail["devices_total"]) == ("wave", 4)
    monkeypatch.setattr("controller.console.data.DEVICES_SHOWN", 2)
    detail = data.rollout("r-big")
    assert detail is not None
    assert [(d["device_id"], d["state"]) for d in detail["devices"]] == [
        ("robot-1", "DOWNLOADING"),
        ("robot-3", "DOWNLOADING"),
    ]
    assert (detail["devices_order"], detail["devices_total"]) == ("changed", 4)
