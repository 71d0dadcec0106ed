"""`jetfleet keys` and `jetfleet bundle`, through the real CLI (exit codes: docs/protocol.md)."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import make_convnet, make_golden, make_mlp, mlp_inputs, write_golden
from typer.testing import CliRunner, Result

from controller.bundles import bundler
from controller.cli.main import app
from controller.security.keystore import KeystoreError, init_keys, load_keys, rotate_keys
from protocol.bundle import VerifiedBundle, extract_bundle, verify_bundle
from protocol.dsse import Envelope
from protocol.errors import RollbackAttackError
from protocol.trust import load_trust_root, rotate

NOW = datetime.now(timezone.utc)
Cli = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("JETFLEET_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("JETFLEET_KEYS", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str | Path) -> Result:
        return runner.invoke(app, [str(a) for a in args])

    return run


@pytest.fixture
def keys_dir(cli: Cli, tmp_path: Path) -> Path:
    r = cli("keys", "init", tmp_path / "keys")
    assert r.exit_code == 0, r.output
    return tmp_path / "keys"


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return make_mlp(tmp_path / "mlp.onnx", in_dim=8, hidden=16, out_dim=4)


def _extract(bundle: Path, keys_dir: Path, dest: Path) -> VerifiedBundle:
    trust = load_trust_root((keys_dir / "trust.json").read_bytes(), NOW)
    return extract_bundle(bundle, trust, dest, NOW)


# -- keys --------------------------------------------------------------------------------


def test_keys_init_writes_private_keys_0600_and_a_signed_trust_root(
    cli: Cli, tmp_path: Path
) -> None:
    r = cli("keys", "init", tmp_path / "k", "--output", "json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    d = tmp_path / "k"
    for role in ("root", "release", "operator"):
        mode = stat.S_IMODE((d / f"{role}.key").stat().st_mode)
        assert mode == 0o600, (role, oct(mode))
        assert (d / f"{role}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    trust = load_trust_root((d / "trust.json").read_bytes(), NOW)
    assert trust.version == 1
    for role in ("root", "release", "operator"):
        assert trust.roles[role].keyids == [info["keyids"][role]]
    human = cli("keys", "show", d)
    assert info["keyids"]["release"] in human.stdout  # whole key ids, not cropped


def test_keys_init_refuses_to_overwrite_existing_keys_unless_forced(
    cli: Cli, keys_dir: Path
) -> None:
    before = (keys_dir / "root.key").read_bytes()
    r = cli("keys", "init", keys_dir)
    assert r.exit_code == 2
    assert "already holds" in r.stderr and "--force" in r.stderr
    assert (keys_dir / "root.key").read_bytes() == before
    r = cli("keys", "init", keys_dir, "--force")
    assert r.exit_code == 0
    assert (keys_dir / "root.key").read_bytes() != before


def test_keys_init_uses_the_global_keys_option(cli: Cli, tmp_path: Path) -> None:
    assert cli("--keys", tmp_path / "g", "keys", "init").exit_code == 0
    assert (tmp_path / "g" / "trust.json").is_file()
    r = cli("keys", "init")
    assert r.exit_code == 2 and "no key directory" in r.stderr


def test_keys_rotate_makes_a_root_devices_accept_and_retires_old_keys(
    cli: Cli, keys_dir: Path
) -> None:
    old = load_keys(keys_dir)
    r = cli("keys", "rotate", keys_dir, "--role", "root", "--role", "release", "--output", "json")
    assert r.exit_code == 0, r.output
    new = load_keys(keys_dir)
    assert json.loads(r.stdout)["version"] == 2
    assert new.root.keyid != old.root.keyid and new.release.keyid != old.release.keyid
    assert new.operator.keyid == old.operator.keyid
    # A device holding version 1 accepts version 2 (signed by the old and the new root key)…
    accepted = rotate(old.trust, Envelope.decode(new.trust_envelope), NOW)
    assert accepted.version == 2
    # …and refuses to go back to version 1.
    with pytest.raises(RollbackAttackError):
        rotate(accepted, Envelope.decode(old.trust_envelope), NOW)
    retired = keys_dir / "retired" / "v1"
    assert sorted(os.listdir(retired)) == ["release.key", "root.key", "trust.json"]


def test_an_expired_trust_root_is_reported_and_renewed_by_rotate(tmp_path: Path) -> None:
    d = tmp_path / "k"
    init_keys(d, expires_days=1, now=NOW - timedelta(days=2))
    with pytest.raises(KeystoreError, match=r"expired.*keys rotate"):
        load_keys(d)
    renewed = rotate_keys(d, roles=[], now=NOW)
    assert renewed.trust.version == 2 and renewed.trust.expires > NOW
    assert load_keys(d).trust.version == 2


def test_build_creates_the_output_directory(
    cli: Cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "dir" / "m.jfb"
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        mlp,
        "--name",
        "m",
        "--version",
        "1.0.0",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert out.is_file() and os.listdir(out.parent) == ["m.jfb"]


def test_key_files_readable_by_others_are_refused(keys_dir: Path) -> None:
    os.chmod(keys_dir / "release.key", 0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_keys(keys_dir)


def test_a_key_that_does_not_match_the_trust_root_is_refused(
    cli, keys_dir: Path, tmp_path: Path
) -> None:
    assert cli("keys", "init", tmp_path / "other").exit_code == 0
    os.replace(tmp_path / "other" / "release.key", keys_dir / "release.key")
    with pytest.raises(KeystoreError, match="does not hold the release role"):
        load_keys(keys_dir)


# -- bundle build / verify / inspect -----------------------------------------------------


def test_build_verify_inspect_round_trip(
    cli: Cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        mlp,
        "--name",
        "mlp",
        "--version",
        "1.2.3",
        "--profile",
        "x:1x8/4x8/16x8",
        "--latency-p99-ms",
        "5",
        "--min-throughput",
        "100",
        "--max-regression-pct",
        "7.5",
        "--probation-s",
        "30",
        "--atol",
        "0.01",
        "--rtol",
        "0.02",
        "--device-model",
        "NVIDIA Jetson AGX Orin",
        "--min-tensorrt",
        "8.6",
        "--min-jetpack",
        "6.0",
        "--workspace-mb",
        "512",
        "--dla-core",
        "0",
    )
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "mlp-1.2.3.jfb"
    assert str(bundle) in r.stdout
    v = cli("bundle", "verify", bundle, "--trust", keys_dir / "trust.json")
    assert v.exit_code == 0, v.output
    assert v.stdout.count("\n") == 1 and v.stdout.startswith("OK mlp-1.2.3.jfb: mlp 1.2.3")
    i = cli("bundle", "inspect", bundle, "--output", "json")
    assert i.exit_code == 0, i.output
    info = json.loads(i.stdout)
    m = info["manifest"]
    assert info["signatures"] == [{"keyid": load_keys(keys_dir).release.keyid}]
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    assert m["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}]
    assert m["build"] == {
        "precision": "fp32",
        "profiles": {"x": {"min": [1, 8], "opt": [4, 8], "max": [16, 8]}},
        "workspace_mb": 512,
        "dla_core": 0,
    }
    assert m["targets"] == {
        "device_models": ["NVIDIA Jetson AGX Orin"],
        "min_tensorrt": "8.6",
        "min_jetpack": "6.0",
    }
    assert m["gate"] == {
        "atol": 0.01,
        "rtol": 0.02,
        "outputs": {},  # fp32: every output elementwise within atol/rtol
        "latency_p99_ms": 5.0,
        "min_throughput": 100.0,
        "max_regression_pct": 7.5,
        "probation_s": 30.0,
    }
    human = cli("bundle", "inspect", bundle)
    assert "x float32[batch, 8]" in human.stdout and "not verified" in human.stdout
    # Generated golden inputs follow the profile's opt shape; outputs are ORT fp32.
    vb = _extract(bundle, keys_dir, tmp_path / "x")
    with np.load(vb.golden_path, allow_pickle=False) as z:
        assert z["input.x"].shape == (4, 8)
        expected = make_golden(mlp, {"x": z["input.x"]})["output.y"]
        np.testing.assert_allclose(z["output.y"], expected, rtol=1e-6, atol=1e-6)
    assert vb.model_path.read_bytes() == mlp.read_bytes()


def test_golden_inputs_only_get_outputs_computed_by_onnx_runtime(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    feeds = mlp_inputs(batch=3, in_dim=8)
    np.savez(tmp_path / "in.npz", **feeds)
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        mlp,
        "--name",
        "mlp",
        "--version",
        "1.0.0",
        "--golden",
        tmp_path / "in.npz",
        "--out",
        tmp_path / "b.jfb",
        "--output",
        "json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["golden_outputs"] == "computed"
    vb = _extract(tmp_path / "b.jfb", keys_dir, tmp_path / "x")
    with np.load(vb.golden_path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["input.x"], feeds["x"])
        ref = make_golden(mlp, feeds)["output.y"]
        np.testing.assert_allclose(z["output.y"], ref, rtol=1e-6, atol=1e-6)


def test_golden_outputs_from_training_are_kept_when_the_model_agrees(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    golden = make_golden(mlp, mlp_inputs(batch=2, in_dim=8))
    golden["output.y"] = golden["output.y"] + np.float32(2e-4)  # "training framework" noise
    write_golden(tmp_path / "g.npz", golden)
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        mlp,
        "--name",
        "mlp",
        "--version",
        "1.0.0",
        "--golden",
        tmp_path / "g.npz",
        "--out",
        tmp_path / "b.jfb",
        "--output",
        "json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["golden_outputs"] == "given"
    vb = _extract(tmp_path / "b.jfb", keys_dir, tmp_path / "x")
    with np.load(vb.golden_path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["output.y"], golden["output.y"])


def test_model_disagreeing_with_given_golden_outputs_is_refused_naming_the_worst_element(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    golden = make_golden(mlp, mlp_inputs(batch=2, in_dim=8))
    golden["output.y"] = golden["output.y"].copy()
    golden["output.y"][1, 2] += 0.5
    golden["output.y"][0, 0] += 0.01
    write_golden(tmp_path / "g.npz", golden)
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        mlp,
        "--name",
        "mlp",
        "--version",
        "1.0.0",
        "--golden",
        tmp_path / "g.npz",
        "--out",
        tmp_path / "b.jfb",
    )
    assert r.exit_code == 1
    assert "output 'y'" in r.stderr and "worst element [1, 2]" in r.stderr
    assert "2 of 8 elements" in r.stderr
    assert not (tmp_path / "b.jfb").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--precision", "fp8"], "--precision must be"),
        (["--precision", "int8"], "needs --calibration"),
        (["--version", "1.0"], "invalid version"),
        (["--name", "Bad Name"], "invalid model name"),
        (["--profile", "x:1x8/4x8"], "INPUT:MIN/OPT/MAX"),
        (["--profile", "nope:1x8/4x8/16x8"], "no input 'nope'"),
        (["--profile", "x:1x9/4x9/16x9"], "fixes it to 8"),
        (["--profile", "x:8x8/4x8/16x8"], "min <= opt <= max"),
        (["--golden", "missing.npz"], "does not exist"),
        (["--latency-p99-ms", "0"], "GateSpec latency_p99_ms: Input should be greater than 0"),
    ],
)
def test_bad_build_input_exits_2_with_one_line(
    cli, keys_dir: Path, mlp: Path, args: list[str], words: str
) -> None:
    base = {"--name": "mlp", "--version": "1.0.0"}
    extra = list(args)
    for flag in ("--name", "--version"):
        if flag in extra:
            base[flag] = extra.pop(extra.index(flag) + 1)
            extra.remove(flag)
    flat = [x for kv in base.items() for x in kv]
    r = cli("--keys", keys_dir, "bundle", "build", mlp, *flat, *extra)
    assert r.exit_code == 2, r.output
    assert words in r.stderr and r.stderr.count("\n") == 1


def test_golden_file_with_wrong_names_or_dtypes_exits_2(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    def build_with(name: str, **arrays: np.ndarray):  # type: ignore[no-untyped-def]
        np.savez(tmp_path / name, **arrays)
        args = ("--name", "m", "--version", "1.0.0", "--golden", tmp_path / name)
        return cli("--keys", keys_dir, "bundle", "build", mlp, *args)

    r = build_with("names.npz", images=np.zeros((1, 8), np.float32))
    assert r.exit_code == 2 and "'images'" in r.stderr and "input.x" in r.stderr
    r = build_with("dtype.npz", x=np.zeros((1, 8), np.float64))
    assert r.exit_code == 2 and "float64" in r.stderr and "float32" in r.stderr
    r = build_with("shape.npz", x=np.zeros((1, 9), np.float32))
    assert r.exit_code == 2 and "shape [1, 9]" in r.stderr


def test_build_without_keys_or_with_a_broken_model_exits_2(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    r = cli("bundle", "build", mlp, "--name", "m", "--version", "1.0.0")
    assert r.exit_code == 2 and "--keys" in r.stderr
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        tmp_path / "junk.onnx",
        "--name",
        "m",
        "--version",
        "1.0.0",
    )
    assert r.exit_code == 2 and "junk.onnx" in r.stderr


def test_fp16_bundle_keeps_fp32_io_and_fp32_golden_outputs(
    cli, keys_dir: Path, tmp_path: Path
) -> None:
    conv = make_convnet(tmp_path / "conv.onnx", size=16)
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        conv,
        "--name",
        "conv",
        "--version",
        "2.0.0",
        "--precision",
        "fp16",
        "--atol",
        "0.05",
        "--rtol",
        "0.05",
        "--out",
        tmp_path / "c.jfb",
        "--output",
        "json",
    )
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["manifest"]["build"]["precision"] == "fp16"
    vb = _extract(tmp_path / "c.jfb", keys_dir, tmp_path / "x")
    model = onnx.load(str(vb.model_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    with np.load(vb.golden_path, allow_pickle=False) as z:
        ref = make_golden(conv, {"image": z["input.image"]})["output.logits"]
        np.testing.assert_allclose(z["output.logits"], ref, rtol=1e-6, atol=1e-6)
    err = info["conversion_max_error"]["logits"]
    assert 0 < err < 0.05  # fp16 really changed the numbers, within the gate


def test_int8_bundle_is_qdq_quantized_from_the_calibration_set(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    np.savez(tmp_path / "calib.npz", x=mlp_inputs(batch=32, in_dim=8, seed=5)["x"])
    r = cli(
        "--keys",
        keys_dir,
        "bundle",
        "build",
        mlp,
        "--name",
        "mlp",
        "--version",
        "1.0.0-int8",
        "--precision",
        "int8",
        "--calibration",
        tmp_path / "calib.npz",
        "--atol",
        "0.5",
        "--rtol",
        "0.5",
        "--out",
        tmp_path / "q.jfb",
    )
    assert r.exit_code == 0, r.output
    vb = _extract(tmp_path / "q.jfb", keys_dir, tmp_path / "x")
    ops = {n.op_type for n in onnx.load(str(vb.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert vb.manifest.build.precision == "int8"


def test_verify_exits_3_with_one_line_on_a_tampered_bundle(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    assert (
        cli(
            "--keys", keys_dir, "bundle", "build", mlp, "--name", "m", "--version", "1.0.0"
        ).exit_code
        == 0
    )
    bundle = tmp_path / "m-1.0.0.jfb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    r = cli("bundle", "verify", bundle, "--trust", keys_dir / "trust.json")
    assert r.exit_code == 3
    assert r.stderr.startswith("jetfleet: verification failed:") and r.stderr.count("\n") == 1
    r = cli("bundle", "verify", bundle, "--trust", keys_dir / "trust.json", "--output", "json")
    assert r.exit_code == 3 and json.loads(r.stdout)["ok"] is False


def test_verify_exits_3_for_a_bundle_from_another_fleet(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    assert cli("keys", "init", tmp_path / "other").exit_code == 0
    assert (
        cli(
            "--keys",
            tmp_path / "other",
            "bundle",
            "build",
            mlp,
            "--name",
            "m",
            "--version",
            "1.0.0",
        ).exit_code
        == 0
    )
    r = cli("bundle", "verify", tmp_path / "m-1.0.0.jfb", "--trust", keys_dir / "trust.json")
    assert r.exit_code == 3 and "[bad_signature]" in r.stderr
    # Without --trust, the trust root of --keys is used.
    assert (
        cli("--keys", tmp_path / "other", "bundle", "verify", tmp_path / "m-1.0.0.jfb").exit_code
        == 0
    )


def test_verify_and_inspect_usage_errors_exit_2_and_garbage_exits_3(
    cli, keys_dir: Path, tmp_path: Path
) -> None:
    r = cli("bundle", "verify", tmp_path / "none.jfb", "--trust", keys_dir / "trust.json")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = cli("bundle", "verify", tmp_path / "none.jfb", "--trust", tmp_path / "none.json")
    assert r.exit_code == 2 and "cannot read trust root" in r.stderr
    (tmp_path / "junk.jfb").write_bytes(os.urandom(3000))
    assert cli("bundle", "inspect", tmp_path / "junk.jfb").exit_code == 3
    r = cli("bundle", "verify", tmp_path / "junk.jfb", "--trust", keys_dir / "trust.json")
    assert r.exit_code == 3


def test_built_bundle_verifies_with_the_library_the_agent_uses(
    cli, keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    assert (
        cli(
            "--keys", keys_dir, "bundle", "build", mlp, "--name", "m", "--version", "1.0.0"
        ).exit_code
        == 0
    )
    trust = load_trust_root((keys_dir / "trust.json").read_bytes(), NOW)
    assert verify_bundle(tmp_path / "m-1.0.0.jfb", trust, NOW).name == "m"


# -- the model reader --------------------------------------------------------------------


def test_describe_model_names_anonymous_dynamic_dims_and_skips_initializer_inputs(
    tmp_path: Path,
) -> None:
    w = onnx.numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        # Old exporters list initializers among the inputs; the dim of x is anonymous.
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4]),
            onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [4, 2]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 2])],
        [w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    io = bundler.describe_model(tmp_path / "m.onnx")
    assert [(t.name, t.shape) for t in io.inputs] == [("x", ["x_dim0", 4])]
    assert [(t.name, t.shape) for t in io.outputs] == [("y", ["n", 2])]


def test_a_model_whose_external_weights_file_is_missing_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    model = onnx.load(str(make_mlp(tmp_path / "m.onnx", in_dim=8, hidden=16, out_dim=4)))
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        size_threshold=0,
        location="ext.data",
    )
    (tmp_path / "ext.data").unlink()
    with pytest.raises(bundler.BuildInputError, match=r"keeps weights in ext\.data"):
        bundler.describe_model(tmp_path / "ext.onnx")


def test_rebuilding_gives_bit_identical_golden_files(
    keys_dir: Path, mlp: Path, tmp_path: Path
) -> None:
    keys = load_keys(keys_dir)
    spec = bundler.BundleSpec(model=mlp, name="m", version="1.0.0")
    a = bundler.build_bundle(spec, [keys.release], tmp_path / "a.jfb")
    b = bundler.build_bundle(spec, [keys.release], tmp_path / "b.jfb")
    assert a.manifest.file("golden.npz").sha256 == b.manifest.file("golden.npz").sha256
    assert a.manifest.file("model.onnx").sha256 == b.manifest.file("model.onnx").sha256


def test_golden_npz_is_byte_identical_whenever_it_is_written(tmp_path: Path) -> None:
    arrays = {"input.x": np.arange(6, dtype=np.float32).reshape(2, 3), "output.y": np.ones(2)}
    first = bundler.write_npz(tmp_path / "a.npz", arrays).read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert bundler.write_npz(tmp_path / "b.npz", arrays).read_bytes() == first
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        np.testing.assert_array_equal(loaded["input.x"], arrays["input.x"])


def test_keys_rotate_with_an_unknown_role_or_missing_directory_exits_2(
    cli: Cli, keys_dir: Path, tmp_path: Path
) -> None:
    r = cli("keys", "rotate", keys_dir, "--role", "admin")
    assert r.exit_code == 2 and "unknown role 'admin'" in r.stderr
    r = cli("keys", "rotate", tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in r.stderr
