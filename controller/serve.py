"""`jetfleet serve`: bundle hosting over HTTP, the Prometheus endpoint, telemetry ingestion.

Bundles: `GET|HEAD /bundles/<file>` from `settings.bundle_dir`, with single-range
requests (`Range: bytes=a-b`, `a-`, `-n`; 206/416) so agents resume downloads. Names are
one plain path segment ([A-Za-z0-9._-], no leading dot); no directory listing, no
traversal, no symlinks, nothing but regular files (opened without blocking, so a FIFO
planted there cannot hang a thread). Metrics: `GET /metrics` (text format).

Each connection has a thread; a client that sends nothing (or half a request) for
`idle_timeout_s` is disconnected, and past `max_connections` open at once a new one gets
503 at once, so idle or half-sent connections cannot take every thread or exhaust memory.

State file `data_dir/serve.json` = {"bundle_url_base", "metrics_url", "pid"}, written
atomically at start and removed at exit, tells `rollout start` where bundles are served.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog

from controller.ingest import IngestPool

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry
from protocol.fsio import write_atomic

log = structlog.get_logger(__name__)

SERVE_STATE = "serve.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20
IDLE_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 34\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
    b"too many connections; retry later\n"
)


# -- the state file -----------------------------------------------------------------


@dataclass(frozen=True)
class ServeState:
    bundle_url_base: str  # e.g. http://host:8380/bundles ; a bundle is base + "/" + file
    metrics_url: str
    pid: int

    def bundle_url(self, filename: str) -> str:
        return f"{self.bundle_url_base}/{filename}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_serve_state(data_dir: Path, state: ServeState) -> Path:
    """tmp + fsync + rename: a reader sees the old file or the new one, never half."""
    path = data_dir / SERVE_STATE
    write_atomic(path, json.dumps(state.__dict__).encode())
    return path


def read_serve_state(data_dir: Path) -> ServeState | None:
    """The running server's state, or None when there is none or its process is gone."""
    try:
        data = json.loads((Path(data_dir) / SERVE_STATE).read_text())
        state = ServeState(str(data["bundle_url_base"]), str(data["metrics_url"]), int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if _pid_alive(state.pid) else None


def remove_serve_state(data_dir: Path, pid: int | None = None) -> None:
    """Remove the state file if it is ours (a newer server may have replaced it)."""
    path = Path(data_dir) / SERVE_STATE
    try:
        if pid is not None and json.loads(path.read_text()).get("pid") != pid:
            return
        path.unlink()
    except (OSError, ValueError):
        pass


# -- HTTP -----------------------------------------------------------------------------


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=` range -> (start, end inclusive); None when unsatisfiable.

    Raises ValueError for a header we do not serve as a range (several ranges, another
    unit, garbage): RFC 9110 lets a server answer those with the whole file.
    """
    m = _RANGE_RE.match(header.strip())
    if not m or (not m[1] and not m[2]):
        raise ValueError(f"unsupported Range {header!r}")
    if not m[1]:  # suffix: the last n bytes
        n = int(m[2])
        if n == 0 or size == 0:
            return None
        return max(size - n, 0), size - 1
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: JetfleetHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "jetfleet-serve"

    def setup(self) -> None:
        super().setup()
        # Every read and write on the socket gives up after this long: an idle or
        # half-sent request, or a reader that stopped reading, frees its thread.
        self.connection.settimeout(self.server.idle_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http", client=self.client_address[0], line=format % args)

    def _plain(self, code: HTTPStatus, text: str, headers: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics" and self.server.registry is not None:
            self._metrics()
        elif path.startswith("/bundles/") and self.server.bundle_dir is not None:
            self._bundle(path[len("/bundles/") :])
        else:
            self._plain(HTTPStatus.NOT_FOUND, "not found")

    def _metrics(self) -> None:
        # prometheus_client is the controller extra's: imported where it is used, so the
        # rest of this module (the serve state the CLI reads) works on the base install.
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        assert self.server.registry is not None
        body = generate_latest(self.server.registry)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _bundle(self, raw_name: str) -> None:
        name = unquote(raw_name)
        # One plain segment: no "/", "..", "\\", NUL, hidden or temporary files.
        if not _NAME_RE.match(name):
            self._plain(HTTPStatus.NOT_FOUND, "not found")
            return
        assert self.server.bundle_dir is not None
        path = self.server.bundle_dir / name
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # missing, or a symlink (ELOOP)
            self._plain(HTTPStatus.NOT_FOUND, "not found")
            return
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, a device
            os.close(fd)
            self._plain(HTTPStatus.NOT_FOUND, "not found")
            return
        with os.fdopen(fd, "rb") as f:
            self._send_file(f, st, name)

    def _send_file(self, f: Any, st: os.stat_result, name: str) -> None:
        size = st.st_size
        etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        start, end, code = 0, size - 1, HTTPStatus.OK
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range == etag):
            try:
                r = parse_range(rng, size)
            except ValueError:
                r = (0, size - 1)  # not a range we serve: the whole file
            else:
                if r is None:
                    self._plain(
                        HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                        f"range not satisfiable for {size} bytes",
                        {"Content-Range": f"bytes */{size}"},
                    )
                    return
                code = HTTPStatus.PARTIAL_CONTENT
            start, end = r
        length = max(end - start + 1, 0)
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        if code == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        log.info(
            "bundle_served", file=name, start=start, bytes=length, client=self.client_address[0]
        )
        try:
            self.connection.sendfile(f, offset=start, count=length)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            log.info("bundle_client_gone", file=name)


class JetfleetHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        bundle_dir: Path | None,
        registry: CollectorRegistry | None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve() if bundle_dir is not None else None
        self.registry = registry
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """Answer 503 without a thread: a fresh socket's send buffer takes it at once."""
        log.warning("http_busy", client=client_address[0])
        try:
            request.setblocking(False)
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        t.start()
        return t


# -- the whole service -----------------------------------------------------------------


@dataclass
class ServeConfig:
    broker: str
    telemetry_db: str | Path
    bundle_dir: Path
    data_dir: Path
    controller_db: str | Path | None = None
    host: str = "0.0.0.0"
    http_port: int = 8380
    metrics_port: int | None = None
    advertise_host: str | None = None
    protocol: str = "5"
    share_group: str = "jetfleet"
    prefix: str = "jetfleet/v1"
    ca: str = ""
    cert: str = ""
    key: str = ""
    ingest: bool = True
    ingest_workers: int = 1
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS


class JetfleetServer:
    """Starts the parts in order (ingester, HTTP, state file) and stops them in reverse."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.ingester: IngestPool | None = None
        self.http: JetfleetHTTPServer | None = None
        self.metrics_http: JetfleetHTTPServer | None = None
        self.state: ServeState | None = None
        self._stopped = threading.Event()

    def start(self) -> ServeState:
        from controller.metrics import FleetCollector, make_registry  # the controller extra

        cfg = self.cfg
        cfg.bundle_dir.mkdir(parents=True, exist_ok=True)
        if cfg.ingest:
            self.ingester = IngestPool(
                cfg.ingest_workers,
                cfg.telemetry_db,
                cfg.broker,
                protocol=cfg.protocol,
                share_group=cfg.share_group,
                prefix=cfg.prefix,
                ca=cfg.ca,
                cert=cfg.cert,
                key=cfg.key,
            )
            self.ingester.start()
        ing = self.ingester
        collector = FleetCollector(
            cfg.telemetry_db,
            stats=(lambda: ing.stats) if ing else None,
            status=(lambda: dict(ing.status)) if ing else None,
            controller_db=cfg.controller_db,
        )
        registry = make_registry(collector)
        try:
            self.http = self._http_server(cfg.http_port, cfg.bundle_dir, registry)
            self.http.start()
            metrics_port = self.http.port
            if cfg.metrics_port is not None and cfg.metrics_port != cfg.http_port:
                self.metrics_http = self._http_server(cfg.metrics_port, None, registry)
                self.metrics_http.start()
                metrics_port = self.metrics_http.port
        except OSError:
            self.stop()
            raise
        host = cfg.advertise_host or (
            socket.gethostname() if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        )
        self.state = ServeState(
            bundle_url_base=f"http://{host}:{self.http.port}/bundles",
            metrics_url=f"http://{host}:{metrics_port}/metrics",
            pid=os.getpid(),
        )
        write_serve_state(cfg.data_dir, self.state)
        log.info(
            "serve_started",
            bundles=self.state.bundle_url_base,
            metrics=self.state.metrics_url,
            bundle_dir=str(cfg.bundle_dir),
            ingest=bool(ing),
        )
        return self.state

    def _http_server(
        self, port: int, bundle_dir: Path | None, registry: CollectorRegistry
    ) -> JetfleetHTTPServer:
        server = JetfleetHTTPServer(
            (self.cfg.host, port),
            bundle_dir=bundle_dir,
            registry=registry,
            idle_timeout_s=self.cfg.idle_timeout_s,
            max_connections=self.cfg.max_connections,
        )
        return server

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        remove_serve_state(self.cfg.data_dir, os.getpid())
        for srv in (self.metrics_http, self.http):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        if self.ingester is not None:
            self.ingester.stop()
        log.info("serve_stopped")

    def run_forever(self, ready: Callable[[ServeState], None] | None = None) -> None:
        """Until SIGINT/SIGTERM; the state file is removed on the way out."""
        stop = threading.Event()

        def _signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        old = {s: signal.signal(s, _signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            state = self.start()
            if ready is not None:
                ready(state)
            stop.wait()
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
