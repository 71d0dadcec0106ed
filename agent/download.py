"""Fetching a bundle: http(s):// with Range resume, or file://; hashed while streaming.

The size the signed command declares is a hard cap (no endless data), itself capped by
the config's max bundle size; the disk must have that much room plus a reserve before a
byte is written. A partial download stays in downloads/<sha256>.part so a retry or an
agent restart resumes where it stopped.

A peer cannot hold the download: a guard thread watches every HTTP transfer and shuts
its socket down (which wakes the blocked read at once) when the job is canceled or past
its deadline (the `canceled` callback says so), or when less than `min_rate_bytes_s`
arrived over the last `min_rate_window_s` (a server that trickles a byte at a time
never trips the per-read timeout).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import structlog

from protocol.errors import CodedError
from protocol.fsio import sha256_file

log = structlog.get_logger("jetfleet.agent.download")

CHUNK = 256 * 1024


class DownloadError(CodedError):
    """`code` is a ReasonCode value: download_failed, too_large, disk_full, canceled."""

    code = "download_failed"


class Canceled(Exception):
    """Raised from inside a long step when the job's cancel flag is set."""


@dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int
    min_free_bytes: int
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3
    min_rate_bytes_s: int = 1024
    min_rate_window_s: float = 60.0


Progress = Callable[[int, int], None]  # (bytes done, bytes total)
CancelCheck = Callable[[], bool]


def _check_size(size: int, limits: DownloadLimits) -> None:
    if size > limits.max_bytes:
        raise DownloadError(
            f"bundle declares {size} bytes, above this device's limit of {limits.max_bytes}",
            code="too_large",
        )


def check_disk(directory: Path, needed: int, limits: DownloadLimits) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + limits.min_free_bytes:
        raise DownloadError(
            f"not enough disk in {directory}: {free // 2**20} MiB free, the bundle needs "
            f"{needed // 2**20} MiB plus a {limits.min_free_bytes // 2**20} MiB reserve",
            code="disk_full",
        )


def fetch(
    url: str,
    *,
    sha256: str,
    size: int,
    downloads: Path,
    limits: DownloadLimits,
    progress: Progress | None = None,
    canceled: CancelCheck | None = None,
) -> Path:
    """Return a local path whose content has `sha256`, at most `size` bytes.

    file:// is read in place (hashed, not copied: the bundle verification that follows
    checks the signatures again on the same file); http(s):// lands in downloads/.
    """
    _check_size(size, limits)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file" or scheme == "":
        return _local(url, sha256=sha256, size=size, canceled=canceled, progress=progress)
    if scheme not in ("http", "https"):
        raise DownloadError(f"bundle url {url!r}: scheme must be http, https or file")
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / f"{sha256}.jfb"
    if final.is_file() and _sha256_file(final, canceled) == sha256:
        return final
    part = downloads / f"{sha256}.part"
    have = part.stat().st_size if part.exists() else 0
    check_disk(downloads, size - have, limits)
    attempt = 0
    while True:
        try:
            _http_into(url, part, size=size, limits=limits, progress=progress, canceled=canceled)
            break
        except DownloadError as e:
            attempt += 1
            if e.code != "download_failed" or attempt > limits.retries:
                raise
            log.warning("download_retry", url=url, attempt=attempt, reason=e.reason)
            _backoff(min(0.5 * 2.0 ** (attempt - 1), 10.0), canceled)
    digest = _sha256_file(part, canceled)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"downloaded bundle has sha256 {digest[:16]}…, the command says {sha256[:16]}…",
            code="bundle_invalid",
        )
    os.replace(part, final)
    return final


def _backoff(seconds: float, canceled: CancelCheck | None) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if canceled and canceled():
            raise Canceled()
        time.sleep(min(left, 0.2))


def _local(
    url: str, *, sha256: str, size: int, canceled: CancelCheck | None, progress: Progress | None
) -> Path:
    parts = urlsplit(url)
    path = Path(unquote(parts.path)) if parts.scheme else Path(url)
    try:
        actual = path.stat().st_size
    except OSError as e:
        raise DownloadError(f"bundle {path} cannot be read: {e.strerror or e}") from e
    if actual > size:
        raise DownloadError(
            f"bundle {path} has {actual} bytes, more than the {size} the command declares",
            code="too_large",
        )
    digest = _sha256_file(path, canceled, progress, size)
    if digest != sha256:
        raise DownloadError(
            f"bundle {path} has sha256 {digest[:16]}…, the command says {sha256[:16]}…",
            code="bundle_invalid",
        )
    return path


def _sha256_file(
    path: Path,
    canceled: CancelCheck | None = None,
    progress: Progress | None = None,
    total: int = 0,
) -> str:
    def each_chunk(done: int) -> None:
        if canceled and canceled():
            raise Canceled()
        if progress:
            progress(done, total or done)

    return sha256_file(path, each_chunk)


