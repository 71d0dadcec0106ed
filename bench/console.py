"""The console under load: the fleet page with 1,000 robots in Chromium, and the
server's memory while 20 clients follow live updates.

    .venv/bin/python bench/console.py [--robots 1000] [--clients 20] [--seconds 15]

Starts a real `jetfleet serve --no-ingest` on loopback over a controller database with
N simulated robots (statuses through the registry's ingest path). Reports the median of
5 loads of `/` until the page is interactive (its rows rendered, `body[data-ready]`),
measured by the browser from navigation start; then the server's RSS idle and while
`--clients` server-sent-event clients follow the fleet as robots change every 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.fleet.registry import Registry  # noqa: E402
from controller.sandbox.localbroker import free_port  # noqa: E402
from controller.server.state import read_serve_state  # noqa: E402
from protocol.messages import DeviceStatus, HardwareProfile, ModelSlot  # noqa: E402


def status(i: int, version: str, online: bool = True) -> DeviceStatus:
    return DeviceStatus.new(
        device_id=f"robot-{i:04d}",
        online=online,
        agent_version="0.1.0",
        groups=[f"site-{i % 7}", "all-robots"],
        hardware=HardwareProfile(device_model="Jetson Orin NX", jetpack="6.0"),
        models={"detector": ModelSlot(active=version), "segmenter": ModelSlot(active="2.0.0")},
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_serve(data: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "JETFLEET_DB": str(data / "controller.db"),
        "JETFLEET_CONFIG": str(data / "none.toml"),
        "JETFLEET_BROKER": "mqtt://127.0.0.1:1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", "from controller.cli.main import app; app()", "serve",
         "--no-ingest", "--host", "127.0.0.1", "--http-port", str(port)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while read_serve_state(data) is None:
        time.sleep(0.1)
    return proc


def page_loads(base: str, runs: int = 5) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        for _ in range(runs):
            page.goto(base + "/?limit=1000")
            page.wait_for_selector("body[data-ready='1']")
            times.append(page.evaluate("performance.now()") / 1000)
        rows = page.locator("#robots tbody tr").count()
        browser.close()
    print(f"rows rendered: {rows}")
    return times


def follow(base: str, stop: threading.Event, events: list[int]) -> None:
    try:
        with httpx.stream("GET", base + "/api/events?topics=fleet", timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith("event:"):
                    events.append(1)
                if stop.is_set():
                    return
    except httpx.HTTPError:  # the server stopped first
        return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--robots", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=15.0)
    a = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="console-bench-"))
    registry = Registry.open(data / "controller.db")
    for i in range(a.robots):
        registry.apply_status(status(i, "1.0.0", online=i % 10 != 0))
    port = free_port()
    proc = start_serve(data, port)
    base = f"http://127.0.0.1:{port}"
    try:
        loads = page_loads(base)
        print(f"fleet page, {a.robots} robots: interactive in median "
              f"{statistics.median(loads) * 1000:.0f} ms (runs: "
              f"{', '.join(f'{t * 1000:.0f}' for t in loads)} ms)")  # fmt: skip
        idle = rss_mib(proc.pid)
        stop, events = threading.Event(), []  # type: ignore[var-annotated]
        clients = [threading.Thread(target=follow, args=(base, stop, events), daemon=True)
                   for _ in range(a.clients)]  # fmt: skip
        for t in clients:
            t.start()
        peak, end, n = idle, time.monotonic() + a.seconds, 0
        while time.monotonic() < end:
            n += 1
            for i in range(n % 50, a.robots, 50):  # 20 robots change every 0.2 s
                registry.apply_status(status(i, f"1.{n}.0"))
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.2)
        stop.set()
        print(f"server RSS: idle {idle:.0f} MiB, peak {peak:.0f} MiB with {a.clients} live "
              f"clients ({len(events)} events delivered in {a.seconds:.0f} s)")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
