"""The fleet as the controller sees it: SQLite (WAL), fed from retained status and events.

A device's retained status (docs/protocol.md) is the source of truth for who it is (groups,
hardware, agent version) and what runs on it (active/previous version per model); its
events only advance the job in flight between two statuses. The will message (`online:
false`) arrives as an ordinary status, so statuses are applied in arrival order, which
the broker keeps per topic.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from controller.db import Database, open_database
from controller.db.migrations import AddColumn, Step, migrate
from controller.mqtt import ControllerMqtt
from protocol.errors import CodedError, MessageError
from protocol.ids import validate_id
from protocol.messages import DeviceStatus, JobEvent
from protocol.topics import Topics

log = structlog.get_logger("jetfleet.controller.registry")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    groups TEXT NOT NULL DEFAULT '[]',
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    agent_version TEXT,
    hardware TEXT NOT NULL DEFAULT '{}',
    models TEXT NOT NULL DEFAULT '{}',
    job TEXT,
    last_seq INTEGER,
    status_at TEXT,
    trust_version INTEGER,
    desired TEXT  -- the DesiredSummary of its last status (JSON)
);
"""


class TargetError(CodedError, ValueError):
    """A `--target` that names nothing, or names something invalid."""

    code = "target"


def open_db(target: str | Path) -> Database:
    """The controller database: a SQLite file (WAL, so a `rollout status` can read while a
    driver writes) or a PostgreSQL URL (controller/db)."""
    return open_database(target)


@dataclass
class DeviceRecord:
    id: str
    groups: list[str] = field(default_factory=list)
    online: bool = False
    last_seen: float | None = None
    agent_version: str | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, str | None]] = field(default_factory=dict)
    job: dict[str, Any] | None = None
    last_seq: int | None = None
    trust_version: int | None = None  # the trust root version its status reports
    status_at: float | None = None  # when the device says it wrote its status (its clock)
    desired: dict[str, Any] | None = None  # its DesiredSummary, once it accepted a document
    windows: dict[str, Any] | None = None  # its WindowsSummary (None: an older agent)

    def active_version(self, model: str) -> str | None:
        return (self.models.get(model) or {}).get("active")

    def previous_version(self, model: str) -> str | None:
        return (self.models.get(model) or {}).get("previous")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "groups": self.groups,
            "online": self.online,
            "last_seen": self.last_seen,
            "agent_version": self.agent_version,
            "hardware": self.hardware,
            "models": self.models,
            "job": self.job,
            "last_seq": self.last_seq,
            "trust_version": self.trust_version,
            "windows": self.windows,
        }

    @classmethod
    def from_row(cls, row: Any) -> DeviceRecord:
        return cls(
            id=row["id"],
            groups=json.loads(row["groups"]),
            online=bool(row["online"]),
            last_seen=row["last_seen"],
            agent_version=row["agent_version"],
            hardware=json.loads(row["hardware"]),
            models=json.loads(row["models"]),
            job=json.loads(row["job"]) if row["job"] else None,
            last_seq=row["last_seq"],
            trust_version=row["trust_version"],
            status_at=_epoch(row["status_at"]),
            desired=json.loads(row["desired"]) if row["desired"] else None,
            windows=json.loads(row["windows"]) if row["windows"] else None,
        )


