"""The accuracy check each output of a bundle is gated by (`jetfleet bundle build
--accuracy`, and the default by precision), written into the signed manifest's
`gate.outputs`; devices apply them in agent.gate.accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import ValidationError

from protocol.errors import CodedError, ProtocolError
from protocol.manifest import GateSpec, OutputCheck, Precision, TensorSpec

# What a float output is judged by when the operator names nothing (`--accuracy`): fp32 is
# compared element by element (the gate's atol/rtol); fp16 rounds every layer, so its
# elementwise error has a tail: the 99th percentile of the error is held to 1e-2 instead;
# int8 moves every element a little and keeps the direction of the output: cosine similarity
# per sample >= 0.99 (a classifier's operator may prefer `--accuracy logits=topk`).
PRECISION_CHECKS: dict[str, OutputCheck | None] = {
    "fp32": None,
    "fp16": OutputCheck(metric="quantile", error_quantile=0.99, atol=1e-2, rtol=1e-2),
    "int8": OutputCheck(metric="cosine", min_cosine=0.99),
}


class AccuracySpecError(CodedError):
    """A bad --accuracy option (exit 2): the message names the option and the field."""

    code = "accuracy_spec"


def gate_with_checks(
    gate: GateSpec, precision: Precision, outputs: Sequence[TensorSpec]
) -> GateSpec:
    """The gate with the precision's check on every float output the operator left open."""
    default = PRECISION_CHECKS[precision]
    if default is None:
        return gate
    checks = {t.name: default for t in outputs if np.dtype(t.dtype).kind == "f"}
    return gate.model_copy(update={"outputs": checks | gate.outputs})


def parse_accuracy(text: str, outputs: Sequence[TensorSpec]) -> tuple[str, OutputCheck]:
    """`logits=topk:k=5,min_agreement=0.98` -> ("logits", OutputCheck(metric="topk", ...))."""
    name, eq, rest = text.partition("=")
    metric, _, params = rest.partition(":")
    names = [t.name for t in outputs]
    if not eq or not metric:
        raise AccuracySpecError(
            f"--accuracy {text!r}: expected OUTPUT=METRIC[:KEY=VALUE,...], e.g. logits=topk:k=5"
        )
    if name not in names:
        raise AccuracySpecError(f"--accuracy {text!r}: the model has no output {name!r} ({names})")
    fields: dict[str, str] = {"metric": metric}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise AccuracySpecError(f"--accuracy {text!r}: {item!r} is not KEY=VALUE")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - set(OutputCheck.model_fields)
    if unknown:
        raise AccuracySpecError(
            f"--accuracy {text!r}: unknown key(s) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(k for k in OutputCheck.model_fields if k != 'metric')}"
        )
    try:
        return name, OutputCheck.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise AccuracySpecError(
            f"--accuracy {text!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from e
    except ProtocolError as e:
        raise AccuracySpecError(f"--accuracy {text!r}: {e}") from e
