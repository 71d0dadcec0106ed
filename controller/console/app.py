"""The one ASGI application of `jetfleet serve`: bundles, `/metrics`, and the console."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from controller.console.hosting import BundleHost, MetricsEndpoint, not_found

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from controller.settings import ControllerSettings


@dataclass(frozen=True)
class ConsoleConfig:
    controller_db: str | Path | None
    telemetry_db: str | Path | None
    token: str | None = None
    actions: ControllerSettings | None = None  # settings holding the operator key
    poll_s: float = 1.0


def console_routes(cfg: ConsoleConfig) -> list[BaseRoute]:
    from controller.console.api import Api, Guard
    from controller.console.data import ConsoleData
    from controller.console.live import Hub
    from controller.console.pages import Pages

    data = ConsoleData(cfg.controller_db, cfg.telemetry_db)
    guard = Guard(cfg.token, cfg.actions)
    return [*Api(data, Hub(data, cfg.poll_s), guard).routes(), *Pages(guard).routes()]


async def _not_found(request: Request, exc: Exception) -> Response:
    return not_found()


def make_app(
    *,
    bundle_dir: Path | None,
    registry: CollectorRegistry | None,
    console: ConsoleConfig | None = None,
) -> Starlette:
    routes: list[BaseRoute] = []
    if bundle_dir is not None:
        routes.append(
            Route("/bundles/{name}", BundleHost(Path(bundle_dir)).handle, methods=["GET"])
        )
    if registry is not None:
        routes.append(Route("/metrics", MetricsEndpoint(registry).handle, methods=["GET"]))
    if console is not None:
        routes.extend(console_routes(console))
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
