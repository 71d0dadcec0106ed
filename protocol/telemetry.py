"""The telemetry sample a device publishes QoS 0 every `telemetry.interval_s` (docs/protocol.md).

Units are in the field names' spirit: bytes for memory and disk, percent (0-100) for
loads, °C for temperatures, mW for power rails, milliseconds for inference latency.
`gpu` is null (present, not omitted) on a device with no GPU source, so a consumer can
tell "no GPU" from "an old agent that did not report one".
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.errors import MessageError
from protocol.ids import validate_id
from protocol.schema import Document

GpuSource = Literal["tegrastats", "sysfs", "nvml"]


class _Part(BaseModel):
    # NaN and infinity are not JSON; a sensor that reads them reports nothing instead.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class CpuStats(_Part):
    percent: list[float] = Field(default_factory=list, description="per core, 0-100")
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0

    @property
    def mean_percent(self) -> float | None:
        return sum(self.percent) / len(self.percent) if self.percent else None


class MemStats(_Part):
    total: int = Field(ge=0, description="bytes")
    used: int = Field(ge=0)
    available: int = Field(ge=0)
    swap_used: int = Field(default=0, ge=0)


class GpuStats(_Part):
    source: GpuSource
    name: str | None = None
    load_pct: float | None = Field(default=None, ge=0, le=100)
    freq_mhz: float | None = Field(default=None, ge=0)
    emc_pct: float | None = Field(default=None, ge=0, le=100)
    emc_freq_mhz: float | None = Field(default=None, ge=0)
    mem_used: int | None = Field(default=None, ge=0, description="bytes")
    mem_total: int | None = Field(default=None, ge=0, description="bytes")
    power_mw: dict[str, float] = Field(
        default_factory=dict, description="instantaneous mW per rail, e.g. VDD_IN"
    )
    nvpmodel: str | None = None
    temp_c: float | None = None

    @property
    def input_power_mw(self) -> float | None:
        """The board's total draw: the input rail when known, else the sum of the rails."""
        for rail in ("VDD_IN", "POM_5V_IN", "board"):
            if rail in self.power_mw:
                return self.power_mw[rail]
        return sum(self.power_mw.values()) if self.power_mw else None


class MetricStats(_Part):
    """One service-recorded metric over the telemetry interval (since the last sample).

    A counter carries `sum`; a gauge carries `last`, `mean`, `min` and `max`. `n` is how
    many times the service recorded it in the interval."""

    kind: Literal["counter", "gauge"]
    n: int = Field(ge=0, description="records in the interval")
    sum: float | None = Field(default=None, description="counter: total of the increments")
    last: float | None = Field(default=None, description="gauge: the latest value")
    mean: float | None = None
    min: float | None = None
    max: float | None = None


class VersionMetrics(_Part):
    """What the robot's service reported about one version of a model in the interval."""

    metrics: dict[str, MetricStats] = Field(default_factory=dict, description="name -> stats")
    errors: int = Field(default=0, ge=0, description="inferences that raised")
    dropped: int = Field(
        default=0, ge=0, description="records refused: past a bound on names, a bad name or value"
    )


class ModelStats(_Part):
    version: str | None = None
    p50_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    count: int = Field(default=0, ge=0, description="inferences in the live window")
    metrics: dict[str, VersionMetrics] = Field(
        default_factory=dict,
        description="version -> the service's own metrics since the previous sample",
    )


class JobCounts(_Part):
    done: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    refused: int | None = Field(
        default=None, ge=0, description="messages refused since start (unverifiable, replays)"
    )
    refused_unreported: int | None = Field(
        default=None,
        ge=0,
        description="of those, refused without an event: past the agent's refusal budget",
    )


class TelemetrySample(Document):
    """One device's vital signs at `at`; published on `.../devices/{id}/telemetry`."""

    KIND: ClassVar[str] = "telemetry"
    model_config = ConfigDict(allow_inf_nan=False)

    device_id: str
    at: datetime
    uptime_s: float = Field(ge=0, description="agent uptime")
    cpu: CpuStats = Field(default_factory=CpuStats)
    mem: MemStats | None = None
    disk_free_bytes: int | None = Field(default=None, ge=0, description="of the data dir")
    temps: dict[str, float] = Field(default_factory=dict, description="sensor -> °C")
    gpu: GpuStats | None = None
    models: dict[str, ModelStats] = Field(default_factory=dict)
    jobs: JobCounts = Field(default_factory=JobCounts)

    _id = field_validator("device_id")(lambda cls, v: validate_id(v))

    @field_validator("at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise MessageError("telemetry 'at' must carry a timezone (RFC 3339 with Z)")
        return v

    def encode(self) -> bytes:
        """Compact JSON; `gpu` stays as an explicit null when there is no GPU."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.gpu is None:
            data["gpu"] = None
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
