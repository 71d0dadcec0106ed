"""`jetfleet serve`: bundles over HTTP with Range requests and nothing else, the state
file rollouts read, and the whole service (ingestion + HTTP + metrics) up and down."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.publish as publish
import pytest
import structlog

from controller.fleet.registry import Registry
from controller.sandbox.localbroker import LocalMosquitto, free_port
from controller.server.serve import (
    JetfleetHTTPServer,
    JetfleetServer,
    ServeConfig,
    parse_range,
)
from controller.server.state import (
    ServeState,
    read_serve_state,
    remove_serve_state,
    write_serve_state,
)
from protocol.messages import DeviceStatus
from protocol.topics import Topics


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands configure structlog for the process (bound to the stderr of their
    moment); start and end each test with the default configuration."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


BUNDLE = bytes(range(256)) * 40  # 10240 bytes, every offset recognisable


@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[tuple[JetfleetHTTPServer, Path]]:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "detector-1.2.0.jfb").write_bytes(BUNDLE)
    (tmp_path / "secret.key").write_text("do not serve")
    srv = JetfleetHTTPServer(("127.0.0.1", 0), bundle_dir=bundles, registry=None)
    srv.start()
    yield srv, bundles
    srv.shutdown()
    srv.server_close()


def get(
    srv: JetfleetHTTPServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_whole_bundle_is_served_with_length_and_range_support(bundle_server) -> None:
    srv, _ = bundle_server
    status, h, body = get(srv, "/bundles/detector-1.2.0.jfb")
    assert status == 200 and body == BUNDLE
    assert h["content-length"] == str(len(BUNDLE)) and h["accept-ranges"] == "bytes"
    assert h["content-type"] == "application/octet-stream" and h["etag"]


@pytest.mark.parametrize(
    ("rng", "start", "end"),
    [("bytes=100-199", 100, 199), ("bytes=10000-", 10000, 10239), ("bytes=-40", 10200, 10239)],
)
def test_range_request_resumes_a_download(bundle_server, rng: str, start: int, end: int) -> None:
    srv, _ = bundle_server
    status, h, body = get(srv, "/bundles/detector-1.2.0.jfb", {"Range": rng})
    assert status == 206
    assert body == BUNDLE[start : end + 1]
    assert h["content-range"] == f"bytes {start}-{end}/{len(BUNDLE)}"
    assert h["content-length"] == str(end - start + 1)


def test_unsatisfiable_range_is_416_with_the_size(bundle_server) -> None:
    srv, _ = bundle_server
    status, h, _ = get(srv, "/bundles/detector-1.2.0.jfb", {"Range": "bytes=20000-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(BUNDLE)}"


def test_a_stale_if_range_gets_the_whole_new_file(bundle_server) -> None:
    srv, _ = bundle_server
    status, _, body = get(
        srv, "/bundles/detector-1.2.0.jfb", {"Range": "bytes=100-199", "If-Range": '"old"'}
    )
    assert status == 200 and body == BUNDLE


def test_head_gives_headers_without_body(bundle_server) -> None:
    srv, _ = bundle_server
    status, h, body = get(srv, "/bundles/detector-1.2.0.jfb", method="HEAD")
    assert status == 200 and body == b"" and h["content-length"] == str(len(BUNDLE))


@pytest.mark.parametrize(
    "path",
    [
        "/bundles/",
        "/bundles",
        "/bundles/../secret.key",
        "/bundles/%2e%2e%2fsecret.key",
        "/bundles/..%2Fsecret.key",
        "/bundles/%2Fetc%2Fpasswd",
        "/bundles/.hidden.jfb",
        "/bundles/missing.jfb",
        "/bundles/sub/detector-1.2.0.jfb",
        "/secret.key",
        "/",
    ],
)
def test_no_listing_no_traversal_nothing_outside_the_bundle_dir(bundle_server, path: str) -> None:
    srv, _ = bundle_server
    status, _, body = get(srv, path)
    assert status == 404
    assert b"do not serve" not in body and b"detector" not in body


def test_symlinks_and_directories_in_the_bundle_dir_are_not_served(
    bundle_server, tmp_path: Path
) -> None:
    srv, bundles = bundle_server
    (bundles / "link.jfb").symlink_to(tmp_path / "secret.key")
    (bundles / "adir.jfb").mkdir()
    assert get(srv, "/bundles/link.jfb")[0] == 404
    assert get(srv, "/bundles/adir.jfb")[0] == 404


def test_the_server_counts_the_connections_it_held_and_refused(tmp_path: Path) -> None:
    srv = JetfleetHTTPServer(
        ("127.0.0.1", 0), bundle_dir=tmp_path, registry=None, max_connections=2
    )
    srv.start()
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(5)]
    try:
        deadline = time.monotonic() + 5
        while srv.connections.refused < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (srv.connections.peak, srv.connections.refused) == (2, 3)
    finally:
        for s in held:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_parse_range_edge_cases() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-100", 10) == (0, 9)
    assert parse_range("bytes=10-", 10) is None
    assert parse_range("bytes=-0", 10) is None
    assert parse_range("bytes=7-3", 10) is None
    for bad in ("bytes=0-1,4-5", "items=0-1", "bytes=-", "garbage"):
        with pytest.raises(ValueError):
            parse_range(bad, 10)


def test_state_file_is_atomic_and_only_trusted_while_its_process_lives(tmp_path: Path) -> None:
    state = ServeState("http://ctl:8380/bundles", "http://ctl:8380/metrics", os.getpid())
    write_serve_state(tmp_path, state)
    assert read_serve_state(tmp_path) == state
    assert state.bundle_url("a-1.0.0.jfb") == "http://ctl:8380/bundles/a-1.0.0.jfb"
    assert not list(tmp_path.glob(".*tmp"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_serve_state(tmp_path, ServeState(state.bundle_url_base, state.metrics_url, dead.pid))
    assert read_serve_state(tmp_path) is None  # a crashed server's leftover
    remove_serve_state(tmp_path, pid=os.getpid())  # not ours: stays
    assert (tmp_path / "serve.json").exists()
    remove_serve_state(tmp_path, pid=dead.pid)
    assert not (tmp_path / "serve.json").exists()
    (tmp_path / "serve.json").write_text("{half")
    assert read_serve_state(tmp_path) is None


def test_server_runs_ingestion_bundles_and_metrics_then_cleans_up(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    cfg = ServeConfig(
        broker=mosquitto.url,
        telemetry_db=tmp_path / "data" / "telemetry.db",
        bundle_dir=tmp_path / "bundles",
        data_dir=tmp_path / "data",
        host="127.0.0.1",
        http_port=0,
        metrics_port=free_port(),
        advertise_host="controller.local",
        controller_db=tmp_path / "data" / "controller.db",
    )
    server = JetfleetServer(cfg)
    state = server.start()
    try:
        assert read_serve_state(cfg.data_dir) == state
        assert state.bundle_url_base.startswith("http://controller.local:")
        assert state.bundle_url_base.endswith("/bundles")
        (cfg.bundle_dir / "m-1.0.0.jfb").write_bytes(b"bundle bytes")
        assert server.http is not None and server.metrics_http is not None
        assert get(server.http, "/bundles/m-1.0.0.jfb")[2] == b"bundle bytes"
        status, h, body = get(server.metrics_http, "/metrics")
        assert status == 200 and h["content-type"].startswith("text/plain")
        assert b"jetfleet_telemetry_samples_total" in body
        assert get(server.metrics_http, "/bundles/m-1.0.0.jfb")[0] == 404  # metrics only
        assert server.ingester is not None and server.ingester.wait_connected(5)
        # A robot's retained status reaches the controller database with no CLI running.
        status = DeviceStatus.new(device_id="robot-7", online=True, groups=["dock"])
        publish.single(
            Topics().status("robot-7"), status.encode(), qos=1, retain=True,
            hostname="127.0.0.1", port=mosquitto.port,
        )  # fmt: skip
        registry = Registry.open(cfg.controller_db)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while registry.get("robot-7") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = registry.get("robot-7")
        assert seen is not None and seen.online and seen.groups == ["dock"]
    finally:
        server.stop()
    assert not (cfg.data_dir / "serve.json").exists()


def test_jetfleet_serve_command_runs_until_sigterm_and_removes_its_state_file(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    """Also: the console's token comes from the config file when no option or env gives it."""
    data = tmp_path / "data"
    port = free_port()
    config = tmp_path / "controller.toml"
    config.write_text('console_token = "from-the-file"\n')
    env = {
        **os.environ,
        "JETFLEET_BROKER": mosquitto.url,
        "JETFLEET_DB": str(data / "controller.db"),
        "JETFLEET_CONFIG": str(config),
    }
    env.pop("JETFLEET_CONSOLE_TOKEN", None)
    cli = [sys.executable, "-c", "from controller.cli.main import app; app()", "serve"]
    proc = subprocess.Popen(
        [*cli, "--host", "127.0.0.1", "--http-port", str(port), "--advertise-host", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and read_serve_state(data) is None:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.1)
        state = read_serve_state(data)
        assert state is not None and state.pid == proc.pid
        assert state.bundle_url_base == f"http://127.0.0.1:{port}/bundles"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")  # open to Prometheus: no token
        metrics = conn.getresponse()
        metrics.read()
        assert metrics.status == 200
        for headers, status in (({}, 401), ({"Authorization": "Bearer from-the-file"}, 200)):
            conn.request("GET", "/api/fleet", headers=headers)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == status
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert not (data / "serve.json").exists()


def test_serve_with_an_unreachable_broker_exits_1_with_the_reason(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from controller.cli.main import app

    r = CliRunner().invoke(
        app,
        [
            "--broker",
            f"mqtt://127.0.0.1:{free_port()}",
            "--db",
            str(tmp_path / "c.db"),
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
        ],
    )
    assert r.exit_code == 1
    assert "cannot connect" in r.stderr and "Connection refused" in r.stderr
    assert not (tmp_path / "serve.json").exists()


def test_several_ingest_workers_on_mqtt311_is_a_usage_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from controller.cli.main import app

    cfg = tmp_path / "config.toml"
    cfg.write_text('protocol = "3.1.1"\n')
    r = CliRunner().invoke(
        app,
        [
            "--config",
            str(cfg),
            "--broker",
            "mqtt://127.0.0.1:1",
            "--db",
            str(tmp_path / "c.db"),
            "serve",
            "--http-port",
            "0",
            "--ingest-workers",
            "2",
        ],
    )
    assert r.exit_code == 2 and "MQTT 5 shared subscription" in r.stderr


def test_the_console_token_option_beats_the_environment_which_beats_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller.settings import ControllerSettings

    config = tmp_path / "config.toml"
    config.write_text('console_token = "file"\n[contexts.site]\nconsole_token = "site"\n')
    monkeypatch.delenv("JETFLEET_CONSOLE_TOKEN", raising=False)
    monkeypatch.delenv("JETFLEET_CONTEXT", raising=False)
    assert ControllerSettings.load(config=config).console_token == "file"
    assert ControllerSettings.load(config=config, context="site").console_token == "site"
    monkeypatch.setenv("JETFLEET_CONSOLE_TOKEN", "env")
    assert ControllerSettings.load(config=config, context="site").console_token == "env"
    given = ControllerSettings.load({"console_token": "option"}, config=config)
    assert given.console_token == "option"
