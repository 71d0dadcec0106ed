"""Bundle download over real HTTP (a stdlib server with Range support) and file://."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.download import Canceled, DownloadError, DownloadLimits, fetch

BLOB = os.urandom(3 * 2**20 + 123)
SHA = hashlib.sha256(BLOB).hexdigest()


class Server:
    def __init__(self) -> None:
        self.mode = "ok"  # ok | drop_half | stall | endless | no_range
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = 0
                if rng and outer.mode != "no_range":
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
                else:
                    self.send_response(200)
                body = BLOB[start:]
                if outer.mode == "endless":
                    self.end_headers()
                    try:
                        while True:
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.mode == "drop_half":
                    outer.mode = "ok"
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                if outer.mode == "stall":
                    self.wfile.write(body[:1000])
                    self.wfile.flush()
                    time.sleep(3)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bundles/b.jfb"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


LIMITS = DownloadLimits(max_bytes=64 * 2**20, min_free_bytes=0, read_timeout_s=1.0, retries=2)


def test_http_download_hashes_and_lands_under_sha(server: Server, tmp_path: Path) -> None:
    path = fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=LIMITS)
    assert path == tmp_path / f"{SHA}.jfb" and path.read_bytes() == BLOB
    assert not list(tmp_path.glob("*.part"))


def test_dropped_connection_resumes_with_range(server: Server, tmp_path: Path) -> None:
    server.mode = "drop_half"
    path = fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=LIMITS)
    assert path.read_bytes() == BLOB
    assert server.ranges[0] is None and server.ranges[1] == f"bytes={len(BLOB) // 2}-"


def test_partial_file_from_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    (tmp_path / f"{SHA}.part").write_bytes(BLOB[:1000])
    fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=LIMITS)
    assert server.ranges == ["bytes=1000-"]


def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    server.mode = "no_range"
    (tmp_path / f"{SHA}.part").write_bytes(BLOB[:1000])
    path = fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=LIMITS)
    assert path.read_bytes() == BLOB


def test_stalled_server_times_out(server: Server, tmp_path: Path) -> None:
    server.mode = "stall"
    limits = DownloadLimits(max_bytes=2**30, min_free_bytes=0, read_timeout_s=0.5, retries=0)
    with pytest.raises(DownloadError, match="slow retrieval") as e:
        fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=limits)
    assert e.value.code == "download_failed"


def test_endless_data_stops_at_declared_size(server: Server, tmp_path: Path) -> None:
    server.mode = "endless"
    with pytest.raises(DownloadError, match="endless data") as e:
        fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=LIMITS)
    assert e.value.code == "too_large"
    assert (tmp_path / f"{SHA}.part").stat().st_size <= len(BLOB)


def test_wrong_content_is_refused_and_removed(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="sha256") as e:
        fetch(server.url, sha256="1" * 64, size=len(BLOB), downloads=tmp_path, limits=LIMITS)
    assert e.value.code == "bundle_invalid"
    assert list(tmp_path.iterdir()) == []


def test_declared_size_over_config_cap_is_refused_before_any_request(
    server: Server, tmp_path: Path
) -> None:
    limits = DownloadLimits(max_bytes=1000, min_free_bytes=0)
    with pytest.raises(DownloadError) as e:
        fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=limits)
    assert e.value.code == "too_large" and server.ranges == []


def test_not_enough_disk_is_refused_before_download(server: Server, tmp_path: Path) -> None:
    limits = DownloadLimits(max_bytes=2**40, min_free_bytes=2**50)
    with pytest.raises(DownloadError, match="not enough disk") as e:
        fetch(server.url, sha256=SHA, size=len(BLOB), downloads=tmp_path, limits=limits)
    assert e.value.code == "disk_full" and server.ranges == []


def test_cancel_stops_download_and_keeps_resumable_prefix(server: Server, tmp_path: Path) -> None:
    calls = []

    def canceled() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Canceled):
        fetch(
            server.url,
            sha256=SHA,
            size=len(BLOB),
            downloads=tmp_path,
            limits=LIMITS,
            canceled=canceled,
        )
    assert 0 < (tmp_path / f"{SHA}.part").stat().st_size < len(BLOB)


def test_file_url_is_hashed_in_place(tmp_path: Path) -> None:
    src = tmp_path / "b.jfb"
    src.write_bytes(BLOB)
    dl = tmp_path / "dl"
    assert fetch(src.as_uri(), sha256=SHA, size=len(BLOB), downloads=dl, limits=LIMITS) == src
    with pytest.raises(DownloadError) as e:
        fetch(src.as_uri(), sha256=SHA, size=len(BLOB) - 1, downloads=dl, limits=LIMITS)
    assert e.value.code == "too_large"
