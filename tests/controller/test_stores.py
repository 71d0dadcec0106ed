"""The controller's database layer and its stores, on SQLite and on a real PostgreSQL
(the `db` fixture runs each test on both): the SQL both engines must read the same,
versioned migrations, and the rules the rollout store keeps across processes (one
holder per device, one command per assignment), each process on its own connection."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from controller.db import Database, DatabaseError, open_database
from controller.db.migrations import AddColumn, SchemaTooNewError, migrate, schema_version
from controller.desired.store import ReleaseStore, current_documents, latest_documents
from controller.fleet.registry import Registry
from controller.rollouts.slo_bake import TelemetrySource
from controller.rollouts.store import (
    PENDING,
    RUNNING,
    WAITING,
    DevicesHeldError,
    RolloutStore,
    RolloutSummary,
    rollout_state_counts,
    rollouts_in_flight,
)
from controller.telemetry.store import (
    METRICS,
    MIGRATIONS,
    MINUTE,
    RAW,
    TelemetryStore,
    TelemetryStoreError,
    day_partitions,
    default_telemetry_db,
    row_from_sample,
)
from protocol.messages import JobState
from protocol.release import DesiredModel, Pins, Release
from protocol.telemetry import TelemetrySample


def create(store: RolloutStore, rid: str, waves: list[list[str]], **kw: Any) -> None:
    store.create(
        rollout_id=rid,
        kind="deploy",
        model="detector",
        version="2.0.0",
        target="all",
        waves_spec="1,100%",
        waves=waves,
        max_failure_rate=0.5,
        wave_timeout=30.0,
        auto_rollback=True,
        **kw,
    )


def at_once(n: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` on n threads released together; each result or the exception raised."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_statements_read_the_same_on_both_engines(db: str) -> None:
    conn = open_database(db)
    conn.executescript(
        "CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER, x REAL, b BLOB, flag INTEGER);"
    )
    blob = bytes(range(256))
    conn.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", ("50%-off", 2**40, 0.5, blob, True))
    conn.executemany("INSERT INTO t (k, flag) VALUES (?, ?)", [("a", False), ("b", None)])
    # A literal % next to ? parameters: PostgreSQL's driver must not read it as one.
    row = conn.execute("SELECT * FROM t WHERE k LIKE '50%' AND n > ?", (1,)).fetchone()
    assert row["k"] == row[0] == "50%-off"
    assert dict(row) == {"k": "50%-off", "n": 2**40, "x": 0.5, "b": blob, "flag": 1}
    assert bytes(row["b"]) == blob
    assert [tuple(r) for r in conn.execute("SELECT k, flag FROM t ORDER BY k")] == [
        ("50%-off", 1),
        ("a", 0),
        ("b", None),
    ]
    assert conn.columns("t") == {"k", "n", "x", "b", "flag"}
    assert conn.columns("no_such_table") == set()
    cur = conn.execute("UPDATE t SET n = 1 WHERE k IN (?, ?)", ("a", "b"))
    assert cur.rowcount == 2


def test_a_failed_transaction_leaves_nothing_and_nested_ones_join_the_outer(db: str) -> None:
    conn = open_database(db)
    conn.executescript("CREATE TABLE t (k TEXT PRIMARY KEY)")
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute("INSERT INTO t VALUES (?)", ("lost",))
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (?)", ("inner",))
        raise RuntimeError("midway")
    assert not conn.in_transaction
    with conn.transaction():
        conn.execute("INSERT INTO t VALUES (?)", ("kept",))
    # A constraint error inside a transaction rolls it back whole; the connection goes on.
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), conn.transaction():
        conn.execute("INSERT INTO t VALUES (?)", ("second",))
        conn.execute("INSERT INTO t VALUES (?)", ("kept",))
    other = open_database(db)  # what another process sees
    assert [r[0] for r in other.execute("SELECT k FROM t ORDER BY k")] == ["kept"]


def test_a_write_sent_later_is_seen_by_the_next_statement_and_kept_or_lost_with_its_transaction(
    db: str,
) -> None:
    conn = open_database(db)
    conn.executescript("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER)")
    with conn.transaction():
        conn.execute_later("INSERT INTO t VALUES (?, ?)", ("a", 1))
        conn.execute_later("UPDATE t SET n = n + ? WHERE k = ?", (10, "a"))
        # The next statement reads both writes: they reach the server ahead of it.
        cur = conn.execute("UPDATE t SET n = n * 2 WHERE k = ? RETURNING n", ("a",))
        assert cur.fetchone()[0] == 22
        conn.execute_later("INSERT INTO t VALUES (?, ?)", ("b", 2))  # waits for COMMIT
    other = open_database(db)  # what another process sees after the commit
    assert [tuple(r) for r in other.execute("SELECT k, n FROM t ORDER BY k")] == [
        ("a", 22),
        ("b", 2),
    ]
    # A transaction that fails drops what was still waiting, and so does a bad write.
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute_later("INSERT INTO t VALUES (?, ?)", ("lost", 3))
        raise RuntimeError("midway")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), conn.transaction():
        conn.execute_later("INSERT INTO t VALUES (?, ?)", ("c", 4))
        conn.execute_later("INSERT INTO t VALUES (?, ?)", ("a", 5))  # a duplicate key
        conn.execute("SELECT 1")
    assert not conn.in_transaction
    # Outside a transaction it runs at once (autocommit): nothing waits to be lost.
    conn.execute_later("INSERT INTO t VALUES (?, ?)", ("d", 6))
    assert [r[0] for r in other.execute("SELECT k FROM t ORDER BY k")] == ["a", "b", "d"]


def test_reads_in_a_snapshot_agree_with_each_other_while_another_process_commits(
    db: str,
) -> None:
    conn, other = open_database(db), open_database(db)
    conn.executescript("CREATE TABLE t (k TEXT PRIMARY KEY)")
    count = "SELECT COUNT(*) FROM t"
    with conn.snapshot():
        assert conn.execute(count).fetchone()[0] == 0
        with other.transaction():
            other.execute("INSERT INTO t VALUES (?)", ("meanwhile",))
        assert conn.execute(count).fetchone()[0] == 0
    assert not conn.in_transaction
    assert conn.execute(count).fetchone()[0] == 1
    with conn.transaction(), conn.snapshot():  # inside a transaction: its own view
        conn.execute("INSERT INTO t VALUES (?)", ("mine",))
        assert conn.execute(count).fetchone()[0] == 2


def test_migrations_apply_once_upgrade_an_older_schema_and_refuse_a_newer_one(db: str) -> None:
    steps = (
        "CREATE TABLE widgets (id TEXT PRIMARY KEY, size REAL)",
        AddColumn("widgets", "colour", "TEXT NOT NULL DEFAULT 'red'"),
        "CREATE TABLE gadgets (id INTEGER PRIMARY KEY, blob BLOB)",
    )
    old = open_database(db)
    assert migrate(old, "widgets", steps[:1]) == 1
    old.execute("INSERT INTO widgets (id, size) VALUES (?, ?)", ("w1", 1.5))
    # A database from before versions already had the column: the step is a no-op there.
    old.execute(old.ddl("ALTER TABLE widgets ADD COLUMN colour TEXT NOT NULL DEFAULT 'blue'"))

    # Several controllers start on the upgrade at once: each finds it done or does it.
    results = at_once(4, lambda i: migrate(open_database(db), "widgets", steps))
    assert results == [3, 3, 3, 3]
    conn = open_database(db)
    assert schema_version(conn, "widgets") == 3
    assert conn.columns("gadgets") == {"id", "blob"}
    assert tuple(conn.execute("SELECT id, size, colour FROM widgets").fetchone()) == (
        "w1",
        1.5,
        "blue",
    )
    with pytest.raises(SchemaTooNewError) as err:
        migrate(conn, "widgets", steps[:2])
    assert err.value.code == "schema_too_new"
    assert "widgets schema version 3, newer than this controller's 2" in str(err.value)


def test_every_store_opens_a_fresh_database_and_a_second_process_finds_it_current(
    db: str,
) -> None:
    first = open_database(db)
    Registry(first)
    RolloutStore(first)
    ReleaseStore(first)
    versions = {c: schema_version(first, c) for c in ("registry", "rollouts", "releases")}
    assert versions == {
        "registry": len(Registry.MIGRATIONS),
        "rollouts": len(RolloutStore.MIGRATIONS),
        "releases": len(ReleaseStore.MIGRATIONS),
    }
    second = open_database(db)
    RolloutStore(second)
    Registry(second)
    assert schema_version(second, "rollouts") == versions["rollouts"]
    readonly = open_database(db, readonly=True)
    assert rollout_state_counts(readonly) == ({}, {})
    assert rollouts_in_flight(readonly) == {}


def test_two_processes_starting_rollouts_on_one_device_at_once_hold_it_once(db: str) -> None:
    stores = [RolloutStore(open_database(db)) for _ in range(4)]
    results = at_once(4, lambda i: create(stores[i], f"r-{i}", [["robot-1"], [f"robot-x{i}"]]))
    won = [i for i, r in enumerate(results) if r is None]
    assert len(won) == 1, results
    assert all(isinstance(r, DevicesHeldError) for i, r in enumerate(results) if i not in won)
    assert stores[0].holders(["robot-1", "robot-x0"]) == {
        "robot-1": f"r-{won[0]}",
        **({"robot-x0": "r-0"} if won == [0] else {}),
    }
    # Nothing of a refused rollout was stored.
    assert [r.id for r in stores[1].recent()] == [f"r-{won[0]}"]


def test_an_assignment_gets_one_command_whichever_process_records_first(db: str) -> None:
    stores = [RolloutStore(open_database(db)) for _ in range(3)]
    create(stores[0], "r-1", [["robot-1"]])
    results = at_once(
        3, lambda i: stores[i].record_command("r-1", "robot-1", f"cmd-{i}", f"env-{i}".encode())
    )
    assert results.count(True) == 1, results
    winner = results.index(True)
    for s in stores:
        a = s.assignment("r-1", "robot-1")
        assert a is not None and (a.command_id, a.envelope, a.state) == (
            f"cmd-{winner}",
            f"env-{winner}".encode(),
            PENDING,
        )
        assert s.sent_envelope(f"cmd-{winner}") == f"env-{winner}".encode()


def test_a_rollout_goes_through_the_store_the_same_on_both_engines(db: str) -> None:
    conn = open_database(db)
    store = RolloutStore(conn)
    create(store, "r-abc", [["robot-1"], ["robot-2", "robot-3"]], already_done={"robot-3": "on it"})
    assert store.find("r-a") is not None and store.find("r-x") is None
    assert store.get("r-abc").state == RUNNING  # type: ignore[union-attr]
    store.start_wave("r-abc", 0, deadline=2e9)
    assert store.record_command("r-abc", "robot-1", "c1", b"\x00signed")
    store.mark_published(["c1"])
    assert store.apply_job_state("c1", "RECEIVED", seq=1, device_id="robot-1")
    assert not store.apply_job_state("c1", "RECEIVED", seq=1, device_id="robot-1")
    assert not store.apply_job_state("c1", "ACTIVE", seq=2, device_id="robot-9")  # not its own
    for _ in range(2):  # the broker may deliver an event twice
        store.record_event(
            "r-abc", "robot-1", "c1", 2, "FAILED", "slow", "latency_regression", None
        )
    assert store.apply_job_state(
        "c1", "FAILED", seq=2, code="latency_regression", gate={"p99_ms": 9.5}
    )
    store.end_wave("r-abc", 0)
    store.start_wave("r-abc", 1, deadline=2e9)
    assert store.record_command("r-abc", "robot-2", "c2", b"two")
    assert store.time_out("r-abc", 1, "no answer") == ["robot-2"]
    summary = store.summary("r-abc")
    assert (summary.assigned, summary.failed, summary.failure_rate) == (2, 2, 1.0)
    assert [w.counts for w in summary.waves] == [
        {"FAILED": 1},
        {"TIMED_OUT": 1, "SUCCEEDED": 1},
    ]
    assert store.assignment("r-abc", "robot-1").gate == {"p99_ms": 9.5}  # type: ignore[union-attr]
    assert len(store.events("r-abc")) == 1
    assert store.terminal_events("r-abc") == {("robot-1", "c1")}
    assert store.open_count("r-abc", 1) == 0
    assert store.record_rollback("r-abc", "robot-1", "rb1", b"rb", "1.0.0")
    assert store.assignment_by_command("rb1")[1] is True  # type: ignore[index]
    store.start_bake("r-abc", 0, 100.0)
    store.record_verdicts(
        "r-abc", 0, [{"slo": "p99 < 5", "verdict": "FAIL", "reason": "9.5", "mean": 9.5}], 101.0
    )
    store.end_bake("r-abc", 0, "failed", 102.0)
    assert store.slo_verdicts("r-abc")[0]["mean"] == 9.5
    assert store.slo_verdicts("r-abc")[0]["bake"] == "failed"
    assert store.request_abort("r-abc", "operator", rollback=True)
    assert rollouts_in_flight(open_database(db, readonly=True))[("robot-1", "detector")] == "r-abc"
    store.set_state("r-abc", "aborted")
    assert not store.request_abort("r-abc", "again", rollback=True)
    assert store.get("r-abc").finished_at is not None  # type: ignore[union-attr]
    assert [a.state for a in store.assignments("r-abc")] == [
        JobState.FAILED.value,
        JobState.TIMED_OUT.value,
        JobState.SUCCEEDED.value,
    ]
    assert WAITING not in {a.state for a in store.assignments("r-abc")}
    history = store.device_history("robot-1")
    assert [(r.id, a.command_id) for r, a in history] == [("r-abc", "c1")]


def same_summary_both_ways(store: RolloutStore, rid: str) -> RolloutSummary:
    """The light summary equals the full one, field for field and in the order its
    lists and counts come (the JSON of `rollout status`); the full one is returned."""
    full, light = store.summary(rid), store.light_summary(rid)
    assert light == full
    assert json.dumps(light.to_dict()) == json.dumps(full.to_dict())
    return full


def test_a_summary_counted_by_the_database_equals_the_one_folded_from_every_row(db: str) -> None:
    offline = {"robot-11", "robot-12", "robot-03", "robot-99"}
    store = RolloutStore(open_database(db), offline=lambda: offline)
    ids = [f"robot-{i:02d}" for i in range(35)]
    create(store, "r-mix", [ids[:10], ids[10:25], ids[25:]], already_done={"robot-34": "on it"})
    # Another rollout's jobs on some of the same devices count in neither summary.
    create(store, "r-other", [ids[:5]], exclusive=False)
    for d in ids[:5]:
        assert store.record_command("r-other", d, f"o-{d}", b"env")
        assert store.apply_job_state(f"o-{d}", "FAILED", device_id=d, code="crash")
    assert same_summary_both_ways(store, "r-mix").assigned == 0

    def job(device: str, *states: str, code: str | None = None) -> str:
        cid = f"c-{device}"
        assert store.record_command("r-mix", device, cid, b"signed")
        for state in states:
            assert store.apply_job_state(cid, state, device_id=device, code=code, reason=state)
        return cid

    store.start_wave("r-mix", 0, deadline=2e9)
    for d in ids[:3]:
        job(d, "RECEIVED", "SUCCEEDED")
    job("robot-03", "DOWNLOADING", "FAILED", code="latency_regression")
    job("robot-04", "FAILED", code="not_judged")
    job("robot-05", "VALIDATING", "ROLLED_BACK", code="probation_failed")
    job("robot-06", "CANCELED", code="canceled")
    job("robot-07", "REJECTED", code="bad_signature")
    retried = job("robot-08", "FAILED", code="download_failed")
    assert store.reset_for_retry("r-mix", "robot-08", retried, 2e9, "retry 1 of 1")
    job("robot-09")  # never answers
    assert store.time_out("r-mix", 0, "no answer in 30s") == ["robot-09"]
    store.end_wave("r-mix", 0)
    mid = same_summary_both_ways(store, "r-mix")
    assert (mid.assigned, mid.failed) == (9, 4)

    store.start_wave("r-mix", 1, deadline=2e9)
    for d in ids[10:15]:
        job(d)  # PENDING: robot-11 and robot-12 are offline
    for d in ids[15:18]:
        job(d, "BUILDING", "STAGED")
    # An abort's cancels: one not answered yet, one not answered in time.
    assert store.record_cancel("r-mix", "robot-16", "cx-16", b"cancel")
    assert store.record_cancel("r-mix", "robot-17", "cx-17", b"cancel")
    assert store.time_out_staged_cancels("r-mix", {"robot-17": "no answer"}) == ["robot-17"]
    job("robot-18", "STAGED")  # its activate finds the staged job gone
    assert store.record_activate("r-mix", "robot-18", "ac-18", b"activate", at=time.time())
    assert store.settle_activate("ac-18", "REJECTED", code="not_staged", reason="expired")
    job("robot-19", "ON_HOLD", code="window")
    job("robot-20", "DOWNLOADING")
    job("robot-21", "FAILED", code="not_judged")
    store.leave_to_release("r-mix", ["robot-22", "robot-23"], "offline at its wave")
    job("robot-24", "SUCCEEDED")
    store.start_bake("r-mix", 0, 100.0)
    store.record_verdicts(
        "r-mix", 0, [{"slo": "p99 < 5", "verdict": "PASS", "reason": "4.1", "mean": 4.1}], 101.0
    )
    assert store.request_abort("r-mix", "operator", rollback=True)
    for d, rb_state in (("robot-03", "SUCCEEDED"), ("robot-05", "FAILED"), ("robot-07", None)):
        assert store.record_rollback("r-mix", d, f"rb-{d}", b"rb", "1.0.0")
        if rb_state:
            assert store.apply_job_state(f"rb-{d}", rb_state, device_id=d)
    store.mark_rollback_impossible("r-mix", "robot-06", "no earlier version")
    store.add_rollback_wave("r-mix", 4, deadline=2e9)
    store.skip_pending_waves("r-mix")

    end = same_summary_both_ways(store, "r-mix")
    assert (end.assigned, end.failed) == (22, 4)
    assert [f["device_id"] for f in end.failures] == [
        "robot-03",
        "robot-05",
        "robot-07",
        "robot-09",
    ]
    assert [d["device_id"] for d in end.not_judged] == ["robot-04", "robot-21"]
    assert [d["device_id"] for d in end.not_staged] == ["robot-18"]
    assert end.offline_pending == ["robot-11", "robot-12"]
    assert end.staged == ["robot-15"] and end.cancels_pending == ["robot-16"]
    assert [d["device_id"] for d in end.cancels_unacknowledged] == ["robot-17"]
    assert end.left_to_release == ["robot-22", "robot-23"]
    assert end.rollbacks == {"SUCCEEDED": 1, "FAILED": 1, "PENDING": 1, "NO_PREVIOUS": 1}
    assert [w.state for w in end.waves] == ["done", "running", "skipped", "rollback"]
    assert end.waves[2].counts == {"WAITING": 9, "SUCCEEDED": 1} and end.slo_verdicts
    offline.clear()  # nobody offline: PENDING devices are not named
    assert same_summary_both_ways(store, "r-mix").offline_pending == []
    with pytest.raises(KeyError):
        store.light_summary("r-none")


def test_release_history_keeps_versions_per_scope(db: str) -> None:
    conn = open_database(db)
    store = ReleaseStore(conn)
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    model = DesiredModel(version="2.0.0", sha256="b" * 64, url="http://x/b.jfb", size=1)
    for v in (1, 2):
        doc = Release.new(group="lab", version=v, issued_at=now, models={"detector": model})
        store.record("group:lab", doc, b"\x00env%d" % v)
    store.record("group:lab", Release.new(group="lab", version=2, issued_at=now, models={}), b"x")
    pin = Pins.new(device="robot-3", version=1, issued_at=now, models={"detector": model})
    store.record("device:robot-3", pin, b"-")
    assert store.last_version("group:lab") == 2 and store.last_version("group:none") == 0
    assert [(h["scope"], h["version"]) for h in store.history("group:lab")] == [
        ("group:lab", 2),
        ("group:lab", 1),
    ]
    readonly = open_database(db, readonly=True)
    assert latest_documents(readonly) == {
        "group:lab": {},
        "device:robot-3": {"detector": model.model_dump()},
    }
    assert set(current_documents(readonly)) == {"group:lab", "device:robot-3"}


def test_a_readonly_connection_cannot_write(db: str) -> None:
    RolloutStore(open_database(db))
    ro = open_database(db, readonly=True)
    with pytest.raises(Exception, match=r"(?i)read-only|readonly"):
        ro.execute("DELETE FROM rollouts")


def test_a_bad_target_is_one_coded_line() -> None:
    with pytest.raises(DatabaseError, match="use a file path, sqlite:///PATH or postgresql://"):
        open_database("mysql://x/y")
    with pytest.raises(DatabaseError) as err:
        open_database("postgresql://someone:secret@127.0.0.1:1/nowhere", timeout=1)
    assert err.value.code == "database" and "secret" not in str(err.value)
    assert "\n" not in str(err.value)


def test_wrap_takes_a_database_as_is(db: str) -> None:
    conn = open_database(db)
    assert Database.wrap(conn) is conn


def test_telemetry_readers_before_any_sample_see_no_data_not_an_error(db: str) -> None:
    """The SLO gates, export and the console read telemetry before `serve` ever stored a
    sample: on PostgreSQL the controller's database exists then, its telemetry tables not."""
    RolloutStore(open_database(db))
    target = default_telemetry_db(db)
    with pytest.raises(TelemetryStoreError, match="has `jetfleet serve` run"):
        TelemetryStore(target, readonly=True)
    source = TelemetrySource(target)
    assert source.samples("robot-1", 0.0, 2e9) == []
    TelemetryStore(target).close()  # serve's ingester creates the tables
    assert TelemetryStore(target, readonly=True).count_raw() == 0


