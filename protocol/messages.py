"""Commands, job events, device status and their reason codes (docs/protocol.md)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.errors import MessageError
from protocol.ids import validate_id, validate_semver
from protocol.schema import Document

COMMAND_PAYLOAD_TYPE = "application/vnd.jetfleet.command+json"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError) as e:
        raise MessageError(f"{what} {value!r} is not a UUID") from e


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise MessageError("timestamps must carry a timezone (RFC 3339 with Z or an offset)")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Body fields end up in paths (data_dir/models/<model>) and hook environments: each id-like
# one is held to the same rule as a manifest's name, so "../x" never reaches the disk.
def _optional_id(what: str) -> Any:
    return lambda cls, v: None if v is None else validate_id(v, what)


def _optional_semver(cls: Any, v: str | None) -> str | None:
    return None if v is None else validate_semver(v)


class CommandKind(str, Enum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    CANCEL = "cancel"
    PING = "ping"
    TRUST_UPDATE = "trust_update"
    ACTIVATE = "activate"  # switch a STAGED deploy (rollout activate)
    WINDOWS = "windows"  # set the maintenance windows of a device or group


class DeployBody(_Body):
    url: str = Field(min_length=1, description="http(s):// or file:// of the .jfb bundle")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, description="bundle size in bytes: a hard cap on the download")
    rollout_id: str | None = None
    name: str | None = Field(default=None, description="model name, informative")
    version: str | None = Field(default=None, description="model version, informative")
    stage: bool = Field(
        default=False,
        description="download, build and gate, then wait STAGED (the old engine serving) for "
        "an `activate` command naming this command id; agents before staging ignore it and "
        "activate at once",
    )

    _r = field_validator("rollout_id")(_optional_id("rollout id"))
    _n = field_validator("name")(_optional_id("model name"))
    _v = field_validator("version")(_optional_semver)


class RollbackBody(_Body):
    model: str = Field(min_length=1)
    to_version: str
    rollout_id: str | None = None

    _m = field_validator("model")(lambda cls, v: validate_id(v, "model name"))
    _v = field_validator("to_version")(lambda cls, v: validate_semver(v))
    _r = field_validator("rollout_id")(_optional_id("rollout id"))


class CancelBody(_Body):
    command_id: str

    _c = field_validator("command_id")(lambda cls, v: _uuid(v, "command_id"))


class ActivateBody(_Body):
    command_id: str = Field(description="the STAGED deploy to switch to")

    _c = field_validator("command_id")(lambda cls, v: _uuid(v, "command_id"))


class WindowsBody(_Body):
    windows: list[str] = Field(
        default_factory=list,
        max_length=32,
        description='maintenance windows, e.g. "Mon-Fri 22:00-06:00"; empty: any time',
    )
    timezone: str = Field(default="", max_length=64, description="IANA zone; empty: the device's")
    clear: bool = Field(
        default=False, description="forget windows set by command: agent.toml's apply again"
    )


class PingBody(_Body):
    pass


class TrustUpdateBody(_Body):
    trust_root: dict[str, Any] = Field(description="the new trust root's DSSE envelope")
    chain: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=64,
        description="the trust roots before it (DSSE envelopes, oldest first): a device "
        "walks them one version at a time from the one it holds (TUF)",
    )


CommandBody = Union[
    DeployBody, RollbackBody, CancelBody, PingBody, TrustUpdateBody, ActivateBody, WindowsBody
]
BODY_BY_KIND: dict[CommandKind, type[_Body]] = {
    CommandKind.DEPLOY: DeployBody,
    CommandKind.ROLLBACK: RollbackBody,
    CommandKind.CANCEL: CancelBody,
    CommandKind.PING: PingBody,
    CommandKind.TRUST_UPDATE: TrustUpdateBody,
    CommandKind.ACTIVATE: ActivateBody,
    CommandKind.WINDOWS: WindowsBody,
}


class Command(Document):
    """A controller → device instruction; travels inside an operator-signed DSSE envelope."""

    KIND: ClassVar[str] = "command"

    command_id: str
    issued_at: datetime
    expires_at: datetime
    target: str = Field(description="a device id or group:NAME")
    kind: CommandKind
    body: CommandBody

    _c = field_validator("command_id")(lambda cls, v: _uuid(v, "command_id"))

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _tz(cls, v: datetime) -> datetime:
        return _aware(v)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v.startswith("group:"):
            validate_id(v[6:], "group name")
        else:
            validate_id(v, "device id")
        return v

    @model_validator(mode="before")
    @classmethod
    def _typed_body(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" in data:
            try:
                kind = CommandKind(data["kind"])
            except ValueError as e:
                raise MessageError(f"unknown command kind {data['kind']!r}") from e
            body = data.get("body", {})
            if not isinstance(body, BaseModel):
                data = {**data, "body": BODY_BY_KIND[kind].model_validate(body)}
        return data

    @model_validator(mode="after")
    def _body_matches_kind(self) -> Command:
        if not isinstance(self.body, BODY_BY_KIND[self.kind]):
            raise MessageError(f"{self.kind.value} command has a {type(self.body).__name__}")
        if self.expires_at <= self.issued_at:
            raise MessageError("expires_at must be after issued_at")
        return self

    @property
    def rollout_id(self) -> str | None:
        return getattr(self.body, "rollout_id", None)


class JobState(str, Enum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    BUILDING = "BUILDING"
    VALIDATING = "VALIDATING"
    # A deploy with `stage`: gated, its engine kept, the old one serving, until an
    # `activate` command (or [activation] stage_ttl_s, then CANCELED stage_expired).
    STAGED = "STAGED"
    # Gated and ready, waiting for the robot's moment: a maintenance window (code window)
    # or the busy lock (code busy); the old engine keeps serving.
    ON_HOLD = "ON_HOLD"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    CANCELED = "CANCELED"
    TIMED_OUT = "TIMED_OUT"
    # The busy lock was still held at [activation] busy_timeout_s: the job ends without
    # activating (not a failure of the model; the old engine stays).
    DEFERRED = "DEFERRED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def failed(self) -> bool:
        """Terminal and not a success: counts against a rollout's failure rate."""
        return self in FAILURE_STATES

    def can_move_to(self, new: JobState) -> bool:
        """Whether a job in this state may record `new` next (see TRANSITIONS)."""
        return new in TRANSITIONS[self]


TERMINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.REJECTED,
        JobState.FAILED,
        JobState.ROLLED_BACK,
        JobState.CANCELED,
        JobState.TIMED_OUT,
        JobState.DEFERRED,
    }
)
FAILURE_STATES = frozenset(
    {JobState.REJECTED, JobState.FAILED, JobState.ROLLED_BACK, JobState.TIMED_OUT}
)
# The forward path; a job may leave it for a terminal state at any step.
PIPELINE = (
    JobState.RECEIVED,
    JobState.QUEUED,
    JobState.DOWNLOADING,
    JobState.VERIFYING,
    JobState.BUILDING,
    JobState.VALIDATING,
    JobState.STAGED,  # only for a deploy with `stage`, until its activate command
    JobState.ON_HOLD,  # only while a window or the busy lock holds the switch back
    JobState.ACTIVATING,
    JobState.PROBATION,
    JobState.SUCCEEDED,
)
# Where a job can still stop with its old engine active: a cancel or the job's time
# limit applies here (RECEIVED and QUEUED have not started; the rest are worker steps).
PRE_ACTIVATION_STATES = frozenset(
    {JobState.DOWNLOADING, JobState.VERIFYING, JobState.BUILDING, JobState.VALIDATING}
)
# ON_HOLD: gated, waiting for a window or the busy lock. Cancelable and resumable (a
# restart goes on waiting without building again), but outside the job's time limit: the
# wait has its own bounds (the windows, [activation] busy_timeout_s).
HOLD_STATES = frozenset({JobState.STAGED, JobState.ON_HOLD})
CANCELABLE_STATES = frozenset(
    {JobState.RECEIVED, JobState.QUEUED} | PRE_ACTIVATION_STATES | HOLD_STATES
)
# Every move the agent makes, state by state. A state may repeat: the RECEIVED event is
# written right after the job's row, and a speed run the gate declines to judge adds
# another VALIDATING event. A pre-activation job resumed after a restart starts its steps
# again (a deploy at DOWNLOADING, a rollback at BUILDING), and a rollback skips the steps
# a held version does not need (QUEUED -> BUILDING or ACTIVATING; ACTIVATING ->
# SUCCEEDED without PROBATION). Past ACTIVATING the only way out but success is
# ROLLED_BACK: the previous engine is restored. Terminal states go nowhere. ON_HOLD
# repeats when its reason changes (window, then busy); DEFERRED ends only a hold.
_FROM_PRE_ACTIVATION = (
    PRE_ACTIVATION_STATES | HOLD_STATES | {JobState.ACTIVATING} | TERMINAL_STATES
) - {JobState.DEFERRED}
# A held job goes on (ACTIVATING, or ON_HOLD after STAGED), starts over at DOWNLOADING
# when a restart finds its gated files gone, or ends without switching (SUCCEEDED: the
# version became active meanwhile; REJECTED: a downgrade by now, or a bundle the trust
# root no longer accepts).
_FROM_HOLD = frozenset(
    {JobState.ON_HOLD, JobState.ACTIVATING, JobState.DOWNLOADING, JobState.SUCCEEDED}
    | {JobState.CANCELED, JobState.FAILED, JobState.REJECTED}
)
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # Queued for the worker, or settled at intake: ping, cancel and trust_update commands
    # end here, and so do a deploy a cancel got to first and an intake that crashed.
    JobState.RECEIVED: frozenset(
        {JobState.RECEIVED, JobState.QUEUED, JobState.SUCCEEDED, JobState.REJECTED}
        | {JobState.FAILED, JobState.CANCELED}
    ),
    JobState.QUEUED: frozenset(
        {JobState.DOWNLOADING, JobState.BUILDING, JobState.ACTIVATING}
        | (TERMINAL_STATES - {JobState.ROLLED_BACK, JobState.DEFERRED})
    ),
    JobState.DOWNLOADING: _FROM_PRE_ACTIVATION,
    JobState.VERIFYING: _FROM_PRE_ACTIVATION,
    JobState.BUILDING: _FROM_PRE_ACTIVATION,
    JobState.VALIDATING: _FROM_PRE_ACTIVATION,
    JobState.STAGED: _FROM_HOLD,
    JobState.ON_HOLD: _FROM_HOLD | {JobState.DEFERRED},
    JobState.ACTIVATING: frozenset({JobState.PROBATION, JobState.SUCCEEDED, JobState.ROLLED_BACK}),
    JobState.PROBATION: frozenset({JobState.SUCCEEDED, JobState.ROLLED_BACK}),
    **{state: frozenset() for state in TERMINAL_STATES},
}


