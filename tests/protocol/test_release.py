"""Release and pin documents: what verification alone refuses (no agent, no memory)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from protocol.dsse import sign
from protocol.errors import CommandRejected, MessageError, PayloadTypeError, WrongRoleError
from protocol.messages import COMMAND_PAYLOAD_TYPE
from protocol.release import (
    DesiredModel,
    Pins,
    Release,
    sign_release,
    verify_pins,
    verify_release,
)

NOW = datetime.now(timezone.utc)
MODEL = DesiredModel(version="1.0.0", sha256="a" * 64, url="file:///b.jfb", size=10)


def _release(group: str = "lab", issued_at: datetime = NOW) -> Release:
    return Release.new(group=group, version=1, issued_at=issued_at, models={"detector": MODEL})


def test_a_release_signed_by_the_operator_for_this_group_verifies(trust_material) -> None:
    env = sign_release(_release(), [trust_material.operator])
    doc = verify_release(env, trust_material.trust, group="lab", now=NOW)
    assert doc.models["detector"].version == "1.0.0"


def test_a_release_of_another_group_is_refused_as_wrong_target(trust_material) -> None:
    env = sign_release(_release("dock"), [trust_material.operator])
    with pytest.raises(CommandRejected) as e:
        verify_release(env, trust_material.trust, group="lab", now=NOW)
    assert e.value.code == "wrong_target"


def test_pins_for_another_device_are_refused(trust_material) -> None:
    doc = Pins.new(device="robot-2", version=1, issued_at=NOW, models={})
    env = sign_release(doc, [trust_material.operator])
    with pytest.raises(CommandRejected) as e:
        verify_pins(env, trust_material.trust, device_id="robot-1", now=NOW)
    assert e.value.code == "wrong_target"


def test_a_release_signed_as_a_command_or_by_the_release_key_is_refused(trust_material) -> None:
    as_command = sign(_release().encode(), COMMAND_PAYLOAD_TYPE, [trust_material.operator])
    with pytest.raises(PayloadTypeError):
        verify_release(as_command, trust_material.trust, group="lab", now=NOW)
    by_release_key = sign_release(_release(), [trust_material.release])
    with pytest.raises(WrongRoleError):
        verify_release(by_release_key, trust_material.trust, group="lab", now=NOW)


def test_a_release_issued_in_the_future_is_refused(trust_material) -> None:
    env = sign_release(_release(issued_at=NOW + timedelta(hours=1)), [trust_material.operator])
    with pytest.raises(CommandRejected) as e:
        verify_release(env, trust_material.trust, group="lab", now=NOW)
    assert e.value.code == "command_expired"


def test_model_names_and_versions_are_held_to_the_id_and_semver_rules() -> None:
    with pytest.raises(MessageError):
        Release.new(group="lab", version=1, issued_at=NOW, models={"../x": MODEL})
    with pytest.raises(MessageError):
        DesiredModel(version="latest", sha256="a" * 64, url="file:///b", size=1)
