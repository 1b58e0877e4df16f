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

import onnx

from ..graph import GraphIndex
from ..math import fold_after_conv, fold_after_conv_transpose
from .base import FoldRule, Match, Plan, cast_checked, conv_operands, weight_dtype, write_plan
from .path import check_links, fold_path, producer_of, splice


class ConvThenBN(FoldRule):
    """Conv -> BN and ConvTranspose -> BN."""
    name = "conv-bn"
    summary = "scaled its output channels' filters and mapped its bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        return producer_of(bn, index, ("Conv", "ConvTranspose"))

    def check(self, match: Match, index: GraphIndex) -> Plan:
        conv = match.neighbour
        check_links(match, index, conv.op_type)
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
        conv, bn = match.neighbour, match.bn
        write_plan(index, conv, plan, {1: "W", 2: "B"}, conv.name or bn.name)
        splice(index, match, plan.beyond)
