"""sd_notify against a real AF_UNIX datagram socket, as systemd binds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify


def _receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"jetfleet-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_ready_status_watchdog_stopping_arrive_on_a_path_socket(
    path_socket: socket.socket,
) -> None:
    assert sdnotify.ready("connected to broker")
    assert _receive(path_socket) == {"READY": "1", "STATUS": "connected to broker"}
    assert sdnotify.status("idle, 0 jobs")
    assert _receive(path_socket) == {"STATUS": "idle, 0 jobs"}
    assert sdnotify.watchdog()
    assert _receive(path_socket) == {"WATCHDOG": "1"}
    assert sdnotify.stopping()
    assert _receive(path_socket) == {"STOPPING": "1"}


def test_abstract_namespace_socket_written_with_at_sign_is_reached(
    abstract_socket: socket.socket,
) -> None:
    assert sdnotify.notify(READY="1")
    assert _receive(abstract_socket) == {"READY": "1"}


def test_a_multiline_status_is_sent_as_one_line(path_socket: socket.socket) -> None:
    assert sdnotify.status("building engine\nstep 2")
    assert _receive(path_socket) == {"STATUS": "building engine step 2"}


def test_without_notify_socket_every_call_is_a_quiet_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False
    assert sdnotify.notify(STATUS="x") is False


def test_a_vanished_or_bogus_socket_returns_false_instead_of_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/name")
    assert sdnotify.ready() is False
    # A stream socket where a datagram socket is expected: the send fails, no exception.
    stream_path = tmp_path / "stream.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(str(stream_path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(stream_path))
        assert sdnotify.watchdog() is False


def test_a_supervisor_that_stops_reading_cannot_hang_the_daemon(
    path_socket: socket.socket,
) -> None:
    sent = 0
    started = time.monotonic()
    while sdnotify.watchdog():  # fills the receiver's queue, which is never read
        sent += 1
        assert sent < 100_000
    blocked = time.monotonic() - started
    assert sent >= 1
    assert blocked < sdnotify.SEND_TIMEOUT_S + 2.0
    assert _receive(path_socket) == {"WATCHDOG": "1"}  # what was queued is intact
    assert sdnotify.stopping()  # and there is room again once the receiver reads


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # WatchdogSec=30: ping every 15 s
        ("30000000", "self", 15.0),
        ("30000000", "1", None),  # meant for another process
        ("0", None, None),
        ("", None, None),
        ("abc", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert sdnotify.watchdog_interval() == expected


def test_a_child_process_reaches_the_socket_it_inherits_through_the_environment(
    path_socket: socket.socket,
) -> None:
    code = "from agent import sdnotify; import sys; sys.exit(0 if sdnotify.ready('child') else 1)"
    env = {**os.environ}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=30)
    assert done.returncode == 0
    assert _receive(path_socket) == {"READY": "1", "STATUS": "child"}
