"""BN after a linear op whose weight is DequantizeLinear(codes, scale, zero_point): fold into the scale.

A weight quantized per output channel is ``W[m] = (q[m] - z[m]) * scale[m]``. A BN after the op
scales output channel m by s[m] (and shifts it by t[m]), so ``s[m] * W[m] = (q[m] - z[m]) *
(scale[m] * s[m])``: the codes stay, only the scale changes, exact in real arithmetic (the new scale is
rounded once to the scale's dtype, as a float weight would be). A negative s[m] negates that
channel's codes and zero point, so every scale stays positive (TensorRT requires it): refused
(``negated-code-out-of-range``) when a code or zero point has no negation in the code type (int8 -128,
any uint8 code but 0), never clamped; a scale that would be 0 or not finite is refused
(``quantized-scale-invalid``). A per-tensor scale becomes per-axis along the output channels, which
DequantizeLinear supports from opset 13 (``quantization-opset-too-old`` before). Blocked quantization
(``block_size``) and a quantization axis that is not the output channels are refused. The bias, a float
constant or DequantizeLinear(int32 codes, bias scale), maps through the affine; an int32 bias is
re-quantized at the new scale ``x_scale * scale'[m]`` (x_scale from the DequantizeLinear feeding the
op, else the old bias scale times |s[m]|), rounding to the nearest code: at most half a bias step per
channel. A DequantizeLinear or a constant shared with another reader is never changed: the fold gets
its own copies. Nothing else of the Q/DQ structure changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..batchnorm import attribute
from ..constants import NotConstant
from ..graph import GraphIndex
from ..reasons import (CHANNEL_AXIS_MISMATCH, DTYPE_OVERFLOW, DTYPE_UNSUPPORTED, NEGATED_CODE_OUT_OF_RANGE,
                       QUANTIZATION_OPSET_TOO_OLD, QUANTIZED_SCALE_INVALID, QUANTIZED_WEIGHTS)
from .base import Refusal, bias_name, constant, set_attribute, set_folded_input

_CODE_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


@dataclass
class Dequantized:
    """A DequantizeLinear node and its constant operands; `scale` and `zero_point` as given."""
    node: onnx.NodeProto
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int


@dataclass
class QuantizedInputs:
    """New operands for a DequantizeLinear feeding input `position` of the folded node."""
    position: int
    source: Dequantized | None  # None: a new DequantizeLinear (a bias the node did not have)
    codes: np.ndarray | None  # None: unchanged
    scale: np.ndarray
    zero_point: np.ndarray | None


def dequantize_linear_of(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear (default domain) producing tensor `name`, if any."""
    node = index.producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
        return node
    return None


def dequantized(index: GraphIndex, node: onnx.NodeProto, what: str) -> Dequantized:
    """The operands of DequantizeLinear `node`, refused unless constant, per-tensor or per-axis (no
    blocks), with codes of a type bnfold can negate."""
    if attribute(node, "block_size", 0):
        raise Refusal(QUANTIZED_WEIGHTS, f"{what} is block-quantized (block_size): not folded")
    codes = constant(index, node.input[0], f"{what} codes")
    scale = constant(index, node.input[1], f"{what} scale")
    zero_point = constant(index, node.input[2], f"{what} zero point") if len(node.input) > 2 and node.input[2] else None
    if codes.dtype.type not in _CODE_TYPES:
        raise Refusal(DTYPE_UNSUPPORTED, f"{what} codes are {codes.dtype.name}: not folded")
    if scale.ndim > 1 or (zero_point is not None and zero_point.shape != scale.shape):
        raise Refusal(QUANTIZED_WEIGHTS, f"{what} scale of shape {list(scale.shape)} is not per-tensor or per-axis")
    axis = int(attribute(node, "axis", 1))
    return Dequantized(node, codes, scale, zero_point, axis + codes.ndim if axis < 0 else axis)


