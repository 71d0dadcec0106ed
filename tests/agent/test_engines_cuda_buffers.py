"""cuda_buffers (the TensorRT runner's pycuda layer) on a real GPU; skipped without one.

bench/cuda_runner_check.py runs the same checks as a script and prints what it measured.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("pycuda", reason="pycuda is not installed here (needs an NVIDIA GPU host)")

from agent.engines import cuda_buffers as cb

if not cb.cuda_available():
    pytest.skip("pycuda is installed but no CUDA device answers", allow_module_level=True)


@pytest.mark.parametrize("nbytes", [4, 12345, 1 << 20])
def test_host_device_round_trip_is_byte_exact(nbytes: int) -> None:
    src = np.random.default_rng(nbytes).standard_normal(max(1, nbytes // 4)).astype(np.float32)
    with cb.cuda_context():
        stream = cb.Stream()
        staged = cb.PinnedStaging().view(src.shape, src.dtype)
        np.copyto(staged, src)
        buf = cb.DeviceBuffer(16)
        buf.ensure(src.nbytes)
        buf.upload(staged, stream)
        back = cb.PinnedStaging().view(src.shape, src.dtype)
        buf.download(back, stream)
        stream.synchronize()
        buf.free()
    assert np.array_equal(src, back)


def test_event_timer_measures_a_copy_and_works_from_another_thread() -> None:
    results: list[float] = []

    def run() -> None:
        with cb.cuda_context():
            stream = cb.Stream()
            host = cb.PinnedStaging().view((1 << 22,), np.float32)
            buf = cb.DeviceBuffer(host.nbytes)
            timer = cb.EventTimer(stream)
            timer.start()
            buf.upload(host, stream)
            timer.stop()
            stream.synchronize()
            results.append(timer.elapsed_ms())
            timer.close()
            stream.close()
            buf.free()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(results) == 1 and results[0] > 0
