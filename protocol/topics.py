"""The MQTT topic tree of SPEC §2, built and parsed in one place."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import MessageError
from protocol.ids import validate_id

DEFAULT_PREFIX = "jetfleet/v1"
DEVICE_CHANNELS = ("cmd", "events", "status", "telemetry")


@dataclass(frozen=True)
class ParsedTopic:
    scope: str  # "devices" or "groups"
    name: str  # device id or group name
    channel: str  # cmd | events | status | telemetry


@dataclass(frozen=True)
class Topics:
    """Topic names under a configurable prefix (default `jetfleet/v1`)."""

    prefix: str = DEFAULT_PREFIX

    def device_cmd(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id)}/cmd"

    def group_cmd(self, group: str) -> str:
        return f"{self.prefix}/groups/{validate_id(group, 'group name')}/cmd"

    def events(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id)}/events"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id)}/status"

    def telemetry(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{validate_id(device_id)}/telemetry"

    def group_release(self, group: str) -> str:
        """The group's release (retained, operator-signed): its desired state."""
        return f"{self.prefix}/groups/{validate_id(group, 'group name')}/release"

    def device_pins(self, device_id: str) -> str:
        """The device's pins (retained, operator-signed): per-model overrides."""
        return f"{self.prefix}/devices/{validate_id(device_id)}/pins"

    # Wildcard subscriptions used by the controller.
    def all_events(self) -> str:
        return f"{self.prefix}/devices/+/events"

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/devices/+/telemetry"

    def shared_telemetry(self, share_group: str) -> str:
        """MQTT 5 shared subscription so several ingesters split the telemetry stream."""
        return f"$share/{validate_id(share_group, 'share group')}/{self.all_telemetry()}"

    def command_topic_for_target(self, target: str) -> str:
        """`group:NAME` goes to the group topic, anything else is a device id."""
        if target.startswith("group:"):
            return self.group_cmd(target[len("group:") :])
        return self.device_cmd(target)

    def parse(self, topic: str) -> ParsedTopic:
        """Split a concrete topic into scope, name and channel; MessageError if it is not ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise MessageError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 3 or parts[0] not in ("devices", "groups"):
            raise MessageError(f"topic {topic!r} is not a jetfleet device or group topic")
        scope, name, channel = parts
        if scope == "groups" and channel != "cmd":
            raise MessageError(f"topic {topic!r}: groups only have a cmd channel")
        if channel not in DEVICE_CHANNELS:
            raise MessageError(f"topic {topic!r}: unknown channel {channel!r}")
        validate_id(name, "device id" if scope == "devices" else "group name")
        return ParsedTopic(scope, name, channel)
