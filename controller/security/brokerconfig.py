"""A Mosquitto 2 configuration and ACL that keep every device in its own lane.

The broker requires a client certificate from the fleet CA and takes the certificate's
common name as the MQTT user name (`use_identity_as_username`), so the ACL can name
devices. What each identity may do (docs/protocol.md, Topics):

- a device reads only `PREFIX/devices/<its id>/cmd` and the cmd topics of its groups, and
  writes only its own `events`, `status` (with the will) and `telemetry`; nothing else;
- a controller identity reads and writes the whole `PREFIX/#` tree.

Mosquitto's `pattern` lines (with `%u`, the user name) express the per-device part for
every device at once; group membership cannot be expressed by a pattern, so each device
with groups gets its own `user` block, generated from a groups file.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from controller.security import pki
from protocol.errors import CodedError, InvalidIdError
from protocol.ids import validate_id
from protocol.topics import DEFAULT_PREFIX

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the controller runs on 3.11+
    import tomli as tomllib

CONF_NAME = "mosquitto.conf"
ACL_NAME = "acl"
RABBITMQ_NAME = "rabbitmq-permissions.sh"
CERTS_DIR = "certs"
DEFAULT_PORT = 8883
DEVICE_WRITE_CHANNELS = ("events", "status", "telemetry")
# A prefix is a plain topic path: no wildcards, no `%` (ACL substitution), no spaces, no
# empty levels, and not a `$` system topic.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class BrokerConfigError(CodedError, ValueError):
    """A groups file, prefix or identity the broker configuration cannot be built from."""

    code = "broker_config"


@dataclass(frozen=True)
class BrokerConfigFiles:
    """What `write_broker_config` wrote; start the broker with `mosquitto -c <config>`."""

    config: Path
    acl: Path
    ca: Path
    cert: Path
    key: Path
    devices_with_groups: int
    rabbitmq: Path  # the same lanes as rabbitmqctl commands, for a RabbitMQ broker

    def as_dict(self) -> dict[str, str | int]:
        return {
            "config": str(self.config),
            "acl": str(self.acl),
            "rabbitmq": str(self.rabbitmq),
            "ca": str(self.ca),
            "cert": str(self.cert),
            "key": str(self.key),
            "devices_with_groups": self.devices_with_groups,
        }


def _checked_id(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except InvalidIdError as e:
        raise BrokerConfigError(str(e)) from e


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise BrokerConfigError(
            f"topic prefix {prefix!r} must be plain topic levels like 'jetfleet/v1' "
            "(letters, digits, . _ -; no wildcards, no leading or trailing '/')"
        )
    return prefix


def load_groups_file(path: Path) -> dict[str, list[str]]:
    """Read `devices.toml`: a `[devices]` table mapping each device id to its groups,

        [devices]
        robot-0042 = ["warehouse-a", "canary"]

    (the same groups as each device's agent.toml `groups`)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise BrokerConfigError(f"groups file {path}: cannot read it ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise BrokerConfigError(f"groups file {path}: not valid TOML ({e})") from e
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise BrokerConfigError(
            f"groups file {path}: needs a [devices] table mapping device id -> list of groups"
        )
    result: dict[str, list[str]] = {}
    for device, groups in devices.items():
        try:
            validate_id(device, "device id")
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise BrokerConfigError(
                    f"groups file {path}: device {device!r}: groups must be a list of names"
                )
            result[device] = sorted({validate_id(g, "group name") for g in groups})
        except InvalidIdError as e:
            raise BrokerConfigError(f"groups file {path}: {e}") from e
    return result


def render_acl(
    *,
    prefix: str = DEFAULT_PREFIX,
    controllers: Sequence[str] = (pki.DEFAULT_CONTROLLER,),
    device_groups: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The Mosquitto `acl_file` text. Anything it does not grant is denied."""
    prefix = validate_prefix(prefix)
    device_groups = device_groups or {}
    if not controllers:
        raise BrokerConfigError("at least one controller identity is needed")
    for c in controllers:
        _checked_id(c, "controller name")
        if c in device_groups:
            raise BrokerConfigError(
                f"{c!r} is both a controller and a device in the groups file: the broker "
                "knows clients only by name, so a device would get the controller's rights"
            )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"# Generated by `jetfleet broker config` at {stamp}; regenerate rather than edit,",
        "# then reload the broker (SIGHUP) to apply. Clients are known by their certificate's",
        "# common name (use_identity_as_username). Anything not granted here is denied.",
        "",
        "# Controllers: the whole tree (commands out; events, status, telemetry in).",
    ]
    for c in sorted(set(controllers)):
        lines += [f"user {c}", f"topic readwrite {prefix}/#", ""]
    if device_groups:
        lines.append("# Group command topics, per device (a pattern cannot express membership).")
        for device in sorted(device_groups):
            groups = device_groups[device]
            if not groups:
                continue
            lines.append(f"user {device}")
            lines += [f"topic read {prefix}/groups/{g}/cmd" for g in groups]
            lines.append("")
    lines += [
        "# Every device, by its own name: its commands in; its events, status, telemetry out.",
        f"pattern read {prefix}/devices/%u/cmd",
        *(f"pattern write {prefix}/devices/%u/{ch}" for ch in DEVICE_WRITE_CHANNELS),
        "",
    ]
    return "\n".join(lines)


def _listener(
    port: int,
    bind: str,
    ca: Path,
    cert: Path,
    key: Path,
    *,
    pin_client_ids: bool,
    crl: Path | None = None,
) -> list[str]:
    return [
        f"listener {port} {bind}".rstrip(),
        "protocol mqtt",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        # Revoked certificates (`jetfleet pki revoke`) are refused at the handshake.
        *([f"crlfile {crl}"] if crl else []),
        "tls_version tlsv1.2",
        # A client must present a certificate signed by the fleet CA; its common name is
        # its user name, which the ACL is written against.
        "require_certificate true",
        "use_identity_as_username true",
        # The client id becomes the certificate's name: a device can then neither kick
        # another device off nor take over (and drain) its persistent session.
        *(["use_username_as_clientid true"] if pin_client_ids else []),
    ]


def render_mosquitto_conf(
    *,
    port: int,
    bind: str,
    ca: Path,
    cert: Path,
    key: Path,
    acl: Path,
    data_dir: Path | None,
    run_as: str | None = None,
    log_denials: bool = False,
    controller_port: int | None = None,
    controller_bind: str = "",
    crl: Path | None = None,
) -> str:
    """Without `controller_port`: one listener for everyone, client ids as clients send
    them. With it: the devices' listener pins each client id to the certificate's name,
    and controllers (several processes under one identity, persistent sessions per
    rollout) connect to their own listener, which should be reachable from the operations
    network only (`controller_bind`)."""
    listeners = ["", "# Devices (and, without a controllers' listener, controllers)."]
    listeners += _listener(
        port, bind, ca, cert, key, pin_client_ids=controller_port is not None, crl=crl
    )
    if controller_port is not None:
        listeners += ["", "# Controllers: keep this port off the devices' network."]
        listeners += _listener(
            controller_port, controller_bind, ca, cert, key, pin_client_ids=False, crl=crl
        )
    lines = [
        "# Generated by `jetfleet broker config`: mutual TLS with the fleet CA, per-device ACL.",
        "per_listener_settings false",
        *([f"user {run_as}"] if run_as else []),
        "allow_anonymous false",
        f"acl_file {acl}",
        # Persistent sessions: commands published while a robot is offline wait for it.
        *(["persistence true", f"persistence_location {data_dir}/"] if data_dir else []),
        # Mosquitto drops QoS 1 messages for a connected client beyond this queue once its
        # in-flight window is full (default 1000): a rollout wave of a large fleet sends the
        # controller's single subscription bursts of events far larger than that.
        "max_queued_messages 100000",
        # Without it, the broker's small writes after the TLS handshake wait on the
        # client's delayed ACK: ~40 ms added to every TLS connect (bench/tls_overhead.py).
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        # Mosquitto logs each "Denied PUBLISH/SUBSCRIBE" at debug level only: a device
        # hitting the ACL is worth seeing (misconfiguration or a compromised robot), but
        # debug is verbose on a busy broker.
        *(["log_type debug"] if log_denials else []),
        "connection_messages true",
        *listeners,
        "",
    ]
    return "\n".join(lines)


def write_broker_config(
    out: Path,
    pki_dir: Path,
    *,
    port: int = DEFAULT_PORT,
    bind: str = "",
    prefix: str = DEFAULT_PREFIX,
    controllers: Sequence[str] = (pki.DEFAULT_CONTROLLER,),
    groups_file: Path | None = None,
    server_name: str = pki.DEFAULT_SERVER,
    install_dir: Path | None = None,
    data_dir: Path | None = Path("/var/lib/mosquitto"),
    run_as: str | None = None,
    log_denials: bool = False,
    controller_port: int | None = None,
    controller_bind: str = "",
) -> BrokerConfigFiles:
    """Write OUT/mosquitto.conf, OUT/acl and OUT/certs/{ca.crt,server.crt,server.key}.

    `install_dir` is where OUT will live on the broker host (the config names files by
    absolute path); it defaults to OUT itself."""
    for p in (port, controller_port):
        if p is not None and not 0 < p < 65536:
            raise BrokerConfigError(f"port {p} is not a TCP port")
    if controller_port == port:
        raise BrokerConfigError("the controllers' port must differ from the devices' port")
    pki_dir, out = Path(pki_dir), Path(out)
    for c in controllers:
        _checked_id(c, "controller name")
        role = pki.role_of(pki_dir, c)
        if role is not None and role is not pki.Role.CONTROLLER:
            raise BrokerConfigError(
                f"{c!r} was issued to a {role.value}, not a controller: giving it the "
                "controller's rights would let that client command the whole fleet"
            )
    device_groups = load_groups_file(groups_file) if groups_file else {}
    for device in device_groups:
        role = pki.role_of(pki_dir, device)
        if role is not None and role is not pki.Role.DEVICE:
            raise BrokerConfigError(f"groups file names {device!r}, which is a {role.value}")
    acl_text = render_acl(prefix=prefix, controllers=controllers, device_groups=device_groups)

    server_cert, server_key = pki.server_cert_paths(pki_dir, server_name)
    if not server_cert.is_file() or not server_key.is_file():
        raise BrokerConfigError(
            f"no broker certificate {server_cert}: run `jetfleet pki issue-server --pki "
            f"{pki_dir} --host <broker host>` first"
        )
    try:
        pki.verify_issued(pki_dir, server_cert)
    except pki.PkiError as e:
        raise BrokerConfigError(str(e)) from e

    certs = out / CERTS_DIR
    pki.copy_public(pki_dir / pki.CA_CERT, certs / "ca.crt")
    pki.copy_public(server_cert, certs / "server.crt")
    pki.copy_private(server_key, certs / "server.key")
    has_crl = (pki_dir / pki.CRL).is_file()
    if has_crl:
        pki.copy_public(pki_dir / pki.CRL, certs / "crl.pem")
    pki.write_public(out / ACL_NAME, acl_text.encode())
    where = Path(install_dir) if install_dir else out.resolve()
    conf = render_mosquitto_conf(
        port=port,
        bind=bind,
        ca=where / CERTS_DIR / "ca.crt",
        cert=where / CERTS_DIR / "server.crt",
        key=where / CERTS_DIR / "server.key",
        acl=where / ACL_NAME,
        data_dir=data_dir,
        run_as=run_as,
        log_denials=log_denials,
        controller_port=controller_port,
        controller_bind=controller_bind,
        crl=where / CERTS_DIR / "crl.pem" if has_crl else None,
    )
    pki.write_public(out / CONF_NAME, conf.encode())
    rabbit = render_rabbitmq_permissions(
        prefix=prefix, controllers=controllers, device_groups=device_groups
    )
    pki.write_public(out / RABBITMQ_NAME, rabbit.encode())
    return BrokerConfigFiles(
        config=out / CONF_NAME,
        acl=out / ACL_NAME,
        ca=certs / "ca.crt",
        cert=certs / "server.crt",
        key=certs / "server.key",
        devices_with_groups=sum(1 for g in device_groups.values() if g),
        rabbitmq=out / RABBITMQ_NAME,
    )


# -- RabbitMQ (MQTT plugin): the same lanes as users' permissions -----------------------


def _routing_key_re(prefix: str) -> str:
    """`jetfleet/v1` as the start of an AMQP routing-key regex: RabbitMQ's MQTT plugin maps
    topic levels to routing-key words on `amq.topic` (`/` becomes `.`)."""
    return re.escape(prefix.replace("/", "."))


def rabbitmq_permission_commands(
    *,
    prefix: str = DEFAULT_PREFIX,
    controllers: Sequence[str] = (pki.DEFAULT_CONTROLLER,),
    device_groups: Mapping[str, Sequence[str]],
    vhost: str = "/",
) -> list[list[str]]:
    """`rabbitmqctl` argument lists that give each identity the rights `render_acl` gives
    it on Mosquitto. A device may declare, bind and read only its own session queues
    (`mqtt-subscription-<its id>qos0|1`, its client id being its name) and write to
    `amq.topic`; its topic permissions allow reading its own and its groups' command
    routing keys and writing its own events, status and telemetry. RabbitMQ needs one
    user per device (`add_user`, then `clear_password` for certificate login) and applies
    these to users that exist; every device of the fleet must be listed."""
    prefix = validate_prefix(prefix)
    rk = _routing_key_re(prefix)
    cmds: list[list[str]] = []
    for c in sorted(set(controllers)):
        _checked_id(c, "controller name")
        if c in device_groups:
            raise BrokerConfigError(f"{c!r} is both a controller and a device in the groups file")
        cmds.append(["set_permissions", "-p", vhost, c, ".*", ".*", ".*"])
        cmds.append(
            ["set_topic_permissions", "-p", vhost, c, "amq.topic", f"^{rk}\\..*", f"^{rk}\\..*"]
        )
    for device in sorted(device_groups):
        _checked_id(device, "device id")
        if "." in device:
            raise BrokerConfigError(
                f"device id {device!r} has a '.', which RabbitMQ reads as a topic level separator"
            )
        queues = f"mqtt-subscription-{re.escape(device)}qos[01]"
        both = f"^({queues}|amq\\.topic)$"
        cmds.append(["set_permissions", "-p", vhost, device, f"^{queues}$", both, both])
        me = f"{rk}\\.devices\\.{re.escape(device)}"
        groups = [re.escape(g) for g in device_groups[device]]
        read = (
            f"^({me}\\.cmd"
            + (f"|{rk}\\.groups\\.({'|'.join(groups)})\\.cmd" if groups else "")
            + ")$"
        )
        write = f"^{me}\\.({'|'.join(DEVICE_WRITE_CHANNELS)})$"
        cmds.append(["set_topic_permissions", "-p", vhost, device, "amq.topic", write, read])
    return cmds


def render_rabbitmq_permissions(
    *,
    prefix: str = DEFAULT_PREFIX,
    controllers: Sequence[str] = (pki.DEFAULT_CONTROLLER,),
    device_groups: Mapping[str, Sequence[str]],
    vhost: str = "/",
) -> str:
    """`rabbitmq_permission_commands` as a shell script (one `rabbitmqctl` line each)."""
    cmds = rabbitmq_permission_commands(
        prefix=prefix, controllers=controllers, device_groups=device_groups, vhost=vhost
    )
    lines = [
        "#!/bin/sh",
        "# Generated by jetfleet: per-device RabbitMQ permissions (docs/brokers.md §3).",
        "# Create one user per device first (rabbitmqctl add_user ID ...; clear_password ID).",
        "set -e",
        *(shlex.join(["rabbitmqctl", *c]) for c in cmds),
    ]
    return "\n".join(lines) + "\n"
