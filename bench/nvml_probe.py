"""Print one real NVML sample as JSON, through agent.telemetry.nvml.

Run once on a machine with an NVIDIA GPU and keep the output as
tests/fixtures/nvml/h100_sample.json (tests replay it through `to_gpu_stats`):

    python bench/nvml_probe.py [--index 0] > tests/fixtures/nvml/h100_sample.json

`raw` is what NVML returned (None where the GPU does not support a query), `gpu` the
GpuStats the agent publishes from it. Exit 2 with a reason on stderr when there is no NVML.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.telemetry.nvml import NvmlReader, NvmlUnavailableError, to_gpu_stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=int, default=0, help="GPU index (default 0)")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between two reads")
    args = ap.parse_args()
    try:
        reader = NvmlReader(args.index)
    except NvmlUnavailableError as e:
        print(f"nvml_probe: {e}", file=sys.stderr)
        return 2
    try:
        reader.read_raw()  # the first utilisation read after init can be stale
        time.sleep(args.settle)
        raw = reader.read_raw()
    finally:
        reader.close()
    out = {
        "recorded_at": datetime.now(timezone.utc).isoformat(),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "raw": raw,
        "gpu": to_gpu_stats(raw).model_dump(mode="json"),
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
