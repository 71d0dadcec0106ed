"""ModelRuntime: loads `current`, hot-swaps without dropping requests, reports latencies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.engines import EngineLoadError, load_engine, select_backend
from agent.engines.cache import EngineCache
from agent.engines.sidecar import sidecar_path
from agent.livestats import LiveStats
from agent.runtime import ModelRuntime, NoModelError
from protocol.manifest import BuildOptions
from tests.models import make_golden, make_mlp, mlp_inputs

FEEDS = mlp_inputs(batch=4)


class Device:
    """A data_dir laid out as the agent lays it out (SPEC / contracts), with real engines."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = EngineCache(root / "engines", 1 << 30)
        self.backend = select_backend("onnxruntime")
        self.model_dir = root / "models" / "det"
        self.golden: dict[str, np.ndarray] = {}

    def install(self, version: str, seed: int) -> Path:
        model = make_mlp(self.root / f"src-{version}.onnx", seed=seed)
        self.golden[version] = make_golden(model, FEEDS)["output.y"]
        entry = self.cache.get_or_build(self.backend, model, f"{seed:064x}", BuildOptions())
        vdir = self.model_dir / "versions" / version
        vdir.mkdir(parents=True)
        os.link(entry, vdir / "engine")
        os.link(sidecar_path(entry), vdir / "engine.json")
        return vdir

    def activate(self, version: str) -> None:
        tmp = self.model_dir / ".current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"versions/{version}", tmp)
        os.replace(tmp, self.model_dir / "current")


@pytest.fixture
def device(tmp_path: Path) -> Device:
    d = Device(tmp_path)
    d.install("1.0.0", seed=1)
    d.install("2.0.0", seed=2)
    d.activate("1.0.0")
    return d


def test_runs_the_current_version(device: Device) -> None:
    # Options of the other backend (timing_cache_dir is TensorRT's) are ignored, so one
    # service config works whichever backend made `current`.
    opts = {"intra_op_threads": 2, "timing_cache_dir": device.root / "tc"}
    with ModelRuntime("det", device.root, report=False, engine_options=opts) as rt:
        assert rt.version == "1.0.0"
        np.testing.assert_allclose(rt.infer(FEEDS)["y"], device.golden["1.0.0"], rtol=1e-5)


def test_no_active_version_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoModelError, match="no active version"):
        ModelRuntime("det", tmp_path)


def test_repointing_current_swaps_the_engine(device: Device) -> None:
    with ModelRuntime("det", device.root, report=False, check_interval_s=0.01) as rt:
        rt.infer(FEEDS)
        device.activate("2.0.0")
        deadline = time.monotonic() + 5
        while rt.version != "2.0.0" and time.monotonic() < deadline:
            rt.infer(FEEDS)  # the check and the background load happen during serving
            time.sleep(0.005)
        assert rt.version == "2.0.0" and rt.swaps == 1
        np.testing.assert_allclose(rt.infer(FEEDS)["y"], device.golden["2.0.0"], rtol=1e-5)


def test_no_request_fails_while_versions_swap_back_and_forth(device: Device) -> None:
    rt = ModelRuntime("det", device.root, report=False, check_interval_s=0.0)
    errors: list[BaseException] = []
    results: list[np.ndarray] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                results.append(rt.infer(FEEDS)["y"])
            except BaseException as e:  # any failure is what this test looks for
                errors.append(e)

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(10):
        version = "2.0.0" if i % 2 == 0 else "1.0.0"
        device.activate(version)
        rt.refresh(wait=True)
        assert rt.version == version  # never left on a stale target
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    rt.close()
    assert not errors
    assert rt.swaps >= 10 and len(results) > 20
    for y in results:  # every answer is one version's, never a mix or garbage
        assert any(np.allclose(y, g, rtol=1e-5) for g in device.golden.values())


def test_a_corrupt_new_engine_is_refused_and_the_old_one_keeps_serving(device: Device) -> None:
    bad = device.install("3.0.0", seed=3)
    data = bytearray((bad / "engine").read_bytes())
    (bad / "engine").unlink()  # break the hard link: corrupt this copy only
    data[100] ^= 0xFF
    (bad / "engine").write_bytes(bytes(data))
    with ModelRuntime("det", device.root, report=False) as rt:
        device.activate("3.0.0")
        assert rt.refresh(wait=True) is False
        assert rt.version == "1.0.0"
        np.testing.assert_allclose(rt.infer(FEEDS)["y"], device.golden["1.0.0"], rtol=1e-5)


