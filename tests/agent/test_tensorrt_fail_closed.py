"""The TensorRT runner's fail-closed paths, on a machine without TensorRT or a GPU.

agent/engines/tensorrt_backend.py and cuda_buffers.py run unchanged; only the Jetson's
TensorRT and pycuda are replaced by tests/agent/fake_jetson.py, which records what the real
ones make hard to see (handles destroyed outside the CUDA context, host syncs, DLA core).
The same behaviours run against the real TensorRT in test_tensorrt_backend.py on a Jetson.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from agent.engines import (
    EngineLoadError,
    InferenceError,
    UnsupportedError,
    load_engine,
    select_backend,
)
from agent.engines.api import EngineMeta
from agent.engines.sidecar import file_sha256, write_meta
from agent.runtime import ModelRuntime
from tests.agent import fake_jetson
from tests.agent.fake_jetson import REC, plan

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda")),
    reason="the real TensorRT/pycuda are here: test_tensorrt_backend.py covers these",
)

X = {"name": "x", "mode": "input", "dtype": "FLOAT", "shape": [-1, 4]}
DOUBLE = {"name": "y", "mode": "output", "dtype": "FLOAT", "shape": [-1, 4], "op": "double"}
NONZERO = {"name": "idx", "mode": "output", "dtype": "INT64", "shape": [1, -1], "op": "nonzero"}


@pytest.fixture(autouse=True)
def jetson(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, mod in (("tensorrt", fake_jetson.tensorrt), ("pycuda", fake_jetson.pycuda),
                      ("pycuda.driver", fake_jetson.driver)):  # fmt: skip
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    REC.reset()
    yield
    assert REC.leaks == [], "CUDA handles destroyed outside the CUDA context"


def _engine_file(root: Path, plan_bytes: bytes, *, dla_core: int | None = None) -> Path:
    path = root / "engine"
    path.write_bytes(plan_bytes)
    meta = EngineMeta("tensorrt", "10.3.0", file_sha256(path), "k" * 64,
                      extra={"build": {"dla_core": dla_core}})  # fmt: skip
    write_meta(path, meta)
    return path


def _live_handles() -> dict[str, int]:
    return {k: v for k, v in REC.live.items() if v}


def test_an_execution_context_tensorrt_cannot_create_is_a_load_failure(tmp_path: Path) -> None:
    path = _engine_file(tmp_path, plan(X, DOUBLE, context="none"))
    with pytest.raises(EngineLoadError, match="could not create an execution context"):
        load_engine(path)
    assert _live_handles() == {}


def test_bf16_io_is_unsupported_and_releases_what_was_made(tmp_path: Path) -> None:
    bf16 = {**DOUBLE, "dtype": "BF16"}
    with pytest.raises(UnsupportedError, match=r"'y' is DataType.BF16, which has no numpy type"):
        load_engine(_engine_file(tmp_path, plan(X, bf16)))
    assert _live_handles() == {}


@pytest.mark.parametrize("kind", ["Stream", "Event"])
def test_pycuda_failing_mid_load_is_a_load_error_and_nothing_leaks(
    tmp_path: Path, kind: str
) -> None:
    REC.fail_next[kind] = MemoryError("cuStreamCreate failed: out of memory")
    with pytest.raises(EngineLoadError, match="MemoryError: cuStreamCreate failed"):
        load_engine(_engine_file(tmp_path, plan(X, DOUBLE)))
    assert _live_handles() == {}


def test_a_shape_tensor_input_is_refused_at_load(tmp_path: Path) -> None:
    shape_in = {"name": "shape", "mode": "input", "dtype": "INT64", "shape": [2],
                "shape_tensor": True}  # fmt: skip
    with pytest.raises(UnsupportedError, match="input 'shape' is a shape tensor"):
        load_engine(_engine_file(tmp_path, plan(X, shape_in, DOUBLE)))


def test_close_releases_stream_events_and_buffers_inside_the_context(tmp_path: Path) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, DOUBLE)))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(engine.infer({"x": x})["y"], 2 * x)
    assert _live_handles() == {"Stream": 1, "Event": 2, "DeviceAllocation": 2}
    engine.close()
    assert _live_handles() == {}  # and none outside the context (the fixture checks)
    engine.close()
    with pytest.raises(InferenceError, match="closed"):
        engine.infer({"x": x})


def test_outputs_whose_shape_depends_on_the_data_are_returned_whole(tmp_path: Path) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, NONZERO)))
    try:
        for hits in (3, 8, 0, 5):
            x = np.full((2, 4), -1.0, dtype=np.float32)
            x.reshape(-1)[:hits] = 1.0
            idx = engine.infer({"x": x})["idx"]
            assert idx.shape == (1, hits) and idx.reshape(-1).tolist() == list(range(hits))
    finally:
        engine.close()


def test_one_host_sync_per_inference_after_the_output_copies(tmp_path: Path) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, DOUBLE)))
    try:
        REC.ops.clear()
        engine.infer({"x": np.ones((1, 4), np.float32)})
        syncs = [i for i, op in enumerate(REC.ops) if op.endswith("synchronize")]
        assert REC.ops[syncs[0]] == "stream.synchronize"
        assert syncs[0] > max(i for i, op in enumerate(REC.ops) if op == "memcpy_dtoh")
        assert engine.last_gpu_ms == 0.25  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_the_dla_core_of_the_build_is_set_on_the_runtime_before_deserializing(
    tmp_path: Path,
) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, DOUBLE), dla_core=1))
    try:
        assert engine.dla_core == 1  # type: ignore[attr-defined]
        assert REC.runtimes[-1].DLA_core == 1
    finally:
        engine.close()


def test_plugins_are_registered_once_per_process_before_any_plan_is_deserialized() -> None:
    # The fake runtime, like the real one, cannot deserialize a plugin plan before that.
    select_backend("tensorrt")
    select_backend("tensorrt")
    assert REC.plugin_registrations == 1


def test_dla_cores_are_counted_by_the_runtime_not_a_builder() -> None:
    backend = select_backend("tensorrt")  # the fake has no Builder: using one would raise
    assert backend.cache_key_parts()["dla_cores"] == "2"


def test_a_log_handler_that_raises_inside_tensorrt_does_not_escape(tmp_path: Path) -> None:
    from agent.engines.tensorrt_backend import _get_logger

    closed = io.StringIO()
    closed.close()  # e.g. the journal's pipe went away: every write raises ValueError
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=closed))
    try:
        _get_logger().log(fake_jetson.ILogger.Severity.ERROR, "Plugin not found")
    finally:
        structlog.reset_defaults()


def test_the_runtime_keeps_serving_when_a_new_tensorrt_engine_cannot_get_a_context(
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "models" / "det"
    for version, context in (("1.0.0", "ok"), ("2.0.0", "none")):
        vdir = model_dir / "versions" / version
        vdir.mkdir(parents=True)
        _engine_file(vdir, plan(X, DOUBLE, context=context))
    (model_dir / "current").symlink_to("versions/1.0.0")
    x = np.ones((1, 4), np.float32)
    with ModelRuntime("det", tmp_path, report=False, check_interval_s=0.0) as rt:
        (model_dir / "current").unlink()
        (model_dir / "current").symlink_to("versions/2.0.0")
        assert rt.refresh(wait=True) is False
        for _ in range(20):
            np.testing.assert_array_equal(rt.infer({"x": x})["y"], 2 * x)
        assert rt.version == "1.0.0"
    assert len(REC.runtimes) == 2, "the failed version was loaded once, not retried"
    assert json.loads((model_dir / "versions/2.0.0/engine").read_bytes())["context"] == "none"
