"""detect_hardware on recorded Jetson files (tests/fixtures/jetson, sources in SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hardware import (
    detect_hardware,
    jetpack_for_l4t,
    parse_nv_tegra_release,
    parse_nvinfer_version,
    version_at_least,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "jetson"


@pytest.mark.parametrize(
    ("root", "model", "l4t", "jetpack", "tensorrt"),
    [
        ("agx-orin-r36.3.0", "NVIDIA Jetson AGX Orin Developer Kit", "36.3.0", "6.0", None),
        ("agx-orin-r36.4.0", "NVIDIA Jetson AGX Orin Developer Kit", "36.4.0", "6.1", "10.3.0"),
        ("orin-nano-super-r36.4.7",
         "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "36.4.7", "6.2.1",
         "10.7.0"),
        ("xavier-nx-r35.4.1", "NVIDIA Jetson Xavier NX Developer Kit", "35.4.1", "5.1.2", None),
        ("nano-r32.7.1", "NVIDIA Jetson Nano Developer Kit", "32.7.1", "4.6.1", None),
    ],
)  # fmt: skip
def test_recorded_jetsons_are_recognised(
    root: str, model: str, l4t: str, jetpack: str, tensorrt: str | None
) -> None:
    hw = detect_hardware(root=FIXTURES / root)
    assert (hw.model, hw.l4t, hw.jetpack, hw.tensorrt) == (model, l4t, jetpack, tensorrt)
    assert hw.is_jetson and "\x00" not in (hw.model or "")


def test_a_machine_without_jetson_files_is_not_a_jetson(tmp_path: Path) -> None:
    hw = detect_hardware(root=tmp_path)
    assert not hw.is_jetson and hw.model is None and hw.jetpack is None
    assert hw.cpu_count >= 1 and hw.to_dict()["l4t"] is None


@pytest.mark.parametrize(
    ("l4t", "jetpack"),
    [("36.3.0", "6.0"), ("36.4.0", "6.1"), ("36.4.3", "6.2"), ("36.4.4", "6.2.1"),
     ("35.1.0", "5.0.2"), ("35.2.1", "5.1"), ("35.5.0", "5.1.3"), ("32.7.4", "4.6.4"),
     ("36.9.0", "6.2.1"), ("34.1.0", None), ("38.2.0", "7.0"), ("38.4.0", "7.0"),
     ("39.0.0", None)],
)  # fmt: skip
def test_l4t_maps_to_jetpack_with_newer_releases_as_a_lower_bound(
    l4t: str, jetpack: str | None
) -> None:
    assert jetpack_for_l4t(l4t) == jetpack


def test_release_line_parsing_is_strict() -> None:
    line = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64"
    assert parse_nv_tegra_release(line) == "36.4.3"
    assert parse_nv_tegra_release("# R35 (release), REVISION: 5, GCID: 1") == "35.5.0"
    assert parse_nv_tegra_release("R36 whatever") is None
    assert parse_nvinfer_version("#define NV_TENSORRT_MAJOR 10\n") is None


def test_version_comparison_pads_missing_parts() -> None:
    assert version_at_least("6.1", "6.1.0") and version_at_least("10.3.0.30", "10.3")
    assert not version_at_least("5.1.2", "6.0") and version_at_least("6.2.1", "6.2")


def test_a_jetpack7_thor_is_recognised_by_its_release_line() -> None:
    hw = detect_hardware(root=FIXTURES / "agx-thor-r38.2.0")
    assert (hw.model, hw.l4t) == ("NVIDIA Jetson AGX Thor Developer Kit", "38.2.0")
    assert hw.is_jetson


@pytest.mark.parametrize(
    ("root", "tensorrt_full", "cuda"),
    [
        ("agx-orin-r36.4.0", "10.3.0.30", "12.6.68"),
        ("orin-nano-super-r36.4.7", "10.7.0.23", None),  # build number through a macro
        ("nano-r32.7.1", None, None),
    ],
)
def test_full_tensorrt_version_and_cuda_come_from_the_installed_files(
    root: str, tensorrt_full: str | None, cuda: str | None
) -> None:
    hw = detect_hardware(root=FIXTURES / root)
    assert (hw.tensorrt_full, hw.cuda_version) == (tensorrt_full, cuda)


def test_cuda_10_on_jetpack_4_reads_version_txt(tmp_path: Path) -> None:
    (tmp_path / "usr/local/cuda").mkdir(parents=True)
    (tmp_path / "usr/local/cuda/version.txt").write_text("CUDA Version 10.2.300\n")
    assert detect_hardware(root=tmp_path).cuda_version == "10.2.300"
