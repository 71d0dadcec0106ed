"""Does this bundle's `targets` admit this device? Checked before any download-heavy work.

Device models match by words: "jetson-agx-orin", "Jetson AGX Orin" and the exact
device-tree string "NVIDIA Jetson AGX Orin Developer Kit" all admit an AGX Orin dev kit,
while "jetson-orin" does not admit it (the words must appear together and in order).
"""

from __future__ import annotations

import re

from agent.engines.api import Backend, TargetMismatchError
from agent.hardware import L4T_TO_JETPACK, HardwareProfile, parse_version, version_at_least
from protocol.manifest import BuildOptions, Targets


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def model_matches(target: str, model: str) -> bool:
    want, have = _words(target), _words(model)
    if not want:
        return False
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def _check_version_field(field: str, value: str) -> None:
    try:
        parse_version(value)
    except ValueError as e:
        raise TargetMismatchError(f"bundle target {field} {value!r} is not a version") from e


def _unmapped_l4t(l4t: str) -> str:
    newest = L4T_TO_JETPACK[-1][0]
    if parse_version(l4t)[0] > newest[0]:
        return (
            f"newer than this agent's L4T table (up to R{'.'.join(map(str, newest))}): "
            "upgrade jetfleet-agent"
        )
    return "older than any JetPack we know"


def check_targets(
    targets: Targets,
    hardware: HardwareProfile,
    backend: Backend,
    *,
    build: BuildOptions | None = None,
) -> None:
    """Raise TargetMismatchError (or UnsupportedError, for `build` options this backend
    cannot honour) with a sentence naming what excludes this device."""
    if targets.device_models:
        if hardware.model is None:
            raise TargetMismatchError(
                f"the bundle is only for {targets.device_models}, and this device's model is "
                "unknown (no /proc/device-tree/model: not a Jetson)"
            )
        if not any(model_matches(t, hardware.model) for t in targets.device_models):
            raise TargetMismatchError(
                f"the bundle is only for {targets.device_models}; this device is {hardware.model!r}"
            )
    if targets.min_jetpack:
        _check_version_field("min_jetpack", targets.min_jetpack)
        if hardware.jetpack is None:
            raise TargetMismatchError(
                f"the bundle needs JetPack >= {targets.min_jetpack}, and this device has no "
                "JetPack (no /etc/nv_tegra_release)"
                if hardware.l4t is None
                else f"the bundle needs JetPack >= {targets.min_jetpack}; this device runs "
                f"L4T {hardware.l4t}, {_unmapped_l4t(hardware.l4t)}"
            )
        if not version_at_least(hardware.jetpack, targets.min_jetpack):
            raise TargetMismatchError(
                f"the bundle needs JetPack >= {targets.min_jetpack}; this device runs JetPack "
                f"{hardware.jetpack} (L4T {hardware.l4t})"
            )
    # min_tensorrt constrains TensorRT builds only: ONNX Runtime runs the ONNX model itself.
    if targets.min_tensorrt and backend.name == "tensorrt":
        _check_version_field("min_tensorrt", targets.min_tensorrt)
        have = backend.version or hardware.tensorrt
        if not have or not version_at_least(have, targets.min_tensorrt):
            raise TargetMismatchError(
                f"the bundle needs TensorRT >= {targets.min_tensorrt}; this device has "
                f"TensorRT {have or 'none'}"
            )
    if build is not None:
        check = getattr(backend, "check_build_options", None)
        if callable(check):
            check(build)
