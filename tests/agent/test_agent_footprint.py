"""The daemon's import graph stays free of the heavy inference stack (issue 3: idle RSS).

numpy alone is ~10 MiB of the agent's 60 MiB idle budget; ONNX Runtime and TensorRT run
in the builder child (agent/enginejob.py) and in the robot's service (agent/runtime.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Every module the running daemon loads (cli `run` -> daemon -> worker, mqtt, telemetry,
# livestats), imported the way `python -m agent.cli run` does.
DAEMON_MODULES = [
    "agent.cli",
    "agent.daemon",
    "agent.worker",
    "agent.livestats",
    "agent.hardware",
    "agent.telemetry.loop",
    "agent.telemetry.sampler",
]
HEAVY = ["numpy", "onnx", "onnxruntime", "tensorrt", "pycuda", "rich"]


def test_daemon_modules_do_not_import_numpy_onnx_or_onnxruntime() -> None:
    code = (
        "import sys; sys.argv = ['agent']\n"
        f"for m in {DAEMON_MODULES!r}: __import__(m)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"the daemon imports {out.stdout.strip()}"
