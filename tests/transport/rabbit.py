"""A private RabbitMQ node with the MQTT plugin, on free loopback ports, for tests.

Runs the Debian package's `rabbitmq-server` directly (not the /usr/sbin wrapper, which
switches to the `rabbitmq` user, nor systemd), with its own node name, Erlang port mapper
port, distribution port, database, logs, config and enabled-plugins file, so it never
touches a system RabbitMQ and several can run side by side.

Debian bookworm ships RabbitMQ 3.10: MQTT 3.1.1 only (an MQTT 5 CONNECT is refused),
QoS 0 and 1 (a QoS 2 subscription is granted as 1), retained messages kept per node and
delivered only to subscriptions without wildcards. Topic levels map to AMQP routing-key
words on the `amq.topic` exchange (`/` becomes `.`), so a `.` inside a topic level cannot
be told apart from a level separator: device ids with dots must not be used there.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller.sandbox.localbroker import free_port, wait_for_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
PLUGIN_GLOB = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbitmq_mqtt-*"


def rabbitmq_missing() -> str | None:
    """Why RabbitMQ with the MQTT plugin cannot run here, or None if it can."""
    if not Path(RABBITMQ_SERVER).is_file():
        return (
            "RabbitMQ is not installed (apt-get install rabbitmq-server; "
            "JETFLEET_WITH_RABBITMQ=1 bash scripts/setup does it)"
        )
    if not glob.glob(PLUGIN_GLOB):
        return "RabbitMQ is installed without its MQTT plugin (rabbitmq_mqtt)"
    if not shutil.which("epmd") and not glob.glob("/usr/lib/erlang/erts-*/bin/epmd"):
        return "Erlang's epmd is missing (apt-get install erlang-base)"
    return None


@dataclass
class TlsListener:
    port: int
    ca: Path
    cert: Path
    key: Path


@dataclass
class LocalRabbitMQ:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    tls: TlsListener | None = None
    proc: subprocess.Popen[bytes] | None = None
    # A cluster's nodes share one port mapper (they find each other through it) and one
    # Erlang cookie; 0 / "" give this node its own. Only the node that owns the port mapper
    # ends it on stop(), so stopping one node of a cluster leaves the others reachable.
    epmd_port: int = 0
    cookie: str = ""
    owns_epmd: bool = True
    extra_config: tuple[str, ...] = ()  # more rabbitmq.conf lines

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.epmd_port = self.epmd_port or free_port()
        self.dist_port = free_port()
        self.node = f"jetfleet-test-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        assert self.tls is not None
        return f"mqtts://{self.host}:{self.tls.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "rabbitmq.out"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _config(self) -> str:
        lines = [
            "listeners.tcp = none",  # no AMQP listener: this node serves MQTT only
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
            "mqtt.allow_anonymous = true",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "log.console = true",
            "log.console.level = warning",
            "log.file = false",
            *self.extra_config,
        ]
        if self.tls:
            lines += [
                f"mqtt.listeners.ssl.default = {self.host}:{self.tls.port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.cert}",
                f"ssl_options.keyfile = {self.tls.key}",
                # Mutual TLS, as on Mosquitto: no certificate from the fleet CA, no connection.
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
            ]
        return "\n".join(lines) + "\n"

    def env(self) -> dict[str, str]:
        w = self.workdir
        return {
            **os.environ,
            "HOME": str(w),  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

    def start(self, timeout: float = 90.0) -> None:
        if self.proc and self.proc.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.cookie:
            cookie = self.workdir / ".erlang.cookie"  # in $HOME, owner-only or Erlang refuses it
            cookie.unlink(missing_ok=True)
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(self.cookie)
        (self.workdir / "rabbitmq.conf").write_text(self._config())
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [RABBITMQ_SERVER],
            env=self.env(),
            cwd=self.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends the whole node
        )
        out.close()
        try:
            wait_for_port(self.host, self.port, timeout)
            if self.tls:
                wait_for_port(self.host, self.tls.port, 10)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"RabbitMQ did not start: {e}\n{self.log()[-3000:]}") from e

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.proc = None
        if self.owns_epmd:
            self.stop_epmd()

    def stop_epmd(self) -> None:
        # The node started its own epmd (a daemon outside our process group) on our port.
        epmd = shutil.which("epmd") or next(iter(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")), "")
        if epmd:
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
                capture_output=True,
                timeout=10,
                check=False,
            )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self._epmd_listening():
            time.sleep(0.1)

    def _epmd_listening(self) -> bool:
        import socket

        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.epmd_port)) == 0

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl ARGS` against this node; RuntimeError with its output if it fails."""
        env = {
            **self.env(),
            # The CLI is an Erlang node too: give it a free distribution port of its own
            # (its default range, 35672-35682, is shared by every RabbitMQ on the host).
            "RABBITMQ_CTL_DIST_PORT_MIN": str(port := free_port()),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(port),
        }
        r = subprocess.run(
            [RABBITMQCTL, "-n", self.node, *args],
            env=env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    def __enter__(self) -> LocalRabbitMQ:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RabbitCluster:
    """`size` private nodes on this machine joined into one RabbitMQ cluster: each its own
    node name, MQTT and distribution ports and database; one port mapper and one Erlang
    cookie for all. Durable MQTT sessions are quorum queues (`mqtt.durable_queue_type`,
    for new clusters only), replicated on every node, so a session and its queued
    messages outlive the node a client was connected to, as long as a majority of the
    nodes runs: three nodes survive one stopped, two nodes survive none (see
    docs/brokers.md §6)."""

    workdir: Path
    size: int = 3
    nodes: list[LocalRabbitMQ] = field(default_factory=list)

    def start(self) -> RabbitCluster:
        epmd, cookie = free_port(), secrets.token_hex(20)
        conf = ("mqtt.durable_queue_type = quorum",)
        try:
            for i in range(self.size):
                # Ports are picked as each node starts, so that no port picked earlier can
                # be taken meanwhile by a node already running.
                n = LocalRabbitMQ(
                    Path(self.workdir) / f"node{i}", epmd_port=epmd, cookie=cookie,
                    owns_epmd=False, extra_config=conf,
                )  # fmt: skip
                self.nodes.append(n)
                n.start()
            for n in self.nodes[1:]:
                n.ctl("stop_app")
                n.ctl("join_cluster", self.nodes[0].node)
                n.ctl("start_app")
                wait_for_port(n.host, n.port, 60)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if self.nodes:
            self.nodes[0].stop_epmd()

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
