"""A private Mosquitto broker on a free loopback port, for the demo, tests and benchmarks.

Uses the real `mosquitto` binary (Debian package `mosquitto`). Persistence is on, so a
stop/start keeps persistent sessions and their queued QoS 1 messages, as a production
broker would across a restart.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from protocol.errors import CodedError

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(CodedError, RuntimeError):
    """The local Mosquitto could not be found, configured or started."""

    code = "local_broker"


def find_mosquitto() -> str:
    for c in MOSQUITTO_CANDIDATES:
        path = shutil.which(c) or (c if Path(c).is_file() else None)
        if path:
            return path
    raise BrokerError("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class LocalMosquitto:
    """`with LocalMosquitto(workdir) as b: b.url` — stop() and start() keep the same port."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_config: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def write_config(self) -> None:
        persist = self.workdir / "persist"
        persist.mkdir(exist_ok=True)
        lines = [
            # Run as whoever started us: as root, mosquitto would otherwise switch to the
            # `mosquitto` user and fail to write our persistence directory.
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {persist}/",
            # Queue generously for offline persistent sessions (tests send bursts).
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if self.extra_config:
            lines = [f"listener {self.port} {self.host}", self.extra_config]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            return
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, timeout)
        except BrokerError as e:
            self.stop()
            raise BrokerError(f"{e}; mosquitto log:\n{self.log_path.read_text()[-2000:]}") from e

    def wait(self) -> int | None:
        """Until mosquitto exits; its exit status."""
        proc = self.proc
        return proc.wait() if proc is not None else None

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file (sessions, queued messages) first."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
