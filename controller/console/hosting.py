"""Bundles over HTTP with single-range requests, and the Prometheus endpoint.

Bundles: `GET|HEAD /bundles/<file>` from the bundle directory, with one `bytes=` range
(`a-b`, `a-`, `-n`; 206/416) so agents resume downloads. Names are one plain path
segment ([A-Za-z0-9._-], no leading dot); no listing, no traversal, no symlinks, nothing
but regular files (opened without blocking, so a FIFO planted there cannot hang a worker).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from controller.server.serve import parse_range

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

log = structlog.get_logger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_CHUNK = 1 << 20


def not_found() -> Response:
    return PlainTextResponse("not found\n", status_code=404)


def _open_regular(path: Path) -> tuple[int, os.stat_result] | None:
    """An fd on a regular file that is not a symlink, or None."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing, or a symlink (ELOOP)
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, a device
        os.close(fd)
        return None
    return fd, st


class FileRangeResponse(Response):
    """Headers at once, then the bytes [start, start+length) read off the event loop."""

    def __init__(
        self, fd: int, start: int, length: int, status: int, headers: dict[str, str], head: bool
    ) -> None:
        super().__init__(status_code=status, headers=headers, media_type="application/octet-stream")
        self.fd, self.start, self.length, self.head = fd, start, length, head
        self.headers["content-length"] = str(length)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            offset, left = self.start, 0 if self.head else self.length
            while left > 0:
                chunk = await to_thread.run_sync(os.pread, self.fd, min(_CHUNK, left), offset)
                if not chunk:  # truncated under us: stop short, the length tells the client
                    break
                offset, left = offset + len(chunk), left - len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if self.head or left > 0 or self.length == 0:
                await send({"type": "http.response.body", "body": b""})
        finally:
            os.close(self.fd)


@dataclass(frozen=True)
class BundleHost:
    bundle_dir: Path

    async def handle(self, request: Request) -> Response:
        name = request.path_params["name"]
        # One plain segment: no "/", "..", "\\", NUL, hidden or temporary files.
        if not _NAME_RE.match(name):
            return not_found()
        opened = await to_thread.run_sync(_open_regular, self.bundle_dir / name)
        if opened is None:
            return not_found()
        fd, st = opened
        try:
            response = self._respond(request, fd, st, name)
        except BaseException:
            os.close(fd)
            raise
        return response

    def _respond(self, request: Request, fd: int, st: os.stat_result, name: str) -> Response:
        size = st.st_size
        etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        }
        start, end, code = 0, size - 1, 200
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if rng and (if_range is None or if_range == etag):
            try:
                r = parse_range(rng, size)
            except ValueError:
                r = (0, size - 1)  # not a range we serve: the whole file
            else:
                if r is None:
                    os.close(fd)
                    return PlainTextResponse(
                        f"range not satisfiable for {size} bytes\n",
                        status_code=416,
                        headers={"Content-Range": f"bytes */{size}"},
                    )
                code = 206
                headers["Content-Range"] = f"bytes {r[0]}-{r[1]}/{size}"
            start, end = r
        length = max(end - start + 1, 0)
        head = request.method == "HEAD"
        if not head and length:
            client = request.client.host if request.client else ""
            log.info("bundle_served", file=name, start=start, bytes=length, client=client)
        return FileRangeResponse(fd, start, length, code, headers, head)


@dataclass(frozen=True)
class MetricsEndpoint:
    registry: CollectorRegistry

    async def handle(self, request: Request) -> Response:
        # prometheus_client is the controller extra's; the collector reads the databases,
        # so the text is made on a worker thread.
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        body = await to_thread.run_sync(generate_latest, self.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
