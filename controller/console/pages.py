"""The console's pages: plain HTML that loads one JS module each (static/), no build step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from controller.console.api import Guard

HERE = Path(__file__).parent
PAGES = {"fleet": "Fleet", "robot": "Robot", "rollouts": "Rollouts", "rollout": "Rollout"}
_UPLOT_CSS = '<link rel="stylesheet" href="/static/vendor/uplot-1.6.32/uPlot.min.css">\n'


def _render(name: str) -> str:
    head = (HERE / "pages" / "_head.html").read_text()
    extra = _UPLOT_CSS if name == "robot" else ""
    head = head.replace("{title}", PAGES[name]).replace("{extra_head}", extra)
    return head + (HERE / "pages" / f"{name}.html").read_text()


class Pages:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.html = {name: _render(name) for name in PAGES}

    def _page(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            refused = self.guard.refuse_read(request)
            if refused is not None:
                return refused
            return HTMLResponse(self.html[name], headers={"Cache-Control": "no-store"})

        return page

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self._page("fleet")),
            Route("/robots/{device_id}", self._page("robot")),
            Route("/rollouts", self._page("rollouts")),
            Route("/rollouts/{rollout_id}", self._page("rollout")),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