def _epoch(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


# A job event's registry write, one statement: an event before any status (the controller
# missed the retained one) inserts the device, since an event proves it is connected; for
# a known one the job moves only on a newer event that is not a refusal's report, and
# last seen moves on any.
_NEWER = "?=1 AND (devices.last_seq IS NULL OR devices.last_seq < excluded.last_seq)"
_EVENT_UPSERT = (
    "INSERT INTO devices (id, online, last_seen, job, last_seq) "
    "VALUES (?, 1, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
    "last_seen=excluded.last_seen, "
    f"job=CASE WHEN {_NEWER} THEN excluded.job ELSE devices.job END, "
    f"online=CASE WHEN {_NEWER} THEN 1 ELSE devices.online END, "
    f"last_seq=CASE WHEN {_NEWER} THEN excluded.last_seq ELSE devices.last_seq END"
)


def _event_row(event: JobEvent, seen: float) -> tuple[Any, ...]:
    job = {
        "command_id": event.command_id,
        "state": event.state.value,
        "kind": event.kind.value if event.kind else None,
        "rollout_id": event.rollout_id,
        "model": event.model,
        "version": event.version,
    }
    fresh = 0 if event.is_refusal else 1
    return (
        event.device_id, seen, None if event.is_refusal else json.dumps(job), event.seq,
        fresh, fresh, fresh,
    )  # fmt: skip


# Ids per query when reading many devices' presence (within every engine's parameter limit).
PRESENCE_BATCH = 500


class Registry:
    """Device records in the controller database; safe to share between threads."""

    # Schema steps, oldest first (controller/db/migrations.py): append, never edit.
    MIGRATIONS: tuple[Step, ...] = (
        _SCHEMA,
        AddColumn("devices", "trust_version", "INTEGER"),
        AddColumn("devices", "desired", "TEXT"),
        AddColumn("devices", "windows", "TEXT"),  # the WindowsSummary of its last status
    )

    def __init__(self, conn: Database | sqlite3.Connection, topics: Topics | None = None) -> None:
        self.conn = Database.wrap(conn)
        self.topics = topics or Topics()
        self._lock = threading.RLock()
        with self._lock:
            migrate(self.conn, "registry", self.MIGRATIONS)

    @classmethod
    def open(cls, path: str | Path, topics: Topics | None = None) -> Registry:
        return cls(open_db(path), topics)

    # -- ingest ------------------------------------------------------------------------
    def apply_status(self, status: DeviceStatus, received_at: float | None = None) -> None:
        """An online status proves the device is there now (last seen: when it arrived). An
        offline one (the will, or a clean stop) may be read hours later from the broker:
        last seen is then what we knew, or the robot's own timestamp on the status, never
        the time we read it; and the will's missing models and hardware keep the last
        known ones (the robot still has them)."""
        models = {name: slot.model_dump() for name, slot in status.models.items()}
        job = status.job.model_dump(mode="json") if status.job else None
        seen = (received_at or time.time()) if status.online else status.at.timestamp()
        with self._lock:
            self.conn.execute_later(  # nobody reads its outcome
                """INSERT INTO devices (id, groups, online, last_seen, agent_version, hardware,
                       models, job, last_seq, status_at, trust_version, desired, windows)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET groups=excluded.groups, online=excluded.online,
                       last_seen=CASE WHEN excluded.online = 1
                           OR excluded.last_seen > COALESCE(devices.last_seen, 0)
                           THEN excluded.last_seen ELSE COALESCE(devices.last_seen, 0) END,
                       agent_version=COALESCE(excluded.agent_version, devices.agent_version),
                       hardware=CASE WHEN excluded.online = 1 OR excluded.hardware != '{}'
                           THEN excluded.hardware ELSE devices.hardware END,
                       models=CASE WHEN excluded.online = 1 OR excluded.models != '{}'
                           THEN excluded.models ELSE devices.models END,
                       job=excluded.job,
                       last_seq=CASE WHEN COALESCE(excluded.last_seq, -1)
                           > COALESCE(devices.last_seq, -1) THEN COALESCE(excluded.last_seq, -1)
                           ELSE COALESCE(devices.last_seq, -1) END,
                       status_at=excluded.status_at,
                       trust_version=COALESCE(excluded.trust_version, devices.trust_version),
                       desired=CASE WHEN excluded.online = 1 THEN excluded.desired
                           ELSE COALESCE(excluded.desired, devices.desired) END,
                       windows=CASE WHEN excluded.online = 1 THEN excluded.windows
                           ELSE COALESCE(excluded.windows, devices.windows) END""",
                (
                    status.device_id,
                    json.dumps(status.groups),
                    int(status.online),
                    seen,
                    status.agent_version,
                    status.hardware.model_dump_json(exclude_none=True),
                    json.dumps(models),
                    json.dumps(job) if job else None,
                    status.last_seq,
                    status.at.isoformat(),
                    status.trust_version,
                    status.desired.model_dump_json() if status.desired else None,
                    status.windows.model_dump_json() if status.windows else None,
                ),
            )

    def apply_event(self, event: JobEvent, received_at: float | None = None) -> None:
        """Advance the device's job in flight; an event older than what we know is ignored."""
        with self._lock:
            # Nobody reads its outcome, so on PostgreSQL it shares the round trip of the
            # driver's next statement (execute_later).
            self.conn.execute_later(_EVENT_UPSERT, _event_row(event, received_at or time.time()))

    def apply_events(self, events: Sequence[JobEvent], received_at: float | None = None) -> None:
        """`apply_event` for each, in order, as one batch (the driver's run of job events)."""
        seen = received_at or time.time()
        with self._lock:
            self.conn.executemany(_EVENT_UPSERT, [_event_row(e, seen) for e in events])

    def read_event(self, topic: str, payload: bytes) -> JobEvent | None:
        """The job event on a device's events topic, checked but not applied; None for any
        other topic. Raises MessageError for a payload that is not a valid event, or one
        whose device id disagrees with its topic (a device may only speak for itself)."""
        parsed = self.topics.parse(topic)
        if parsed.scope != "devices" or parsed.channel != "events":
            return None
        event = JobEvent.decode(payload)
        if event.device_id != parsed.name:
            raise MessageError(f"event on {topic} claims device {event.device_id!r}; ignored")
        return event

    def handle(self, topic: str, payload: bytes) -> DeviceStatus | JobEvent | None:
        """Apply one MQTT message of ours; returns what it was, None for other channels.

        Raises MessageError for a payload that is not a valid status/event, or one whose
        device id disagrees with its topic (a device may only speak for itself)."""
        event = self.read_event(topic, payload)
        if event is not None:
            self.apply_event(event)
            return event
        parsed = self.topics.parse(topic)
        if parsed.scope != "devices" or parsed.channel != "status":
            return None
        if not payload:  # a cleared retained message: the device was decommissioned
            self.forget(parsed.name)
            return None
        status = DeviceStatus.decode(payload)
        if status.device_id != parsed.name:
            raise MessageError(f"status on {topic} claims device {status.device_id!r}; ignored")
        self.apply_status(status)
        return status

    def forget(self, device_id: str) -> None:
        with self._lock:
            self.conn.execute("DELETE FROM devices WHERE id=?", (device_id,))

    # -- queries -----------------------------------------------------------------------
    def get(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self.conn.execute("SELECT * FROM devices WHERE id=?", (device_id,)).fetchone()
        return DeviceRecord.from_row(row) if row else None

    def devices(self, group: str | None = None) -> list[DeviceRecord]:
        with self._lock:
            rows = self.conn.execute("SELECT * FROM devices ORDER BY id").fetchall()
        records = [DeviceRecord.from_row(r) for r in rows]
        if group is not None:
            records = [r for r in records if group in r.groups]
        return records

    def resolve_target(self, target: str) -> list[str]:
        """`all`, `group:NAME` or `ID[,ID...]` to a sorted list of device ids.

        Explicit ids need not be known yet: a device that has never connected gets its
        command when it does (if its session exists) or times out with its wave."""
        target = target.strip()
        if not target:
            raise TargetError("empty --target: use all, group:NAME or ID[,ID...]")
        if target == "all":
            ids = [d.id for d in self.devices()]
            if not ids:
                raise TargetError("--target all: no device has reported to this controller yet")
            return ids
        if target.startswith("group:"):
            group = validate_id(target[6:], "group name")
            ids = [d.id for d in self.devices(group)]
            if not ids:
                raise TargetError(f"--target {target}: no known device is in group {group!r}")
            return ids
        ids = [p.strip() for p in target.split(",") if p.strip()]
        for i in ids:
            validate_id(i)
        if len(set(ids)) != len(ids):
            raise TargetError(f"--target {target}: a device is named twice")
        return sorted(ids)

    def presence(self, ids: list[str]) -> dict[str, tuple[bool, float | None]]:
        """Device id -> (online, last seen) of the known ones among `ids` (a few queries,
        however many ids)."""
        out: dict[str, tuple[bool, float | None]] = {}
        for i in range(0, len(ids), PRESENCE_BATCH):
            chunk = ids[i : i + PRESENCE_BATCH]
            marks = ",".join("?" for _ in chunk)
            with self._lock:
                rows = self.conn.execute(
                    f"SELECT id, online, last_seen FROM devices WHERE id IN ({marks})", chunk
                ).fetchall()
            out.update({r[0]: (bool(r[1]), r[2]) for r in rows})
        return out

    def offline_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self.conn.execute("SELECT id FROM devices WHERE online=0")}

    def unknown(self, ids: Iterable[str]) -> list[str]:
        with self._lock:
            known = {r["id"] for r in self.conn.execute("SELECT id FROM devices")}
        return [i for i in ids if i not in known]


# Topics per SUBSCRIBE packet when reading statuses by name (keeps packets and the
# broker's per-packet work small for large fleets).
NAMED_SUBSCRIBE_BATCH = 100


def sync_from_broker(
    registry: Registry,
    mqtt: ControllerMqtt,
    timeout: float = 10.0,
    device_ids: Iterable[str] = (),
) -> int:
    """Read every retained status into the registry; returns how many devices reported.

    Retained messages carry no end marker, so after subscribing we publish a marker to a
    private topic we also subscribe to: the broker sends it after the retained statuses it
    queued for us at subscribe time. A quiet period is the fallback for brokers that
    interleave.

    Some brokers (RabbitMQ 3.10) never match retained messages against a wildcard
    subscription. So, second pass: the status topic of every device this registry
    already knows, and of each of `device_ids` (explicitly named targets), that did not
    arrive through the wildcard is subscribed to by name. On Mosquitto that is only the
    devices without a retained status (normally none), so it costs nothing there. A
    device never seen before is still only learned from its live status or events."""
    marker_topic = f"{registry.topics.prefix}/controller/sync/{uuid.uuid4().hex}"
    done = threading.Event()
    reported: set[str] = set()
    last = [time.monotonic()]

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        last[0] = time.monotonic()
        if topic == marker_topic:
            done.set()
            return
        try:
            message = registry.handle(topic, payload)
        except MessageError as e:
            log.warning("bad_status_ignored", topic=topic, reason=e.reason)
            return
        if isinstance(message, DeviceStatus):
            reported.add(message.device_id)

    def wait_for_marker() -> None:
        done.clear()
        last[0] = time.monotonic()
        mqtt.publish(marker_topic, b"sync", qos=1)
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if time.monotonic() > deadline or time.monotonic() - last[0] > 2.0:
                break

    wanted = {d.id for d in registry.devices()} | {validate_id(d) for d in device_ids}
    mqtt.set_handler(on_message)
    mqtt.subscribe([marker_topic, registry.topics.all_status()], timeout=timeout)
    wait_for_marker()
    missing = sorted(wanted - reported)
    if missing:
        for i in range(0, len(missing), NAMED_SUBSCRIBE_BATCH):
            batch = missing[i : i + NAMED_SUBSCRIBE_BATCH]
            mqtt.subscribe([registry.topics.status(d) for d in batch], timeout=timeout)
        wait_for_marker()
        log.debug("status_read_by_name", asked=len(missing), got=len(reported & set(missing)))
    return len(reported)
