"""The console's rollout pages in a real headless Chromium against a real serve: a
rollout started from the CLI (real bundle, real broker, simulated devices speaking the
real protocol) appears and its counts move without a reload."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_harness import BROWSER_MARKS, chromium_page, console_server, screenshot
from fleet import SimFleet, make_devices, run_cli

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet

pytestmark = BROWSER_MARKS


@pytest.fixture
def console(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with console_server(Path(env["JETFLEET_DB"]), tmp_path / "console-state") as (base, _):
        yield base


def test_a_rollout_started_from_the_cli_appears_and_its_counts_move_live(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    console: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)), chromium_page() as page:
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
        screenshot(page, "rollout.png")
        assert page.locator("#devices tbody tr").count() == 3
        # A rollout bigger than the page's device table shows the devices that moved last.
        monkeypatch.setattr("controller.console.data.DEVICES_SHOWN", 2)
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#devices tbody tr").count() == 2
        assert "the 2 that changed last of 3" in page.locator("#devices-shown").inner_text()
