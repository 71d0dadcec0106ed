"""`jetfleet bundle build`: from an ONNX model to a signed .jfb.

What the operator gives is checked before anything is signed: the model must be a valid
ONNX file that a device can run, resolved by the same function the device's builder runs
(protocol.modelio); weights in external data files are bundled with it; golden inputs
must match its inputs by name, dtype and fixed dims; golden outputs given by the training
framework must agree with what ONNX Runtime computes in fp32 (within the gate's
atol/rtol), or the build is refused: a bundle whose golden file disagrees with its own
model would be rejected by every device's accuracy gate.

Golden outputs are always those of the fp32 model, also for fp16 and int8 bundles: the gate
measures how far the device's engine is from the reference, not from another approximation.
Golden files may also come from Polygraphy (`polygraphy run --onnxrt --save-inputs/
--save-outputs`, controller.bundles.polygraphy_files). Each output's accuracy check follows the
precision unless the operator names one (`--accuracy`, controller.bundles.accuracy_checks).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.bundles import polygraphy_files
from controller.bundles.accuracy_checks import gate_with_checks
from protocol.bundle import (
    GOLDEN_INPUT_PREFIX,
    GOLDEN_OUTPUT_PREFIX,
    bundle_filename,
    make_manifest,
    write_bundle,
)
from protocol.errors import CodedError, ProtocolError
from protocol.fsio import sha256_file
from protocol.keys import SigningKey
from protocol.manifest import (
    BuildOptions,
    GateSpec,
    Manifest,
    Precision,
    Profile,
    Targets,
    TensorSpec,
)
from protocol.modelio import ModelError, ModelIO, resolve_model_file, shape_tensor_inputs

MODEL_MEMBER = "model.onnx"
GOLDEN_MEMBER = "golden.npz"


class BuildInputError(CodedError):
    """Bad input from the operator (exit 2): the message names the file, tensor or option."""

    code = "bundle_input"


class GoldenMismatchError(CodedError):
    """The model disagrees with the given golden outputs (exit 1); names the worst element."""

    code = "golden_mismatch"


@dataclass(frozen=True)
class BundleSpec:
    model: Path
    name: str
    version: str
    golden: Path | None = None
    golden_inputs: Path | None = None  # with a Polygraphy outputs file as `golden`
    precision: Precision = "fp32"
    calibration: Path | None = None
    gate: GateSpec = field(default_factory=GateSpec)
    profiles: dict[str, Profile] = field(default_factory=dict)
    workspace_mb: int | None = None
    dla_core: int | None = None
    targets: Targets = field(default_factory=Targets)
    seed: int = 0


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    sha256: str
    golden_source: str  # "computed" (ONNX Runtime fp32) | "given" (checked against the model)
    golden_inputs: str  # "file" | "generated"
    # For fp16/int8: how far the converted model is from the fp32 golden on this machine's
    # ONNX Runtime CPU (None if ORT cannot run it here). Informative; devices gate for real.
    conversion_error: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)


# -- the model ---------------------------------------------------------------------------


def describe_model(path: Path) -> ModelIO:
    """Inputs and outputs of an ONNX file, resolved as every device resolves them
    (protocol.modelio): weights listed as inputs are not inputs, custom ops are refused."""
    path = Path(path)
    if not path.is_file():
        raise BuildInputError(f"model {path} does not exist")
    try:
        io = resolve_model_file(path)
    except ModelError as e:
        raise BuildInputError(f"{path}: {e.reason}") from e
    import onnx  # here, not at the top: every `jetfleet` command imports this module

    try:
        # By path: the checker then also reads the external data files.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BuildInputError(f"{path} is not a valid ONNX model: {first}") from e
    _refuse_shape_tensors(path)
    return io


def _refuse_shape_tensors(path: Path) -> None:
    """Refused for every fleet, not only TensorRT ones: a bundle does not know which
    backend its devices run, and TensorRT devices refuse shape-tensor inputs."""
    import onnx

    found = shape_tensor_inputs(onnx.load(str(path), load_external_data=False))
    if found:
        name, use = next(iter(found.items()))
        raise BuildInputError(
            f"{path}: input {name!r} is a shape tensor (its values feed {use}): TensorRT "
            "devices need shapes as constants in the model or taken from a data tensor "
            "(Shape): export with fixed shape values (e.g. onnxsim)"
        )


def _check_shipped(path: Path, io: ModelIO, what: str) -> None:
    """The model the bundle ships must resolve to the inputs and outputs the manifest
    declares: the device resolves that file, not the one the operator gave."""
    try:
        shipped = resolve_model_file(path)  # not the checker: converters leave unsorted graphs
    except ModelError as e:
        raise BuildInputError(f"the {what} model: {e.reason}") from e
    for kind, want, got in (
        ("inputs", io.inputs, shipped.inputs),
        ("outputs", io.outputs, shipped.outputs),
    ):
        if [t.model_dump() for t in want] != [t.model_dump() for t in got]:
            raise BuildInputError(
                f"the {what} model's {kind} differ from the original's: "
                f"{[(t.name, t.dtype) for t in got]} instead of {[(t.name, t.dtype) for t in want]}"
            )


def _bundle_model(src: Path, io: ModelIO, tmp: Path) -> dict[str, Path]:
    """The model's bundle members: model.onnx, plus its external data files renamed after
    their SHA-256. Naming them by content makes model.onnx's own hash (the engine cache key
    on a device) change whenever any weight does."""
    if not io.data_files:
        return {MODEL_MEMBER: src}
    renamed = {loc: f"weights-{sha256_file(src.parent / loc)}.bin" for loc in io.data_files}
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = renamed[entry.value]
    onnx.save(model, str(tmp / MODEL_MEMBER))
    for loc, name in renamed.items():
        # Beside model.onnx, as on a device; a copy, as onnx's checker refuses hard links.
        shutil.copyfile(src.parent / loc, tmp / name)
    return {MODEL_MEMBER: tmp / MODEL_MEMBER} | {n: tmp / n for n in renamed.values()}


_PROFILE_RE = re.compile(r"^([^:]+):(\d+(?:x\d+)*)/(\d+(?:x\d+)*)/(\d+(?:x\d+)*)$")


def parse_profile(text: str, io: ModelIO) -> tuple[str, Profile]:
    """`images:1x3x224x224/4x3x224x224/8x3x224x224` -> ("images", Profile(min, opt, max))."""
    m = _PROFILE_RE.match(text.strip())
    if not m:
        raise BuildInputError(
            f"--profile {text!r}: expected INPUT:MIN/OPT/MAX with shapes like 1x3x224x224"
        )
    name = m[1]
    names = [t.name for t in io.inputs]
    if name not in names:
        raise BuildInputError(f"--profile {text!r}: the model has no input {name!r} ({names})")
    shapes = [[int(d) for d in s.split("x")] for s in (m[2], m[3], m[4])]
    spec = io.input(name)
    for label, shape in zip(("min", "opt", "max"), shapes, strict=True):
        if len(shape) != len(spec.shape):
            raise BuildInputError(
                f"--profile {name}: {label} shape has rank {len(shape)}, the input has "
                f"rank {len(spec.shape)} {spec.shape}"
            )
        for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise BuildInputError(
                    f"--profile {name}: {label} dim {i} is {got}, the model fixes it to {want}"
                )
    try:
        return name, Profile(min=shapes[0], opt=shapes[1], max=shapes[2])
    except (ProtocolError, ValueError) as e:
        raise BuildInputError(f"--profile {name}: {e}") from e


def check_profiles(
    io: ModelIO, profiles: Mapping[str, Profile], feeds: Mapping[str, np.ndarray]
) -> list[str]:
    """Refuse what a TensorRT device would refuse: one named axis given two ranges, golden
    inputs outside their profile. Warn of dynamic inputs without a profile (TensorRT
    devices cannot build those; ONNX Runtime devices can)."""
    axes: dict[str, tuple[str, tuple[int, int, int]]] = {}
    for name, prof in profiles.items():
        for i, dim in enumerate(io.input(name).shape):
            span = (prof.min[i], prof.opt[i], prof.max[i])
            if isinstance(dim, str):
                first, seen = axes.setdefault(dim, (name, span))
                if seen != span:
                    raise BuildInputError(
                        f"--profile {name}: axis {dim!r} is {'/'.join(map(str, span))} here "
                        f"but {'/'.join(map(str, seen))} in the profile of {first!r}; "
                        "TensorRT needs one range per named axis"
                    )
        shape = list(feeds[name].shape)
        if any(not lo <= d <= hi for d, lo, hi in zip(shape, prof.min, prof.max, strict=True)):
            raise BuildInputError(
                f"golden input {name!r} has shape {shape}, outside its profile "
                f"(min {prof.min}, max {prof.max}): a TensorRT engine could not run it"
            )
    return [
        f"input {t.name!r} has dynamic axes {[d for d in t.shape if isinstance(d, str)]} and "
        "no --profile: TensorRT devices will refuse this bundle (ONNX Runtime devices run it)"
        for t in io.inputs
        if t.dynamic and t.name not in profiles
    ]


# -- golden data -------------------------------------------------------------------------


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise BuildInputError(f"{what} {path} does not exist") from e
    except (ValueError, OSError) as e:
        raise BuildInputError(f"{what} {path} is not a numpy .npz file: {e}") from e


def _split_named(
    arrays: Mapping[str, np.ndarray], io: ModelIO, what: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keys `input.<name>` / `output.<name>`, or bare input names."""
    in_names = {t.name for t in io.inputs}
    out_names = {t.name for t in io.outputs}
    inputs: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        if key.startswith(GOLDEN_INPUT_PREFIX) and key[len(GOLDEN_INPUT_PREFIX) :] in in_names:
            inputs[key[len(GOLDEN_INPUT_PREFIX) :]] = arr
        elif key.startswith(GOLDEN_OUTPUT_PREFIX) and key[len(GOLDEN_OUTPUT_PREFIX) :] in out_names:
            outputs[key[len(GOLDEN_OUTPUT_PREFIX) :]] = arr
        elif key in in_names:
            inputs[key] = arr
        else:
            raise BuildInputError(
                f"{what} has array {key!r}, which names no model input or output; expected "
                f"{', '.join(sorted(GOLDEN_INPUT_PREFIX + n for n in in_names))} and optionally "
                f"{', '.join(sorted(GOLDEN_OUTPUT_PREFIX + n for n in out_names))}"
            )
    return inputs, outputs


