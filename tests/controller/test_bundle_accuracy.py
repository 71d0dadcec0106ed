"""`jetfleet bundle build`: the accuracy check each output is gated by, and golden files
saved by NVIDIA Polygraphy, through the real CLI and the real `polygraphy` tool."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from controller.bundles import bundler
from controller.cli.main import app
from protocol.bundle import extract_bundle
from protocol.manifest import Manifest
from protocol.trust import load_trust_root
from tests.classifier import images, make_resnet

Cli = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("JETFLEET_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "init", str(tmp_path / "keys")]).exit_code == 0
    monkeypatch.setenv("JETFLEET_KEYS", str(tmp_path / "keys"))
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def resnet(tmp_path: Path) -> Path:
    model = make_resnet(tmp_path / "resnet.onnx")
    np.savez(tmp_path / "golden.npz", image=images(8, seed=1))
    np.savez(tmp_path / "cal.npz", image=images(32, seed=5))
    np.savez(tmp_path / "cal-clipped.npz", image=images(32, seed=5) * 0.03)
    return model


def _build(cli: Cli, model: Path, version: str, *extra: str | Path) -> tuple[Result, Path]:
    out = model.parent / f"b-{version}.jfb"
    r = cli("bundle", "build", model, "--name", "classifier", "--version", version,
            "--out", out, "--output", "json", *extra)  # fmt: skip
    return r, out


def _manifest(result: Result) -> Manifest:
    assert result.exit_code == 0, result.output
    return Manifest.model_validate(json.loads(result.stdout)["manifest"])


def test_each_precision_signs_the_check_it_implies_into_the_manifest(
    cli: Cli, resnet: Path, tmp_path: Path
) -> None:
    golden = ("--golden", tmp_path / "golden.npz")
    fp32 = _manifest(_build(cli, resnet, "1.0.0", *golden)[0])
    assert fp32.gate.outputs == {}  # elementwise atol/rtol, as every bundle before
    fp16 = _manifest(_build(cli, resnet, "1.0.1", *golden, "--precision", "fp16")[0])
    q = fp16.gate.outputs["logits"]
    assert (q.metric, q.error_quantile, q.atol, q.rtol) == ("quantile", 0.99, 1e-2, 1e-2)
    r, bundle = _build(cli, resnet, "1.0.2", *golden, "--precision", "int8",
                       "--calibration", tmp_path / "cal.npz")  # fmt: skip
    int8 = _manifest(r)
    assert (int8.gate.outputs["logits"].metric, int8.gate.outputs["logits"].min_cosine) == (
        "cosine",
        0.99,
    )
    # The build machine already checked it passes (the only warning: no TensorRT profile).
    assert [w for w in json.loads(r.stdout)["warnings"] if "dynamic axes" not in w] == []
    shown = cli("bundle", "inspect", bundle)
    assert "logits: cosine similarity >= 0.99" in shown.stdout
    # The golden outputs of a reduced-precision bundle are the fp32 model's, bit for bit.
    trust = load_trust_root((tmp_path / "keys/trust.json").read_bytes(), datetime.now(timezone.utc))
    vb = extract_bundle(bundle, trust, tmp_path / "x", datetime.now(timezone.utc))
    with np.load(vb.golden_path) as z:
        ref = bundler.run_model(resnet, {"image": z["input.image"]})["logits"]
        assert np.array_equal(z["output.logits"], ref)


def test_accuracy_option_names_an_outputs_metric_and_bad_ones_exit_2(
    cli: Cli, resnet: Path, tmp_path: Path
) -> None:
    topk = ("--accuracy", "logits=topk:k=3,min_agreement=0.9")
    r, _ = _build(cli, resnet, "2.0.0", "--precision", "int8", "--calibration",
                  tmp_path / "cal.npz", *topk)  # fmt: skip
    check = _manifest(r).gate.outputs["logits"]
    assert (check.metric, check.k, check.min_agreement) == ("topk", 3, 0.9)
    for spec, message in [
        ("scores=cosine", "the model has no output 'scores' (['logits'])"),
        ("logits=median:k=x", "k: Input should be a valid integer"),
        ("logits=psnr", "metric: Input should be 'elementwise', 'max', 'mean'"),
        ("logits=topk:top=5", "unknown key(s) top"),
        ("logits=boxes", "accuracy metric 'boxes' needs 'scores'"),
    ]:
        bad, _ = _build(cli, resnet, "2.0.1", "--accuracy", spec)
        assert bad.exit_code == 2, (spec, bad.output)
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_clipping_calibration_is_flagged_at_build_by_the_devices_own_check(
    cli: Cli, resnet: Path, tmp_path: Path
) -> None:
    r, _ = _build(cli, resnet, "3.0.0", "--golden", tmp_path / "golden.npz", "--precision",
                  "int8", "--calibration", tmp_path / "cal-clipped.npz")  # fmt: skip
    assert r.exit_code == 0, r.output  # the device decides; the operator is told first
    assert "the int8 model fails the gate's accuracy check" in r.stderr
    assert "output 'logits' fails its cosine check" in r.stderr


# -- golden files from Polygraphy ----------------------------------------------------------


def _polygraphy(model: Path, out: Path, inp: Path) -> None:
    pytest.importorskip("polygraphy", reason="polygraphy is a dev dependency")
    exe = Path(sys.executable).with_name("polygraphy")
    subprocess.run(
        [str(exe), "run", str(model), "--onnxrt", "--input-shapes", "image:[4,3,32,32]",
         "--save-inputs", str(inp), "--save-outputs", str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_polygraphy_run_outputs_become_the_golden_file(
    cli: Cli, resnet: Path, tmp_path: Path
) -> None:
    out, inp = tmp_path / "pg-out.json", tmp_path / "pg-in.json"
    _polygraphy(resnet, out, inp)
    r, bundle = _build(cli, resnet, "4.0.0", "--golden", out, "--golden-inputs", inp)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["golden_outputs"] == "given"  # and checked against fp32 ORT
    trust = load_trust_root((tmp_path / "keys/trust.json").read_bytes(), datetime.now(timezone.utc))
    vb = extract_bundle(bundle, trust, tmp_path / "x", datetime.now(timezone.utc))
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    saved = RunResults.load(str(out))
    (_, iterations), feeds = saved[0], load_json(str(inp))
    with np.load(vb.golden_path) as z:
        assert np.array_equal(z["input.image"], feeds[0]["image"])
        assert np.array_equal(z["output.logits"], iterations[0]["logits"])

    no_inputs, _ = _build(cli, resnet, "4.0.1", "--golden", out)
    assert no_inputs.exit_code == 2 and "--golden-inputs" in no_inputs.stderr


@pytest.mark.slow
def test_polygraphy_outputs_of_a_reduced_precision_run_are_refused(
    cli: Cli, resnet: Path, tmp_path: Path
) -> None:
    int8 = tmp_path / "resnet-int8.onnx"
    to_int8 = bundler._to_int8  # noqa: SLF001 - an INT8 model as the bundler makes one
    to_int8(resnet, int8, tmp_path / "cal.npz", bundler.describe_model(resnet))
    out, inp = tmp_path / "pg8-out.json", tmp_path / "pg8-in.json"
    _polygraphy(int8, out, inp)
    r, _ = _build(cli, resnet, "5.0.0", "--golden", out, "--golden-inputs", inp)
    assert r.exit_code == 1 and "refusing to build" in r.stderr, r.output
    assert "output 'logits' disagrees with the golden outputs" in r.stderr
    # A TensorRT run (fp16 or int8 or not, the file cannot say) is not a reference at all.
    trt = tmp_path / "pg-trt.json"
    trt.write_text(out.read_text().replace('"onnxrt-runner', '"trt-runner'))
    r, _ = _build(cli, resnet, "5.0.1", "--golden", trt, "--golden-inputs", inp)
    assert r.exit_code == 2 and "must hold exactly one ONNX Runtime run" in r.stderr
    assert "trt-runner-N0" in r.stderr
