"""The fleet's state as a command or the console opens it: the registry and rollout store
of the settings' database, the broker options, and a refresh from retained status."""

from __future__ import annotations

from controller.fleet.registry import Registry, sync_from_broker
from controller.mqtt import ControllerMqtt, MqttOptions
from controller.rollouts.store import RolloutStore
from controller.settings import ControllerSettings
from protocol.ids import validate_id
from protocol.topics import Topics


def mqtt_options(s: ControllerSettings, *, client_id: str = "") -> MqttOptions:
    return MqttOptions(
        broker=s.broker, protocol=s.protocol, ca=s.ca, cert=s.cert, key=s.key, client_id=client_id
    )


def open_registry(s: ControllerSettings) -> Registry:
    return Registry.open(s.db_target(), Topics(s.prefix))


def open_store(s: ControllerSettings) -> tuple[RolloutStore, Registry]:
    registry = open_registry(s)
    return RolloutStore(registry.conn, offline=registry.offline_ids), registry


def named_devices(target: str | None) -> list[str]:
    """The device ids a `--target ID[,ID...]` names (none for `all` or `group:G`);
    ProtocolError for an invalid id."""
    if not target or target.strip() == "all" or target.strip().startswith("group:"):
        return []
    return [validate_id(p.strip()) for p in target.split(",") if p.strip()]


def refresh_registry(
    s: ControllerSettings,
    registry: Registry,
    timeout: float = 10.0,
    *,
    target: str | None = None,
) -> int:
    """Pull every retained status from the broker into the registry (MqttError if down,
    TransportConfigError for unusable TLS settings, ProtocolError for an invalid id in
    `target`): the wildcard, then by name the known devices and those `target` names
    that it missed (brokers such as RabbitMQ never send retained messages to wildcards)."""
    device_ids = named_devices(target)
    client = ControllerMqtt(mqtt_options(s))
    with client.connect(timeout=timeout) as m:
        return sync_from_broker(registry, m, timeout=timeout, device_ids=device_ids)
