"""Staged activation: what `activate` costs against the deploy it replaces.

Real agents (subprocesses) on a private Mosquitto, each with v1 active. Per round, in the
same process and on the same agents:
  1. plain: a deploy of the next version, publish → every agent SUCCEEDED (download,
     verify, build, gate, switch, probation);
  2. staged: a deploy with stage=true of the version after, publish → every agent
     STAGED; then one `activate` per agent, publish of the first → every agent SUCCEEDED.
Medians over the rounds; the ratio activate / plain is what a fleet waits at switch time.

    .venv/bin/python bench/staged_activation.py --agents 3 --rounds 3 --work 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.sandbox.localbroker import LocalMosquitto  # noqa: E402
from protocol.keys import SigningKey  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from protocol.trust import build_trust_root  # noqa: E402
from tests.agent.harness import (  # noqa: E402
    AgentProcess,
    EventCollector,
    Publisher,
    build_bundle,
    deploy_body,
    make_command,
    sign_command,
    write_agent_config,
)


def _all(events: list[EventCollector], cids: list[str], state: str, timeout: float) -> None:
    for ev, cid in zip(events, cids, strict=True):
        ev.wait_state(cid, state, timeout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=float, default=40.0, help="model size (tests/models.py)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-staged-"))
    root, release, operator = (SigningKey.generate() for _ in range(3))
    trust = tmp / "trust.json"
    envelope = build_trust_root(root=[root], release=[release], operator=[operator])
    trust.write_bytes(envelope.encode())
    versions = [f"1.{i}.0" for i in range(2 * args.rounds + 1)]
    bundles = {v: build_bundle(tmp, release, version=v, extra_work=args.work) for v in versions}
    broker = LocalMosquitto(tmp / "broker")
    broker.start()
    ids = [f"bench-{i}" for i in range(args.agents)]
    agents, events = [], []
    plain, stage, activate = [], [], []
    try:
        for d in ids:
            cfg = write_agent_config(tmp / d / "agent.toml", device_id=d, broker_url=broker.url,
                                     data_dir=tmp / d / "data", trust_root=trust)  # fmt: skip
            events.append(EventCollector(broker.url, d).start())
            agents.append(AgentProcess(cfg).start())
        for ev in events:
            ev.wait_online()
        pub = Publisher(broker.url)

        def deploy(version: str, **extra: object) -> tuple[list[str], float]:
            cmds = [make_command(d, "deploy", deploy_body(bundles[version], **extra)) for d in ids]
            envs = [sign_command(c, operator) for c in cmds]
            t0 = time.monotonic()
            for d, env in zip(ids, envs, strict=True):
                pub.publish(Topics().device_cmd(d), env)
            return [c.command_id for c in cmds], t0

        cids, t0 = deploy(versions[0])  # v1 active everywhere first
        _all(events, cids, "SUCCEEDED", 300)
        for r in range(args.rounds):
            cids, t0 = deploy(versions[1 + 2 * r])
            _all(events, cids, "SUCCEEDED", 600)
            plain.append(time.monotonic() - t0)
            cids, t0 = deploy(versions[2 + 2 * r], stage=True)
            _all(events, cids, "STAGED", 600)
            stage.append(time.monotonic() - t0)
            envs = [sign_command(make_command(d, "activate", {"command_id": c}), operator)
                    for d, c in zip(ids, cids, strict=True)]  # fmt: skip
            t1 = time.monotonic()
            for d, env in zip(ids, envs, strict=True):
                pub.publish(Topics().device_cmd(d), env)
            _all(events, cids, "SUCCEEDED", 600)
            activate.append(time.monotonic() - t1)
            print(f"round {r + 1}: plain {plain[-1]:.2f}s  stage {stage[-1]:.2f}s  "
                  f"activate {activate[-1]:.2f}s", flush=True)  # fmt: skip
        pub.close()
    finally:
        for a in agents:
            a.stop()
        for ev in events:
            ev.stop()
        broker.stop()
    p, s, a = (statistics.median(x) for x in (plain, stage, activate))
    print(f"{args.agents} agents, {args.rounds} rounds, medians: plain deploy {p:.2f}s, "
          f"stage {s:.2f}s, activate → all SUCCEEDED {a:.2f}s ({a / p:.0%} of the plain "
          f"deploy; the stage skipped {s:.2f}s at switch time)")  # fmt: skip


if __name__ == "__main__":
    main()
