"""What a BatchNormalization node computes, read from its attributes per opset (1 to 15).

Opsets 1-6 normalize with running statistics only when ``is_test=1``. Opsets 7-13 have no mode
attribute: a runtime normalizes with batch statistics when the node declares its optional training
outputs (running mean/var, saved mean/var). From opset 14, ``training_mode=1`` selects batch
statistics. Only inference-mode BNs are affine maps that can be folded.
"""

from __future__ import annotations

import onnx

from .reasons import TRAINING_MODE


def attribute(node: onnx.NodeProto, name: str, default):
    """The value of attribute `name` of `node`, or `default` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def declared_extra_outputs(bn: onnx.NodeProto) -> list[str]:
    """The optional outputs (running/saved statistics) the node names."""
    return [name for name in bn.output[1:] if name]


def training_mode_refusal(bn: onnx.NodeProto, opset: int) -> tuple[str, str] | None:
    """(reason code, detail) when the node normalizes with batch statistics at `opset`, else None."""
    extra = declared_extra_outputs(bn)
    if opset < 7 and attribute(bn, "is_test", 0) == 0:
        return TRAINING_MODE, f"is_test=0 (opset {opset}): normalizes with batch statistics"
    if opset >= 14 and attribute(bn, "training_mode", 0) != 0:
        return TRAINING_MODE, "training_mode=1: normalizes with batch statistics"
    if extra and 7 <= opset < 14:
        return TRAINING_MODE, (f"declares training outputs ({', '.join(extra)}) at opset {opset}, "
                               "which makes runtimes normalize with batch statistics")
    return None


def is_inference_mode(bn: onnx.NodeProto, opset: int) -> bool:
    """True when the node normalizes with its running statistics (an affine map bnfold can fold)."""
    return training_mode_refusal(bn, opset) is None
