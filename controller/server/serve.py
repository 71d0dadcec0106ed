"""`jetfleet serve`: bundle hosting over HTTP, the Prometheus endpoint, telemetry ingestion.

Bundles: `GET|HEAD /bundles/<file>` from `settings.bundle_dir`, with single-range
requests (`Range: bytes=a-b`, `a-`, `-n`; 206/416) so agents resume downloads. Names are
one plain path segment ([A-Za-z0-9._-], no leading dot); no directory listing, no
traversal, no symlinks, nothing but regular files (opened without blocking, so a FIFO
planted there cannot hang a worker). Metrics: `GET /metrics` (text format).

One ASGI application (controller/console/) under uvicorn on one event loop: a client
that sends nothing (or half a request) for `idle_timeout_s` is disconnected, and past
`max_connections` open at once a new one gets 503 + Retry-After at once, so idle or
half-sent connections cannot exhaust memory. The console and its API: docs/console.md.

State file `data_dir/serve.json` (controller/server/state.py), written atomically at start
and removed at exit, tells `rollout start` where bundles are served.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from controller.server.state import ServeState, remove_serve_state, write_serve_state
from controller.telemetry.ingest import IngestPool
from controller.telemetry.store import RAW_RETENTION_S

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from controller.fleet.registry import Registry
    from controller.settings import ControllerSettings
    from protocol.messages import DeviceStatus
from protocol.errors import CodedError

log = structlog.get_logger(__name__)

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
IDLE_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 34\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
    b"too many connections; retry later\n"
)


# -- HTTP -----------------------------------------------------------------------------


@dataclass
class ConnectionStats:
    """Counted on the server's event loop as connections come: exact, not sampled."""

    peak: int = 0  # the most connections held at once (a refused one never counts)
    refused: int = 0  # answered 503 past the cap