class ReasonCode(str, Enum):
    """Machine codes carried next to the human `reason` of a non-success terminal event."""

    MALFORMED = "malformed"
    SCHEMA = "schema"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ROLE = "wrong_role"
    THRESHOLD = "threshold"
    PAYLOAD_TYPE = "payload_type"
    TRUST_ROOT = "trust_root"
    TRUST_EXPIRED = "trust_expired"
    TRUST_VERSION = "trust_version"
    COMMAND_EXPIRED = "command_expired"
    REPLAY = "replay"
    WRONG_TARGET = "wrong_target"
    BUNDLE_INVALID = "bundle_invalid"
    DOWNGRADE = "downgrade"
    UNKNOWN_VERSION = "unknown_version"
    TARGET_MISMATCH = "target_mismatch"
    UNSUPPORTED = "unsupported"
    DOWNLOAD_FAILED = "download_failed"
    DISK_FULL = "disk_full"
    TOO_LARGE = "too_large"
    BUILD_FAILED = "build_failed"
    ACCURACY = "accuracy"
    LATENCY_REGRESSION = "latency_regression"
    LATENCY_BUDGET = "latency_budget"
    THROUGHPUT = "throughput"
    # The speed gate gave no verdict: the device's clocks, power mode or thermal state
    # changed during every measurement (a device condition, not a fault of the model).
    NOT_JUDGED = "not_judged"
    HOOK_FAILED = "hook_failed"
    HEALTH_FAILED = "health_failed"
    PROBATION_LATENCY = "probation_latency"
    GPU_FALLBACK = "gpu_fallback"  # more DLA-build layers on the GPU than the manifest allows
    # The consumer did not acknowledge the new version within [activation] ack_timeout_s.
    NOT_ACKNOWLEDGED = "not_acknowledged"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    # ON_HOLD and DEFERRED (issue 14): outside the device's maintenance windows; the
    # robot's busy lock is held.
    WINDOW = "window"
    BUSY = "busy"
    # Staged activation: an activate naming a job that is not STAGED; a staged version
    # never activated within [activation] stage_ttl_s (CANCELED, its files removed).
    NOT_STAGED = "not_staged"
    BAD_WINDOWS = "bad_windows"  # a windows command whose windows or time zone do not parse
    STAGE_EXPIRED = "stage_expired"
    INTERRUPTED = "interrupted"
    # The device's state.db was corrupt and started fresh: on its own event, and on every
    # command issued before that (the device can no longer tell it from a replay).
    STATE_RESET = "state_reset"
    NOT_CANCELABLE = "not_cancelable"  # a cancel naming an unknown job or one already activating
    # Desired state (releases and pins, issue 13): an older document than one accepted, or
    # one as old with other content; two groups' releases that disagree on a model.
    RELEASE_STALE = "release_stale"
    RELEASE_CONFLICT = "release_conflict"
    INTERNAL = "internal"


