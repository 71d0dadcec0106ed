"""A running `jetfleet serve` against hostile clients and a hostile bundle directory: a
FIFO planted among the bundles, connections that send nothing or half a request, and
more of them than the server has threads for."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.sandbox.localbroker import free_port
from controller.server.state import read_serve_state

REPO = Path(__file__).resolve().parents[2]
BUNDLE = b"signed bundle bytes" * 100


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    bundles: Path

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))


def start_serve(tmp_path: Path, *args: str) -> Served:
    data = tmp_path / "data"
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "detector-1.0.0.jfb").write_bytes(BUNDLE)
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text(f'bundle_dir = "{bundles}"\n')
    env = {
        **os.environ,
        "JETFLEET_BROKER": "mqtt://127.0.0.1:1",  # --no-ingest: never contacted
        "JETFLEET_DB": str(data / "controller.db"),
        "JETFLEET_CONFIG": str(config),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", "from controller.cli.main import app; app()", "serve",
         "--no-ingest", "--host", "127.0.0.1", "--http-port", str(port), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while read_serve_state(data) is None:
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stderr.read().decode() if proc.stderr else ""
        )
        time.sleep(0.1)
    return Served(proc, port, bundles)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Served]:
    s = start_serve(tmp_path, "--idle-timeout", "1", "--max-connections", "4")
    yield s
    s.proc.send_signal(signal.SIGTERM)
    s.proc.communicate(timeout=30)


@pytest.mark.serial  # asserts a wall-clock bound
def test_a_fifo_in_the_bundle_directory_is_refused_without_hanging(serve: Served) -> None:
    os.mkfifo(serve.bundles / "planted.jfb")
    started = time.monotonic()
    status, _ = serve.get("/bundles/planted.jfb", timeout=5)
    assert status == 404 and time.monotonic() - started < 2
    # No thread is left blocked on it: the real bundle is still served.
    assert serve.get("/bundles/detector-1.0.0.jfb") == (200, BUNDLE)


@pytest.mark.serial  # asserts a wall-clock bound
@pytest.mark.parametrize("sent", [b"", b"GET /bundles/detector-1.0.0.jfb HTTP/1.1\r\nHost: x"])
def test_an_idle_or_half_sent_connection_is_closed_after_the_idle_timeout(
    serve: Served, sent: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", serve.port), timeout=5) as s:
        s.sendall(sent)
        started = time.monotonic()
        try:
            closed = s.recv(1024) == b""
        except TimeoutError:
            closed = False
        assert closed, "the server kept a silent connection open for 5 s"
        assert time.monotonic() - started < 3


def test_connections_beyond_the_limit_get_503_and_threads_stay_bounded(serve: Served) -> None:
    before = serve.threads()
    held = [socket.create_connection(("127.0.0.1", serve.port), timeout=5) for _ in range(30)]
    try:
        for s in held:
            s.sendall(b"GET /bundles/")  # half a request each
        time.sleep(0.3)
        assert serve.threads() <= before + 4
        # The 26 beyond the limit are turned away at once: a 503, or a reset when the
        # refusal crossed the bytes they sent; none is left hanging.
        answers = []
        for s in held[4:]:
            try:
                answers.append(s.recv(64)[:12])
            except ConnectionResetError:
                answers.append(b"reset")
        assert set(answers) <= {b"HTTP/1.1 503", b"reset", b""} and b"HTTP/1.1 503" in answers
    finally:
        for s in held:
            s.close()
    # Once the idle ones time out, ordinary requests are served again.
    time.sleep(1.5)
    assert serve.get("/bundles/detector-1.0.0.jfb") == (200, BUNDLE)
