"""The console in a real headless Chromium against a real `serve` (uvicorn, SQLite):
the fleet page lists the robots and follows a change live; an unauthenticated action is
refused. Screenshots land in docs/screenshots/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_harness import BROWSER_MARKS, chromium_page, console_server, screenshot

from controller.fleet.registry import Registry
from controller.telemetry.store import TelemetryStore, row_from_sample
from protocol.messages import DeviceStatus, HardwareProfile, ModelSlot
from protocol.telemetry import TelemetrySample

pytestmark = BROWSER_MARKS


def status(device: str, online: bool, version: str) -> DeviceStatus:
    return DeviceStatus.new(
        device_id=device,
        online=online,
        agent_version="0.1.0",
        groups=["warehouse"],
        hardware=HardwareProfile(device_model="Jetson Orin Nano", jetpack="6.0"),
        models={"detector": ModelSlot(active=version)},
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Registry]]:
    registry = Registry.open(tmp_path / "controller.db")
    for i in range(12):
        registry.apply_status(status(f"robot-{i:02d}", i % 4 != 3, "1.0.0"))
    with console_server(tmp_path / "controller.db", tmp_path) as (base, _):
        yield base, registry


@pytest.fixture
def page() -> Iterator[Any]:
    with chromium_page() as pg:
        yield pg


def test_fleet_page_lists_the_robots_and_follows_them_live(served, page) -> None:
    base, registry = served
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready='1']")
    rows = page.locator("#robots tbody tr")
    assert rows.count() == 12
    assert "robot-00" in rows.first.inner_text() and "detector 1.0.0" in rows.first.inner_text()
    assert "9 online" in page.locator("#stats").inner_text()
    # A robot goes offline and moves to a new version: its row changes without a reload.
    page.evaluate("window.__same = true")
    registry.apply_status(status("robot-00", False, "1.1.0"))
    row = page.locator("tr[data-robot='robot-00']")
    row.locator("text=detector 1.1.0").wait_for(timeout=10_000)
    assert "offline" in row.inner_text()
    assert page.evaluate("window.__same") is True  # the same document: no reload
    screenshot(page, "fleet.png")


def test_an_action_without_authentication_is_refused(served, page) -> None:
    base, _ = served
    page.goto(base + "/rollouts")
    answer = page.evaluate(
        """async () => { const r = await fetch('/api/rollouts/any/pause',
             {method: 'POST', headers: {'X-Jetfleet-Action': '1'}});
           return [r.status, await r.text()]; }"""
    )
    assert answer[0] == 403
    assert json.loads(answer[1])["error"].startswith("actions are off")


def test_serve_beyond_loopback_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "JETFLEET_DB": str(tmp_path / "c.db"), "JETFLEET_CONFIG": "/nonexistent"}
    env.pop("JETFLEET_CONSOLE_TOKEN", None)
    r = subprocess.run(
        [sys.executable, "-c", "from controller.cli.main import app; app()",
         "--broker", "mqtt://127.0.0.1:1", "serve", "--no-ingest", "--host", "0.0.0.0",
         "--http-port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert r.returncode == 2
    assert "serves the console to the network" in r.stderr


def test_a_token_guards_the_api(tmp_path: Path) -> None:
    with console_server(tmp_path / "c.db", tmp_path, token="s3cret") as (base, _):
        assert httpx.get(base + "/api/fleet").status_code == 401
        ok = httpx.get(base + "/api/fleet", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["total"] == 0
        act = httpx.post(
            base + "/api/rollouts/x/abort",
            headers={"Authorization": "Bearer s3cret", "X-Jetfleet-Action": "1"},
        )
        assert act.status_code == 403 and "operator key" in act.json()["error"]


def telemetry_rows(device: str, n: int) -> list[tuple[Any, ...]]:
    """n samples, 5 s apart, ending now: load, temperature, power, memory, latency."""
    now = time.time()
    rows = []
    for i in range(n):
        sample = TelemetrySample.new(
            device_id=device,
            at=datetime.fromtimestamp(now - (n - i) * 5, timezone.utc),
            uptime_s=100.0 + i * 5,
            cpu={"percent": [20.0 + i % 7, 30.0], "load1": 1.5},
            mem={"total": 8 << 30, "used": (3 << 30) + i * (1 << 20), "available": 4 << 30},
            temps={"cpu": 45.0 + i % 5},
            gpu={"source": "tegrastats", "load_pct": 40.0 + i % 11, "temp_c": 50.0,
                 "power_mw": {"VDD_IN": 9000.0 + 50 * i}},
            models={"detector": {"version": "1.0.0", "p50_ms": 8.0 + i % 3, "p99_ms": 14.0,
                                 "count": 100}},
        )  # fmt: skip
        rows.append(row_from_sample(sample, sample.encode().decode()))
    return rows


def test_robot_page_draws_charts_from_stored_telemetry(served, page, tmp_path: Path) -> None:
    base, _ = served
    store = TelemetryStore(tmp_path / "telemetry.db")
    store.insert_batch(telemetry_rows("robot-01", 60))
    page.goto(base + "/robots/robot-01")
    page.wait_for_selector("body[data-ready='1']")
    for title in ("CPU / GPU load (%)", "Power (W)", "Inference latency (ms)"):
        page.wait_for_selector(f"div[data-chart='{title}'] canvas", timeout=10_000)
    assert (
        "detector@1.0.0 p50_ms"
        in page.locator("div[data-chart='Inference latency (ms)']").inner_text()
    )
    # A new sample arrives: the chart takes it without a reload.
    power = page.locator("div[data-chart='Power (W)']")
    before = int(power.get_attribute("data-points") or 0)
    store.insert_batch(telemetry_rows("robot-01", 1))
    page.wait_for_function(
        "(n) => Number(document.querySelector(\"div[data-chart='Power (W)']\").dataset.points) > n",
        arg=before,
        timeout=10_000,
    )
    screenshot(page, "robot.png")
    store.close()