class _Guard:
    """Ends a transfer from outside its blocked read: canceled, past deadline, too slow.

    Shutting the socket down wakes a read blocked in recv() at once, whatever the peer
    does; the reading thread then raises `tripped` instead of the read's own error.
    """

    POLL_S = 0.2

    def __init__(self, url: str, limits: DownloadLimits, canceled: CancelCheck | None) -> None:
        self._url = url
        self._limits = limits
        self._canceled = canceled
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self.received = 0  # written by the reading thread only
        self.tripped: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="download-guard", daemon=True)

    def __enter__(self) -> _Guard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
        if self.tripped is not None:
            self._shutdown()

    def _run(self) -> None:
        window = self._limits.min_rate_window_s
        mark, mark_bytes = time.monotonic(), 0
        while not self._stop.wait(self.POLL_S):
            if self.canceled():
                self._trip(Canceled())
                return
            now = time.monotonic()
            if window > 0 and now - mark >= window:
                rate = (self.received - mark_bytes) / (now - mark)
                if rate < self._limits.min_rate_bytes_s:
                    self._trip(
                        DownloadError(
                            f"GET {self._url}: {rate:.1f} bytes/s over the last {window:g}s, "
                            f"below download.min_rate_bytes_s = {self._limits.min_rate_bytes_s}"
                        )
                    )
                    return
                mark, mark_bytes = now, self.received

    def _trip(self, why: Exception) -> None:
        self.tripped = why
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: the read has ended anyway
                sock.shutdown(socket.SHUT_RDWR)

    def canceled(self) -> bool:
        return bool(self._canceled and self._canceled())

    def check(self) -> None:
        if self.tripped is not None:
            raise self.tripped


def _opener(guard: _Guard) -> urllib.request.OpenerDirector:
    """urllib with connections that hand their socket to the guard (redirects too)."""

    class Plain(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            guard.attach(self.sock)

    class Tls(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            guard.attach(self.sock)

    class PlainHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Plain, req)

    class TlsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Tls, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(PlainHandler(), TlsHandler())


def _http_into(
    url: str,
    part: Path,
    *,
    size: int,
    limits: DownloadLimits,
    progress: Progress | None,
    canceled: CancelCheck | None,
) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    with _Guard(url, limits, canceled) as guard:
        try:
            _transfer(url, part, have, guard, size=size, limits=limits, progress=progress)
        except (DownloadError, OSError, http.client.HTTPException):
            guard.check()  # the guard's reason, not the read error it caused
            raise
        guard.check()


def _transfer(
    url: str,
    part: Path,
    have: int,
    guard: _Guard,
    *,
    size: int,
    limits: DownloadLimits,
    progress: Progress | None,
) -> None:
    with _request(url, part, have, guard, limits) as resp:
        have = _resume_offset(resp, url, have, size)
        # The socket timeout bounds each read; the guard bounds the whole transfer.
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        if isinstance(sock, socket.socket):
            sock.settimeout(limits.read_timeout_s)
        with open(part, "ab" if have else "wb") as out:
            try:
                done = _copy_body(resp, out, url, have, guard, size, limits, progress)
            finally:
                out.flush()
                os.fsync(out.fileno())
    if done != size:
        raise DownloadError(f"GET {url}: got {done} bytes, the command declares {size}")


def _request(
    url: str, part: Path, have: int, guard: _Guard, limits: DownloadLimits
) -> http.client.HTTPResponse:
    """The GET (a range request from `have` when resuming), answered with headers."""
    req = urllib.request.Request(url, headers={"User-Agent": "jetfleet-agent"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp: http.client.HTTPResponse = _opener(guard).open(req, timeout=limits.connect_timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Our partial file is longer than or equal to the server's: start over.
            part.unlink(missing_ok=True)
            raise DownloadError(f"GET {url}: range not satisfiable, restarting") from e
        raise DownloadError(f"GET {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        guard.check()
        raise DownloadError(f"GET {url}: {getattr(e, 'reason', e)}") from e
    return resp


def _resume_offset(resp: http.client.HTTPResponse, url: str, have: int, size: int) -> int:
    """Where the body starts in the file: `have`, or 0 when the server ignored Range."""
    status = int(resp.status)
    if have and status == 200:
        have = 0  # the server ignored Range: take the whole body again
    elif have and status != 206:
        raise DownloadError(f"GET {url}: unexpected HTTP {status} to a range request")
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and have + int(length) > size:
        raise DownloadError(
            f"GET {url}: server announces {have + int(length)} bytes, the command declares {size}",
            code="too_large",
        )
    return have


def _copy_body(
    resp: http.client.HTTPResponse,
    out: BinaryIO,
    url: str,
    done: int,
    guard: _Guard,
    size: int,
    limits: DownloadLimits,
    progress: Progress | None,
) -> int:
    """Append the body to `out` under the guard; the file's length when it ends."""
    last_sync = time.monotonic()
    while True:
        chunk = _read_chunk(resp, url, limits)
        guard.check()
        if not chunk:
            return done
        if guard.canceled():
            raise Canceled()
        done += len(chunk)
        guard.received += len(chunk)
        if done > size:
            raise DownloadError(
                f"GET {url}: more than the declared {size} bytes (endless data)",
                code="too_large",
            )
        out.write(chunk)
        if progress:
            progress(done, size)
        if time.monotonic() - last_sync > 2.0:
            # Keep the resumable prefix durable without an fsync per chunk.
            out.flush()
            os.fsync(out.fileno())
            last_sync = time.monotonic()


def _read_chunk(resp: http.client.HTTPResponse, url: str, limits: DownloadLimits) -> bytes:
    try:
        # read1: whatever has arrived (up to CHUNK), so progress and the guard's rate see
        # every byte of a trickle.
        return resp.read1(CHUNK)
    except TimeoutError as e:
        raise DownloadError(
            f"GET {url}: no data for {limits.read_timeout_s:.0f}s (slow retrieval)"
        ) from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"GET {url}: connection lost ({e})") from e


def remove_partials(downloads: Path, keep: set[str] | None = None) -> int:
    """Delete .part files not belonging to a job that will resume (by sha256)."""
    if not downloads.is_dir():
        return 0
    n = 0
    for p in downloads.iterdir():
        sha = p.name.split(".", 1)[0]
        if keep and sha in keep:
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n
