"""Agent configuration: `agent.toml`, every key overridable by environment (docs/agent.md).

Environment variables are `JETFLEET_AGENT_` + the key path in upper case joined by `__`
(`JETFLEET_AGENT_BROKER__URL`), and win over the file. Unknown keys in the file are
refused so that a typo (`[activaton]`) is reported instead of silently ignored.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from protocol.errors import CodedError, ProtocolError
from protocol.ids import validate_id
from protocol.topics import DEFAULT_PREFIX
from protocol.transport import TransportConfigError, parse_broker_urls

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/jetfleet/agent.toml")
ENV_PREFIX = "JETFLEET_AGENT_"


class ConfigError(CodedError, ValueError):
    """A config the agent cannot run with; the message names the key and the reason."""

    code = "config"

    def __init__(self, reason: str, *, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Section):
    # One URL, or a cluster's nodes comma-separated, tried in order (docs/brokers.md §6).
    url: str = "mqtt://127.0.0.1:1883"
    protocol: str = "5"
    ca: str = ""
    cert: str = ""
    key: str = ""
    username: str = ""
    password: str = ""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # How long the broker keeps the session (and queued commands) while we are away.
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # systemd READY=1 is sent on the first connection, or after this long without one
    # (kept well under the unit's TimeoutStartSec).
    ready_without_broker_s: float = Field(default=60.0, ge=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> str:
        text = str(v).strip()
        if text in ("5", "5.0"):
            return "5"
        if text in ("3.1.1", "311", "4"):
            return "3.1.1"
        raise ValueError(f"must be 5 or 3.1.1, not {v!r}")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            parse_broker_urls(v)
        except TransportConfigError as e:
            raise ValueError(e.reason) from e
        return v


class ActivationConfig(_Section):
    hook: str = ""
    health: str = ""
    hook_timeout_s: float = Field(default=120.0, gt=0)
    health_timeout_s: float = Field(default=10.0, gt=0)
    health_interval_s: float = Field(default=2.0, gt=0)
    # The consumer contract (docs/integration.md): after a switch, wait this long for the
    # consumer to acknowledge the new version, else roll back; 0 waits for nothing.
    ack_timeout_s: float = Field(default=0.0, ge=0)
    # Models whose consumer acknowledges (empty: every model).
    ack_models: list[str] = Field(default_factory=list)
    # Where consumers write <model>.json (empty: data_dir/ack); bind-mount it read-write.
    ack_dir: str = ""
    # Robot-aware activation (agent/windows.py, agent/busy.py): a gated job switches only
    # inside a window ("Mon-Fri 22:00-06:00"; none: always) in `timezone` (empty: the
    # device's), and only while no one holds the busy lock (empty: data_dir/run/busy.lock).
    windows: list[str] = Field(default_factory=list)
    timezone: str = ""
    busy_lock: str = ""
    # How long a job waits for the busy lock inside an open window; then `defer` ends it
    # DEFERRED (the old engine stays) or `activate` switches anyway.
    busy_timeout_s: float = Field(default=3600.0, gt=0)
    busy_timeout_action: Literal["defer", "activate"] = "defer"
    # A staged version (deploy with `stage`) never activated is canceled after this long
    # (code stage_expired) and its bundle removed.
    stage_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)

    @model_validator(mode="after")
    def _windows(self) -> ActivationConfig:
        from agent.windows import WindowError, Windows

        try:
            Windows(self.windows, self.timezone)
        except WindowError as e:
            raise ValueError(e.reason) from e
        return self


class TelemetryConfig(_Section):
    interval_s: float = Field(default=5.0, gt=0)


class LimitsConfig(_Section):
    max_bundle_mb: int = Field(default=4096, gt=0)
    min_free_disk_mb: int = Field(default=256, ge=0)
    engine_cache_mb: int = Field(default=8192, gt=0)
    # From receipt to activation (download + build + gate); TensorRT builds of large
    # models take tens of minutes on an Orin Nano.
    job_timeout_s: float = Field(default=4 * 3600.0, gt=0)
    # A worker that makes no progress this long (plus the longest wait a step may take:
    # the hook and health timeouts, one download read) stops the systemd watchdog pings.
    worker_stall_s: float = Field(default=300.0, gt=0)
    # The engine child's memory cap (RLIMIT_DATA); 0: half of this device's RAM.
    engine_memory_mb: int = Field(default=0, ge=0)
    # What a bundle's golden arrays may decode to, checked from the npy headers.
    max_golden_mb: int = Field(default=256, gt=0)


class DownloadConfig(_Section):
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    retries: int = Field(default=3, ge=0)
    # Fewer bytes than this per second over a whole window fails the attempt (a server
    # that trickles data never trips read_timeout_s); 0 turns the check off.
    min_rate_bytes_s: int = Field(default=1024, ge=0)
    min_rate_window_s: float = Field(default=60.0, gt=0)


class GateConfig(_Section):
    """The speed gate's measurement rules on the device (the thresholds come from the
    bundle's manifest)."""

    # A speed run during which the power mode, clocks or thermal state moved is not
    # judged; it is repeated after `retry_wait_s`, at most `speed_attempts` runs in all.
    speed_attempts: int = Field(default=3, ge=1, le=10)
    retry_wait_s: float = Field(default=30.0, ge=0, le=600)
    max_temp_rise_c: float = Field(default=10.0, gt=0)
    # Where the Jetson's own files are read (sys/, etc/nvpmodel.conf, var/lib/nvpmodel,
    # etc/nv_tegra_release): `/` on a robot; tests point it at a recorded tree.
    sysfs_root: Path = Path("/")