# What a person reads of a reason (status, `rollout status`, logs); longer ones are
# summarised and the full text travels in the event's `detail`.
REASON_MAX_CHARS = 400


def bound_reason(reason: str, limit: int = REASON_MAX_CHARS) -> str:
    """`reason` if short enough, else its start and how much was left out."""
    if len(reason) <= limit:
        return reason
    cut = reason[: limit - 40].rsplit(" ", 1)[0] or reason[: limit - 40]
    return f"{cut} … [{len(reason) - len(cut):,} more characters]"


class JobEvent(Document):
    """One step of a job, published QoS 1 on the device's events topic."""

    KIND: ClassVar[str] = "event"

    command_id: str
    rollout_id: str | None = None
    device_id: str
    state: JobState
    seq: int = Field(ge=0, description="per device, strictly increasing across restarts")
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    phase: str | None = Field(
        default=None,
        max_length=200,
        description="BUILDING progress events: the build phase `progress` is of",
    )
    reason: str | None = Field(
        default=None, description=f"for a person, at most {REASON_MAX_CHARS} characters"
    )
    detail: str | None = Field(
        default=None, description="the full reason, when `reason` had to be shortened"
    )
    code: str | None = None
    kind: CommandKind | None = None
    model: str | None = None
    version: str | None = None
    gate: dict[str, Any] | None = Field(default=None, description="gate figures when it ran")
    refused_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="set only on the REJECTED report of a refused message (unverifiable, or a "
        "repeat of a command the device already received): the SHA-256 of the refused bytes. "
        "Such a report is not a state of the job that command_id names; it settles that "
        "command only when it is the refusal of the very bytes the controller sent and its "
        "code is not replay",
    )
    origin: Literal["release", "pin"] | None = Field(
        default=None,
        description="set on the events of a job the device started itself to converge to "
        "its desired state (a group release or a pin), which no operator command names",
    )
    at: datetime = Field(default_factory=utcnow)

    _id = field_validator("device_id")(lambda cls, v: validate_id(v))

    @model_validator(mode="before")
    @classmethod
    def _bound_reason(cls, data: Any) -> Any:
        """Every event, built or received, carries a reason a person can read."""
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            short = bound_reason(data["reason"])
            if short != data["reason"]:
                data = {**data, "reason": short, "detail": data.get("detail") or data["reason"]}
        return data

    @model_validator(mode="after")
    def _reason_on_failure(self) -> JobEvent:
        failed = self.state.terminal and self.state is not JobState.SUCCEEDED
        if failed and not (self.reason and self.code):
            raise MessageError(f"a {self.state.value} event needs a reason and a code")
        if self.refused_sha256 is not None and self.state is not JobState.REJECTED:
            raise MessageError("only a REJECTED event reports a refused message")
        return self

    @property
    def is_refusal(self) -> bool:
        """A report about a refused message rather than a step of a job. Agents before
        refused_sha256 sent a replay refusal as a plain REJECTED [replay], which no job
        of theirs ever ended with either."""
        return self.refused_sha256 is not None or (
            self.state is JobState.REJECTED and self.code == ReasonCode.REPLAY.value
        )


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_model: str | None = None  # e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    jetpack: str | None = None
    l4t: str | None = None  # e.g. "36.3.0"
    tensorrt: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    backend: str | None = None  # engine backend in use: tensorrt | onnxruntime
    backend_version: str | None = None
    # Set when backend = auto runs ONNX Runtime on the CPU because TensorRT cannot run
    # (e.g. pycuda missing): the reason, for the operator to fix.
    backend_fallback: str | None = None