def _guarded_protocol(idle_timeout_s: float, max_connections: int, stats: ConnectionStats) -> type:
    """uvicorn's h11 protocol with the two guards http.server's threads had.

    A connection that has not sent a whole request head within `idle_timeout_s` (idle,
    or half a request) is closed; past `max_connections` open at once a new one is
    answered 503 + Retry-After at once and closed, before it sends anything.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                stats.refused += 1
                log.warning("http_busy", client=self.client[0] if self.client else "")
                transport.write(_BUSY)
                transport.close()
                return
            stats.peak = max(stats.peak, len(self.connections))
            self._await_head()

        def _await_head(self) -> None:
            self._cancel_head()
            self._head_timer = self.loop.call_later(idle_timeout_s, self._head_timeout)

        def _cancel_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
                self._cancel_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head()
            super().connection_lost(exc)

    return GuardedH11


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


class JetfleetHTTPServer:
    """One uvicorn server on its own thread and event loop, serving `app` (by default
    bundles and /metrics). The socket is bound in the constructor, so a taken port
    fails there (OSError) and port 0 is known at once."""

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        bundle_dir: Path | None,
        registry: CollectorRegistry | None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        app: Any = None,
    ) -> None:
        import uvicorn

        from controller.console.app import make_app

        self.bundle_dir = Path(bundle_dir).resolve() if bundle_dir is not None else None
        self.registry = registry
        self.app = app or make_app(bundle_dir=self.bundle_dir, registry=registry)
        self.connections = ConnectionStats()
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self._sock = socket.create_server(addr, family=family, backlog=max(128, max_connections))
        config = uvicorn.Config(
            self.app,
            http=_guarded_protocol(idle_timeout_s, max_connections, self.connections),
            loop="asyncio",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=max(1, int(idle_timeout_s)),
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> threading.Thread:
        t = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="http", daemon=True
        )
        t.start()
        self._thread = t
        while not self._server.started and t.is_alive():
            time.sleep(0.01)
        if not self._server.started:
            raise OSError(f"the HTTP server on port {self.port} did not start")
        return t

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def server_close(self) -> None:
        self._sock.close()


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
    raw_retention_s: float = RAW_RETENTION_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    # The web console on the HTTP port (docs/console.md): beyond loopback only with a token.
    console: bool = True
    token: str | None = None
    actions: ControllerSettings | None = None  # settings holding the operator key
    console_poll_s: float = 1.0


class ConsoleTokenError(CodedError):
    code = "console_token"


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_console_exposure(cfg: ServeConfig) -> None:
    """The console shows the whole fleet: listening beyond loopback needs a token."""
    if cfg.console and cfg.token is None and cfg.host not in LOOPBACK:
        raise ConsoleTokenError(
            f"listening on {cfg.host or '*'} serves the console to the network: give it a "
            "token (--token, JETFLEET_CONSOLE_TOKEN or console_token in the config file), "
            "listen on 127.0.0.1, or --no-console"
        )


class StatusRecorder:
    """Each device status the ingester hears goes into the controller database, so the
    console's fleet and the drift gauges follow the robots while no CLI runs. paho's
    thread only enqueues; one thread opens the database and writes."""

    def __init__(self, controller_db: str | Path) -> None:
        self.controller_db = controller_db
        self.recorded = 0
        self._queue: queue.SimpleQueue[tuple[DeviceStatus, float] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def offer(self, status: DeviceStatus) -> None:
        self._queue.put((status, time.time()))

    def start(self) -> None:
        from controller.fleet.registry import Registry

        registry = Registry.open(self.controller_db)  # a bad database fails `start`
        self._thread = threading.Thread(
            target=self._run, args=(registry,), name="status-recorder", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)
            self._thread = None

    def _run(self, registry: Registry) -> None:
        while (item := self._queue.get()) is not None:
            status, received_at = item
            try:
                registry.apply_status(status, received_at)
                self.recorded += 1
            except Exception as e:  # a locked database: the next status brings it up to date
                log.warning("status_record_failed", device=status.device_id, reason=str(e))
        registry.conn.close()


class JetfleetServer:
    """Starts the parts in order (ingester, HTTP, state file) and stops them in reverse."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.ingester: IngestPool | None = None
        self.http: JetfleetHTTPServer | None = None
        self.metrics_http: JetfleetHTTPServer | None = None
        self.recorder: StatusRecorder | None = None
        self.state: ServeState | None = None
        self._stopped = threading.Event()

    def start(self) -> ServeState:
        from controller.telemetry.metrics import (  # the controller extra
            FleetCollector,
            make_registry,
        )

        cfg = self.cfg
        cfg.bundle_dir.mkdir(parents=True, exist_ok=True)
        ingester = self._make_ingester()  # checks its options first: a usage error
        check_console_exposure(cfg)
        if ingester is not None:
            if self.recorder is not None:
                self.recorder.start()
            self.ingester = ingester
            try:
                ingester.start()
            except BaseException:
                if self.recorder is not None:
                    self.recorder.stop()
                raise
        ing = self.ingester
        collector = FleetCollector(
            cfg.telemetry_db,
            stats=(lambda: ing.stats) if ing else None,
            status=(lambda: dict(ing.status)) if ing else None,
            controller_db=cfg.controller_db,
        )
        registry = make_registry(collector)
        try:
            self.http = self._http_server(cfg.http_port, cfg.bundle_dir, registry, console=True)
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

    def _make_ingester(self) -> IngestPool | None:
        cfg = self.cfg
        if not cfg.ingest:
            return None
        if cfg.controller_db is not None:
            self.recorder = StatusRecorder(cfg.controller_db)
        return IngestPool(
            cfg.ingest_workers,
            cfg.telemetry_db,
            cfg.broker,
            protocol=cfg.protocol,
            share_group=cfg.share_group,
            prefix=cfg.prefix,
            ca=cfg.ca,
            cert=cfg.cert,
            key=cfg.key,
            on_status=self.recorder.offer if self.recorder is not None else None,
            raw_retention_s=cfg.raw_retention_s,
        )

    def _http_server(
        self,
        port: int,
        bundle_dir: Path | None,
        registry: CollectorRegistry,
        *,
        console: bool = False,
    ) -> JetfleetHTTPServer:
        from controller.console.app import ConsoleConfig, make_app

        cfg = self.cfg
        console_cfg = None
        if console and cfg.console:
            console_cfg = ConsoleConfig(
                controller_db=cfg.controller_db,
                telemetry_db=cfg.telemetry_db,
                token=cfg.token,
                actions=cfg.actions,
                poll_s=cfg.console_poll_s,
            )
        bundles = Path(bundle_dir).resolve() if bundle_dir is not None else None
        return JetfleetHTTPServer(
            (cfg.host, port),
            bundle_dir=bundles,
            registry=registry,
            idle_timeout_s=cfg.idle_timeout_s,
            max_connections=cfg.max_connections,
            app=make_app(bundle_dir=bundles, registry=registry, console=console_cfg),
        )

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
        if self.recorder is not None:
            self.recorder.stop()
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