def _check_tensor(arr: np.ndarray, spec: TensorSpec, what: str, batch_axis: bool = False) -> None:
    if arr.dtype != np.dtype(spec.dtype):
        raise BuildInputError(f"{what} {spec.name!r} is {arr.dtype}, the model wants {spec.dtype}")
    shape = arr.shape[1:] if batch_axis else arr.shape
    if len(shape) != len(spec.shape):
        raise BuildInputError(
            f"{what} {spec.name!r} has shape {list(shape)}, the model wants {spec.shape}"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if isinstance(want, int) and got != want:
            raise BuildInputError(
                f"{what} {spec.name!r} has shape {list(shape)}, the model wants {spec.shape}"
            )


def _golden_arrays(path: Path, inputs_path: Path | None) -> dict[str, np.ndarray]:
    if not polygraphy_files.is_polygraphy_json(path):
        if inputs_path is not None:
            raise BuildInputError("--golden-inputs goes with a Polygraphy outputs file (.json)")
        return _load_npz(path, "golden file")
    try:
        return polygraphy_files.load_golden_pair(path, inputs_path)
    except polygraphy_files.PolygraphyFileError as e:
        raise BuildInputError(str(e)) from e


def load_golden(
    path: Path, io: ModelIO, inputs_path: Path | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Inputs (every model input) and, when the file has them, all reference outputs."""
    arrays = _golden_arrays(path, inputs_path)
    inputs, outputs = _split_named(arrays, io, f"golden file {path}")
    missing = [t.name for t in io.inputs if t.name not in inputs]
    if missing:
        raise BuildInputError(f"golden file {path} lacks input(s) {', '.join(missing)}")
    for spec in io.inputs:
        _check_tensor(inputs[spec.name], spec, "golden input")
    if not outputs:
        return inputs, None
    absent = [t.name for t in io.outputs if t.name not in outputs]
    if absent:
        raise BuildInputError(
            f"golden file {path} has some outputs but not {', '.join(absent)}: give all "
            "reference outputs, or none to have ONNX Runtime compute them"
        )
    for spec in io.outputs:
        if outputs[spec.name].dtype != np.dtype(spec.dtype):
            # A reduced-precision reference would hide exactly the error the gate measures.
            raise BuildInputError(
                f"golden output {spec.name!r} is {outputs[spec.name].dtype}, the model's is "
                f"{spec.dtype}: golden outputs must come from the fp32 model itself"
            )
    return inputs, outputs


def generate_inputs(io: ModelIO, profiles: Mapping[str, Profile], seed: int) -> dict[str, Any]:
    """Deterministic inputs: dynamic dims take the profile's opt shape, else 1."""
    rng = np.random.default_rng(seed)
    dims: dict[str, int] = {}
    for name, prof in profiles.items():
        for d, v in zip(io.input(name).shape, prof.opt, strict=True):
            if isinstance(d, str):
                dims.setdefault(d, v)
    feeds: dict[str, Any] = {}
    for spec in io.inputs:
        if spec.name in profiles:
            shape = list(profiles[spec.name].opt)
        else:
            shape = [d if isinstance(d, int) else dims.get(d, 1) for d in spec.shape]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def run_model(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with ONNX Runtime on the CPU, as the reference: no graph rewrites (fusions can
    change numerics) and one thread (reductions in a fixed order), so that rebuilding a
    bundle from the same model and inputs gives bit-identical golden outputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, dict(feeds))
    except Exception as e:  # ORT raises its own exception types from C++
        raise BuildInputError(f"ONNX Runtime cannot run {path.name}: {e}") from e
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


@dataclass(frozen=True)
class Mismatch:
    output: str
    index: tuple[int, ...]
    model: float
    golden: float
    bad: int
    total: int

    def sentence(self, atol: float, rtol: float) -> str:
        diff = abs(self.model - self.golden)
        return (
            f"output {self.output!r} disagrees with the golden outputs: worst element "
            f"{list(self.index)}: model {self.model:.6g}, golden {self.golden:.6g} "
            f"(|diff| {diff:.3g} > atol {atol:g} + rtol {rtol:g} × |golden|); "
            f"{self.bad} of {self.total} elements outside the tolerance"
        )


def compare(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], atol: float, rtol: float
) -> Mismatch | None:
    """The first output with elements outside |a - e| <= atol + rtol * |e|, worst element."""
    for name, exp in expected.items():
        got = actual[name]
        if got.shape != exp.shape:
            raise GoldenMismatchError(
                f"output {name!r} has shape {list(got.shape)}, the golden file {list(exp.shape)}"
            )
        a = got.astype(np.float64)
        e = exp.astype(np.float64)
        ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
        if ok.all():
            continue
        excess = np.where(ok, -np.inf, np.nan_to_num(np.abs(a - e), nan=np.inf) - rtol * np.abs(e))
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
        return Mismatch(name, idx, float(a[idx]), float(e[idx]), int((~ok).sum()), ok.size)
    return None


def _max_errors(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> dict:
    return {
        n: float(np.max(np.abs(actual[n].astype(np.float64) - e.astype(np.float64))))
        if e.size
        else 0.0
        for n, e in expected.items()
    }


# -- precision conversion ----------------------------------------------------------------


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx

    model = onnx.load(str(src))
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:  # older ORT wheels without the transformers tools
        from onnxconverter_common.float16 import (
            convert_float_to_float16,
        )
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise BuildInputError(f"fp16 conversion of {src.name} failed: {e}") from e
    onnx.save(converted, str(dst))


class _CalibrationReader:
    """Feeds calibration samples to quantize_static one batch at a time."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def calibration_batches(path: Path, io: ModelIO) -> list[dict[str, np.ndarray]]:
    """Arrays named like the model inputs (or `input.<name>`); samples stacked on axis 0:
    either one extra leading axis (N batches), or batches concatenated along the batch dim."""
    inputs, _ = _split_named(_load_npz(path, "calibration file"), io, f"calibration file {path}")
    missing = [t.name for t in io.inputs if t.name not in inputs]
    if missing:
        raise BuildInputError(f"calibration file {path} lacks input(s) {', '.join(missing)}")
    per_input: dict[str, list[np.ndarray]] = {}
    for spec in io.inputs:
        arr = inputs[spec.name]
        if arr.ndim == len(spec.shape) + 1:
            _check_tensor(arr, spec, "calibration input", batch_axis=True)
            per_input[spec.name] = [arr[i] for i in range(arr.shape[0])]
        else:
            _check_tensor(arr, spec, "calibration input")
            step = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 1
            per_input[spec.name] = [arr[i : i + step] for i in range(0, arr.shape[0], step)]
    counts = {len(v) for v in per_input.values()}
    if len(counts) != 1 or 0 in counts:
        raise BuildInputError(f"calibration file {path}: inputs hold different sample counts")
    n = counts.pop()
    return [{name: per_input[name][i] for name in per_input} for i in range(n)]


def _to_int8(src: Path, dst: Path, calibration: Path, io: ModelIO) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = calibration_batches(calibration, io)

    class Reader(_CalibrationReader, CalibrationDataReader):
        pass

    try:
        # Symmetric int8 Q/DQ pairs: the explicit-quantization form TensorRT builds from.
        quantize_static(
            str(src),
            str(dst),
            Reader(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    except BuildInputError:
        raise
    except Exception as e:
        raise BuildInputError(f"int8 quantization of {src.name} failed: {e}") from e


# -- the build ---------------------------------------------------------------------------


def _conversion_verdict(
    converted: Mapping[str, np.ndarray],
    golden: Mapping[str, np.ndarray],
    gate: GateSpec,
    precision: str,
) -> list[str]:
    """The devices' own accuracy check, run here on the converted model: a warning if it fails."""
    from agent.gate.accuracy import check_accuracy

    report = check_accuracy(converted, golden, gate)
    if report.passed:
        return []
    return [
        f"on this machine's ONNX Runtime the {precision} model fails the gate's accuracy check "
        f"({report.reason}); devices will likely reject it unless --accuracy is loosened"
    ]


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """An .npz that np.load(allow_pickle=False) reads, byte-identical for identical arrays:
    np.savez stamps each zip entry with the current time, which would make every rebuild
    of a bundle differ."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return path


def build_bundle(
    spec: BundleSpec, release_keys: Sequence[SigningKey], out: Path | None = None
) -> BuildResult:
    """Check the inputs, compute or check the golden outputs, convert the precision, sign."""
    io = describe_model(spec.model)
    for name in spec.profiles:
        if name not in {t.name for t in io.inputs}:
            raise BuildInputError(f"profile for {name!r}, which is not a model input")
    if spec.precision == "int8" and spec.calibration is None:
        raise BuildInputError("--precision int8 needs --calibration FILE.npz (sample inputs)")
    if spec.calibration is not None and spec.precision != "int8":
        raise BuildInputError("--calibration is only used with --precision int8")
    warnings: list[str] = []
    if spec.golden_inputs is not None and spec.golden is None:
        raise BuildInputError("--golden-inputs needs --golden (the Polygraphy outputs file)")
    gate = gate_with_checks(spec.gate, spec.precision, io.outputs)
    if spec.golden is not None:
        feeds, given = load_golden(spec.golden, io, spec.golden_inputs)
        inputs_from = "file"
    else:
        feeds, given = generate_inputs(io, spec.profiles, spec.seed), None
        inputs_from = "generated"
    warnings += check_profiles(io, spec.profiles, feeds)
    reference = run_model(spec.model, feeds)
    if given is not None:
        bad = compare(reference, given, spec.gate.atol, spec.gate.rtol)
        if bad is not None:
            raise GoldenMismatchError(bad.sentence(spec.gate.atol, spec.gate.rtol))
        golden_out = given
    else:
        golden_out = reference
    try:
        build = BuildOptions(
            precision=spec.precision,
            profiles=spec.profiles,
            workspace_mb=spec.workspace_mb,
            dla_core=spec.dla_core,
        )
    except (ProtocolError, ValueError) as e:
        raise BuildInputError(f"build options: {e}") from e
    out = Path(out) if out is not None else Path.cwd() / bundle_filename(spec.name, spec.version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".jetfleet-build-", dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        model_file = tmp / MODEL_MEMBER
        conversion_error = None
        if spec.precision == "fp32":
            members = _bundle_model(spec.model, io, tmp)
        else:
            if spec.precision == "fp16":
                _to_fp16(spec.model, model_file)
            else:
                assert spec.calibration is not None
                _to_int8(spec.model, model_file, spec.calibration, io)
            members = {MODEL_MEMBER: model_file}
            try:
                converted = run_model(model_file, feeds)
            except BuildInputError as e:
                warnings.append(f"the {spec.precision} model does not run on this CPU: {e}")
            else:
                conversion_error = _max_errors(converted, golden_out)
                warnings += _conversion_verdict(converted, golden_out, gate, spec.precision)
        golden_file = tmp / GOLDEN_MEMBER
        arrays = {GOLDEN_INPUT_PREFIX + k: np.ascontiguousarray(v) for k, v in feeds.items()}
        arrays |= {GOLDEN_OUTPUT_PREFIX + k: np.ascontiguousarray(v) for k, v in golden_out.items()}
        write_npz(golden_file, arrays)
        _check_shipped(members[MODEL_MEMBER], io, spec.precision)
        files = {**members, GOLDEN_MEMBER: golden_file}
        try:
            manifest = make_manifest(
                name=spec.name,
                version=spec.version,
                files=files,
                inputs=io.inputs,
                outputs=io.outputs,
                build=build,
                targets=spec.targets,
                gate=gate,
            )
        except ProtocolError as e:
            raise BuildInputError(str(e)) from e
        path = write_bundle(out, manifest, files, list(release_keys))
    return BuildResult(
        path=path,
        manifest=manifest,
        sha256=sha256_file(path),
        golden_source="given" if given is not None else "computed",
        golden_inputs=inputs_from,
        conversion_error=conversion_error,
        warnings=warnings,
    )
