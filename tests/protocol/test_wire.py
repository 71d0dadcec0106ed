"""Topics, ids, semantic versions and the `schema` rules of every payload (docs/protocol.md)."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from protocol.errors import InvalidIdError, MessageError, SchemaError
from protocol.ids import SemVer, validate_id
from protocol.manifest import FileEntry, Manifest, Profile, TensorSpec
from protocol.messages import Command, DeployBody, DeviceStatus, JobEvent, JobState
from protocol.topics import DEFAULT_PREFIX, Topics

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)

# -- topics ------------------------------------------------------------------------------


def test_topic_builders_follow_the_spec_tree() -> None:
    t = Topics()
    assert t.prefix == DEFAULT_PREFIX == "jetfleet/v1"
    assert t.device_cmd("robot-0042") == "jetfleet/v1/devices/robot-0042/cmd"
    assert t.group_cmd("warehouse-a") == "jetfleet/v1/groups/warehouse-a/cmd"
    assert t.events("r1") == "jetfleet/v1/devices/r1/events"
    assert t.status("r1") == "jetfleet/v1/devices/r1/status"
    assert t.telemetry("r1") == "jetfleet/v1/devices/r1/telemetry"
    assert t.all_events() == "jetfleet/v1/devices/+/events"
    assert t.shared_telemetry("ingest") == "$share/ingest/jetfleet/v1/devices/+/telemetry"
    assert t.command_topic_for_target("group:canary") == "jetfleet/v1/groups/canary/cmd"
    assert t.command_topic_for_target("r1") == "jetfleet/v1/devices/r1/cmd"
    assert Topics("site/x").status("r1") == "site/x/devices/r1/status"


@pytest.mark.parametrize(
    "topic",
    ["jetfleet/v1/devices/r1/cmd", "jetfleet/v1/devices/r1/events",
     "jetfleet/v1/devices/r1/status", "jetfleet/v1/devices/r1/telemetry",
     "jetfleet/v1/groups/canary/cmd"],
)  # fmt: skip
def test_topics_parse_back_to_what_built_them(topic: str) -> None:
    p = Topics().parse(topic)
    scope = "groups" if "/groups/" in topic else "devices"
    assert (p.scope, p.channel) == (scope, topic.rsplit("/", 1)[1])
    assert p.name == topic.split("/")[3]


@pytest.mark.parametrize(
    "topic",
    ["other/v1/devices/r1/cmd", "jetfleet/v1/devices/r1", "jetfleet/v1/devices/r1/cmd/x",
     "jetfleet/v1/groups/g/status", "jetfleet/v1/devices/r1/logs", "jetfleet/v1/devices/R1/cmd",
     "jetfleet/v1/robots/r1/cmd", "jetfleet/v1/devices/+/cmd"],
)  # fmt: skip
def test_foreign_or_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(MessageError):
        Topics().parse(topic)


@pytest.mark.parametrize("bad", ["", "Robot", "-r", "a/b", "a+b", "#", "x" * 65, "r 1", "é"])
def test_invalid_ids_are_refused_by_builders(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        Topics().device_cmd(bad)
    with pytest.raises(InvalidIdError):
        validate_id(bad, "group name")


def test_valid_ids() -> None:
    for good in ("a", "robot-0042", "r.1_x", "0" * 64):
        assert validate_id(good) == good


# -- semantic versions -------------------------------------------------------------------


def test_semver_precedence_follows_semver_org() -> None:
    # The example chain of semver.org §11.
    chain = "1.0.0-alpha 1.0.0-alpha.1 1.0.0-alpha.beta 1.0.0-beta 1.0.0-beta.2 1.0.0-beta.11"
    chain += " 1.0.0-rc.1 1.0.0 1.0.1 1.1.0 2.0.0 10.0.0"
    versions = [SemVer(v) for v in chain.split()]
    assert sorted(reversed(versions)) == versions
    for lo, hi in itertools.pairwise(versions):
        assert lo < hi and not hi < lo


def test_build_metadata_does_not_affect_precedence() -> None:
    assert SemVer("1.2.3+build.5") == SemVer("1.2.3+other")
    assert hash(SemVer("1.2.3+a")) == hash(SemVer("1.2.3"))


@pytest.mark.parametrize(
    "bad", ["1", "1.2", "01.2.3", "1.2.3-", "1.2.3-01", "v1.2.3", "", "1.2.3.4"]
)
def test_invalid_versions_are_refused(bad: str) -> None:
    with pytest.raises(MessageError, match="semantic version"):
        SemVer(bad)


# -- schema ------------------------------------------------------------------------------


def _command_doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema": "jetfleet.command/v1",
        "command_id": str(uuid.uuid4()),
        "issued_at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(minutes=5)).isoformat(),
        "target": "robot-1",
        "kind": "deploy",
        "body": {"url": "file:///b.jfb", "sha256": "a" * 64, "size": 10},
    }
    doc.update(over)
    return doc


def test_unknown_fields_and_newer_minor_versions_are_accepted() -> None:
    doc = _command_doc(schema="jetfleet.command/v1.7", future_field={"x": 1})
    cmd = Command.decode(json.dumps(doc))
    assert isinstance(cmd.body, DeployBody) and cmd.body.size == 10


@pytest.mark.parametrize(
    ("schema", "words"),
    [(None, "missing 'schema'"), ("jetfleet.command/v2", "major version 2"),
     ("jetfleet.event/v1", "is a event document"), ("command-v1", "not of the form")],
)  # fmt: skip
def test_missing_other_kind_or_other_major_schema_is_refused_with_the_reason(
    schema: str | None, words: str
) -> None:
    doc = _command_doc()
    if schema is None:
        del doc["schema"]
    else:
        doc["schema"] = schema
    with pytest.raises(SchemaError, match=words):
        Command.decode(json.dumps(doc))


def test_command_body_must_match_its_kind_and_times_must_be_ordered_and_aware() -> None:
    with pytest.raises(MessageError):
        Command.decode(json.dumps(_command_doc(kind="rollback")))
    with pytest.raises(MessageError, match="unknown command kind"):
        Command.decode(json.dumps(_command_doc(kind="format_disk")))
    with pytest.raises(MessageError, match="expires_at"):
        Command.decode(json.dumps(_command_doc(expires_at=NOW.isoformat())))
    with pytest.raises(MessageError, match="timezone"):
        Command.decode(json.dumps(_command_doc(issued_at="2026-01-01T00:00:00")))
    with pytest.raises(MessageError, match="UUID"):
        Command.decode(json.dumps(_command_doc(command_id="42")))
    with pytest.raises(InvalidIdError):
        Command.decode(json.dumps(_command_doc(target="group:Bad")))


@pytest.mark.parametrize("raw", [b"\xff", b"{", b"[]", b"null", b'"x"'])
def test_non_json_payloads_are_message_errors(raw: bytes) -> None:
    with pytest.raises(MessageError):
        Command.decode(raw)


def test_failed_terminal_events_need_a_reason_and_a_code() -> None:
    base = {"command_id": "c", "device_id": "r1", "seq": 1}
    with pytest.raises(MessageError, match="reason and a code"):
        JobEvent.new(**base, state="REJECTED")
    ok = JobEvent.new(**base, state="REJECTED", reason="bad signature", code="bad_signature")
    assert JobEvent.decode(ok.encode()).state is JobState.REJECTED
    assert JobState.ROLLED_BACK.failed and JobState.SUCCEEDED.terminal
    assert not JobState.SUCCEEDED.failed and not JobState.PROBATION.terminal


def test_status_round_trips_and_validates_the_device_id() -> None:
    s = DeviceStatus.new(device_id="r1", online=True, groups=["canary"])
    assert DeviceStatus.decode(s.encode()).groups == ["canary"]
    with pytest.raises(InvalidIdError):
        DeviceStatus.new(device_id="R1", online=True)


# -- manifest ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "manifest.dsse.json", "a\x00"]
)
def test_manifest_refuses_unsafe_or_reserved_file_paths(path: str) -> None:
    with pytest.raises(MessageError):
        FileEntry(path=path, size=1, sha256="a" * 64)


def _manifest(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema": "jetfleet.manifest/v1",
        "name": "det",
        "version": "1.0.0",
        "files": [
            {"path": "model.onnx", "size": 1, "sha256": "a" * 64},
            {"path": "golden.npz", "size": 1, "sha256": "b" * 64},
        ],
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 2]}],
    }
    doc.update(over)
    return doc


def test_manifest_consistency_rules() -> None:
    m = Manifest.decode(json.dumps(_manifest()))
    assert m.total_size == 2 and m.semver == SemVer("1.0.0")
    assert TensorSpec(name="x", dtype="float32", shape=["b", 3]).dynamic
    with pytest.raises(MessageError, match="twice"):
        Manifest.decode(
            json.dumps(_manifest(files=[*_manifest()["files"], _manifest()["files"][0]]))
        )  # type: ignore[list-item]
    with pytest.raises(MessageError, match="not among its files"):
        Manifest.decode(json.dumps(_manifest(model="other.onnx")))
    with pytest.raises(MessageError, match="not a model input"):
        Manifest.decode(
            json.dumps(_manifest(build={"profiles": {"z": {"min": [1], "opt": [1], "max": [1]}}}))
        )
    with pytest.raises(MessageError, match="dtype"):
        Manifest.decode(
            json.dumps(_manifest(inputs=[{"name": "x", "dtype": "complex64", "shape": []}]))
        )
    with pytest.raises(MessageError, match="min <= opt <= max"):
        Profile(min=[4, 3], opt=[2, 3], max=[8, 3])
