"""BN after Conv or ConvTranspose: scale each output channel's filters, map the bias.

Exact for any rank, group count, strides, dilations, pads, auto_pad, output_padding and output_shape:
those change which inputs reach an output, not the per-output-channel affine applied after it.
Conv weights are [M, C/g, k...] (output channel = axis 0); ConvTranspose weights are
[C_in, C_out/g, k...] (output channel = group * C_out/g + axis-1 index).
Conditions: the Conv's output is read by the BN only (or reaches it through Identity/Dropout nodes
that are identities, each tensor read by the next node only: rules/base.require_transparent_path),
weights and BN parameters are constants.
"""

from __future__ import annotations

import onnx

from ..graph import GraphIndex
from ..math import fold_after_conv, fold_after_conv_transpose
from .base import (FoldRule, Match, Plan, absorb_into_producer, bn_affine, cast_checked, conv_operands,
                   drop_chain, producer_of, require_transparent_path, weight_dtype, write_plan)


class ConvThenBN(FoldRule):
    """Conv -> BN and ConvTranspose -> BN."""
    name = "conv-bn"
    summary = "scaled its output channels' filters and mapped its bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        return producer_of(bn, index, ("Conv", "ConvTranspose"))

    def check(self, match: Match, index: GraphIndex) -> Plan:
        conv, bn = match.neighbour, match.bn
        require_transparent_path(index, match, conv, bn, conv.op_type)
        weight, bias, groups = conv_operands(index, conv)
        dtype = weight_dtype(weight, f"{conv.op_type} weight")
        transposed = conv.op_type == "ConvTranspose"
        channels = weight.shape[1] * groups if transposed else weight.shape[0]
        scale, shift = bn_affine(bn, index, channels)
        if transposed:
            new_weight, new_bias = fold_after_conv_transpose(weight, bias, scale, shift, groups, dtype)
        else:
            new_weight, new_bias = fold_after_conv(weight, bias, scale, shift, dtype)
        return Plan({1: cast_checked(new_weight, dtype, "weights"), 2: cast_checked(new_bias, dtype, "biases")})

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        conv, bn = match.neighbour, match.bn
        drop_chain(index, match)
        write_plan(index, conv, plan, {1: "W", 2: "B"}, conv.name or bn.name)
        absorb_into_producer(index, bn, conv)
