"""check_targets: a bundle's device models and minimum JetPack/TensorRT, before any build."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.engines import TargetMismatchError, select_backend
from agent.engines.targets import check_targets, model_matches
from agent.hardware import HardwareProfile, detect_hardware
from protocol.manifest import Targets

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "jetson"


class FakeTrt:
    """Only the identity of a TensorRT backend (TensorRT itself is not installable here)."""

    name = "tensorrt"

    def __init__(self, version: str) -> None:
        self.version = version

    def cache_key_parts(self) -> dict[str, str]:
        return {}


def _hw(root: str) -> HardwareProfile:
    return detect_hardware(root=FIXTURES / root)


def test_device_model_words_must_appear_together_and_in_order() -> None:
    agx = "NVIDIA Jetson AGX Orin Developer Kit"
    assert model_matches("jetson-agx-orin", agx) and model_matches("Jetson AGX Orin", agx)
    assert model_matches(agx, agx)
    assert not model_matches("jetson-orin-nano", agx) and not model_matches("jetson-orin", agx)
    assert not model_matches("", agx)


def test_other_device_model_is_a_mismatch_naming_both() -> None:
    ort = select_backend("onnxruntime")
    with pytest.raises(
        TargetMismatchError, match=r"only for \['jetson-orin-nano'\].*AGX Orin"
    ) as e:
        check_targets(Targets(device_models=["jetson-orin-nano"]), _hw("agx-orin-r36.4.0"), ort)
    assert e.value.code == "target_mismatch"
    check_targets(Targets(device_models=["jetson-orin-nano", "jetson-agx-orin"]),
                  _hw("agx-orin-r36.4.0"), ort)  # fmt: skip


def test_minimum_jetpack_is_enforced_and_a_non_jetson_is_told_why(tmp_path: Path) -> None:
    ort = select_backend("onnxruntime")
    check_targets(Targets(min_jetpack="6.0"), _hw("agx-orin-r36.3.0"), ort)
    with pytest.raises(
        TargetMismatchError, match=r"JetPack >= 6.1.*runs JetPack 6.0 \(L4T 36.3.0\)"
    ):
        check_targets(Targets(min_jetpack="6.1"), _hw("agx-orin-r36.3.0"), ort)
    with pytest.raises(TargetMismatchError, match="no /etc/nv_tegra_release"):
        check_targets(Targets(min_jetpack="6.0"), detect_hardware(root=tmp_path), ort)
    with pytest.raises(TargetMismatchError, match="not a version"):
        check_targets(Targets(min_jetpack="six"), _hw("agx-orin-r36.3.0"), ort)


def test_minimum_tensorrt_binds_tensorrt_builds_only() -> None:
    hw = _hw("agx-orin-r36.4.0")
    check_targets(Targets(min_tensorrt="10.3"), hw, FakeTrt("10.3.0"))  # type: ignore[arg-type]
    with pytest.raises(TargetMismatchError, match=r"TensorRT >= 10.7.*has TensorRT 10.3.0"):
        check_targets(Targets(min_tensorrt="10.7"), hw, FakeTrt("10.3.0"))  # type: ignore[arg-type]
    # ONNX Runtime runs the ONNX model itself: a TensorRT minimum does not exclude it.
    check_targets(Targets(min_tensorrt="99.0"), hw, select_backend("onnxruntime"))


def test_no_targets_admit_any_device(tmp_path: Path) -> None:
    check_targets(Targets(), detect_hardware(root=tmp_path), select_backend("onnxruntime"))


def _jetson_root(tmp_path: Path, release: str) -> Path:
    (tmp_path / "etc").mkdir(parents=True)
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        f"# {release} (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64\n"
    )
    return tmp_path


def test_jetpack_7_on_r38_meets_a_jetpack_6_minimum(tmp_path: Path) -> None:
    hw = detect_hardware(root=_jetson_root(tmp_path, "R38"))
    assert (hw.l4t, hw.jetpack) == ("38.2.0", "7.0")
    check_targets(Targets(min_jetpack="6.1"), hw, select_backend("onnxruntime"))


def test_a_release_newer_than_the_table_says_so_rather_than_older(tmp_path: Path) -> None:
    hw = detect_hardware(root=_jetson_root(tmp_path, "R39"))
    with pytest.raises(TargetMismatchError, match=r"L4T 39.2.0, newer than this agent's L4T"):
        check_targets(Targets(min_jetpack="6.1"), hw, select_backend("onnxruntime"))