def test_latencies_reach_the_agent_and_inference_ignores_an_absent_agent(device: Device) -> None:
    with ModelRuntime("det", device.root, report_batch=8) as rt:
        for _ in range(16):
            rt.infer(FEEDS)  # nobody listens: samples are dropped, inference is unaffected
        rt.flush_reports()
        assert rt.reports_dropped == 16
        with LiveStats(device.root / "run" / "live.sock") as stats:
            for _ in range(40):
                rt.infer(FEEDS)
            rt.flush_reports()
            deadline = time.monotonic() + 3
            while (w := stats.snapshot("det")) is None or w.count < 40:
                assert time.monotonic() < deadline, f"only {w}"
                time.sleep(0.01)
            assert w.version == "1.0.0" and 0 < w.p50_ms <= w.p99_ms


class EngineThatCannotLoad:
    """A backend's engine whose construction fails the way TensorRT's can: a TypeError from
    `trt.nptype` on bf16 I/O, or pycuda running out of (shared) memory."""

    def __init__(self, error: BaseException) -> None:
        raise error


def loader_failing_for(version: str, error: Exception, calls: list[str]) -> Any:
    def load(path: Path, **options: Any) -> Any:
        calls.append(path.parent.name)
        if path.parent.name == version:
            return EngineThatCannotLoad(error)
        return load_engine(path, **options)

    return load


@pytest.mark.parametrize(
    "error",
    [TypeError("data type not understood"), MemoryError("cuMemAlloc failed: out of memory")],
    ids=["bf16-io-TypeError", "MemoryError"],
)
def test_a_new_engine_failing_with_any_exception_keeps_the_old_one_and_is_not_retried(
    device: Device, error: Exception
) -> None:
    calls: list[str] = []
    loader = loader_failing_for("2.0.0", error, calls)
    with ModelRuntime(
        "det", device.root, report=False, check_interval_s=0.0, engine_loader=loader
    ) as rt:
        device.activate("2.0.0")
        for _ in range(50):  # every request checks `current` (check_interval_s=0)
            np.testing.assert_allclose(rt.infer(FEEDS)["y"], device.golden["1.0.0"], rtol=1e-5)
            time.sleep(0.002)
        assert rt.version == "1.0.0"
        assert calls.count("2.0.0") == 1, f"the failed target was loaded {calls.count('2.0.0')}x"
        assert rt.refresh(wait=True) is False  # the blocking path does not raise either
        # The swap machinery is still alive: the next version swaps in.
        device.install("3.0.0", seed=3)
        device.activate("3.0.0")
        assert rt.refresh(wait=True) is True and rt.version == "3.0.0"


def test_a_first_load_failing_with_a_foreign_exception_is_an_engine_load_error(
    device: Device,
) -> None:
    loader = loader_failing_for("1.0.0", TypeError("data type not understood"), [])
    with pytest.raises(EngineLoadError, match=r"1\.0\.0 failed: TypeError: data type"):
        ModelRuntime("det", device.root, report=False, engine_loader=loader)


def test_the_runtime_acknowledges_each_load_and_a_failed_swap_on_the_socket(
    device: Device,
) -> None:
    """ModelRuntime follows the consumer contract by itself: no service code needed."""
    bad = device.install("3.0.0", seed=3)
    (bad / "engine").unlink()
    (bad / "engine").write_bytes(b"not an engine")
    with (
        LiveStats(device.root / "run" / "live.sock") as stats,
        ModelRuntime("det", device.root) as rt,
    ):
        assert _ack_of(stats, "1.0.0").healthy
        device.activate("2.0.0")
        assert rt.refresh(wait=True)
        assert _ack_of(stats, "2.0.0").source == "socket"
        device.activate("3.0.0")
        assert rt.refresh(wait=True) is False
        ack = _ack_of(stats, "3.0.0")
        assert not ack.healthy and "3.0.0" in ack.reason and rt.version == "2.0.0"


def _ack_of(stats: LiveStats, version: str) -> Any:
    deadline = time.monotonic() + 3
    while (a := stats.ack("det")) is None or a.version != version:
        assert time.monotonic() < deadline, f"no ack of {version}: {a}"
        time.sleep(0.01)
    return a
