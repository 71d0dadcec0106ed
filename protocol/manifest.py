"""The bundle manifest (docs/protocol.md): what is in a bundle, how to build it, how to judge it."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.errors import MessageError
from protocol.ids import SemVer, validate_id, validate_semver
from protocol.messages import utcnow
from protocol.schema import Document

MANIFEST_PAYLOAD_TYPE = "application/vnd.jetfleet.manifest+json"
MANIFEST_MEMBER = "manifest.dsse.json"
Precision = Literal["fp32", "fp16", "int8"]
DTYPES = (
    "float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
)  # fmt: skip


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FileEntry(_Part):
    path: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        # Bundle members are flat, plain names: anything else is refused before extraction.
        if v.startswith("/") or "\\" in v or "\x00" in v:
            raise MessageError(f"manifest file path {v!r} must be relative and plain")
        parts = v.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise MessageError(f"manifest file path {v!r} has an empty, '.' or '..' component")
        if v == MANIFEST_MEMBER:
            raise MessageError(f"manifest file path {v!r} is reserved for the manifest")
        return v


class TensorSpec(_Part):
    name: str = Field(min_length=1)
    dtype: str
    # Fixed dims are ints; dynamic dims are names (e.g. "batch") shared across tensors.
    shape: list[int | str]

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise MessageError(f"tensor dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


class Profile(_Part):
    """TensorRT optimization profile of one dynamic input: full shapes for min/opt/max."""

    min: list[int]
    opt: list[int]
    max: list[int]

    @model_validator(mode="after")
    def _ordered(self) -> Profile:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise MessageError("profile min/opt/max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not (1 <= lo <= mid <= hi):
                raise MessageError(f"profile needs 1 <= min <= opt <= max, got {lo}/{mid}/{hi}")
        return self


class BuildOptions(_Part):
    precision: Precision = "fp32"
    profiles: dict[str, Profile] = Field(default_factory=dict, description="by input name")
    workspace_mb: int | None = Field(default=None, gt=0)
    dla_core: int | None = Field(default=None, ge=0)


class Targets(_Part):
    device_models: list[str] = Field(default_factory=list, description="empty: any device")
    min_tensorrt: str | None = None
    min_jetpack: str | None = None


Metric = Literal["elementwise", "max", "mean", "median", "quantile", "cosine", "topk", "boxes"]
ERROR_STATS = ("max", "mean", "median", "quantile")
BoxFormat = Literal["xyxy", "xywh", "cxcywh"]


class OutputCheck(_Part):
    """How the gate compares one output with its fp32 golden (Polygraphy's vocabulary).

    elementwise: every element within atol + rtol*|golden| (numpy.allclose).
    max | mean | median | quantile: that statistic of the absolute error <= atol OR of the
    relative error <= rtol (Polygraphy's --check-error-stat, --error-quantile).
    cosine: per sample (axis 0), cosine similarity >= min_cosine (embeddings).
    topk: per row along `axis`, the share of the golden top-k found in the engine's top-k,
    averaged, >= min_agreement (classifiers).
    boxes: this output holds boxes [.., N, 4], `scores` names their scores [.., N]; of the
    boxes scoring >= score_threshold, the share matched one-to-one with IoU >= iou (both
    ways: recall and precision) >= min_agreement (detection heads).
    """

    metric: Metric = "elementwise"
    atol: float | None = Field(default=None, ge=0, description="null: the gate's atol")
    rtol: float | None = Field(default=None, ge=0, description="null: the gate's rtol")
    error_quantile: float = Field(default=0.99, gt=0, le=1, description="quantile")
    min_cosine: float = Field(default=0.99, ge=-1, le=1, description="cosine")
    k: int = Field(default=1, ge=1, description="topk")
    axis: int = Field(default=-1, description="topk: the class axis")
    min_agreement: float = Field(default=0.99, ge=0, le=1, description="topk, boxes")
    scores: str | None = Field(default=None, description="boxes: the score output")
    score_threshold: float = Field(default=0.5, description="boxes")
    iou: float = Field(default=0.5, gt=0, le=1, description="boxes")
    box_format: BoxFormat = Field(default="xyxy", description="boxes")

    @model_validator(mode="after")
    def _complete(self) -> OutputCheck:
        if self.metric == "boxes" and not self.scores:
            raise MessageError("accuracy metric 'boxes' needs 'scores': the score output's name")
        return self


class GateSpec(_Part):
    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=1e-3, ge=0)
    outputs: dict[str, OutputCheck] = Field(
        default_factory=dict,
        description="accuracy check by output name; an output not named: elementwise atol/rtol",
    )
    latency_p99_ms: float | None = Field(default=None, gt=0, description="absolute budget")
    min_throughput: float | None = Field(default=None, gt=0, description="inferences/s")
    max_regression_pct: float = Field(default=10.0, ge=0)
    probation_s: float = Field(default=60.0, ge=0)
    max_gpu_fallback_layers: int | None = Field(
        default=None,
        ge=0,
        description="TensorRT: refuse an engine with more layers on the GPU (DLA builds)",
    )


class Manifest(Document):
    KIND: ClassVar[str] = "manifest"

    name: str
    version: str
    created_at: datetime = Field(default_factory=utcnow)
    model: str = Field(default="model.onnx", description="path of the ONNX member")
    golden: str = Field(default="golden.npz", description="path of the golden member")
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    build: BuildOptions = Field(default_factory=BuildOptions)
    targets: Targets = Field(default_factory=Targets)
    gate: GateSpec = Field(default_factory=GateSpec)

    _n = field_validator("name")(lambda cls, v: validate_id(v, "model name"))
    _v = field_validator("version")(lambda cls, v: validate_semver(v))

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise MessageError("manifest lists a file path twice")
        for role, path in (("model", self.model), ("golden", self.golden)):
            if path not in paths:
                raise MessageError(f"manifest {role} {path!r} is not among its files")
        inputs = {t.name for t in self.inputs}
        for name in self.build.profiles:
            if name not in inputs:
                raise MessageError(f"build profile for {name!r}, which is not a model input")
        self._check_accuracy_outputs()
        return self

    def _check_accuracy_outputs(self) -> None:
        outputs = {t.name for t in self.outputs}
        for name, check in self.gate.outputs.items():
            if name not in outputs:
                raise MessageError(f"gate accuracy check for {name!r}, which is not a model output")
            if check.scores is not None and check.scores not in outputs:
                raise MessageError(
                    f"gate accuracy check for {name!r}: scores {check.scores!r} is not a model "
                    "output"
                )

    @property
    def semver(self) -> SemVer:
        return SemVer(self.version)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)
