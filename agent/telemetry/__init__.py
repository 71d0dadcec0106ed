"""What each robot reports: system vitals, GPU (tegrastats, Jetson sysfs or NVML) and
its deployments, sampled on its own thread and published QoS 0 (docs/protocol.md, Telemetry)."""

from __future__ import annotations

from agent.telemetry.loop import TelemetryLoop
from agent.telemetry.sampler import TelemetrySampler

__all__ = ["TelemetryLoop", "TelemetrySampler"]
