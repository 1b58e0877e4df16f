"""BN after Gemm, and after MatMul (optionally followed by an Add of a constant bias).

Gemm: Y = alpha * A' @ B' + beta * C with A' = A^T if transA, B' = B^T if transB. A BN over Y's axis 1
scales the columns of B' and maps C through the affine; the result keeps alpha, sets beta = 1 and always
has a C (shape [N] unless the old C varied along M). MatMul: only a 2-D output is foldable, because BN's
channel axis 1 is then MatMul's last axis; a rank-3 output would put BN on the sequence axis.
Conditions: every tensor the fold changes (the Gemm/MatMul output, the Add output) is read by the
next node only (also through Identity/Dropout nodes that are identities:
rules/base.require_transparent_path); weights, bias and BN parameters are constants.
"""

from __future__ import annotations

import onnx

from ..graph import GraphIndex
from ..math import fold_after_gemm, fold_after_matmul
from ..reasons import CHANNEL_AXIS_MISMATCH, RANK_UNSUPPORTED
from .base import (FoldRule, Match, Plan, Refusal, absorb_into_producer, attribute, bn_affine, cast_checked,
                   constant, drop_chain, known_rank, optional_constant, producer_of, require_exclusive,
                   require_transparent_path, set_folded_input,
                   weight_dtype, write_plan)


class GemmThenBN(FoldRule):
    """Gemm -> BN."""
    name = "gemm-bn"
    summary = "scaled the columns of B' and mapped C (beta = 1)"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        return producer_of(bn, index, ("Gemm",))

    def check(self, match: Match, index: GraphIndex) -> Plan:
        gemm, bn = match.neighbour, match.bn
        require_transparent_path(index, match, gemm, bn, "Gemm")
        b_matrix = constant(index, gemm.input[1], "Gemm B")
        c = optional_constant(index, gemm, 2, "Gemm C")
        dtype = weight_dtype(b_matrix, "Gemm B")
        trans_b = bool(attribute(gemm, "transB", 0))
        if b_matrix.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"Gemm B has rank {b_matrix.ndim}")
        n = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
        scale, shift = bn_affine(bn, index, n)
        beta = float(attribute(gemm, "beta", 1.0))
        new_b, new_c = fold_after_gemm(b_matrix, c, scale, shift, trans_b, beta, dtype)
        return Plan({1: cast_checked(new_b, dtype, "weights"), 2: cast_checked(new_c, dtype, "biases")},
                    attributes={"beta": 1.0})

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        gemm, bn = match.neighbour, match.bn
        drop_chain(index, match)
        write_plan(index, gemm, plan, {1: "B", 2: "C"}, gemm.name or bn.name)
        absorb_into_producer(index, bn, gemm)


class MatMulThenBN(FoldRule):
    """MatMul -> BN and MatMul -> Add(constant) -> BN, with a 2-D MatMul output."""
    name = "matmul-bn"
    summary = "scaled the weight's columns and mapped (or added) the bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        found = producer_of(bn, index, ("MatMul",))
        if found is not None:
            return found
        found = producer_of(bn, index, ("Add",))
        for operand in found.neighbour.input if found is not None else ():
            matmul = index.producer.get(operand)
            if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in ("", "ai.onnx"):
                return Match(bn, matmul, bias_add=found.neighbour, chain=found.chain)
        return None

    def check(self, match: Match, index: GraphIndex) -> Plan:
        matmul, add, bn = match.neighbour, match.bias_add, match.bn
        if add is not None:
            require_transparent_path(index, match, add, bn, "Add")
            require_exclusive(index, matmul.output[0], add, "MatMul")
        else:
            require_transparent_path(index, match, matmul, bn, "MatMul")
        weight = constant(index, matmul.input[1], "MatMul right operand")
        bias = constant(index, _bias_operand(add, matmul), "Add bias") if add is not None else None
        dtype = weight_dtype(weight, "MatMul right operand")
        if weight.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"MatMul right operand has rank {weight.ndim}, not 2")
        rank = known_rank(index, matmul.output[0], "MatMul output")
        if rank != 2:
            raise Refusal(CHANNEL_AXIS_MISMATCH, f"MatMul output has rank {rank}: BN's channel axis 1 is not "
                                                 "MatMul's output axis")
        if bias is not None and (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, weight.shape[1]))):
            raise Refusal(CHANNEL_AXIS_MISMATCH, f"Add bias of shape {list(bias.shape)} is not per output column")
        scale, shift = bn_affine(bn, index, weight.shape[1])
        new_weight, new_bias = fold_after_matmul(weight, bias, scale, shift, dtype)
        return Plan({1: cast_checked(new_weight, dtype, "weights")}, bias=cast_checked(new_bias, dtype, "biases"))

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        matmul, add, bn = match.neighbour, match.bias_add, match.bn
        drop_chain(index, match)
        write_plan(index, matmul, plan, {1: "W"}, matmul.name or bn.name)
        if add is not None:
            position = list(add.input).index(_bias_operand(add, matmul))
            set_folded_input(index, add, position, plan.bias, f"{add.name or bn.name}_B_bnfold")
            absorb_into_producer(index, bn, add)
            return
        bias_name = index.add_initializer(plan.bias, f"{matmul.name or bn.name}_B_bnfold")
        new_add = onnx.helper.make_node("Add", [matmul.output[0], bias_name], [bn.output[0]],
                                        name=index.context.fresh_name(f"{bn.name or 'bn'}_bias"))
        position = index.position(bn)
        index.remove_node(bn)
        index.insert_node(position, new_add)


def _bias_operand(add: onnx.NodeProto, matmul: onnx.NodeProto) -> str:
    first, second = add.input[0], add.input[1]
    return second if first == matmul.output[0] else first
