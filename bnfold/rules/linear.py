"""BN after Gemm, and after MatMul (optionally followed by an Add of a constant bias).

Gemm: Y = alpha * A' @ B' + beta * C with A' = A^T if transA, B' = B^T if transB. A BN over Y's axis 1
scales the columns of B' and maps C through the affine; the result keeps alpha, sets beta = 1 and always
has a C (shape [N] unless the old C varied along M). MatMul X @ W with a constant 2-D W: the output's
channel axis is its last, whatever X's rank; the BN's channel axis (1) must map onto it, directly for a
2-D output, or across shape ops (rules/path.py: LeViT's MatMul on [B, T, K] -> Reshape [B*T, N] -> BN).
The bias Add right after the MatMul may vary along other axes (any shape whose last axis is 1 or N):
it stays and is mapped through the affine; without one, an Add of the folded shift is created.
Conditions: the path from the linear op to the BN folds (rules/path.py), each tensor on it read by the
next node only; weights, bias and BN parameters are constants.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex
from ..math import fold_after_gemm, fold_after_matmul
from ..reasons import CHANNEL_AXIS_MISMATCH, RANK_UNSUPPORTED
from .base import (FoldRule, Match, Plan, Refusal, attribute, bias_name, cast_checked, constant, known_rank,
                   optional_constant, set_folded_input, weight_dtype, write_plan)
from .path import SHAPE_OPS, check_links, fold_path, producer_of, splice
from .quantized import dequantize_linear_of, dequantized, fold_weight_scale, write_dequantized


class GemmThenBN(FoldRule):
    """Gemm -> BN."""
    name = "gemm-bn"
    summary = "scaled the columns of B' and mapped C (beta = 1)"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        return producer_of(bn, index, ("Gemm",))

    def check(self, match: Match, index: GraphIndex) -> Plan:
        gemm = match.neighbour
        check_links(match, index, "Gemm")
        dq = dequantize_linear_of(index, gemm.input[1])
        if dq is not None:
            return self._quantized_plan(match, index, dequantized(index, dq, "Gemm B"))
        b_matrix = constant(index, gemm.input[1], "Gemm B")
        c = optional_constant(index, gemm, 2, "Gemm C")
        dtype = weight_dtype(b_matrix, "Gemm B")
        trans_b = bool(attribute(gemm, "transB", 0))
        if b_matrix.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"Gemm B has rank {b_matrix.ndim}")
        n = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
        path = fold_path(match, index, gemm.output[0], 1, n, "Gemm")
        beta = float(attribute(gemm, "beta", 1.0))
        new_b, new_c = fold_after_gemm(b_matrix, c, path.scale, path.shift, trans_b, beta, dtype)
        return Plan({1: cast_checked(new_b, dtype, "weights"), 2: cast_checked(new_c, dtype, "biases")},
                    attributes={"beta": 1.0}, beyond=path.beyond)

    def _quantized_plan(self, match: Match, index: GraphIndex, weight) -> Plan:
        """A DequantizeLinear B: new scales along B's output axis; C (float) maps to beta * C * s + t."""
        gemm = match.neighbour
        if weight.codes.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"Gemm B has rank {weight.codes.ndim}")
        axis = 0 if attribute(gemm, "transB", 0) else 1
        path = fold_path(match, index, gemm.output[0], 1, weight.codes.shape[axis], "Gemm")
        new_weight = fold_weight_scale(weight, axis, path.scale, index.context.bn_opset, "Gemm B")
        c = optional_constant(index, gemm, 2, "Gemm C")
        dtype = weight_dtype(np.zeros(0, weight.scale.dtype) if c is None else c, "Gemm C")
        c_term = 0.0 if c is None else float(attribute(gemm, "beta", 1.0)) * c.astype(np.float64)
        new_c = np.asarray(c_term * path.scale + path.shift)
        new_c = new_c.reshape(-1) if new_c.ndim == 2 and new_c.shape[0] == 1 else new_c
        return Plan({2: cast_checked(new_c, dtype, "biases")}, attributes={"beta": 1.0}, beyond=path.beyond,
                    quantized=((new_weight, axis),))

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        gemm = match.neighbour
        write_plan(index, gemm, plan)
        for inputs, axis in plan.quantized:
            write_dequantized(index, gemm, inputs, axis)
        splice(index, match, plan.beyond)


