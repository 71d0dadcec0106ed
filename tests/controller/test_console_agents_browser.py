"""The console in a real headless Chromium against a real `serve` that ingests from a real
Mosquitto, with REAL agents (`python -m agent.cli run` subprocesses) on it: the fleet
page lists them as their retained statuses say, a robot's page charts the telemetry its
agent sends, and its job list follows a rollout from the CLI through each state, all
without a reload. Nothing here is seeded into a database.

The tests share the two agents (starting them costs most of the time), so they run in
file order: the last one stops robot-b.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_harness import BROWSER_MARKS, chromium_page, console_server
from fleet import agent_lab, build_bundle, run_cli, start_agents, wait_until

from controller.security.keystore import KeySet

pytestmark = [*BROWSER_MARKS, pytest.mark.slow, pytest.mark.xdist_group("console_agents")]

DEVICES = ("robot-a", "robot-b")
CPU = "div[data-chart='CPU / GPU load (%)']"


@dataclass
class Lab:
    base: str
    env: dict[str, str]
    keys: KeySet
    root: Path
    agents: dict[str, Any]

    def get(self, path: str) -> Any:
        return httpx.get(self.base + path, timeout=10).json()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("console-agents")
    with agent_lab(root) as (keys, broker, env), contextlib.ExitStack() as stack:
        db = Path(env["JETFLEET_DB"])
        # The serve's state file beside the database: `rollout start` publishes the
        # bundle through it and the agents download it over HTTP.
        serve = console_server(
            db, db.parent, broker=broker.url, ingest=True, advertise_host="127.0.0.1"
        )
        base, _ = stack.enter_context(serve)
        agents = start_agents(root, broker.url, DEVICES, groups=["lab"], telemetry_interval_s=1)
        for a in agents:
            stack.callback(a.stop)
        lab = Lab(base, env, keys, root, dict(zip(DEVICES, agents, strict=True)))
        wait_until(lambda: lab.get("/api/fleet")["online"] == 2, timeout=60, what="two agents")
        yield lab


def test_a_robot_page_charts_the_telemetry_its_agent_sends_and_takes_new_points_live(
    lab: Lab,
) -> None:
    def cpu_points() -> int:
        series = lab.get("/api/robots/robot-a/telemetry?window=600")["metrics"]
        return len(series.get("cpu_pct", []))

    wait_until(lambda: cpu_points() >= 2, timeout=30, what="two samples from robot-a")
    with chromium_page() as page:
        page.goto(lab.base + "/robots/robot-a")
        page.wait_for_selector(f"{CPU} canvas", timeout=10_000)
        page.wait_for_selector("div[data-chart='Memory (MiB)'] canvas")
        assert "cpu_pct" in page.locator(CPU).inner_text()
        first = int(page.locator(CPU).get_attribute("data-points") or 0)
        assert first >= 2
        page.evaluate("window.__same = true")
        # The agent samples every second: the chart grows without a reload.
        page.wait_for_function(
            f'(n) => Number(document.querySelector("{CPU}").dataset.points) > n',
            arg=first,
            timeout=15_000,
        )
        assert page.evaluate("window.__same") is True


def test_a_robot_page_job_list_follows_a_rollout_through_its_states_live(lab: Lab) -> None:
    # Three seconds of probation: a state the page shows before SUCCEEDED.
    bundle = build_bundle(lab.root / "build", lab.keys.release, gate={"probation_s": 3})
    with chromium_page() as page:
        page.goto(lab.base + "/robots/robot-a")
        page.wait_for_selector("#robot h1")
        assert "none" in page.locator("#robot").inner_text()  # no job yet
        page.evaluate("window.__same = true")
        out = run_cli(
            lab.env, "rollout", "start", str(bundle), "--target", "robot-a", "--waves", "100%",
            "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        rollout = json.loads(out.stdout)["rollout"]
        rid = rollout["id"]
        assert rollout["bundle_url"].startswith(lab.base + "/bundles/")  # served by this serve
        row = page.locator(f"#robot tr:has(a[href='/rollouts/{rid}'])")
        state = row.locator("td").nth(2)
        state.locator("text=PROBATION").wait_for(timeout=60_000)
        state.locator("text=SUCCEEDED").wait_for(timeout=60_000)
        times = row.locator("td").nth(3).inner_text()
        for s in ("RECEIVED", "DOWNLOADING", "BUILDING", "PROBATION", "SUCCEEDED"):
            assert s in times, times
        models = page.locator("#robot table").first
        models.locator("td.on:text-is('1.0.0')").wait_for(timeout=10_000)
        assert page.evaluate("window.__same") is True  # the same document: no reload
    agent_log = lab.agents["robot-a"].log()
    assert "SUCCEEDED" in json.dumps(lab.get("/api/robots/robot-a")["jobs"][0]), agent_log[-2000:]


def test_the_fleet_page_lists_the_real_robots_and_follows_one_that_stops(lab: Lab) -> None:
    with chromium_page() as page:
        page.goto(lab.base + "/")
        page.wait_for_selector("body[data-ready='1']")
        rows = page.locator("#robots tbody tr")
        assert rows.count() == 2
        for d in DEVICES:
            text = page.locator(f"tr[data-robot='{d}']").inner_text()
            assert "online" in text and "lab" in text, text
        assert "2 online" in page.locator("#stats").inner_text()
        page.evaluate("window.__same = true")
        # robot-b's agent stops (SIGTERM): its offline status reaches the page by itself.
        lab.agents["robot-b"].stop()
        page.locator("tr[data-robot='robot-b'] td.off").wait_for(timeout=20_000)
        page.locator("#stats >> text=1 online").wait_for(timeout=10_000)
        assert page.evaluate("window.__same") is True
