"""Real-world model shapes (tests/modelzoo.py): what `jetfleet bundle build` accepts, the
device's engine job builds and gates; what a device would refuse, bundle build refuses first.

The device side here is the real builder child (`python -m agent.enginejob`, as the agent's
worker starts it) on the extracted, verified bundle: the same process a rollout runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from modelzoo import CORPUS, DEPLOYABLE, ZooModel, external_data
from typer.testing import CliRunner, Result

from agent.enginejob import EngineJob, EngineJobError, EngineRequest
from controller.bundles import bundler
from controller.cli.main import app
from controller.security.keystore import init_keys
from protocol.bundle import VerifiedBundle, extract_bundle, make_manifest, write_bundle
from protocol.modelio import ModelError, resolve_model_file
from protocol.trust import load_trust_root

NOW = datetime.now(timezone.utc)
Cli = Callable[..., Result]


# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_modelzoo")


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "keys"
    init_keys(d)
    return d


@pytest.fixture
def cli(tmp_path: Path, keys_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("JETFLEET_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("JETFLEET_KEYS", str(keys_dir))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def bundle_build(cli: Cli, model: Path, name: str, profiles: tuple[str, ...], out: Path) -> Result:
    args: list[Any] = ["bundle", "build", model, "--name", name, "--version", "1.0.0"]
    for p in profiles:
        args += ["--profile", p]
    return cli(*args, "--probation-s", "0", "--out", out, "--output", "json")


def extract(bundle: Path, keys_dir: Path, dest: Path) -> VerifiedBundle:
    trust = load_trust_root((keys_dir / "trust.json").read_bytes(), NOW)
    return extract_bundle(bundle, trust, dest, NOW)


def device_engine_job(vb: VerifiedBundle, cache: Path) -> dict[str, Any]:
    """Build and gate the bundle in the agent's builder child, as the worker does."""
    m = vb.manifest
    request = EngineRequest(
        backend="onnxruntime",
        cache_root=cache,
        cache_bytes=1 << 30,
        model=vb.model_path,
        model_sha256=m.file(m.model).sha256,
        build=m.build,
        targets=m.targets,
        golden=vb.golden_path,
        golden_max_bytes=256 << 20,
        inputs=m.inputs,
        outputs=m.outputs,
        gate=m.gate,
    )
    job = EngineJob(request, canceled=lambda: False, stopping=lambda: False)
    try:
        job.build()
        return job.gate()
    finally:
        job.close()


@pytest.mark.slow
@pytest.mark.parametrize("zoo", DEPLOYABLE, ids=str)
def test_every_model_bundle_build_accepts_passes_the_devices_build_and_gate(
    zoo: ZooModel, cli: Cli, keys_dir: Path, tmp_path: Path
) -> None:
    model = zoo.build(tmp_path / "src")
    r = bundle_build(cli, model, zoo.name.replace("_", "-"), zoo.profiles, tmp_path / "b.jfb")
    assert r.exit_code == 0, r.output
    vb = extract(tmp_path / "b.jfb", keys_dir, tmp_path / "bundle")
    # The device resolves the shipped file to exactly what the signed manifest declares.
    io = resolve_model_file(vb.model_path)
    assert io.inputs == vb.manifest.inputs and io.outputs == vb.manifest.outputs
    with np.load(vb.golden_path) as golden:
        fed = sorted(k.removeprefix("input.") for k in golden.files if k.startswith("input."))
    assert fed == sorted(t.name for t in io.inputs)
    gate = device_engine_job(vb, tmp_path / "engines")
    assert gate["passed"], gate["reason"]


def test_a_custom_domain_op_is_refused_at_bundle_build_in_one_line_naming_op_and_domain(
    cli: Cli, tmp_path: Path
) -> None:
    zoo = CORPUS["custom_op"]
    r = bundle_build(cli, zoo.build(tmp_path), "custom", (), tmp_path / "b.jfb")
    assert r.exit_code == 2, r.output
    assert zoo.refusal is not None and zoo.refusal in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "b.jfb").exists()


def _hand_made_bundle(model: Path, keys_dir: Path, out: Path) -> Path:
    """A signed bundle made without `bundle build` (another tool, an older jetfleet)."""
    from controller.security.keystore import load_keys

    golden = bundler.write_npz(
        out.parent / "golden.npz",
        {"input.x": np.ones((1, 8), np.float32), "output.y": np.ones((1, 8), np.float32)},
    )
    files = {"model.onnx": model, "golden.npz": golden}
    spec = [{"name": "x", "dtype": "float32", "shape": [1, 8]}]
    manifest = make_manifest(
        name="custom",
        version="1.0.0",
        files=files,
        inputs=spec,
        outputs=[{**spec[0], "name": "y"}],
    )
    return write_bundle(out, manifest, files, [load_keys(keys_dir).release])


def test_a_device_refuses_a_custom_op_bundle_as_unsupported_before_building(
    keys_dir: Path, tmp_path: Path
) -> None:
    model = CORPUS["custom_op"].build(tmp_path / "src")
    bundle = _hand_made_bundle(model, keys_dir, tmp_path / "custom.jfb")
    vb = extract(bundle, keys_dir, tmp_path / "bundle")
    with pytest.raises(EngineJobError) as e:
        device_engine_job(vb, tmp_path / "engines")
    assert e.value.code == "unsupported"
    assert "op 'FancyNorm' of domain 'com.example.vision'" in e.value.reason


