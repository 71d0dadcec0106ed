"""The console's rollout pages in a real headless Chromium against a real serve: a
rollout started from the CLI (real bundle, real broker, simulated devices speaking the
real protocol) appears and its counts move without a reload."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet import SimFleet, make_devices, run_cli

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from controller.server.serve import JetfleetServer, ServeConfig

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt install chromium)"
    ),
]


@pytest.fixture
def console(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    db = Path(env["JETFLEET_DB"])
    cfg = ServeConfig(
        broker="mqtt://127.0.0.1:1", telemetry_db=db.parent / "telemetry.db",
        bundle_dir=tmp_path / "served", data_dir=tmp_path / "console-state", controller_db=db,
        host="127.0.0.1", http_port=0, ingest=False, console_poll_s=0.2,
    )  # fmt: skip
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    server = JetfleetServer(cfg)
    server.start()
    assert server.http is not None
    yield f"http://127.0.0.1:{server.http.port}"
    server.stop()


def test_a_rollout_started_from_the_cli_appears_and_its_counts_move_live(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path, console: str
) -> None:
    from playwright.sync_api import sync_playwright

    with SimFleet(mosquitto.url, keys.trust, make_devices(3)), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(console + "/rollouts")
        page.wait_for_selector("body[data-ready='1']")
        page.evaluate("window.__same = true")
        out = run_cli(
            env, "rollout", "start", str(bundle), "--target", "all", "--waves", "1,100%",
            "--output", "json",
        )  # fmt: skip
        rid = json.loads(out.stdout)["rollout"]["id"]
        row = page.locator(f"tr[data-rollout='{rid}']")
        row.wait_for(timeout=20_000)
        first = row.inner_text()  # as it first appeared, before the devices finished
        row.locator("[data-state='SUCCEEDED']").wait_for(timeout=60_000)
        row.locator("text=SUCCEEDED 3").wait_for(timeout=60_000)
        assert "SUCCEEDED 3" not in first
        assert page.evaluate("window.__same") is True  # no reload
        page.goto(f"{console}/rollouts/{rid}")
        page.wait_for_selector("body[data-ready='1']")
        assert "SUCCEEDED 1" in page.locator("#waves").inner_text()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "rollout.png"), full_page=True)
        browser.close()
