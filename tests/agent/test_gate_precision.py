"""Reduced precision at the gate: real fp16 and int8 bundles of a ResNet-style classifier,
built by `jetfleet bundle build` (ONNX float16 conversion; ONNX Runtime static Q/DQ int8
quantization, which ORT runs in int8), judged by the metric their precision implies."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from agent.engines import select_backend
from agent.engines.cache import EngineCache
from agent.gate import SpeedSettings, run_gate
from controller.bundles import bundler
from protocol.bundle import extract_bundle
from protocol.manifest import GateSpec, Manifest, OutputCheck
from protocol.messages import JobState
from tests.agent.test_agent_jobs import Device
from tests.classifier import images, make_resnet

# No speed verdict here: these tests are about accuracy.
GATE = GateSpec(probation_s=0, max_regression_pct=1000)
QUICK = SpeedSettings(time_budget_s=0.2, warmup_s=0.05, solo_samples=20)


def _npz(path: Path, arr: np.ndarray) -> Path:
    np.savez(path, image=arr)
    return path


def build(tmp: Path, release, precision: str, version: str, calibration_scale: float = 1.0,
          accuracy: dict[str, OutputCheck] | None = None) -> Path:  # fmt: skip
    """A signed bundle of the classifier; `calibration_scale` < 1 calibrates int8 on
    activations far smaller than the real ones: every larger activation is clipped."""
    work = tmp / f"src-{precision}-{version}"
    work.mkdir(parents=True)
    model = make_resnet(work / "resnet.onnx")
    spec = bundler.BundleSpec(
        model=model,
        name="classifier",
        version=version,
        golden=_npz(work / "golden.npz", images(8, seed=1)),
        precision=precision,  # type: ignore[arg-type]
        calibration=_npz(work / "cal.npz", images(32, seed=5) * calibration_scale)
        if precision == "int8"
        else None,
        gate=GATE.model_copy(update={"outputs": accuracy or {}}),
    )
    return bundler.build_bundle(spec, [release], tmp / f"classifier-{version}.jfb").path


@pytest.fixture
def gate_on(tmp_path: Path, trust_material):  # type: ignore[no-untyped-def]
    """Extract a bundle as a device does, build its engine with ONNX Runtime, run the gate."""
    backend = select_backend("onnxruntime")
    cache = EngineCache(tmp_path / "engines", 1 << 30)
    manifests: dict[Path, Manifest] = {}

    def run(bundle: Path, gate: GateSpec | None = None):  # type: ignore[no-untyped-def]
        dest = tmp_path / f"x-{bundle.stem}"
        if bundle not in manifests:
            now = datetime.now(timezone.utc)
            manifests[bundle] = extract_bundle(bundle, trust_material.trust, dest, now).manifest
        m = manifests[bundle]
        sha = m.file(m.model).sha256
        engine = cache.get_or_build(backend, dest / m.model, sha, m.build)
        return m, run_gate(backend, engine, None, dest / m.golden, gate or m.gate, speed=QUICK)

    return run


@pytest.mark.parametrize(("precision", "metric"), [("fp16", "quantile"), ("int8", "cosine")])
def test_reduced_precision_classifier_passes_its_metric_where_elementwise_refuses(
    tmp_path: Path, trust_material, gate_on, precision: str, metric: str
) -> None:  # type: ignore[no-untyped-def]
    bundle = build(tmp_path, trust_material.release, precision, "1.0.0")
    manifest, result = gate_on(bundle)
    assert manifest.build.precision == precision
    assert manifest.gate.outputs["logits"].metric == metric  # the precision's default
    assert result.passed, result.reason
    acc = result.figures["accuracy"]["outputs"]["logits"]
    assert acc["metric"] == metric and acc["passed"]
    # The same engine against the same fp32 golden outputs, element by element (fp32's
    # tolerances, what every bundle got before): refused.
    _, elementwise = gate_on(bundle, manifest.gate.model_copy(update={"outputs": {}}))
    assert not elementwise.passed and elementwise.code == "accuracy"
    assert elementwise.figures["accuracy"]["failed_metric"] == "elementwise"


def test_int8_classifier_can_be_held_to_top1_agreement_instead(
    tmp_path: Path, trust_material, gate_on
) -> None:  # type: ignore[no-untyped-def]
    topk = {"logits": OutputCheck(metric="topk", k=1, min_agreement=0.75)}
    manifest, result = gate_on(build(tmp_path, trust_material.release, "int8", "1.0.0",
                                     accuracy=topk))  # fmt: skip
    assert manifest.gate.outputs["logits"].metric == "topk"  # the operator's choice wins
    acc = result.figures["accuracy"]["outputs"]["logits"]
    assert result.passed and acc["metric"] == "topk" and acc["rows"] == 8, result.reason
    assert acc["agreement"] >= 0.75


@pytest.mark.slow
def test_agent_accepts_fp16_and_int8_and_refuses_a_broken_quantization_by_its_metric(
    tmp_path: Path, trust_material
) -> None:
    device = Device(tmp_path, trust_material)
    release = trust_material.release
    fp16 = device.deploy(build(tmp_path, release, "fp16", "1.0.0"))
    assert fp16.state is JobState.SUCCEEDED, fp16
    int8 = device.deploy(build(tmp_path, release, "int8", "1.1.0"))
    assert int8.state is JobState.SUCCEEDED, int8
    assert device.slot("classifier") == ("1.1.0", "1.0.0")

    broken = device.deploy(build(tmp_path, release, "int8", "1.2.0", calibration_scale=0.03))
    assert (broken.state, broken.code) == (JobState.ROLLED_BACK, "accuracy"), broken
    assert "output 'logits' fails its cosine check" in (broken.reason or "")
    acc = (broken.gate or {})["accuracy"]
    assert acc["failed_output"] == "logits" and acc["failed_metric"] == "cosine"
    figures = acc["outputs"]["logits"]
    assert figures["min_cosine"] < figures["threshold"] == 0.99
    assert device.slot("classifier") == ("1.1.0", "1.0.0")