def fold_weight_scale(weight: Dequantized, axis: int, factors: np.ndarray, opset: int,
                      what: str) -> QuantizedInputs:
    """The DequantizeLinear operands of the weight scaled by `factors` along its `axis` (float64)."""
    channels = weight.codes.shape[axis]
    per_tensor = weight.scale.size == 1 and weight.scale.ndim <= 1
    if not per_tensor and (weight.axis != axis or weight.scale.shape != (channels,)):
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"{what} is quantized along axis {weight.axis}, its output "
                                             f"channels are axis {axis}")
    negative = factors < 0
    if per_tensor and not negative.any() and (factors == factors[0]).all():  # stays per-tensor
        scale = weight.scale.astype(np.float64) * factors[0]
        return QuantizedInputs(1, weight, None, _checked_scale(scale, weight.scale.dtype, what), weight.zero_point)
    if per_tensor and opset < 13:
        raise Refusal(QUANTIZATION_OPSET_TOO_OLD, f"{what} has a per-tensor scale; per-channel scales need "
                                                  f"DequantizeLinear opset 13 (the model imports {opset})")
    scale = np.broadcast_to(weight.scale.astype(np.float64).reshape(-1), (channels,)) * np.abs(factors)
    zero = None if weight.zero_point is None else np.broadcast_to(weight.zero_point.reshape(-1), (channels,))
    codes = _negated(weight.codes, axis, negative, what) if negative.any() else None
    if zero is not None and negative.any():
        zero = _negated(zero, 0, negative, f"{what} zero point")
    return QuantizedInputs(1, weight, codes, _checked_scale(scale, weight.scale.dtype, what),
                           None if zero is None else np.array(zero, weight.zero_point.dtype))


def _checked_scale(scale: np.ndarray, dtype, what: str) -> np.ndarray:
    """The folded scale rounded once to the scale's dtype; refused when 0 or not finite there."""
    with np.errstate(over="ignore"):
        cast = np.asarray(scale).astype(dtype)
    if not (np.isfinite(cast).all() and (cast > 0).all()):
        raise Refusal(QUANTIZED_SCALE_INVALID, f"{what}: a folded scale is 0 or not finite in {np.dtype(dtype).name}")
    return cast


def _negated(codes: np.ndarray, axis: int, channels: np.ndarray, what: str) -> np.ndarray:
    """`codes` with those of the `channels` (a mask along `axis`) negated, or a refusal if one has no
    negation in the code type."""
    info = np.iinfo(codes.dtype)
    mask = channels.reshape([-1 if a == axis else 1 for a in range(codes.ndim)])
    wide = codes.astype(np.int64)
    negated = np.where(mask, -wide, wide)
    bad = (negated < info.min) | (negated > info.max)
    if bad.any():
        raise Refusal(NEGATED_CODE_OUT_OF_RANGE, f"{what}: {int(bad.sum())} code(s) of a channel the BN flips "
                                                 f"have no negation in {codes.dtype.name}")
    return negated.astype(codes.dtype)


def int32_bias(index: GraphIndex, node: onnx.NodeProto, bias: Dequantized | None, weight_scale: np.ndarray,
               factors: np.ndarray, shifts: np.ndarray, what: str) -> QuantizedInputs | None:
    """The int32 bias codes at bias scale x_scale * weight_scale for ``factors * b + shifts`` (b the
    old bias, DequantizeLinear(int32 codes, b_scale), or 0 when `node` has none), rounded to the
    nearest code: at most half a bias step off per channel. x_scale is the per-tensor scale of the
    DequantizeLinear feeding `node` (what onnxruntime's QLinearConv assumes); without one, an old
    bias keeps b_scale * |factor| and a missing one is None (the fold then adds a float bias)."""
    channels = factors.shape[0]
    old = np.zeros(channels)
    if bias is not None:
        if bias.codes.dtype != np.int32 or (bias.zero_point is not None and bias.zero_point.any()):
            raise Refusal(QUANTIZED_WEIGHTS, f"{what} is not int32 codes with zero point 0")
        old = bias.codes.astype(np.float64) * np.broadcast_to(bias.scale.astype(np.float64).reshape(-1), (channels,))
    x_scale = _input_scale(index, node)
    if x_scale is not None:
        new_scale = x_scale * np.broadcast_to(weight_scale.astype(np.float64).reshape(-1), (channels,))
    elif bias is not None:
        new_scale = np.broadcast_to(bias.scale.astype(np.float64).reshape(-1), (channels,)) * np.abs(factors)
    else:
        return None
    dtype = weight_scale.dtype if bias is None else bias.scale.dtype
    new_scale = _checked_scale(new_scale, dtype, f"{what} scales")
    codes = np.rint((factors * old + shifts) / new_scale.astype(np.float64))
    info = np.iinfo(np.int32)
    if not np.isfinite(codes).all() or (codes < info.min).any() or (codes > info.max).any():
        raise Refusal(DTYPE_OVERFLOW, f"{what}: a re-quantized bias leaves int32")
    zero = None if bias is None or bias.zero_point is None else np.zeros(channels, bias.zero_point.dtype)
    return QuantizedInputs(2, bias, codes.astype(np.int32), new_scale, zero)