class EngineConfig(_Section):
    """Where the engine child runs: on the host (its TensorRT), or in the consumer's image
    so that the TensorRT that loads the engine builds and gates it (integration.md)."""

    builder: Literal["host", "container"] = "host"
    image: str = ""
    runtime: Literal["docker", "podman"] = "docker"
    # GPU flags for `run`; None: docker --runtime nvidia, podman --device nvidia.com/gpu=all.
    gpu_args: list[str] | None = None
    run_args: list[str] = Field(default_factory=list)
    python: str = "python3"
    # The host directory with agent/ and protocol/ (mounted read-only); empty: this agent's.
    code_dir: str = ""

    @model_validator(mode="after")
    def _image(self) -> EngineConfig:
        if self.builder == "container" and not self.image.strip():
            raise ValueError('builder = "container" needs an image')
        return self


class DesiredConfig(_Section):
    """Convergence to the signed desired state (group releases and pins)."""

    # Convergence starts a random 0..jitter_s seconds after the agent starts or a release
    # or pin document changes: a fleet back from a power cut does not download at once.
    jitter_s: float = Field(default=30.0, ge=0, le=3600)


class AgentConfig(BaseSettings):
    """The keys of docs/agent.md exactly, plus optional sections with defaults (limits, ...)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    device_id: str
    groups: list[str] = Field(default_factory=list)
    data_dir: Path = Path("/var/lib/jetfleet")
    trust_root: Path = Path("/etc/jetfleet/trust.json")
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    # With backend = auto, may a device whose TensorRT cannot run (no pycuda, TensorRT
    # too old, no GPU) build and run engines with ONNX Runtime on the CPU (10-50x slower)?
    allow_cpu_fallback: bool = True
    topic_prefix: str = DEFAULT_PREFIX
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    activation: ActivationConfig = Field(default_factory=ActivationConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    desired: DesiredConfig = Field(default_factory=DesiredConfig)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        validate_id(v)
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for g in v:
            validate_id(g, "group name")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; the environment must win over them.
        return (env_settings, init_settings)

    @property
    def ack_dir(self) -> Path:
        return Path(self.activation.ack_dir or Path(self.data_dir) / "ack")

    def wants_ack(self, model: str) -> bool:
        a = self.activation
        return a.ack_timeout_s > 0 and (not a.ack_models or model in a.ack_models)

    @property
    def busy_lock(self) -> Path:
        return Path(self.activation.busy_lock or Path(self.data_dir) / "run" / "busy.lock")

    @property
    def max_bundle_bytes(self) -> int:
        return self.limits.max_bundle_mb * 1024 * 1024

    @property
    def engine_memory_bytes(self) -> int:
        if self.limits.engine_memory_mb:
            return self.limits.engine_memory_mb * 2**20
        # Jetsons share this RAM with the GPU and the robot's own processes.
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _key_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int)) or "config"


def load_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """Read `path` (TOML; None: only the environment), apply `JETFLEET_AGENT_*` overrides.

    Raises ConfigError naming the bad key: `broker.protocol: must be 5 or 3.1.1`.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    data.update(overrides)
    try:
        return AgentConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        key = _key_of(tuple(err["loc"]))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key (check the spelling against docs/agent.md)"
        elif err.get("type") == "missing":
            msg = "required key is missing"
        where = f" in {path}" if path else ""
        raise ConfigError(f"config key {key}{where}: {msg}", key=key) from e
    except ProtocolError as e:  # e.g. InvalidIdError from a validator, already worded
        raise ConfigError(f"config{' ' + str(path) if path else ''}: {e.reason}") from e
