"""What this device is: Jetson model, L4T / JetPack release, TensorRT version, GPU.

Everything comes from files the Jetson already has (no subprocess, no import of
TensorRT), read under `root` so tests can point it at recorded copies:

    /etc/nv_tegra_release         "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: ..."
    /proc/device-tree/model       "NVIDIA Jetson AGX Orin Developer Kit\\0"
    /usr/include/<triplet>/NvInferVersion.h   #define NV_TENSORRT_MAJOR 10 ...
    /usr/local/cuda/version.json  {"cuda": {"name": "CUDA SDK", "version": "12.6.68"}, ...}
    /usr/local/cuda/version.txt   "CUDA Version 10.2.300" (CUDA 10/11.0: JetPack 4)

GPU name, compute capability and DLA cores come from the backend (only TensorRT/CUDA
know them) when one is given.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the agent's idle footprint: no numpy/engines import just to read files
    from agent.engines.api import Backend

# L4T (Jetson Linux) release -> JetPack, from NVIDIA's JetPack archive. A release newer
# than the table within the same major maps to the newest JetPack at or below it: a
# conservative lower bound, which is what a `min_jetpack` check needs.
L4T_TO_JETPACK: list[tuple[tuple[int, int, int], str]] = [
    ((32, 6, 1), "4.6"),
    ((32, 7, 1), "4.6.1"),
    ((32, 7, 2), "4.6.2"),
    ((32, 7, 3), "4.6.3"),
    ((32, 7, 4), "4.6.4"),
    ((32, 7, 5), "4.6.5"),
    ((32, 7, 6), "4.6.6"),
    ((35, 1, 0), "5.0.2"),
    ((35, 2, 1), "5.1"),
    ((35, 3, 1), "5.1.1"),
    ((35, 4, 1), "5.1.2"),
    ((35, 5, 0), "5.1.3"),
    ((35, 6, 0), "5.1.4"),
    ((35, 6, 1), "5.1.5"),
    ((36, 2, 0), "6.0"),  # 6.0 developer preview
    ((36, 3, 0), "6.0"),
    ((36, 4, 0), "6.1"),
    ((36, 4, 3), "6.2"),
    ((36, 4, 4), "6.2.1"),
    ((38, 2, 0), "7.0"),  # JetPack 7: Jetson Thor
]

_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?")
_DEFINE = re.compile(r"^\s*#define\s+(\w+)\s+(\w+)", re.MULTILINE)


@dataclass(frozen=True)
class HardwareProfile:
    model: str | None  # device-tree model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None  # "36.4.0"
    jetpack: str | None  # "6.1"
    tensorrt: str | None  # "10.3.0"
    gpu: str | None
    compute_capability: str | None  # "8.7"
    dla_cores: int | None  # None: unknown (no TensorRT backend to ask)
    machine: str  # "aarch64"
    cpu_count: int
    memory_bytes: int | None
    # Why `backend = auto` runs ONNX Runtime on the CPU on this Jetson; None: it does not.
    backend_fallback: str | None = None
    cuda_version: str | None = None  # "12.6.68"
    tensorrt_full: str | None = None  # with the build number: "10.3.0.30"

    @property
    def is_jetson(self) -> bool:
        return self.l4t is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_version(text: str) -> tuple[int, ...]:
    """ "10.3.0.30" -> (10, 3, 0, 30); "6.2" -> (6, 2). ValueError when it is not one."""
    parts = text.strip().lstrip("vVrR").split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a dotted version number")
    return tuple(int(p) for p in parts)


def version_at_least(have: str, need: str) -> bool:
    a, b = parse_version(have), parse_version(need)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def parse_nv_tegra_release(text: str) -> str | None:
    """ "# R36 (release), REVISION: 4.3, ..." -> "36.4.3"; None when the line is absent."""
    m = _RELEASE.search(text)
    if not m:
        return None
    return f"{int(m.group(1))}.{int(m.group(2))}.{int(m.group(3) or 0)}"


def jetpack_for_l4t(l4t: str) -> str | None:
    v = parse_version(l4t)
    v3 = ((*v, 0, 0, 0))[:3]
    best = None
    for rel, jp in L4T_TO_JETPACK:
        if rel[0] == v3[0] and rel <= v3:
            best = jp
    return best


def parse_nvinfer_version(text: str) -> str | None:
    """The TensorRT version in NvInferVersion.h, following one level of macro indirection."""
    defs = dict(_DEFINE.findall(text))

    def value(name: str) -> str | None:
        v = defs.get(name)
        if v is not None and not v.isdigit():
            v = defs.get(v)
        return v if v is not None and v.isdigit() else None

    nums = [value(f"NV_TENSORRT_{p}") for p in ("MAJOR", "MINOR", "PATCH")]
    if any(n is None for n in nums):
        return None
    return ".".join(str(n) for n in nums)


def parse_nvinfer_full_version(text: str) -> str | None:
    """Like parse_nvinfer_version, with NV_TENSORRT_BUILD appended when the header has it."""
    short = parse_nvinfer_version(text)
    if short is None:
        return None
    defs = dict(_DEFINE.findall(text))
    build = defs.get("NV_TENSORRT_BUILD")
    if build is not None and not build.isdigit():
        build = defs.get(build)
    return f"{short}.{build}" if build is not None and build.isdigit() else short


def read_cuda_version(root: Path = Path("/")) -> str | None:
    """The CUDA toolkit's version from /usr/local/cuda (version.json, else version.txt)."""
    import json

    base = Path(root) / "usr" / "local" / "cuda"
    text = _read(base / "version.json")
    if text:
        try:
            v = json.loads(text).get("cuda", {}).get("version")
        except (ValueError, AttributeError):
            v = None
        if isinstance(v, str) and v:
            return v
    m = re.search(r"CUDA Version\s+([\d.]+)", _read(base / "version.txt") or "")
    return m.group(1) if m else None


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _tensorrt_version(root: Path) -> str | None:
    include = root / "usr" / "include"
    for candidate in [include / "NvInferVersion.h", *sorted(include.glob("*/NvInferVersion.h"))]:
        text = _read(candidate)
        if text and (v := parse_nvinfer_version(text)):
            return v
    if root == Path("/"):
        try:
            from importlib.metadata import PackageNotFoundError, version

            return version("tensorrt")
        except PackageNotFoundError:
            return None
    return None


