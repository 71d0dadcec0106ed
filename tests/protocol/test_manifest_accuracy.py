"""The manifest's per-output accuracy checks (gate.outputs): old manifests keep meaning
elementwise atol/rtol; a check that cannot apply to the model is refused as a bad manifest."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from protocol.errors import MessageError
from protocol.manifest import Manifest

SHA = "0" * 64
OLD = {  # a manifest as every bundle carried it before per-output checks existed
    "schema": "jetfleet.manifest/v1",
    "name": "detector",
    "version": "1.0.0",
    "files": [{"path": "model.onnx", "size": 1, "sha256": SHA},
              {"path": "golden.npz", "size": 1, "sha256": SHA}],
    "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 64, 64]}],
    "outputs": [{"name": "boxes", "dtype": "float32", "shape": [1, 100, 4]},
                {"name": "scores", "dtype": "float32", "shape": [1, 100]}],
    "build": {"precision": "int8"},
    "gate": {"atol": 0.01, "rtol": 0.02},
}  # fmt: skip


def _with_checks(checks: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(OLD)
    doc["gate"]["outputs"] = checks
    return doc


def test_a_manifest_without_checks_means_elementwise_with_its_tolerances() -> None:
    m = Manifest.model_validate(OLD)
    assert m.gate.outputs == {} and (m.gate.atol, m.gate.rtol) == (0.01, 0.02)


def test_a_detector_names_box_agreement_and_its_scores_tolerance() -> None:
    m = Manifest.model_validate(_with_checks({
        "boxes": {"metric": "boxes", "scores": "scores", "score_threshold": 0.3, "iou": 0.6},
        "scores": {"metric": "quantile", "error_quantile": 0.95, "atol": 0.05},
    }))  # fmt: skip
    boxes = m.gate.outputs["boxes"]
    assert (boxes.metric, boxes.scores, boxes.score_threshold, boxes.iou) == (
        "boxes", "scores", 0.3, 0.6,
    )  # fmt: skip
    assert m.gate.outputs["scores"].rtol is None  # the gate's rtol applies
    assert Manifest.model_validate(m.to_dict()).gate == m.gate  # round trip


@pytest.mark.parametrize(
    ("checks", "message"),
    [
        ({"logits": {"metric": "cosine"}}, "check for 'logits', which is not a model output"),
        ({"boxes": {"metric": "boxes"}}, "needs 'scores'"),
        ({"boxes": {"metric": "boxes", "scores": "conf"}}, "scores 'conf' is not a model output"),
        ({"scores": {"metric": "psnr"}}, "metric"),
        ({"scores": {"metric": "quantile", "error_quantile": 0}}, "error_quantile"),
        ({"scores": {"metric": "topk", "k": 0}}, "k"),
        ({"scores": {"metric": "cosine", "min_cosine": 1.5}}, "min_cosine"),
    ],
)
def test_a_check_that_cannot_apply_is_refused(checks: dict[str, Any], message: str) -> None:
    with pytest.raises((MessageError, ValueError), match=message):
        Manifest.model_validate(_with_checks(checks))