class MatMulThenBN(FoldRule):
    """MatMul -> BN and MatMul -> Add(constant) -> BN, the BN over the MatMul's last axis."""
    name = "matmul-bn"
    summary = "scaled the weight's columns and mapped (or added) the bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        found = producer_of(bn, index, ("MatMul",))
        if found is not None and found.chain and found.chain[0].op_type == "Add":
            found.bias_add, found.chain = found.chain[0], found.chain[1:]
        if found is not None:
            return found
        found = producer_of(bn, index, ("Add",))  # a bias that is not a constant: refused in check
        for operand in found.neighbour.input if found is not None else ():
            matmul = index.producer.get(operand)
            if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in ("", "ai.onnx"):
                return Match(bn, matmul, bias_add=found.neighbour, chain=found.chain, beyond=found.beyond)
        return None

    def check(self, match: Match, index: GraphIndex) -> Plan:
        matmul, add = match.neighbour, match.bias_add
        check_links(match, index, "MatMul")
        dq = dequantize_linear_of(index, matmul.input[1])
        quantized = dequantized(index, dq, "MatMul right operand") if dq is not None else None
        weight = quantized.codes if quantized is not None else constant(index, matmul.input[1], "MatMul right operand")
        bias = constant(index, _bias_operand(add, matmul), "Add bias") if add is not None else None
        dtype = weight_dtype(np.zeros(0, quantized.scale.dtype) if quantized is not None else weight,
                             "MatMul right operand")
        if weight.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"MatMul right operand has rank {weight.ndim}, not 2")
        if bias is not None:
            rank = known_rank(index, matmul.output[0], "MatMul output")
            if bias.ndim > rank or (bias.ndim >= 1 and bias.shape[-1] not in (1, weight.shape[1])):
                raise Refusal(CHANNEL_AXIS_MISMATCH, f"Add bias of shape {list(bias.shape)} is not per output column")
        # the channel axis is the MatMul's last; past a shape op, as laid out in the bias Add's output
        near = add.output[0] if add is not None and any(n.op_type in SHAPE_OPS for n in match.chain) \
            else matmul.output[0]
        path = fold_path(match, index, near, None, weight.shape[1], "MatMul")
        if quantized is not None:
            new_codes = fold_weight_scale(quantized, 1, path.scale, index.context.bn_opset, "MatMul right operand")
            new_bias = (0.0 if bias is None else bias.astype(np.float64)) * path.scale + path.shift
            return Plan({}, bias=cast_checked(np.asarray(new_bias), dtype, "biases"), beyond=path.beyond,
                        quantized=((new_codes, 1),))
        new_weight, new_bias = fold_after_matmul(weight, bias, path.scale, path.shift, dtype)
        return Plan({1: cast_checked(new_weight, dtype, "weights")}, bias=cast_checked(new_bias, dtype, "biases"),
                    beyond=path.beyond)

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        matmul, add = match.neighbour, match.bias_add
        new_bias = bias_name(matmul)  # before the weight is perhaps copied under another name
        write_plan(index, matmul, plan)
        for inputs, axis in plan.quantized:
            write_dequantized(index, matmul, inputs, axis)
        if add is not None:
            position = list(add.input).index(_bias_operand(add, matmul))
            set_folded_input(index, add, position, plan.bias)
        else:
            bias = index.add_initializer(plan.bias, new_bias)
            add = onnx.helper.make_node("Add", [matmul.output[0], bias],
                                        [index.context.fresh_name(f"{matmul.output[0]}_biased")],
                                        name=index.context.fresh_name(f"{matmul.name or 'MatMul'}_bias"))
            add = index.insert_node(index.position(matmul) + 1, add)
        splice(index, match, plan.beyond, bias_add=add)


def _bias_operand(add: onnx.NodeProto, matmul: onnx.NodeProto) -> str:
    first, second = add.input[0], add.input[1]
    return second if first == matmul.output[0] else first
