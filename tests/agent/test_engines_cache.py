"""EngineCache: hits skip builds, keys separate what differs, LRU eviction, corruption."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.engines import EngineLoadError, load_engine, select_backend
from agent.engines.api import Backend
from agent.engines.cache import EngineCache, cache_key, platform_parts
from agent.engines.onnxruntime_backend import OnnxRuntimeBackend
from agent.engines.sidecar import sidecar_path, verify_engine_file
from agent.hardware import detect_hardware
from agent.telemetry.sysfs import JetsonSysfs
from protocol.manifest import BuildOptions, Profile
from tests.models import make_mlp, mlp_inputs


class CountingBackend:
    """The real ORT backend, counting how often it is asked to build."""

    def __init__(self, inner: OnnxRuntimeBackend, parts: dict[str, str] | None = None) -> None:
        self.inner, self.builds = inner, 0
        self.name, self.version = inner.name, inner.version
        self._parts = parts

    def build(self, model_path: Path, options: BuildOptions, out_path: Path) -> None:
        self.builds += 1
        self.inner.build(model_path, options, out_path)

    def load(self, engine_path: Path):  # type: ignore[no-untyped-def]
        return self.inner.load(engine_path)

    def cache_key_parts(self) -> dict[str, str]:
        return self._parts if self._parts is not None else self.inner.cache_key_parts()


@pytest.fixture
def backend() -> CountingBackend:
    inner = select_backend("onnxruntime")
    assert isinstance(inner, OnnxRuntimeBackend)
    return CountingBackend(inner)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_mlp(tmp_path / "model.onnx")


def _sha(i: int) -> str:
    return f"{i:064x}"


def test_cache_hit_skips_the_build_and_returns_the_same_file(
    tmp_path: Path, backend: CountingBackend, model: Path
) -> None:
    cache = EngineCache(tmp_path / "engines", 1 << 30)
    first = cache.get_or_build(backend, model, _sha(1), BuildOptions())
    again = cache.get_or_build(backend, model, _sha(1), BuildOptions())
    assert first == again and backend.builds == 1
    # A fresh cache object over the same directory (an agent restart) also hits.
    restarted = EngineCache(tmp_path / "engines", 1 << 30)
    assert restarted.get_or_build(backend, model, _sha(1), BuildOptions()) == first
    assert backend.builds == 1 and restarted.builds == 0


def test_key_separates_model_options_backend_version_and_device(
    backend: CountingBackend,
) -> None:
    base = cache_key(backend, _sha(1), BuildOptions())
    variants = [
        cache_key(backend, _sha(2), BuildOptions()),
        cache_key(backend, _sha(1), BuildOptions(precision="fp16")),
        cache_key(backend, _sha(1), BuildOptions(workspace_mb=256)),
        cache_key(backend, _sha(1), BuildOptions(dla_core=0)),
        cache_key(
            backend,
            _sha(1),
            BuildOptions(profiles={"x": Profile(min=[1, 64], opt=[8, 64], max=[32, 64])}),
        ),
        cache_key(
            CountingBackend(backend.inner, {"gpu": "Orin", "compute_capability": "8.7"}),
            _sha(1),
            BuildOptions(),
        ),
    ]
    other_version = CountingBackend(backend.inner)
    other_version.version = "0.0.1"
    variants.append(cache_key(other_version, _sha(1), BuildOptions()))
    assert len({base, *variants}) == len(variants) + 1
    assert cache_key(backend, _sha(1), BuildOptions()) == base  # and it is stable


ORIN = Path(__file__).resolve().parent.parent / "fixtures" / "jetson" / "agx-orin-r36.4.0"


def _orin_platform() -> dict[str, str | None]:
    return platform_parts(detect_hardware(root=ORIN), JetsonSysfs(ORIN).nvpmodel())


def test_key_separates_tensorrt_build_cuda_l4t_jetpack_and_power_mode(
    backend: CountingBackend,
) -> None:
    orin = _orin_platform()
    assert orin == {"tensorrt": "10.3.0.30", "cuda": "12.6.68", "l4t": "36.4.0",
                    "jetpack": "6.1", "power_mode": "MAXN"}  # fmt: skip
    base = cache_key(backend, _sha(1), BuildOptions(), orin)
    variants = [
        cache_key(backend, _sha(1), BuildOptions(), {**orin, k: v})
        for k, v in [("tensorrt", "10.3.0.31"), ("cuda", "12.6.77"), ("l4t", "36.4.3"),
                     ("jetpack", "6.2"), ("power_mode", "MODE_15W")]
    ]  # fmt: skip
    variants.append(cache_key(backend, _sha(1), BuildOptions()))  # no platform (not a Jetson)
    assert len({base, *variants}) == len(variants) + 1
    assert cache_key(backend, _sha(1), BuildOptions(), dict(orin)) == base


def test_an_engine_built_in_one_power_mode_is_rebuilt_in_another(
    tmp_path: Path, backend: CountingBackend, model: Path
) -> None:
    maxn = _orin_platform()
    first = EngineCache(tmp_path / "engines", 1 << 30, maxn)
    built = first.get_or_build(backend, model, _sha(1), BuildOptions())
    low = EngineCache(tmp_path / "engines", 1 << 30, {**maxn, "power_mode": "MODE_15W"})
    other = low.get_or_build(backend, model, _sha(1), BuildOptions())
    assert other != built and backend.builds == 2
    # Back in MAXN, the first engine is still there: a hit, no third build.
    assert (
        EngineCache(tmp_path / "engines", 1 << 30, maxn).lookup(backend, _sha(1), BuildOptions())
        == built
    )
    assert backend.builds == 2
    assert verify_engine_file(built).extra["platform"]["power_mode"] == "MAXN"


def test_corrupted_entry_is_detected_by_hash_and_rebuilt(
    tmp_path: Path, backend: CountingBackend, model: Path
) -> None:
    cache = EngineCache(tmp_path / "engines", 1 << 30)
    path = cache.get_or_build(backend, model, _sha(1), BuildOptions())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineLoadError, match="corrupt"):
        load_engine(path)
    rebuilt = cache.get_or_build(backend, model, _sha(1), BuildOptions())
    assert backend.builds == 2
    out = load_engine(rebuilt).infer(mlp_inputs())
    assert out["y"].shape == (8, 16)


def test_lru_eviction_keeps_protected_entries_even_through_hard_links(
    tmp_path: Path, backend: CountingBackend
) -> None:
    models = [make_mlp(tmp_path / f"m{i}.onnx", seed=i) for i in range(4)]
    one = EngineCache(tmp_path / "probe", 1 << 30)
    size = one.get_or_build(backend, models[0], _sha(100), BuildOptions())
    entry_bytes = size.stat().st_size + sidecar_path(size).stat().st_size
    cache = EngineCache(tmp_path / "engines", int(entry_bytes * 2.5))  # room for two

    e0 = cache.get_or_build(backend, models[0], _sha(0), BuildOptions())
    # The agent hard-links the active engine into its version directory and protects that.
    version_dir = tmp_path / "models" / "m" / "versions" / "1.0.0"
    version_dir.mkdir(parents=True)
    os.link(e0, version_dir / "engine")
    old = time.time() - 1000
    os.utime(sidecar_path(e0), (old, old))  # e0 is the least recently used of all

    e1 = cache.get_or_build(backend, models[1], _sha(1), BuildOptions())
    os.utime(sidecar_path(e1), (old + 1, old + 1))
    e2 = cache.get_or_build(backend, models[2], _sha(2), BuildOptions(),
                            protect=[version_dir / "engine"])  # fmt: skip
    assert e0.exists(), "the protected (active) engine must survive eviction"
    assert not e1.exists() and not sidecar_path(e1).exists(), "e1 was the LRU unprotected entry"
    assert e2.exists()

    # Using an entry makes it recent: e2 is used, then e3 arrives; e0 is protected by its
    # version directory this time, and the LRU unprotected one (e2 vs e3's newness) decides.
    cache.get_or_build(backend, models[2], _sha(2), BuildOptions())
    e3 = cache.get_or_build(backend, models[3], _sha(3), BuildOptions(), protect=[version_dir])
    assert e0.exists() and e3.exists()
    assert cache.total_bytes() <= cache.max_bytes or not e2.exists()


def test_recently_used_entry_outlives_an_older_one(
    tmp_path: Path, backend: CountingBackend
) -> None:
    models = [make_mlp(tmp_path / f"m{i}.onnx", seed=i) for i in range(3)]
    probe = EngineCache(tmp_path / "probe", 1 << 30).get_or_build(backend, models[0], _sha(9),
                                                                  BuildOptions())  # fmt: skip
    entry = probe.stat().st_size + sidecar_path(probe).stat().st_size
    cache = EngineCache(tmp_path / "engines", int(entry * 2.5))
    a = cache.get_or_build(backend, models[0], _sha(0), BuildOptions())
    b = cache.get_or_build(backend, models[1], _sha(1), BuildOptions())
    for p, t in ((a, 100.0), (b, 200.0)):
        os.utime(sidecar_path(p), (time.time() - t, time.time() - t))
    cache.get_or_build(backend, models[0], _sha(0), BuildOptions())  # touch a: now b is LRU
    c = cache.get_or_build(backend, models[2], _sha(2), BuildOptions())
    assert a.exists() and c.exists() and not b.exists()


def test_crash_leftovers_are_swept_and_never_served(
    tmp_path: Path, backend: CountingBackend, model: Path
) -> None:
    root = tmp_path / "engines"
    cache = EngineCache(root, 1 << 30)
    path = cache.get_or_build(backend, model, _sha(1), BuildOptions())
    # A crash between renaming the engine and writing its sidecar, plus a build temp.
    sidecar_path(path).unlink()
    (root / ".build-deadbeef-1-00").write_bytes(b"half an engine")
    EngineCache(root, 1 << 30)
    assert not path.exists() and not (root / ".build-deadbeef-1-00").exists()
    assert EngineCache(root, 1 << 30).lookup(backend, _sha(1), BuildOptions()) is None


def _unused(b: Backend) -> None:  # the counting wrapper satisfies the Backend protocol
    pass


_unused(CountingBackend.__new__(CountingBackend))