def test_raw_telemetry_lives_in_day_partitions_that_retention_drops_after_folding(
    db: str,
) -> None:
    """On PostgreSQL, raw samples go to the partition of their UTC day (the default one
    when none was made for it), a database from before partitions is converted with its
    rows, and retention drops whole days once folded into minutes; SQLite answers the
    same queries the same."""
    target = default_telemetry_db(db)
    conn = open_database(target)
    migrate(conn, "telemetry", MIGRATIONS[:1])  # a database from before partitions
    day = int(time.time() // 86400) * 86400
    old = TelemetrySample.new(
        device_id="robot-1", at=datetime.fromtimestamp(day - 3 * 86400 + 5, timezone.utc),
        uptime_s=1, cpu={"percent": [10.0]},
    )  # fmt: skip
    conn.execute(
        f"INSERT INTO telemetry_raw VALUES ({', '.join('?' * (len(METRICS) + 3))})",
        row_from_sample(old, old.encode().decode()),
    )
    store = TelemetryStore(target)  # the upgrade
    new = TelemetrySample.new(
        device_id="robot-1", at=datetime.fromtimestamp(day + 65, timezone.utc),
        uptime_s=2, cpu={"percent": [30.0]},
    )  # fmt: skip
    store.insert_batch([row_from_sample(new, new.encode().decode())])
    assert store.series("robot-1", "cpu_pct", 0, 2e9) == [(day - 3 * 86400 + 5, 10.0),
                                                          (day + 65, 30.0)]  # fmt: skip
    if store.conn.postgres:
        parts = day_partitions(store.conn, RAW)
        today = next(n for n, d in parts.items() if d == day)
        assert set(parts.values()) >= {day, day + 86400, day + 2 * 86400}
        assert store.conn.execute(f"SELECT COUNT(*) FROM {today}").fetchone()[0] == 1
        counted = store.conn.execute("SELECT COUNT(*) FROM telemetry_raw_default").fetchone()
        assert counted[0] == 1  # three days ago: no partition was made for it
    later = day + 3 * 86400 + 3600
    counts = store.maintain(later)
    assert store.count_raw() == 0
    assert [(m["ts"], m["n"], m["cpu_pct"]) for m in store.minute_rows("robot-1", 0)] == [
        (day - 3 * 86400, 1, 10.0),
        (day + 60, 1, 30.0),
    ]
    if store.conn.postgres:
        assert counts["raw_partitions_dropped"] == 3 and counts["raw_deleted"] == 1
        # Yesterday (and before) of `later` are gone; the day of the cut stays, and the
        # days ahead of `later` are made.
        kept = sorted(day_partitions(store.conn, RAW).values())
        assert kept == [day + k * 86400 for k in range(2, 6)]
    else:
        assert counts["raw_deleted"] == 2
    reader = TelemetryStore(target, readonly=True)
    assert reader.series("robot-1", "cpu_pct", 0, 2e9) == [(day - 3 * 86400, 10.0),
                                                           (day + 60, 30.0)]  # fmt: skip


def minute_row(device: str, minute: int, cpu: float) -> tuple[Any, ...]:
    """A row of telemetry_minute: (device_id, minute, n, *METRICS)."""
    means = [cpu if m == "cpu_pct" else float(i) for i, m in enumerate(METRICS)]
    return (device, minute, 60, *means)


def minute_history(target: str | Path, day: int) -> dict[str, Any]:
    """What export (minute resolution) and plot read of both devices, by a reader as
    theirs (read-only: it never migrates)."""
    store = TelemetryStore(target, readonly=True)
    try:
        return {
            d: (list(store.minute_rows(d, day - 50 * 86400)),
                store.series(d, "cpu_pct", day - 50 * 86400 + 0.5, day + 86400))
            for d in ("robot-1", "robot-2")
        }  # fmt: skip
    finally:
        store.close()


def test_minute_means_move_into_day_partitions_with_every_row_and_retention_drops_old_days(
    db: str,
) -> None:
    """A database from before minute partitions keeps every minute mean through the
    upgrade (on PostgreSQL: into the partition of its UTC day, or the default one when
    older than the 30 days kept), export and plot read the same rows as before, and
    retention drops whole old days of them; SQLite answers the same."""
    target = default_telemetry_db(db)
    conn = open_database(target)
    migrate(conn, "telemetry", MIGRATIONS[:2])  # raw partitioned, minutes not yet
    day = int(time.time() // 86400) * 86400
    minutes = {  # minute -> cpu mean
        day - 40 * 86400 + 120: 5.0,  # older than the 30 days kept
        day - 10 * 86400 + 600: 10.0,
        day - 3 * 86400 + 60: 30.0,
        day - 60: 59.0,  # yesterday's last minute
        day: 60.0,
    }
    devices = ("robot-1", "robot-2")
    rows = [minute_row(d, m, cpu + i) for m, cpu in minutes.items() for i, d in enumerate(devices)]
    conn.executemany(
        f"INSERT INTO telemetry_minute (device_id, minute, n, {', '.join(METRICS)}) "
        f"VALUES ({', '.join('?' * (len(METRICS) + 3))})",
        rows,
    )
    before = minute_history(target, day)
    assert len(before["robot-1"][0]) == 5 and len(before["robot-2"][1]) == 5

    store = TelemetryStore(target)  # the upgrade
    assert minute_history(target, day) == before
    if store.conn.postgres:
        parts = day_partitions(store.conn, MINUTE)
        assert set(parts.values()) >= {day + k * 86400 for k in (-10, -3, -1, 0, 1, 2)}
        assert min(parts.values()) == day - 30 * 86400
        for name, count in [
            ("telemetry_minute_default", 2),  # 40 days ago
            (next(n for n, d in parts.items() if d == day - 86400), 2),
            (next(n for n, d in parts.items() if d == day), 2),
        ]:
            assert store.conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0] == count

    # Keep 5 days: the cut falls at noon 5 days back.
    counts = store.maintain(day + 43200, minute_retention_s=5 * 86400)
    assert minute_history(target, day) == {
        d: (means[2:], [(t, v) for t, v in points if t >= day - 5 * 86400])
        for d, (means, points) in before.items()
    }
    if store.conn.postgres:
        # Partitions from 30 days back to 6 days back are dropped, with the row of 10
        # days ago; the 40-day-old rows in the default partition are deleted.
        assert counts["minute_partitions_dropped"] == 25
        assert counts["minute_deleted"] == 2
        kept = sorted(day_partitions(store.conn, MINUTE).values())
        assert kept == [day + k * 86400 for k in range(-5, 3)]
    else:
        assert counts["minute_partitions_dropped"] == 0 and counts["minute_deleted"] == 4
    # New means still fold into the minute table (today's partition on PostgreSQL):
    # a sample in the minute before the last run's end, which the next run refolds.
    sample = TelemetrySample.new(
        device_id="robot-1", at=datetime.fromtimestamp(day + 43200 - 115, timezone.utc),
        uptime_s=1, cpu={"percent": [42.0]},
    )  # fmt: skip
    store.insert_batch([row_from_sample(sample, sample.encode().decode())])
    store.maintain(day + 43200, minute_retention_s=5 * 86400)
    assert (day + 43200 - 120, 42.0) in [
        (m["ts"], m["cpu_pct"]) for m in store.minute_rows("robot-1", day, day + 86400)
    ]
    if store.conn.postgres:
        today = next(n for n, d in day_partitions(store.conn, MINUTE).items() if d == day)
        assert store.conn.execute(f"SELECT COUNT(*) FROM {today}").fetchone()[0] == 3


def scans(store: TelemetryStore) -> dict[str, int]:
    """Scans so far of each telemetry_minute partition (the backend's counts flushed)."""
    store.conn.execute("SELECT pg_stat_force_next_flush()")  # flushed once it is idle
    rows = store.conn.execute(
        "SELECT relname, COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0) "
        "FROM pg_stat_user_tables WHERE relname LIKE 'telemetry_minute_%'"
    ).fetchall()
    return {name: int(n) for name, n in rows}


@pytest.mark.postgresql
def test_minute_retention_on_postgresql_reads_only_the_days_it_cuts(postgres_url: str) -> None:
    """The retention DELETE bounds the integer `minute` by an integer, so PostgreSQL
    prunes the day partitions wholly after the cut: a kept day is not read (a float cut
    casts the column and scans every day kept, 30 of them by default)."""
    store = TelemetryStore(postgres_url)
    day = int(time.time() // 86400) * 86400
    names = {d: n for n, d in day_partitions(store.conn, MINUTE).items()}
    before = scans(store)
    # Keep one day from noon two days ahead (a clock's time: a float): today goes whole,
    # tomorrow is cut at noon.
    counts = store.maintain(day + 2 * 86400 + 43200.5, minute_retention_s=86400)
    after = scans(store)
    assert counts["minute_partitions_dropped"] == 1 and names[day] not in after
    for cut in ("telemetry_minute_default", names[day + 86400]):
        assert after[cut] > before[cut], cut  # read by the DELETE
    assert after[names[day + 2 * 86400]] == before[names[day + 2 * 86400]]


def test_a_telemetry_batch_comes_back_as_written_whichever_way_it_went_in(db: str) -> None:
    """SQLite appends by multi-row INSERT, PostgreSQL by COPY: the text COPY stream must
    keep what it escapes (tabs, newlines, backslashes, non-ASCII) and NULL metrics."""
    store = TelemetryStore(default_telemetry_db(db))
    at = datetime.fromtimestamp(int(time.time()), timezone.utc)
    samples = [
        TelemetrySample.new(device_id="robot-1", at=at, uptime_s=1, cpu={"percent": [12.5]}),
        TelemetrySample.new(
            device_id="robot-1", at=at.replace(second=(at.second + 1) % 60), uptime_s=2
        ),  # fmt: skip  (no cpu: a NULL metric)
    ]
    payloads = ['{"note": "tab\there\nnew line \\ back"}', '{"note": "Ωμέγα ✓ \\N"}']
    assert "\t" in payloads[0] and "\\N" in payloads[1]  # raw tab; COPY's NULL marker
    rows = [row_from_sample(s, p) for s, p in zip(samples, payloads, strict=True)]
    store.insert_batch(rows)
    back = list(store.raw_rows("robot-1", 0))
    assert [r["payload"] for r in back] == [r[-1] for r in sorted(rows, key=lambda r: r[1])]
    assert sorted((r["cpu_pct"] for r in back), key=lambda v: v is None) == [12.5, None]
    assert store.count_raw("robot-1") == 2
