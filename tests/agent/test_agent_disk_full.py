"""A full disk named `disk_full` wherever it strikes a deploy, through the real agent
subprocess and a real Mosquitto: before the engine build, during it (the builder child
fills the disk), and while the new version is installed for activation. The disk is a
real small tmpfs mounted where the agent writes that step's files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from protocol.messages import JobEvent
from protocol.topics import Topics
from tests.agent.harness import (
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
from tests.diskfull import fill, small_tmpfs

DEV = "robot-disk"
PAGE = 4096


def deploy_on(
    tmp_path: Path, mosquitto: Any, trust_material: Any, data: Path, reserve_mb: int
) -> tuple[JobEvent, str]:
    """Deploy detector 1.0.0 to a fresh agent; its terminal event and the agent's log."""
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=data,
        trust_root=trust_material.write(tmp_path / "trust.json"),
        health="true",
        extra={"limits": {"min_free_disk_mb": reserve_mb}},
    )
    bundle = build_bundle(tmp_path / "build", trust_material.release, version="1.0.0")
    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg) as agent:
        events.wait_online()
        cmd = make_command(DEV, "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        final = events.wait_terminal(cmd.command_id, timeout=90)
        return final, agent.log()


def model_pages() -> int:
    """Whole pages the test model (and so its ONNX Runtime engine, a few bytes larger)
    takes on a tmpfs."""
    import tempfile

    from tests.models import make_mlp

    with tempfile.TemporaryDirectory() as d:
        size = make_mlp(Path(d) / "m.onnx", seed=0).stat().st_size
    return -(-size // PAGE)


@pytest.mark.slow
def test_a_full_engine_disk_fails_the_deploy_as_disk_full_before_the_build(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    data = tmp_path / "data"
    with small_tmpfs(data / "engines", "1m") as engines:
        fill(engines)
        final, log = deploy_on(tmp_path, mosquitto, trust_material, data, reserve_mb=1)
    assert (final.state.value, final.code) == ("FAILED", "disk_full"), (final, log[-2000:])
    assert final.reason is not None
    assert final.reason.startswith(f"engine build: not enough disk in {data / 'engines'}: 0 KiB")
    assert "plus a 1 MiB reserve (limits.min_free_disk_mb)" in final.reason
    assert "Protobuf" not in final.reason


@pytest.mark.slow
def test_an_engine_disk_that_fills_during_the_build_is_disk_full_not_build_failed(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    data = tmp_path / "data"
    with small_tmpfs(data / "engines", "1m") as engines:
        # Room for the model's size, so the check before the build passes; the engine
        # and its sidecar then need more than that.
        fill(engines, leave=model_pages() * PAGE)
        final, log = deploy_on(tmp_path, mosquitto, trust_material, data, reserve_mb=0)
    assert (final.state.value, final.code) == ("FAILED", "disk_full"), (final, log[-2000:])
    assert final.reason is not None
    assert final.reason.startswith(f"engine build: the disk holding {data / 'engines'} is full (")


@pytest.mark.slow
def test_a_disk_that_fills_while_activating_rolls_back_as_disk_full(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    data = tmp_path / "data"
    with small_tmpfs(data / "models", "1m") as models:
        fill(models)
        final, log = deploy_on(tmp_path, mosquitto, trust_material, data, reserve_mb=0)
        assert engine_link_state(data, "detector") == (None, None)
    assert (final.state.value, final.code) == ("ROLLED_BACK", "disk_full"), (final, log[-2000:])
    assert final.reason is not None and "internal" not in final.reason
    assert final.reason.startswith("disk full: no space left on device (")


def test_the_builder_names_onnxruntimes_protobuf_failure_on_a_full_disk_disk_full(
    tmp_path: Path,
) -> None:
    """ONNX Runtime reports a short write as "Protobuf serialization failed": the builder
    child itself (no check before it) must still say disk_full."""
    from agent.enginejob import EngineJob, EngineJobError, EngineRequest
    from tests.models import make_mlp

    model = make_mlp(tmp_path / "model.onnx", seed=0)
    with small_tmpfs(tmp_path / "engines", "1m") as engines:
        fill(engines)
        request = EngineRequest(
            backend="onnxruntime",
            cache_root=engines,
            timing_cache_dir=tmp_path / "timing",
            cache_bytes=2**30,
            model=model,
            model_sha256="0" * 64,
        )
        job = EngineJob(request, canceled=lambda: False, stopping=lambda: False)
        try:
            with pytest.raises(EngineJobError) as err:
                job.build()
        finally:
            job.close()
    assert err.value.code == "disk_full"
    assert err.value.reason.startswith(f"the disk holding {engines} is full (0 KiB free")
    assert "Protobuf serialization failed" in err.value.reason  # the library's words, kept
