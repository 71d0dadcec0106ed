"""The console's JSON API (docs/console.md), its live events, its guard and its actions.

Read-only unless the server holds the operator key. When a token is set, every console
request (pages, API, events) must carry it: `Authorization: Bearer TOKEN`, or the
`jetfleet_console` cookie that `/login?token=TOKEN` sets. Actions also need the header
`X-Jetfleet-Action: 1` and, when the browser sends one, an `Origin` of this server: a
cross-site form or script can send neither.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from controller.console.data import ConsoleData, FleetQuery, QueryError
from controller.console.live import Hub
from controller.settings import ControllerSettings

COOKIE = "jetfleet_console"
ACTION_HEADER = "x-jetfleet-action"
ACTIONS = ("pause", "resume", "abort", "promote")
DEFAULT_WINDOW_S = 3600.0


@dataclass(frozen=True)
class Guard:
    """Who may read, and who may act."""

    token: str | None
    actions: ControllerSettings | None  # the settings that hold the operator key

    def authenticated(self, request: Request) -> bool:
        if self.token is None:
            return True
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def refuse_read(self, request: Request) -> Response | None:
        if self.authenticated(request):
            return None
        return _reason(401, "the console needs its token (Authorization: Bearer, or /login)")

    def refuse_action(self, request: Request) -> Response | None:
        """None when the action may go ahead; else a 401/403 with a one-line reason."""
        if self.actions is None:
            return _reason(403, "actions are off: this server does not hold the operator key")
        if self.token is None:
            return _reason(403, "actions need a console token (serve --token)")
        if not self.authenticated(request):
            return _reason(401, "not authenticated: send the console token")
        if request.headers.get(ACTION_HEADER) != "1":
            return _reason(403, f"cross-site request refused: no {ACTION_HEADER} header")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return _reason(403, f"cross-site request refused: origin {origin} is not this server")
        return None


def _reason(status: int, text: str) -> Response:
    return JSONResponse({"error": text}, status_code=status)


class Api:
    def __init__(self, data: ConsoleData, hub: Hub, guard: Guard) -> None:
        self.data, self.hub, self.guard = data, hub, guard

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/login", self.login),
            Route("/api/info", self.info),
            Route("/api/fleet", self.fleet),
            Route("/api/robots/{device_id}", self.robot),
            Route("/api/robots/{device_id}/telemetry", self.telemetry),
            Route("/api/rollouts", self.rollouts),
            Route("/api/rollouts/{rollout_id}", self.rollout),
            Route("/api/rollouts/{rollout_id}/{action}", self.act, methods=["POST"]),
            Route("/api/releases", self.releases),
            Route("/api/events", self.events),
        ]

    async def _read(self, request: Request, fn: Any, *args: Any) -> Response:
        refused = self.guard.refuse_read(request)
        if refused is not None:
            return refused
        try:
            result = await to_thread.run_sync(fn, *args)
        except QueryError as e:
            return _reason(400, str(e))
        if result is None:
            return _reason(404, "not found")
        return JSONResponse(result)

    async def login(self, request: Request) -> Response:
        token = request.query_params.get("token", "")
        if self.guard.token is None or not hmac.compare_digest(
            token.encode(), self.guard.token.encode()
        ):
            return PlainTextResponse("wrong or no token\n", status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def info(self, request: Request) -> Response:
        def info() -> dict[str, Any]:
            return {"actions": self.guard.actions is not None and self.guard.token is not None}

        return await self._read(request, info)

    async def fleet(self, request: Request) -> Response:
        try:
            q = FleetQuery.parse(dict(request.query_params))
        except QueryError as e:
            return _reason(400, str(e))
        return await self._read(request, self.data.fleet, q)

    async def robot(self, request: Request) -> Response:
        return await self._read(request, self.data.robot, request.path_params["device_id"])

    async def telemetry(self, request: Request) -> Response:
        try:
            window = float(request.query_params.get("window", DEFAULT_WINDOW_S))
        except ValueError:
            return _reason(400, "window must be a number of seconds")
        device = request.path_params["device_id"]
        return await self._read(request, self.data.telemetry, device, window)

    async def rollouts(self, request: Request) -> Response:
        return await self._read(request, self.data.rollouts)

    async def rollout(self, request: Request) -> Response:
        return await self._read(request, self.data.rollout, request.path_params["rollout_id"])

    async def releases(self, request: Request) -> Response:
        return await self._read(request, self.data.releases)

    async def act(self, request: Request) -> Response:
        refused = self.guard.refuse_action(request)
        if refused is not None:
            return refused
        action = request.path_params["action"]
        if action not in ACTIONS:
            return _reason(404, f"no action {action!r}; actions: {', '.join(ACTIONS)}")
        assert self.guard.actions is not None
        from controller.console.actions import ActionError, run_action

        try:
            result = await to_thread.run_sync(
                run_action, self.guard.actions, action, request.path_params["rollout_id"]
            )
        except ActionError as e:
            return _reason(e.status, e.reason)
        return JSONResponse(result)

    async def events(self, request: Request) -> Response:
        refused = self.guard.refuse_read(request)
        if refused is not None:
            return refused
        from starlette.responses import StreamingResponse

        topics = frozenset(t for t in request.query_params.get("topics", "").split(",") if t)
        if not topics:
            return _reason(400, "name the topics: fleet, rollouts, rollout:ID, robot:ID")
        return StreamingResponse(
            self.hub.stream(topics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
