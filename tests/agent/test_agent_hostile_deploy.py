"""A deploy against a real agent subprocess that a peer or a bundle tries to hold or bloat:
a download server that trickles, a golden file that inflates, a same-version rebuild."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from protocol.keys import SigningKey
from protocol.topics import Topics
from protocol.trust import build_trust_root
from tests.agent.harness import (
    REPO,
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

DEV = "robot-9"


class TricklingServer:
    """Announces the whole Content-Length, then sends one byte every `gap_s` (each read
    well under the agent's read timeout), as a hostile or broken mirror may."""

    def __init__(self, size: int, gap_s: float = 0.5) -> None:
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    while not outer.stop.wait(gap_s):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                except OSError:
                    return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/b.jfb"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class Robot:
    def __init__(self, tmp: Path, broker_url: str, tm: Any, events: EventCollector) -> None:
        self.tmp, self.broker_url, self.tm, self.events = tmp, broker_url, tm, events

    def send(self, kind: str, body: dict[str, Any]) -> str:
        cmd = make_command(DEV, kind, body)
        publish(self.broker_url, Topics().device_cmd(DEV), sign_command(cmd, self.tm.operator))
        return cmd.command_id


@contextmanager
def robot(
    tmp: Path, mosquitto: Any, tm: Any, extra: dict[str, dict[str, Any]] | None = None
) -> Iterator[tuple[Robot, AgentProcess]]:
    cfg = write_agent_config(
        tmp / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=tmp / "data",
        trust_root=tm.write(tmp / "trust.json"),
        extra=extra,
    )
    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg) as agent:
        events.wait_online()
        yield Robot(tmp, mosquitto.url, tm, events), agent


@pytest.fixture
def trickle(tmp_path: Path, trust_material: Any) -> Iterator[tuple[TricklingServer, Path]]:
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    server = TricklingServer(bundle.stat().st_size)
    yield server, bundle
    server.close()


# ---- a trickling download server --------------------------------------------------------


@pytest.mark.serial  # asserts a wall-clock bound
@pytest.mark.slow
def test_a_trickling_download_ends_at_the_job_deadline(
    tmp_path: Path, mosquitto: Any, trust_material: Any, trickle: tuple[TricklingServer, Path]
) -> None:
    server, bundle = trickle
    extra = {"limits": {"job_timeout_s": 3}, "download": {"read_timeout_s": 2}}
    with robot(tmp_path, mosquitto, trust_material, extra) as (r, agent):
        sent = time.monotonic()
        cid = r.send("deploy", deploy_body(bundle, url=server.url))
        final = r.events.wait_terminal(cid, timeout=15)
        took = time.monotonic() - sent
        assert (final.state.value, final.code) == ("TIMED_OUT", "timed_out"), agent.log()[-2000:]
        assert "limits.job_timeout_s" in (final.reason or "")
        assert took < 6, took


@pytest.mark.serial  # asserts a wall-clock bound
@pytest.mark.slow
def test_a_cancel_stops_a_trickling_download_within_seconds_and_the_next_job_runs(
    tmp_path: Path, mosquitto: Any, trust_material: Any, trickle: tuple[TricklingServer, Path]
) -> None:
    server, bundle = trickle
    with robot(tmp_path, mosquitto, trust_material, {"download": {"read_timeout_s": 2}}) as (
        r,
        agent,
    ):
        cid = r.send("deploy", deploy_body(bundle, url=server.url))
        r.events.wait_state(cid, "DOWNLOADING", timeout=15)
        time.sleep(1.0)  # the worker is inside the read now
        asked = time.monotonic()
        cancel = r.send("cancel", {"command_id": cid})
        final = r.events.wait_terminal(cid, timeout=10)
        assert (final.state.value, final.code) == ("CANCELED", "canceled")
        assert time.monotonic() - asked < 3
        assert r.events.wait_terminal(cancel).state.value == "SUCCEEDED"
        # The worker is free again: a later deploy runs to the end.
        later = r.send("deploy", deploy_body(bundle))
        done = r.events.wait_terminal(later, timeout=90)
        assert done.state.value == "SUCCEEDED", agent.log()[-2000:]