def describe(plan_inputs: list) -> str:
    """What a quantized fold did, for the decision's detail: flipped channels, the int32 bias step."""
    words = []
    for new in plan_inputs:
        if new.position == 1 and new.codes is not None:
            flipped = int((new.codes != new.source.codes).reshape(new.codes.shape[0], -1).any(axis=1).sum())
            words.append(f"codes negated where the BN's scale is negative ({flipped} row(s) changed)")
        if new.position == 2:
            words.append(f"int32 bias {'re-quantized' if new.source is not None else 'created'} at the new "
                         f"scale x_scale * w_scale': at most half a bias step (<= {float(new.scale.max()) / 2:.3g}) "
                         "off per channel")
    return "".join(f"; {w}" for w in words)


def _input_scale(index: GraphIndex, node: onnx.NodeProto) -> float | None:
    """The per-tensor scale of the DequantizeLinear feeding `node`'s data input, if constant."""
    source = dequantize_linear_of(index, node.input[0])
    if source is None:
        return None
    try:
        scale = index.constants.value(source.input[1])
    except NotConstant:
        return None
    return float(scale.reshape(-1)[0]) if scale.size == 1 else None


def write_dequantized(index: GraphIndex, node: onnx.NodeProto, new: QuantizedInputs, axis: int) -> None:
    """Give input `new.position` of `node` the new DequantizeLinear operands: in place when only `node`
    reads the DequantizeLinear (its constants copied if shared, as set_folded_input does), else through
    a copy of the DequantizeLinear of its own, `{name}_bnfold` (a new one for a bias `node` did not
    have, named as bias_name says, its codes `{bias}_quantized` and scale `{bias}_scale`)."""
    if new.source is None:
        bias = bias_name(node)
        codes = index.add_initializer(new.codes, f"{bias}_quantized")
        scale = index.add_initializer(new.scale, f"{bias}_scale")
        dq = onnx.helper.make_node("DequantizeLinear", [codes, scale], [index.context.fresh_name(bias)],
                                   name=index.context.fresh_name(f"{bias}_DequantizeLinear"), axis=axis)
        dq = index.insert_node(index.position(node), dq)
        index.set_input(node, new.position, dq.output[0])
        return
    dq = new.source.node
    readers = index.users(dq.output[0])
    if len(readers) != 1 or readers[0] is not node or index.is_output(dq.output[0]):
        copy = onnx.NodeProto()
        copy.CopyFrom(dq)
        copy.name = index.context.fresh_name(f"{dq.name or dq.output[0]}_bnfold")
        copy.output[0] = index.context.fresh_name(f"{dq.output[0]}_bnfold")
        dq = index.insert_node(index.position(node), copy)
        index.set_input(node, new.position, dq.output[0])
    if new.codes is not None:
        set_folded_input(index, dq, 0, new.codes)
    set_folded_input(index, dq, 1, new.scale)
    if new.zero_point is not None:
        set_folded_input(index, dq, 2, new.zero_point)
    if new.scale.ndim == 1:
        set_attribute(dq, "axis", axis)
