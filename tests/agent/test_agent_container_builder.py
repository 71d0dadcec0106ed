"""`[engine] builder = "container"`: the engine child runs in the consumer's image.

These machines run no container engine (dockerd is absent; podman's crun refuses the
sandbox's cgroup layout), so the runtime is tests/agent/fake_container_runtime.py: it
records each command line and runs the child as the image would, with the image's own
interpreter (the other virtualenv, whose ONNX Runtime is another version than the agent's), only
the mounted code and the -e environment. The agent, the broker, the child protocol, the
cache and the gate are the real ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from agent import container
from agent.config import ConfigError, load_config
from protocol.topics import Topics
from tests.agent.harness import (
    EventCollector,
    build_bundle,
    deploy_body,
    make_command,
    publish,
    running_agent,
    sign_command,
    write_agent_config,
)

REPO = Path(__file__).resolve().parents[2]
# The "image" runs the other of the two virtualenvs: another Python, another ONNX Runtime.
IMAGE_PYTHON = REPO / (".venv" if sys.version_info < (3, 11) else ".venv310") / "bin" / "python"
FAKE = Path(__file__).with_name("fake_container_runtime.py")
DEV = "robot-ctr"
IMAGE = "registry.local/detector-app:2.3"


def _ort_version(python: Path) -> str:
    import subprocess

    out = subprocess.run(
        [str(python), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _fake_runtime(tmp: Path, name: str = "docker") -> dict[str, str]:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    (bindir / name).chmod(0o755)
    return {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "FAKE_RUNTIME_LOG": str(tmp / "runtime.log"),
        "FAKE_RUNTIME_IMAGES": json.dumps({IMAGE: str(IMAGE_PYTHON)}),
        "FAKE_RUNTIME_PS": str(tmp / "leftovers"),
    }


def _calls(tmp: Path) -> list[list[str]]:
    log = tmp / "runtime.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line)["argv"] for line in lines]


def _config(tmp: Path, mosquitto, trust_material, **engine) -> Path:
    return write_agent_config(
        tmp / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=tmp / "data",
        trust_root=trust_material.write(tmp / "trust.json"),
        extra={"engine": {"builder": "container", "image": IMAGE, **engine}},
    )


@pytest.mark.slow
@pytest.mark.skipif(not IMAGE_PYTHON.exists(), reason="needs the other virtualenv")
def test_deploy_builds_and_gates_inside_the_image_with_its_runtime_version(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    env = _fake_runtime(tmp_path)
    (tmp_path / "leftovers").write_text("4f2a9c\n")  # a build container a crash left behind
    cfg = _config(tmp_path, mosquitto, trust_material)
    data = (tmp_path / "data").resolve()
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    with EventCollector(mosquitto.url, DEV) as events, running_agent(cfg, events, env=env) as a:
        cmd = make_command(DEV, "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        final = events.wait_terminal(cmd.command_id, timeout=120)
        assert final.state.value == "SUCCEEDED", (final, a.log()[-3000:], _calls(tmp_path))
        assert final.gate and "p99_ms" in final.gate  # the gate ran (inside)
    calls = _calls(tmp_path)
    # At start: leftovers of this device found by label and removed.
    assert calls[0] == ["ps", "-aq", "--filter", f"label=jetfleet.engine-build={DEV}"]
    assert calls[1] == ["rm", "-f", "4f2a9c"]
    run = next(c for c in calls if c[0] == "run")
    joined = " ".join(run)
    assert run[:4] == ["run", "--rm", "-i", "--init"]
    assert "--network none" in joined and "--runtime nvidia" in joined
    assert f"--label jetfleet.engine-build={DEV}" in joined
    assert f"-v {data}/engines:{data}/engines " in joined
    assert f"-v {data}/bundles:{data}/bundles:ro" in joined
    assert f"-v {data}/models:{data}/models:ro" in joined
    assert f"-v {REPO}/agent:/opt/jetfleet/agent:ro" in joined
    assert f"-v {REPO}/protocol:/opt/jetfleet/protocol:ro" in joined
    assert run[-4:] == [IMAGE, "python3", "-m", "agent.enginejob"]
    # The engine was built by the image's runtime: its version is in the sidecar (and so in
    # the cache key, computed inside), not the agent's own.
    meta = json.loads((data / "models/detector/current/engine.json").read_text())
    assert meta["backend_version"] == _ort_version(IMAGE_PYTHON)
    assert meta["backend_version"] != _ort_version(Path(sys.executable))


@pytest.mark.slow
def test_a_missing_image_or_runtime_fails_the_job_with_a_clear_reason(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    env = _fake_runtime(tmp_path)
    cfg = _config(tmp_path, mosquitto, trust_material, image="not-pulled:1")
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    with EventCollector(mosquitto.url, DEV) as events, running_agent(cfg, events, env=env) as a:
        cmd = make_command(DEV, "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        final = events.wait_terminal(cmd.command_id, timeout=120)
        assert (final.state.value, final.code) == ("FAILED", "build_failed"), final
        assert "exited 125" in (final.reason or "")
        assert "unable to find image 'not-pulled:1'" in a.log()
    cfg = _config(tmp_path, mosquitto, trust_material, runtime="podman")
    no_runtime = {"PATH": str(tmp_path / "empty")}  # a robot without podman
    with (
        EventCollector(mosquitto.url, DEV) as events,
        running_agent(cfg, events, env=no_runtime) as a,
    ):
        cmd = make_command(DEV, "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        final = events.wait_terminal(cmd.command_id, timeout=120)
        assert (final.state.value, final.code) == ("FAILED", "build_failed"), final
        assert "cannot start the engine builder 'podman'" in (final.reason or "")
        assert a.alive()


def test_podman_gets_cdi_gpu_flags_and_a_container_builder_needs_an_image(
    tmp_path: Path,
) -> None:
    base = {"device_id": "r1", "data_dir": str(tmp_path / "d")}
    engine = {"builder": "container", "image": "i:1", "runtime": "podman"}
    cfg = load_config(None, **base, engine={**engine, "run_args": ["--ipc=host"]})
    argv = container.child_command(cfg, "jetfleet-build-x")
    assert argv[0] == "podman" and "--device nvidia.com/gpu=all" in " ".join(argv)
    assert argv[-5:] == ["--ipc=host", "i:1", "python3", "-m", "agent.enginejob"]
    with pytest.raises(ConfigError, match=r"engine: .*needs an image"):
        load_config(None, **base, engine={"builder": "container"})


def test_a_canceled_child_also_stops_its_container() -> None:
    """Killing the `docker run` client leaves the container running: kill() says so."""
    from agent.download import Canceled
    from agent.enginejob import EngineJob, EngineRequest

    stopped: list[str] = []
    request = EngineRequest(
        backend="onnxruntime", cache_root=Path("/nonexistent"), cache_bytes=0, model=None,
        model_sha256="0" * 64,
    )  # fmt: skip
    job = EngineJob(
        request,
        canceled=lambda: True,
        stopping=lambda: False,
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        on_kill=lambda: stopped.append("jetfleet-build-x"),
    )
    with pytest.raises(Canceled):
        job.build()
    job.close()
    assert stopped == ["jetfleet-build-x"] and job.proc.returncode is not None


def test_doctor_checks_the_runtime_and_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.doctor import FAIL, PASS, check_builder

    for key, value in _fake_runtime(tmp_path).items():
        monkeypatch.setenv(key, value)
    base = {"device_id": "r1", "data_dir": str(tmp_path / "d")}
    here = load_config(None, **base, engine={"builder": "container", "image": IMAGE})
    assert check_builder(here).status == PASS
    absent = load_config(None, **base, engine={"builder": "container", "image": "nope:1"})
    result = check_builder(absent)
    assert result.status == FAIL and "image nope:1 is not on this robot" in result.detail
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = check_builder(here)
    assert result.status == FAIL and result.detail == "docker is not installed (not on PATH)"
    assert "pull" in result.fix
