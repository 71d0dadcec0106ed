"""For the console's tests: a real `serve` on a free port, Chromium from the Debian
packages driven by Playwright, and where screenshots go (docs/screenshots/, linked from
the README)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"

# A browser test module's `pytestmark`.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt install chromium)"
    ),
]


@contextmanager
def chromium_page() -> Iterator[Any]:
    """One page of a fresh headless Chromium, 1280x800."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 800})
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


@contextmanager
def console_server(db: Path, data_dir: Path, **kw: Any) -> Iterator[tuple[str, Any]]:
    """A real `serve` (Starlette under uvicorn) on a free loopback port over the controller
    database `db`, its telemetry database beside it; yields its base URL and the server.
    Ingestion is off (no broker) unless `broker=` and `ingest=True` are given."""
    from controller.server.serve import JetfleetServer, ServeConfig

    data_dir.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "broker": "mqtt://127.0.0.1:1",
        "telemetry_db": db.parent / "telemetry.db",
        "bundle_dir": data_dir / "bundles",
        "host": "127.0.0.1",
        "http_port": 0,
        "ingest": False,
        "console_poll_s": 0.2,
        **kw,
    }
    server = JetfleetServer(ServeConfig(data_dir=data_dir, controller_db=db, **options))
    server.start()
    try:
        assert server.http is not None
        yield f"http://127.0.0.1:{server.http.port}", server
    finally:
        server.stop()
