"""The one ASGI application of `jetfleet serve`: bundles, `/metrics`, and the console."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from controller.console.hosting import BundleHost, MetricsEndpoint, not_found

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry


async def _not_found(request: Request, exc: Exception) -> Response:
    return not_found()


def make_app(
    *,
    bundle_dir: Path | None,
    registry: CollectorRegistry | None,
    extra_routes: list[BaseRoute] | None = None,
) -> Starlette:
    routes: list[BaseRoute] = []
    if bundle_dir is not None:
        routes.append(
            Route("/bundles/{name}", BundleHost(Path(bundle_dir)).handle, methods=["GET"])
        )
    if registry is not None:
        routes.append(Route("/metrics", MetricsEndpoint(registry).handle, methods=["GET"]))
    routes.extend(extra_routes or [])
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
