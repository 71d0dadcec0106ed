"""One coded error: every error the agent turns into an event's `code` derives from
protocol.errors.CodedError, and `reason_code` trusts nothing else."""

from __future__ import annotations

import pytest

from agent.activation import ActivationError
from agent.commands import reason_code
from agent.download import DownloadError
from agent.enginejob import EngineJobError
from agent.engines.api import EngineLoadError, TargetMismatchError
from agent.store import StoreError
from protocol.errors import (
    BundleError,
    CodedError,
    CommandRejected,
    IllegalTransitionError,
    InvalidIdError,
    TransportConfigError,
    TrustRootError,
)


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (DownloadError("bundle 3 bytes over its size", code="too_large"), "too_large"),
        (ActivationError("GET /health: 503", code="health_failed"), "health_failed"),
        (TargetMismatchError("needs an Orin AGX"), "target_mismatch"),
        (EngineJobError("disk_full", "no space left for the engine"), "disk_full"),
        (StoreError("state.db: disk full", code="disk_full"), "disk_full"),
        (BundleError("member model.onnx resized"), "bundle_invalid"),
    ],
)
def test_each_coded_error_carries_its_code_and_reason(err: CodedError, code: str) -> None:
    assert isinstance(err, CodedError)
    assert reason_code(err) == code
    assert str(err) == err.reason


def test_a_code_outside_the_reason_codes_is_internal() -> None:
    assert reason_code(EngineLoadError("corrupt", code="not_a_reason")) == "internal"
    assert reason_code(IllegalTransitionError("CANCELED to QUEUED")) == "internal"


def test_a_foreign_error_with_a_code_attribute_is_not_trusted() -> None:
    class Foreign(Exception):
        code = "disk_full"  # duck-typed: not one of ours

    assert reason_code(Foreign("?")) == "internal"


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (InvalidIdError("device id 'Robot 1' is not valid"), "malformed"),
        (CommandRejected("signed for robot-2, not this device"), "bad_signature"),
        (TrustRootError("root signatures below threshold", code="rotation"), "trust_root"),
        (TransportConfigError("CA certificate file ca.crt does not exist"), "internal"),
    ],
)
def test_a_finer_code_reports_as_its_familys(err: CodedError, code: str) -> None:
    assert err.code != code
    assert reason_code(err) == code