def test_external_weights_travel_as_members_named_by_content(
    cli: Cli, keys_dir: Path, tmp_path: Path
) -> None:
    model = external_data(tmp_path / "src")
    assert bundle_build(cli, model, "ext", (), tmp_path / "a.jfb").exit_code == 0
    a = json.loads(bundle_build(cli, model, "ext", (), tmp_path / "a2.jfb").stdout)["manifest"]
    # Change one weight in one data file: model.onnx itself must change with it, since a
    # device keys its engine cache by the model file's hash.
    data = tmp_path / "src" / "head.bin"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0x01
    data.write_bytes(bytes(raw))
    b = json.loads(bundle_build(cli, model, "ext", (), tmp_path / "b.jfb").stdout)["manifest"]
    names = sorted(f["path"] for f in a["files"])
    assert names[0] == "golden.npz" and names[1] == "model.onnx"
    assert len(names) == 4 and all(n.startswith("weights-") for n in names[2:])
    sha = {m: {f["path"]: f["sha256"] for f in m_["files"]} for m, m_ in (("a", a), ("b", b))}
    assert sha["a"]["model.onnx"] != sha["b"]["model.onnx"]
    vb = extract(tmp_path / "a.jfb", keys_dir, tmp_path / "bundle")
    assert sorted(resolve_model_file(vb.model_path).data_files) == names[2:]


def test_a_weight_file_outside_the_models_directory_is_refused_on_both_sides(
    cli: Cli, keys_dir: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(external_data(tmp_path / "src")), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../src/" + entry.value
    onnx.save(model, str(tmp_path / "src" / "escape.onnx"))
    r = bundle_build(cli, tmp_path / "src" / "escape.onnx", "esc", (), tmp_path / "b.jfb")
    assert r.exit_code == 2 and "outside the model's directory" in r.stderr, r.output
    with pytest.raises(ModelError, match="outside the model's directory"):
        resolve_model_file(tmp_path / "src" / "escape.onnx")


def test_two_ranges_for_one_named_axis_are_refused_at_bundle_build(
    cli: Cli, tmp_path: Path
) -> None:
    model = CORPUS["encoder"].build(tmp_path)
    profiles = ("input_ids:1x1/2x7/4x16", "attention_mask:1x1/2x5/4x16")
    r = bundle_build(cli, model, "enc", profiles, tmp_path / "b.jfb")
    assert r.exit_code == 2, r.output
    assert "axis 'sequence' is 1/5/16 here but 1/7/16 in the profile of 'input_ids'" in r.stderr


def test_golden_inputs_outside_their_profile_are_refused_at_bundle_build(
    cli: Cli, tmp_path: Path
) -> None:
    model = CORPUS["mobilenet"].build(tmp_path)
    golden = bundler.write_npz(tmp_path / "g.npz", {"input": np.zeros((8, 3, 32, 32), np.float32)})
    r = cli(
        "bundle", "build", model, "--name", "m", "--version", "1.0.0", "--golden", golden,
        "--profile", CORPUS["mobilenet"].profiles[0], "--out", tmp_path / "b.jfb",
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "golden input 'input' has shape [8, 3, 32, 32], outside its profile" in r.stderr


def test_a_dynamic_input_without_a_profile_builds_with_a_warning_naming_tensorrt(
    cli: Cli, tmp_path: Path
) -> None:
    model = CORPUS["mobilenet"].build(tmp_path)
    r = bundle_build(cli, model, "m", (), tmp_path / "b.jfb")
    assert r.exit_code == 0, r.output
    assert "input 'input' has dynamic axes ['batch'] and no --profile" in r.stderr
    assert "TensorRT devices will refuse this bundle" in r.stderr


def _reshape_model(tmp_path: Path, shape_from: str) -> Path:
    """y = Reshape(x, shape) where the shape is `dims` (a fed input) passed through a
    Cast/Unsqueeze/Concat chain, or Shape(x) (taken from the data tensor)."""
    h, tp = onnx.helper, onnx.TensorProto
    nodes = [h.make_node("Shape", ["x"], ["x_shape"])]
    inputs = [h.make_tensor_value_info("x", tp.FLOAT, [2, 3])]
    if shape_from == "input":
        inputs.append(h.make_tensor_value_info("dims", tp.INT32, [2]))
        nodes += [
            h.make_node("Cast", ["dims"], ["dims64"], to=tp.INT64),
            h.make_node("Concat", ["dims64"], ["shape"], axis=0),
        ]
    else:
        nodes.append(h.make_node("Identity", ["x_shape"], ["shape"]))
    nodes.append(h.make_node("Reshape", ["x", "shape"], ["y"]))
    outputs = [h.make_tensor_value_info("y", tp.FLOAT, [2, 3])]
    graph = h.make_graph(nodes, "reshape", inputs, outputs)
    path = tmp_path / f"reshape_{shape_from}.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def test_an_input_feeding_a_reshape_shape_is_refused_at_bundle_build_naming_it(
    cli: Cli, tmp_path: Path
) -> None:
    r = bundle_build(cli, _reshape_model(tmp_path, "input"), "r", (), tmp_path / "b.jfb")
    assert r.exit_code == 2, r.output
    assert "input 'dims' is a shape tensor (its values feed Reshape's input 1)" in r.stderr
    assert "TensorRT devices need shapes as constants" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "b.jfb").exists()


def test_a_shape_taken_from_the_data_tensor_builds(cli: Cli, tmp_path: Path) -> None:
    r = bundle_build(cli, _reshape_model(tmp_path, "data"), "r", (), tmp_path / "b.jfb")
    assert r.exit_code == 0, r.output
