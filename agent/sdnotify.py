"""systemd's sd_notify protocol, stdlib only (the unit is `Type=notify`, `WatchdogSec=`).

The service manager passes a datagram socket in $NOTIFY_SOCKET: a filesystem path, or an
abstract-namespace name written with a leading '@'. Each message is newline-separated
`KEY=VALUE` lines in one datagram. Notification is advisory: outside systemd (a shell,
a test, a container) it does nothing, and it never raises, because a daemon must not die
because its supervisor went away.
"""

from __future__ import annotations

import os
import socket

__all__ = [
    "SEND_TIMEOUT_S",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

SEND_TIMEOUT_S = 1.0


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value[0] == "@":
        # Abstract namespace: a leading NUL byte, no trailing NUL (man sd_notify).
        return b"\0" + value[1:].encode()
    if value[0] == "/":
        return value
    return None  # vsock:... and relative paths are not used on Jetson targets


def notify(**fields: str) -> bool:
    """Send `KEY=VALUE` lines, e.g. notify(READY="1", STATUS="connected").

    Returns True when the datagram was sent, False when $NOTIFY_SOCKET is unset, malformed,
    the send failed or the receiver took none for SEND_TIMEOUT_S.
    """
    address = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None or not fields:
        return False
    # Values cannot span lines in the protocol; keep a status message on one line.
    lines = [f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()]
    payload = ("\n".join(lines) + "\n").encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram send blocks while the receiver's queue is full (10 datagrams by
            # default) and a signal does not end it (the send is retried): a supervisor that
            # stops reading would otherwise hang the daemon, its SIGTERM included.
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1: startup is finished (systemd moves the unit to 'active')."""
    if status_text is None:
        return notify(READY="1")
    return notify(READY="1", STATUS=status_text)


def status(text: str) -> bool:
    """STATUS=...: the free-form line `systemctl status` shows."""
    return notify(STATUS=text)


def watchdog() -> bool:
    """WATCHDOG=1: the keep-alive; send at least every watchdog_interval() seconds."""
    return notify(WATCHDOG="1")


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: a clean shutdown has begun."""
    if status_text is None:
        return notify(STOPPING="1")
    return notify(STOPPING="1", STATUS=status_text)


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1, in seconds: half of $WATCHDOG_USEC (as sd_watchdog_enabled
    recommends), or None when the watchdog is off or meant for another process
    ($WATCHDOG_PID names a different pid)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return value / 1_000_000 / 2
