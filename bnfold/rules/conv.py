"""BN after Conv or ConvTranspose: scale each output channel's filters, map the bias.

Exact for any rank, group count, strides, dilations, pads, auto_pad, output_padding and output_shape:
those change which inputs reach an output, not the per-output-channel affine applied after it.
Conv weights are [M, C/g, k...] (output channel = axis 0); ConvTranspose weights are
[C_in, C_out/g, k...] (output channel = group * C_out/g + axis-1 index).
Conditions: the Conv's output reaches the BN through steps that fold (rules/path.py), each tensor on
the way read by the next node only; the BN's channels map one to one onto the output channels (axis 1);
weights, BN parameters and affine constants are constants.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex
from ..math import fold_after_conv, fold_after_conv_transpose
from ..reasons import QUANTIZED_WEIGHTS
from .base import (FoldRule, Match, Plan, Refusal, attribute, cast_checked, constant, conv_operands, weight_dtype,
                   write_plan)
from .path import check_links, fold_path, producer_of, splice
from .quantized import (dequantize_linear_of, dequantized, describe, fold_weight_scale, int32_bias,
                        write_dequantized)


class ConvThenBN(FoldRule):
    """Conv -> BN and ConvTranspose -> BN."""
    name = "conv-bn"
    summary = "scaled its output channels' filters and mapped its bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        return producer_of(bn, index, ("Conv", "ConvTranspose"))

    def check(self, match: Match, index: GraphIndex) -> Plan:
        conv = match.neighbour
        check_links(match, index, conv.op_type)
        dq = dequantize_linear_of(index, conv.input[1])
        if dq is not None:
            return _quantized_plan(match, index, dequantized(index, dq, f"{conv.op_type} weight"))
        weight, bias, groups = conv_operands(index, conv)
        dtype = weight_dtype(weight, f"{conv.op_type} weight")
        transposed = conv.op_type == "ConvTranspose"
        channels = weight.shape[1] * groups if transposed else weight.shape[0]
        path = fold_path(match, index, conv.output[0], 1, channels, conv.op_type)
        scale, shift = path.scale, path.shift
        if transposed:
            new_weight, new_bias = fold_after_conv_transpose(weight, bias, scale, shift, groups, dtype)
        else:
            new_weight, new_bias = fold_after_conv(weight, bias, scale, shift, dtype)
        return Plan({1: cast_checked(new_weight, dtype, "weights"), 2: cast_checked(new_bias, dtype, "biases")},
                    beyond=path.beyond)

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        conv = match.neighbour
        write_plan(index, conv, plan)
        for inputs, axis in plan.quantized:
            write_dequantized(index, conv, inputs, axis)
        splice(index, match, plan.beyond)


def _quantized_plan(match: Match, index: GraphIndex, weight) -> Plan:
    """Conv/ConvTranspose with a DequantizeLinear weight (rules/quantized.py): new scales (and codes
    of flipped channels), the bias mapped: float, or int32 re-quantized (or created when the input
    comes from a DequantizeLinear, so that runtimes can still fuse the op into an int8 kernel)."""
    conv = match.neighbour
    what = f"{conv.op_type} weight"
    groups = int(attribute(conv, "group", 1))
    transposed = conv.op_type == "ConvTranspose"
    if weight.codes.ndim < 3 or (transposed and groups != 1):
        raise Refusal(QUANTIZED_WEIGHTS, f"{what} of rank {weight.codes.ndim}, group {groups}: its output "
                                         "channels are not one axis of the codes")
    axis = 1 if transposed else 0
    path = fold_path(match, index, conv.output[0], 1, weight.codes.shape[axis], conv.op_type)
    new_weight = fold_weight_scale(weight, axis, path.scale, index.context.bn_opset, what)
    bias_dq = dequantize_linear_of(index, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if bias_dq is None and len(conv.input) > 2 and conv.input[2]:
        bias = constant(index, conv.input[2], f"{conv.op_type} bias")
        dtype = weight_dtype(bias, f"{conv.op_type} bias")
        arrays = {2: cast_checked(bias.astype(np.float64) * path.scale + path.shift, dtype, "biases")}
        return Plan(arrays, beyond=path.beyond, quantized=((new_weight, axis),), note=describe([new_weight]))
    old = dequantized(index, bias_dq, f"{conv.op_type} bias") if bias_dq is not None else None
    new_bias = int32_bias(index, conv, old, new_weight.scale, path.scale, path.shift, f"{conv.op_type} bias")
    if new_bias is None:  # no quantized input scale to quantize a new bias with: a float one
        dtype = weight_dtype(np.zeros(0, weight.scale.dtype), f"{what} scale")
        return Plan({2: cast_checked(path.shift, dtype, "biases")}, beyond=path.beyond,
                    quantized=((new_weight, axis),), note=describe([new_weight]))
    # the bias first: one it creates is named after the weight, before the weight is perhaps copied
    return Plan({}, beyond=path.beyond, quantized=((new_bias, 0), (new_weight, axis)),
                note=describe([new_weight, new_bias]))
