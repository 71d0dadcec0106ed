"""A robot's inference service, as a real one would use jetfleet's runtime library.

    python tests/controller/robot_service.py DATA_DIR SEED

It runs `detector` on a stream of "live" inputs (not the bundle's golden inputs) until
it is terminated, and records each frame's confidence (the top softmax probability) with
`rt.gauge`: the agent sends it in telemetry, tagged with the version that served it.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.runtime import ModelRuntime


def main() -> None:
    data_dir, seed = Path(sys.argv[1]), int(sys.argv[2])
    stop = False

    def finish(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, finish)
    rng = np.random.default_rng(seed)
    # The robot's scenes: a fixed set of frames, shown in turn (live, but repeatable).
    frames = rng.standard_normal((64, 1, 64)).astype(np.float32)
    with ModelRuntime("detector", data_dir, check_interval_s=0.1, report_interval_s=0.1) as rt:
        i = 0
        while not stop:
            y = rt.infer({"x": frames[i % len(frames)]})["y"][0].astype(np.float64)
            p = np.exp(y - y.max())
            rt.gauge("confidence", float(p.max() / p.sum()))
            i += 1
            time.sleep(0.01)


if __name__ == "__main__":
    main()
