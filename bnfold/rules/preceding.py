"""BN before Conv, Gemm or MatMul (pre-activation blocks): fold forward into the consumer.

``W (scale * x + shift) + b = (W scale) x + (W shift + b)``: each *input* channel of W is scaled and
W's response to the constant shift joins the bias. For Conv this is exact only without padding: a
padded border sees zeros where the BN would have produced ``shift``, so any non-zero pad is refused.
For Gemm the BN's channel axis must be A's axis 1 with transA = 0 (the reduced axis K); for MatMul the
BN's input must be 2-D (its channel axis 1 is then the reduced axis). Conditions: the BN's output is
read by the consumer only, as its data input (input 0), and is not a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex
from ..math import fold_before_conv, fold_before_matmul
from ..reasons import CHANNEL_AXIS_MISMATCH, PADDING_PREVENTS_FOLD, RANK_UNSUPPORTED
from .base import (FoldRule, Match, Plan, Refusal, absorb_into_consumer, attribute, bn_affine, cast_checked,
                   constant, known_rank, optional_constant, require_exclusive, sole_consumer_of, weight_dtype,
                   write_plan)


class BNThenConv(FoldRule):
    """BN -> Conv with no padding (any group count, stride, dilation)."""
    name = "bn-conv"
    summary = "scaled its input channels and added W * shift to its bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        conv = sole_consumer_of(bn, index, ("Conv",))
        return Match(bn, conv) if conv is not None else None

    def check(self, match: Match, index: GraphIndex) -> Plan:
        conv, bn = match.neighbour, match.bn
        require_exclusive(index, bn.output[0], conv, "BN")
        weight = constant(index, conv.input[1], "Conv weight")
        bias = optional_constant(index, conv, 2, "Conv bias")
        dtype = weight_dtype(weight, "Conv weight")
        _check_no_padding(conv, weight)
        groups = int(attribute(conv, "group", 1))
        scale, shift = bn_affine(bn, index, weight.shape[1] * groups)
        new_weight, new_bias = fold_before_conv(weight, bias, scale, shift, groups)
        return Plan({1: cast_checked(new_weight, dtype, "weights"), 2: cast_checked(new_bias, dtype, "biases")})

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        conv, bn = match.neighbour, match.bn
        write_plan(index, conv, plan, {1: "W", 2: "B"}, conv.name or bn.name)
        absorb_into_consumer(index, bn, conv)


def _check_no_padding(conv: onnx.NodeProto, weight: np.ndarray) -> None:
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attribute(conv, "pads", [])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = attribute(conv, "kernel_shape", list(weight.shape[2:]))
        strides = attribute(conv, "strides", [1] * len(kernel))
        if any(k != 1 for k in kernel) or any(s != 1 for s in strides):
            raise Refusal(PADDING_PREVENTS_FOLD, f"auto_pad={auto_pad} pads the BN's output with zeros")
    elif auto_pad == "NOTSET" and any(p != 0 for p in pads):
        raise Refusal(PADDING_PREVENTS_FOLD, f"Conv pads {list(pads)}: the border would see 0, not the BN's shift")


class BNThenLinear(FoldRule):
    """BN -> Gemm (transA = 0) and BN -> MatMul over a 2-D input, into the weight's rows."""
    name = "bn-linear"
    summary = "scaled the weight's rows and added shift @ W to the bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        node = sole_consumer_of(bn, index, ("Gemm", "MatMul"))
        return Match(bn, node) if node is not None else None

    def check(self, match: Match, index: GraphIndex) -> Plan:
        node, bn = match.neighbour, match.bn
        require_exclusive(index, bn.output[0], node, "BN")
        weight = constant(index, node.input[1], f"{node.op_type} weight")
        dtype = weight_dtype(weight, f"{node.op_type} weight")
        if weight.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"{node.op_type} weight has rank {weight.ndim}, not 2")
        if node.op_type == "Gemm":
            return self._gemm_plan(node, bn, index, weight, dtype)
        rank = known_rank(index, bn.input[0], "BN input")
        if rank != 2:
            raise Refusal(CHANNEL_AXIS_MISMATCH, f"BN input has rank {rank}: its channel axis is not "
                                                 "MatMul's reduced axis")
        scale, shift = bn_affine(bn, index, weight.shape[0])
        new_weight, new_bias = fold_before_matmul(weight, None, scale, shift)
        return Plan({1: cast_checked(new_weight, dtype, "weights")}, bias=cast_checked(new_bias, dtype, "biases"))

    def _gemm_plan(self, gemm, bn, index, weight, dtype) -> Plan:
        if attribute(gemm, "transA", 0):
            raise Refusal(CHANNEL_AXIS_MISMATCH, "Gemm transA=1: BN's channel axis is Gemm's output row axis")
        trans_b = bool(attribute(gemm, "transB", 0))
        k_by_n = weight.T if trans_b else weight
        scale, shift = bn_affine(bn, index, k_by_n.shape[0])
        alpha, beta = float(attribute(gemm, "alpha", 1.0)), float(attribute(gemm, "beta", 1.0))
        c = optional_constant(index, gemm, 2, "Gemm C")
        c = 0.0 if c is None else c.astype(np.float64)
        new_k_by_n, response = fold_before_matmul(k_by_n, None, scale, shift)
        new_c = beta * c + alpha * response
        new_c = new_c.reshape(-1) if new_c.ndim == 2 and new_c.shape[0] == 1 else new_c
        new_weight = new_k_by_n.T if trans_b else new_k_by_n
        return Plan({1: cast_checked(new_weight, dtype, "weights"), 2: cast_checked(new_c, dtype, "biases")},
                    attributes={"beta": 1.0})

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        node, bn = match.neighbour, match.bn
        write_plan(index, node, plan, {1: "W", 2: "C"}, node.name or bn.name)
        absorb_into_consumer(index, bn, node)
        if node.op_type == "Gemm":
            return
        output = node.output[0]
        product = index.context.fresh_name(f"{output}_unbiased")
        index.set_output(node, 0, product)
        bias_name = index.add_initializer(plan.bias, f"{node.name or bn.name}_B_bnfold")
        add = onnx.helper.make_node("Add", [product, bias_name], [output],
                                    name=index.context.fresh_name(f"{node.name or 'matmul'}_bias"))
        index.insert_node(index.position(node) + 1, add)
