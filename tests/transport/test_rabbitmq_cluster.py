"""A rollout on a RabbitMQ cluster with no load balancer: three nodes on this machine,
agents on different nodes, each agent and the controller given the nodes as a list
(`broker.url = "mqtt://n1,mqtt://n3"`). One rollout succeeds across the nodes; in a second
one the node the controller and one agent are connected to is stopped mid-rollout, both
move on to the next node of their list, and the rollout completes: their persistent
sessions are quorum queues, so the queued commands and events survive the node.

Three nodes, not two: RabbitMQ's quorum queues (and its MQTT client-id tracking in 3.10)
need a majority of the nodes, so a two-node cluster cannot lose either node. With
classic queues a two-node cluster keeps running, but a client whose session queue lived
on the stopped node cannot subscribe on the other one until that node returns (both
checked by hand on 3.10.8, docs/brokers.md §6)."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from controller.rollouts.store import SUCCEEDED
from tests.agent.harness import AgentProcess, build_bundle, write_agent_config
from tests.controller.fleet import ControllerHarness
from tests.transport.brokers import Collector311
from tests.transport.rabbit import RabbitCluster, rabbitmq_missing

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


def _bundle_args(bundle: Path) -> dict[str, Any]:
    data = bundle.read_bytes()
    return {
        "bundle_url": bundle.resolve().as_uri(),
        "bundle_sha256": hashlib.sha256(data).hexdigest(),
        "bundle_size": len(data),
    }


def test_a_rollout_completes_across_a_cluster_with_one_node_stopped_mid_rollout(
    tmp_path: Path, trust_material: Any
) -> None:
    why = rabbitmq_missing()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    dev_a, dev_b = f"rmqc-{tag}-a", f"rmqc-{tag}-b"
    trust = trust_material.write(tmp_path / "trust.json")
    with RabbitCluster(tmp_path / "cluster", size=3) as cluster, ExitStack() as stack:
        n1, n2, n3 = cluster.nodes
        lists = {dev_a: f"{n1.url},{n3.url}", dev_b: f"{n2.url},{n3.url}"}
        agents = {}
        for device, urls in lists.items():
            cfg = write_agent_config(
                tmp_path / f"{device}.toml", device_id=device, broker_url=urls,
                data_dir=tmp_path / f"data-{device}", trust_root=trust, protocol="3.1.1",
            )  # fmt: skip
            events = stack.enter_context(Collector311(urls.split(",")[0], device))
            agents[device] = stack.enter_context(AgentProcess(cfg))
            events.wait_online(timeout=60)
        h = ControllerHarness(
            tmp_path / "controller.db", f"{n1.url},{n2.url},{n3.url}",
            trust_material.operator, protocol="3.1.1",
        )  # fmt: skip

        def roll_out(version: str, during: Any = None) -> str:
            bundle = build_bundle(tmp_path / version, trust_material.release, version=version)
            rid = h.create(
                [dev_a, dev_b], model="detector", version=version, waves_spec="1,100%",
                wave_timeout=120.0, **_bundle_args(bundle),
            )  # fmt: skip
            result: dict[str, Any] = {}
            driver = threading.Thread(target=lambda: result.update(r=h.drive(rid)))
            driver.start()
            if during is not None:
                during(driver)
            driver.join(300)
            logs = {d: a.log()[-2000:] for d, a in agents.items()}
            assert not driver.is_alive(), ("rollout did not finish", logs)
            assert result["r"].state == SUCCEEDED, (result["r"].abort_reason, logs)
            return rid

        roll_out("1.0.0")  # dev_a on node 1, dev_b on node 2, the controller on node 1

        stopped_at: dict[str, float] = {}

        def stop_node_1(driver: threading.Thread) -> None:
            time.sleep(1.0)  # the first wave's command is out, its agent is building
            assert driver.is_alive(), "the rollout ended before the node was stopped"
            n1.stop()
            stopped_at["s"] = time.monotonic()

        started = time.monotonic()
        rid = roll_out("2.0.0", during=stop_node_1)
        print(
            f"rollout 2.0.0: {time.monotonic() - started:.1f} s, node 1 stopped at "
            f"{stopped_at['s'] - started:.1f} s"
        )
        summary = h.store.summary(rid)
        assert [w.state for w in summary.waves] == ["done", "done"]
        a_log = agents[dev_a].log()
        # dev_a moved from node 1 to node 3, its list's next node.
        assert "mqtt_next_broker" in a_log and n3.url in a_log.split("mqtt_next_broker")[-1]
