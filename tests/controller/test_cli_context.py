"""Named contexts (issue 19): `jetfleet context use NAME`, `--context`, and state kept
per context (database, published bundles). Real subprocesses, two real brokers,
simulated devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet import SimFleet, build_bundle, cli_env, make_devices, run_cli, wait_until

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import init_keys
from protocol.topics import Topics


@pytest.mark.slow
def test_each_context_has_its_broker_keys_and_state(
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    staging_keys, prod_keys = init_keys(tmp_path / "k-staging"), init_keys(tmp_path / "k-prod")
    env = cli_env(tmp_path, "mqtt://127.0.0.1:1", tmp_path / "unused")
    for var in ("JETFLEET_BROKER", "JETFLEET_KEYS", "JETFLEET_DB"):
        env.pop(var)
    with LocalMosquitto(tmp_path / "mq-prod") as prod_broker:
        config = tmp_path / "config" / "jetfleet" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            f'[contexts.staging]\nbroker = "{mosquitto.url}"\nkeys = "{tmp_path / "k-staging"}"\n'
            f'[contexts.prod]\nbroker = "{prod_broker.url}"\nkeys = "{tmp_path / "k-prod"}"\n'
            'prefix = "prodfleet/v1"\n'
        )
        staging = SimFleet(mosquitto.url, staging_keys.trust, make_devices(1, prefix="stage"))
        prod = SimFleet(
            prod_broker.url,
            prod_keys.trust,
            make_devices(2, prefix="prod"),
            topics=Topics("prodfleet/v1"),
        )
        with staging, prod:
            typo = run_cli(env, "context", "use", "stagin")
            assert typo.returncode == 2 and "no context 'stagin'" in typo.stderr
            assert "contexts: prod, staging" in typo.stderr

            assert run_cli(env, "context", "use", "staging").returncode == 0
            listed = json.loads(run_cli(env, "devices", "-o", "json").stdout)
            assert [d["id"] for d in listed] == ["stage-0000"]
            bundle = build_bundle(tmp_path / "build", staging_keys.release, version="2.0.0")
            out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", "--wait")
            assert out.returncode == 0, out.stderr

            # --context for one command; the current one stays.
            listed = json.loads(run_cli(env, "--context", "prod", "devices", "-o", "json").stdout)
            assert [d["id"] for d in listed] == ["prod-0000", "prod-0001"]
            # A background driver keeps the context it was started in (its topic prefix).
            prod_bundle = build_bundle(tmp_path / "build-prod", prod_keys.release, version="2.0.0")
            started = run_cli(
                env, "--context", "prod", "rollout", "start", str(prod_bundle), "--target", "all"
            )
            assert started.returncode == 0, started.stderr

            def prod_done() -> bool:
                out = run_cli(env, "--context", "prod", "rollout", "status", "-o", "json")
                return bool(json.loads(out.stdout)["rollout"]["state"] == "succeeded")

            wait_until(prod_done, timeout=60, what="the prod rollout")
            contexts = json.loads(run_cli(env, "context", "list", "-o", "json").stdout)
            assert [(c["name"], c["current"]) for c in contexts] == [
                ("prod", False),
                ("staging", True),
            ]

    # State per context: two databases, and the bundle published for staging only.
    state = tmp_path / "data" / "jetfleet" / "contexts"
    assert (state / "staging" / "controller.db").is_file()
    assert (state / "prod" / "controller.db").is_file()
    assert (state / "staging" / "bundles" / "detector-2.0.0.jfb").is_file()
    assert (state / "prod" / "bundles" / "detector-2.0.0.jfb").is_file()
    assert (state / "prod" / "rollouts").is_dir()  # its driver's log
