"""The retained device status (docs/protocol.md): what runs here, read from the disk itself.

Active/previous versions come from the `current`/`previous` symlinks, not from memory,
so the status can never disagree with what the robot's runtime loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.activation import ModelStore
from agent.store import JobRecord, Store
from protocol.messages import (
    CommandKind,
    DesiredSummary,
    DeviceFault,
    DeviceStatus,
    HardwareProfile,
    JobState,
    JobSummary,
    WindowsSummary,
)


def job_summary(job: JobRecord | None) -> JobSummary | None:
    if job is None:
        return None
    try:
        kind: CommandKind | None = CommandKind(job.kind)
    except ValueError:
        kind = None
    return JobSummary(
        command_id=job.command_id,
        state=job.state,
        kind=kind,
        rollout_id=job.rollout_id,
        model=job.model,
        version=job.version,
        origin=job.data.get("origin"),
    )


class StatusBuilder:
    def __init__(
        self,
        device_id: str,
        groups: list[str],
        store: Store,
        models: ModelStore,
        *,
        hardware: Callable[[], HardwareProfile] = HardwareProfile,
        current_job: Callable[[], JobRecord | None] = lambda: None,
        trust_version: Callable[[], int | None] = lambda: None,
        fault: Callable[[], DeviceFault | None] = lambda: None,
        desired: Callable[[], DesiredSummary | None] = lambda: None,
        windows: Callable[[], WindowsSummary | None] = lambda: None,
    ) -> None:
        self.device_id = device_id
        self.groups = list(groups)
        self.store = store
        self.models = models
        self._hardware = hardware
        self._current_job = current_job
        self._trust_version = trust_version
        self._fault = fault
        self._desired = desired
        self._windows = windows

    def build(self, *, online: bool = True) -> DeviceStatus:
        job = self._current_job()
        if job is None:
            # A job waiting in the queue (or settled by recovery) is still "in flight"; a
            # STAGED one is parked (it may wait days for its activate), not in flight.
            active = [j for j in self.store.active_jobs() if j.state is not JobState.STAGED]
            job = active[0] if active else None
        return DeviceStatus.new(
            device_id=self.device_id,
            online=online,
            agent_version=__version__,
            groups=self.groups,
            hardware=self._hardware(),
            models=self.models.slots(),
            job=job_summary(job),
            last_seq=self.store.last_seq(),
            trust_version=self._trust_version(),
            fault=self._fault(),
            desired=self._desired(),
            windows=self._windows(),
        )

    def offline(self) -> DeviceStatus:
        """The will: no disk reads that could fail, just who we are."""
        return DeviceStatus.new(
            device_id=self.device_id,
            online=False,
            agent_version=__version__,
            groups=self.groups,
        )

    def local_view(self) -> dict[str, Any]:
        """For `jetfleet-agent status` and the telemetry deployment view."""
        return self.build(online=False).to_dict()