def _tensorrt_full_version(root: Path) -> str | None:
    include = root / "usr" / "include"
    for candidate in [include / "NvInferVersion.h", *sorted(include.glob("*/NvInferVersion.h"))]:
        text = _read(candidate)
        if text and (v := parse_nvinfer_full_version(text)):
            return v
    return None


def meminfo_bytes(field: str, root: Path = Path("/")) -> int | None:
    """A /proc/meminfo field ("MemTotal", "MemAvailable") in bytes; None if absent."""
    text = _read(Path(root) / "proc" / "meminfo")
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text or "", re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def detect_hardware(
    backend: Backend | None = None,
    *,
    root: Path = Path("/"),
    backend_fallback: str | None = None,
) -> HardwareProfile:
    root = Path(root)
    release = _read(root / "etc" / "nv_tegra_release")
    l4t = parse_nv_tegra_release(release) if release else None
    model_raw = _read(root / "proc" / "device-tree" / "model")
    model = model_raw.replace("\x00", "").strip() or None if model_raw else None
    tensorrt = _tensorrt_version(root)
    gpu = cc = None
    dla: int | None = None
    if backend is not None:
        parts = backend.cache_key_parts()
        gpu = parts.get("gpu")
        cc = parts.get("compute_capability")
        if parts.get("dla_cores", "").isdigit():
            dla = int(parts["dla_cores"])
        if backend.name == "tensorrt":
            tensorrt = backend.version
    return HardwareProfile(
        model=model,
        l4t=l4t,
        jetpack=jetpack_for_l4t(l4t) if l4t else None,
        tensorrt=tensorrt,
        gpu=gpu,
        compute_capability=cc,
        dla_cores=dla,
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=meminfo_bytes("MemTotal", root),
        backend_fallback=backend_fallback,
        cuda_version=read_cuda_version(root),
        tensorrt_full=(
            backend.version
            if backend is not None and backend.name == "tensorrt"
            else _tensorrt_full_version(root) or tensorrt
        ),
    )