@pytest.mark.slow
def test_a_download_below_the_minimum_rate_fails_with_the_rate_in_the_reason(
    tmp_path: Path, mosquitto: Any, trust_material: Any, trickle: tuple[TricklingServer, Path]
) -> None:
    server, bundle = trickle
    extra = {
        "download": {
            "read_timeout_s": 2,
            "retries": 0,
            "min_rate_bytes_s": 100,
            "min_rate_window_s": 2,
        }
    }
    with robot(tmp_path, mosquitto, trust_material, extra) as (r, _agent):
        cid = r.send("deploy", deploy_body(bundle, url=server.url))
        final = r.events.wait_terminal(cid, timeout=15)
        assert (final.state.value, final.code) == ("FAILED", "download_failed")
        assert "below download.min_rate_bytes_s = 100" in (final.reason or "")
        assert "\n" not in (final.reason or "")


def _watchdog_pings(sock: socket.socket, seconds: float) -> int:
    n, until = 0, time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            n += b"WATCHDOG=1" in sock.recv(4096)
        except TimeoutError:
            break
    return n


@pytest.mark.slow
def test_the_watchdog_stops_pinging_while_a_job_makes_no_progress(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    """A worker held inside a step (here the test hook that parks it at DOWNLOADING)
    stops the systemd watchdog pings, so systemd restarts the agent and the job resumes."""
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
        extra={
            "limits": {"worker_stall_s": 1},
            "activation": {"hook_timeout_s": 1, "health_timeout_s": 1},
            "download": {"read_timeout_s": 1, "connect_timeout_s": 1},
        },
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
    env.update(
        PYTHONPATH=str(REPO),
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="1000000",
        JETFLEET_AGENT_TEST_PAUSE_AT="DOWNLOADING",
    )
    with EventCollector(mosquitto.url, DEV) as events, (tmp_path / "a.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
            cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            events.wait_online()
            assert _watchdog_pings(notify, 1.0) >= 1  # healthy while idle
            r = Robot(tmp_path, mosquitto.url, trust_material, events)
            r.send("deploy", deploy_body(bundle))
            events.wait(
                lambda: any(e.state.value == "DOWNLOADING" for e in events.events), 15, "DL"
            )
            # Quiet limit: max(worker_stall_s, hook + health, read + connect) + 5 s grace.
            _watchdog_pings(notify, 8.0)
            assert _watchdog_pings(notify, 2.0) == 0
        finally:
            proc.kill()
            proc.wait()
            notify.close()


# ---- version identity ---------------------------------------------------------------------


def _deploy(r: Robot, bundle: Path, timeout: float = 90) -> Any:
    return r.events.wait_terminal(r.send("deploy", deploy_body(bundle)), timeout=timeout)


@pytest.mark.slow
def test_a_different_build_of_the_same_version_is_installed_not_reported_already_active(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    rel = trust_material.release
    a = build_bundle(tmp_path, rel, version="1.0.0+build.a")
    b = build_bundle(tmp_path, rel, version="1.0.0+build.b", seed=2)
    with robot(tmp_path, mosquitto, trust_material) as (r, agent):
        assert _deploy(r, a).state.value == "SUCCEEDED", agent.log()[-2000:]
        final = _deploy(r, b)
        assert (final.state.value, final.reason) == ("SUCCEEDED", None), final
        assert engine_link_state(tmp_path / "data", "detector") == (
            "1.0.0+build.b",
            "1.0.0+build.a",
        )
        # The same bundle again is the active one (same sha256): nothing to do.
        again = _deploy(r, b)
        assert again.state.value == "SUCCEEDED"
        assert again.reason == "detector 1.0.0+build.b is already active"
        # Other bytes under the active version string are refused, not taken for it.
        clash = build_bundle(tmp_path, rel, version="1.0.0+build.b", seed=3)
        refused = _deploy(r, clash)
        assert (refused.state.value, refused.code) == ("REJECTED", "bundle_invalid")
        assert "already active from another bundle" in (refused.reason or "")
        assert engine_link_state(tmp_path / "data", "detector")[0] == "1.0.0+build.b"


@pytest.mark.slow
def test_a_redeploy_that_no_longer_verifies_keeps_the_held_bundle_for_a_rollback_rebuild(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    old = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    new_release = SigningKey.generate()
    rotated = build_trust_root(
        root=[trust_material.root],
        release=[new_release],
        operator=[trust_material.operator],
        version=2,
        sign_with=[trust_material.root],
    )
    with robot(tmp_path, mosquitto, trust_material) as (r, agent):
        assert _deploy(r, old).state.value == "SUCCEEDED", agent.log()[-2000:]
        cid = r.send("trust_update", {"trust_root": json.loads(rotated.encode())})
        assert r.events.wait_terminal(cid).state.value == "SUCCEEDED"
        # The active bundle again: its release key is no longer trusted.
        refused = _deploy(r, old)
        assert refused.state.value == "REJECTED", refused
        assert _deploy(r, build_bundle(tmp_path, new_release, version="2.0.0", seed=2)).state \
            .value == "SUCCEEDED"  # fmt: skip
        # 1.0.0's engine is unusable now: going back must rebuild it from its held bundle.
        engine = tmp_path / "data" / "models" / "detector" / "versions" / "1.0.0" / "engine"
        engine.unlink()
        engine.write_bytes(b"not an engine")
        back = r.send("rollback", {"model": "detector", "to_version": "1.0.0"})
        final = r.events.wait_terminal(back, timeout=90)
        assert final.state.value == "SUCCEEDED", final
        assert "BUILDING" in r.events.states(back)


# ---- a golden file that inflates -----------------------------------------------------------

GIB = 2**30


@pytest.mark.slow
def test_a_golden_file_with_an_unnamed_inflating_array_is_rejected_before_it_is_read(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    """1 GiB of zeros deflates to about 1 MB of bundle. Under a 400 MiB cap on the engine
    child, reading it would end in MemoryError: the refusal naming it shows that the child
    only read the npy header."""
    bundle = build_bundle(
        tmp_path, trust_material.release, golden_zeros={"output.pad": ((GIB // 4,), "float32")}
    )
    assert bundle.stat().st_size < 8 * 2**20
    extra = {"limits": {"engine_memory_mb": 400}}
    with robot(tmp_path, mosquitto, trust_material, extra) as (r, _agent):
        final = _deploy(r, bundle)
        assert (final.state.value, final.code) == ("REJECTED", "bundle_invalid"), final
        assert final.reason == (
            "bundle refused: golden file golden.npz has array 'output.pad', "
            "which the manifest does not name"
        )
        assert "BUILDING" in r.events.states(final.command_id)
        assert not (tmp_path / "data" / "models" / "detector").exists()


@pytest.mark.slow
def test_a_golden_input_with_a_huge_dynamic_dimension_is_rejected_by_its_decoded_size(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    rows = GIB // (64 * 4)  # input "x" is ["batch", 64] float32: 1 GiB decoded
    bundle = build_bundle(
        tmp_path, trust_material.release, golden_zeros={"input.x": ((rows, 64), "float32")}
    )
    with robot(tmp_path, mosquitto, trust_material) as (r, _agent):
        final = _deploy(r, bundle)
        assert (final.state.value, final.code) == ("REJECTED", "bundle_invalid"), final
        assert "array 'input.x' brings its arrays to 1024 MiB decoded" in (final.reason or "")
        assert "limits.max_golden_mb" in (final.reason or "")


@pytest.mark.slow
def test_the_engine_child_memory_cap_fails_a_job_that_would_exhaust_the_device(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    """A golden file within limits.max_golden_mb (raised here) but over the child's cap:
    the child fails with MemoryError under its cap; the agent and the device stay fine."""
    rows = GIB // (64 * 4)
    bundle = build_bundle(
        tmp_path, trust_material.release, golden_zeros={"input.x": ((rows, 64), "float32")}
    )
    extra = {"limits": {"max_golden_mb": 4096, "engine_memory_mb": 400}}
    with robot(tmp_path, mosquitto, trust_material, extra) as (r, agent):
        final = _deploy(r, bundle)
        assert (final.state.value, final.code) == ("FAILED", "build_failed"), final
        assert "out of the engine child's cap of 400 MiB (limits.engine_memory_mb)" in (
            final.reason or ""
        )
        assert agent.alive()
