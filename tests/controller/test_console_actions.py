"""Console actions on a server that holds the operator key: only an authenticated,
same-site request with the action header reaches the rollout; the rest get 401/403
with a one-line reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from console_harness import console_server
from fleet import SimFleet, make_devices, run_cli

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from controller.settings import ControllerSettings

TOKEN = "t0ken-for-tests"


@pytest.fixture
def console(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    db = Path(env["JETFLEET_DB"])
    operator = ControllerSettings.load(
        {"broker": env["JETFLEET_BROKER"], "keys": Path(env["JETFLEET_KEYS"]), "db": db},
        config=tmp_path / "none.toml",
    )
    with console_server(db, tmp_path / "state", token=TOKEN, actions=operator) as (base, _):
        yield base


def test_only_an_authenticated_same_site_action_reaches_the_rollout(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path, console: str
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)):
        out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", "--wait",
                      "--output", "json")  # fmt: skip
    rid = json.loads(out.stdout)["rollout"]["id"]
    url = f"{console}/api/rollouts/{rid}/pause"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    action = {**auth, "X-Jetfleet-Action": "1"}
    refusals = [
        (httpx.post(url, headers={"X-Jetfleet-Action": "1"}), 401, "not authenticated"),
        (httpx.post(url, headers=auth), 403, "no x-jetfleet-action header"),
        (httpx.post(url, headers={**action, "Origin": "https://evil.example"}), 403,
         "origin https://evil.example is not this server"),
    ]  # fmt: skip
    for r, status, reason in refusals:
        assert r.status_code == status and reason in r.json()["error"], r.text
    # Authenticated and same-site: it reaches the rollout, which has ended.
    r = httpx.post(url, headers={**action, "Origin": console})
    assert r.status_code == 409 and "cannot pause now" in r.json()["error"]
    assert httpx.get(f"{console}/api/info", headers=auth).json() == {"actions": True}
