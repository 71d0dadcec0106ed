"""The controller's fleet view on RabbitMQ 3.10, which never delivers retained messages to
wildcard subscriptions: statuses of devices the controller knows of (its database) or is
told about (an explicit --target) are read by name. Operator commands run as subprocesses
against a real node, with a real agent (MQTT 3.1.1)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from controller.security.keystore import init_keys
from tests.agent.harness import AgentProcess, write_agent_config
from tests.controller.fleet import cli_env, run_cli
from tests.transport.brokers import Collector311

pytestmark = pytest.mark.rabbitmq


def test_devices_lists_an_agent_that_published_its_status_before_the_controller_subscribed(
    tmp_path: Path, rabbitmq: Any
) -> None:
    device = f"rmq-{uuid.uuid4().hex[:8]}"
    keys_dir = tmp_path / "keys"
    init_keys(keys_dir)
    provisioned = shutil.copy(keys_dir / "trust.json", tmp_path / "provisioned.json")
    env = cli_env(tmp_path, rabbitmq.url, keys_dir)
    config = tmp_path / "config" / "jetfleet" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[broker]\nurl = "{rabbitmq.url}"\nprotocol = "3.1.1"\n')
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=device,
        groups=["rmq-dock"],
        broker_url=rabbitmq.url,
        data_dir=tmp_path / "data-agent",
        trust_root=Path(provisioned),
        protocol="3.1.1",
        telemetry_interval_s=60,
    )

    def listed() -> dict[str, dict[str, Any]]:
        out = run_cli(env, "devices", "--output", "json")
        assert out.returncode == 0, out.stderr
        return {d["id"]: d for d in json.loads(out.stdout)}

    with Collector311(rabbitmq.url, device) as events, AgentProcess(cfg) as agent:
        events.wait_online(timeout=40)
        time.sleep(1.0)  # its start-up statuses are out: from now on it only has a retained one
        # A device never seen before is invisible to the wildcard here (the stated limit).
        assert device not in listed()

        # Named explicitly, it is read by name: online, no "never seen" warning, and the
        # trust update (first rotated, then pushed) reaches it.
        assert run_cli(env, "keys", "rotate").returncode == 0
        out = run_cli(env, "keys", "push", "--target", device, "--wait", "--output", "json",
                      timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr + agent.log()[-2000:]
        assert "never seen" not in out.stderr and "offline" not in out.stderr, out.stderr
        assert [d["state"] for d in json.loads(out.stdout)["devices"]] == ["SUCCEEDED"]

        # Known from the database now, `jetfleet devices` reads its retained status by name
        # every time: the fields only a status carries are there.
        time.sleep(1.0)
        record = listed()[device]
        assert record["online"] is True and record["groups"] == ["rmq-dock"]
        assert record["agent_version"], record
