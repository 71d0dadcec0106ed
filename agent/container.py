"""The engine child in the consumer's own image (`[engine] builder = "container"`).

A TensorRT plan only loads in the TensorRT version that built it, and a consumer in a
container (Isaac ROS, DeepStream) ships its own. So the same child the host build runs
(`python -m agent.enginejob`, same request, same cache, same gate) runs inside that
image instead:

    docker|podman run --rm -i --init --name jetfleet-build-<id>
        --label jetfleet.engine-build=<device> --network none --user <agent uid:gid>
        --group-add <each of the agent's groups> <GPU flags>
        -v <data>/engines:<data>/engines -v <data>/bundles:...:ro -v <data>/models:...:ro
        -v <code>/agent:/opt/jetfleet/agent:ro -v <code>/protocol:... -e PYTHONPATH=/opt/jetfleet
        <image> python3 -m agent.enginejob

Paths are mounted where they are on the host, so the request is the host's. The cache
key is computed inside, from the image's TensorRT version. The container outlives a
killed `docker run` client, so a cancel kills it by name, and the agent removes any left
by a crash when it starts (by label).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import structlog

from agent.config import AgentConfig

log = structlog.get_logger(__name__)

CODE_MOUNT = "/opt/jetfleet"
LABEL = "jetfleet.engine-build"
GPU_ARGS = {"docker": ["--runtime", "nvidia"], "podman": ["--device", "nvidia.com/gpu=all"]}
CLI_TIMEOUT_S = 30.0


def code_dir(config: AgentConfig) -> Path:
    """The directory holding this agent's `agent/` and `protocol/` packages."""
    if config.engine.code_dir:
        return Path(config.engine.code_dir)
    return Path(__file__).resolve().parents[1]


def child_command(config: AgentConfig, name: str) -> list[str]:
    """The argv that runs the engine child in the configured image."""
    e = config.engine
    data = Path(config.data_dir).resolve()
    mounts = [
        f"{data / 'engines'}:{data / 'engines'}",
        f"{data / 'bundles'}:{data / 'bundles'}:ro",
        f"{data / 'models'}:{data / 'models'}:ro",
        # Only jetfleet's own packages: the image brings the interpreter and libraries
        # (numpy, pydantic, TensorRT) built for it; a host venv could not run there.
        *[f"{code_dir(config) / pkg}:{CODE_MOUNT}/{pkg}:ro" for pkg in ("agent", "protocol")],
    ]
    env = {
        "PYTHONPATH": CODE_MOUNT,
        "PYTHONUNBUFFERED": "1",
        "JETFLEET_AGENT_LOG_LEVEL": os.environ.get("JETFLEET_AGENT_LOG_LEVEL", "warning"),
    }
    gpu = GPU_ARGS[e.runtime] if e.gpu_args is None else list(e.gpu_args)
    return [
        e.runtime, "run", "--rm", "-i", "--init",
        "--name", name,
        "--label", f"{LABEL}={config.device_id}",
        "--network", "none",
        "--user", f"{os.getuid()}:{os.getgid()}",
        # The agent's supplementary groups (video, render: the GPU device nodes).
        *[arg for g in os.getgroups() if g != os.getgid() for arg in ("--group-add", str(g))],
        *gpu,
        *[arg for m in mounts for arg in ("-v", m)],
        *[arg for k, v in env.items() for arg in ("-e", f"{k}={v}")],
        *e.run_args,
        e.image, e.python, "-m", "agent.enginejob",
    ]  # fmt: skip


def new_name() -> str:
    return f"jetfleet-build-{uuid.uuid4().hex[:12]}"


def prepare(config: AgentConfig) -> None:
    """The mount sources must exist before the runtime is asked to mount them."""
    data = Path(config.data_dir)
    for sub in ("engines", "bundles", "models"):
        (data / sub).mkdir(parents=True, exist_ok=True)


def _cli(config: AgentConfig, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [config.engine.runtime, *args],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("container_cli_failed", args=list(args), error=str(e))
        return None


def image_problem(config: AgentConfig) -> str | None:
    """Why the configured image cannot run builds here (None: it is on this robot)."""
    e = config.engine
    if shutil.which(e.runtime) is None:
        return f"{e.runtime} is not installed (not on PATH)"
    done = _cli(config, "image", "inspect", e.image)
    if done is None:
        return f"{e.runtime} did not answer"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return f"image {e.image} is not on this robot: {tail[0]}"
    return None


def kill(config: AgentConfig, name: str) -> None:
    """Stop a build container (killing the `run` client leaves it running)."""
    _cli(config, "rm", "-f", name)


def remove_leftovers(config: AgentConfig) -> int:
    """Remove build containers of this device left by a crash (called at start)."""
    found = _cli(config, "ps", "-aq", "--filter", f"label={LABEL}={config.device_id}")
    ids = found.stdout.split() if found is not None and found.returncode == 0 else []
    if ids:
        _cli(config, "rm", "-f", *ids)
        log.warning("container_builds_removed", count=len(ids))
    return len(ids)