class ModelSlot(BaseModel):
    model_config = ConfigDict(extra="ignore")

    active: str | None = None
    previous: str | None = None


class JobSummary(BaseModel):
    model_config = ConfigDict(extra="ignore")

    command_id: str
    state: JobState
    kind: CommandKind | None = None
    rollout_id: str | None = None
    model: str | None = None
    version: str | None = None
    origin: Literal["release", "pin"] | None = None


class HeldBack(BaseModel):
    """A desired version that failed on this device: not tried again until a newer one."""

    model_config = ConfigDict(extra="ignore")

    version: str
    sha256: str
    code: str
    reason: str


class DesiredSummary(BaseModel):
    """What the device should run (its accepted releases and pins) and where it stands."""

    model_config = ConfigDict(extra="ignore")

    releases: dict[str, int] = Field(
        default_factory=dict, description="group -> version of the release accepted"
    )
    pins_version: int | None = Field(default=None, description="version of the pins accepted")
    models: dict[str, str] = Field(
        default_factory=dict, description="model -> desired version (pin, else the groups')"
    )
    held_back: dict[str, HeldBack] = Field(default_factory=dict)
    conflicts: dict[str, str] = Field(
        default_factory=dict,
        description="model -> why the groups' releases disagree (nothing is changed for it)",
    )
    rollouts: dict[str, str] = Field(
        default_factory=dict,
        description="model -> the rollout whose command it follows over its desired state "
        "(until a newer release or pins document arrives)",
    )


class DeviceFault(BaseModel):
    """Something that keeps the device from taking commands, e.g. `disk_full`."""

    model_config = ConfigDict(extra="ignore")

    code: str
    reason: str
    since: datetime


class WindowsSummary(BaseModel):
    """The maintenance windows a device switches engines in (issue 14)."""

    model_config = ConfigDict(extra="ignore")

    windows: list[str] = Field(default_factory=list, description="empty: any time")
    timezone: str = Field(default="", description="IANA zone; empty: the device's local time")
    source: Literal["config", "command"] = Field(
        default="config", description="agent.toml's, or set by a signed `windows` command"
    )


class DeviceStatus(Document):
    """Retained on the status topic; the MQTT will publishes `online: false`."""

    KIND: ClassVar[str] = "status"

    device_id: str
    online: bool
    agent_version: str | None = None
    groups: list[str] = Field(default_factory=list)
    hardware: HardwareProfile = Field(default_factory=HardwareProfile)
    models: dict[str, ModelSlot] = Field(default_factory=dict)
    job: JobSummary | None = None
    last_seq: int | None = None
    at: datetime = Field(default_factory=utcnow)
    # `keys push` skips devices already at or past the pushed version.
    trust_version: int | None = Field(
        default=None,
        description="version of the trust root the device holds now (null from older agents)",
    )
    fault: DeviceFault | None = Field(
        default=None,
        description="set while the device cannot do its work: code disk_full while its state "
        "database cannot be written (commands then wait, unacknowledged, in the broker)",
    )

    desired: DesiredSummary | None = Field(
        default=None, description="set once the device accepted a release or pins"
    )
    windows: WindowsSummary | None = Field(
        default=None, description="the maintenance windows in force (null from older agents)"
    )

    _id = field_validator("device_id")(lambda cls, v: validate_id(v))


StatusKind = Literal["status"]
