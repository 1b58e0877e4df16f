"""BN before Conv, Gemm or MatMul (pre-activation blocks): fold forward into the consumer.

``W (scale * x + shift) + b = (W scale) x + (W shift + b)``: each *input* channel of W is scaled and
W's response to the constant shift joins the bias. For Conv this is exact only if no output reads a
padded element, which holds 0 where the BN would have produced ``shift``. Explicit pads must all be 0
(VALID pads nothing). SAME pads an axis of size n by max(0, (ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
in all (ONNX Conv; stride s, kernel k, dilation d), and the first or last output reads any padding it
adds; that is 0 at every size when (k - 1) * d = 0 (a 1x1 kernel, any stride), otherwise n must be known.
A composed shift of 0 (a per-channel Mul only) reads padding as 0 too, so it folds into any Conv.
For Gemm the BN's channels must map onto A's reduced axis (1, or 0 with transA = 1); for MatMul onto
the last axis of its data input, whatever its rank: directly, or across shape ops (rules/path.py:
BN2d -> Flatten -> Gemm, where feature c*H*W + i carries channel c; BN -> Transpose to channels-last ->
MatMul). Conditions: the BN's output reaches the consumer's data input (input 0) through steps that
fold (rules/path.py), each tensor on the way read by the next node only and not a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex
from ..math import fold_before_conv, fold_before_matmul
from ..reasons import PADDING_PREVENTS_FOLD, RANK_UNSUPPORTED
from .base import (FoldRule, Match, Plan, Refusal, attribute, bias_name, cast_checked, constant, conv_operands,
                   optional_constant, set_folded_input, weight_dtype, write_plan)
from .path import check_links, data_position, fold_path, sole_consumer_of, splice


class BNThenConv(FoldRule):
    """BN -> Conv that reads no padding (any group count, stride, dilation)."""
    name = "bn-conv"
    summary = "scaled its input channels and added W * shift to its bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        return sole_consumer_of(bn, index, ("Conv",))

    def check(self, match: Match, index: GraphIndex) -> Plan:
        conv = match.neighbour
        check_links(match, index, "BN")
        weight, bias, groups = conv_operands(index, conv)
        dtype = weight_dtype(weight, "Conv weight")
        path = fold_path(match, index, conv.input[0], 1, weight.shape[1] * groups, "Conv")
        if path.shift.any():
            _check_no_padding(conv, weight, index)
        new_weight, new_bias = fold_before_conv(weight, bias, path.scale, path.shift, groups, dtype)
        return Plan({1: cast_checked(new_weight, dtype, "weights"), 2: cast_checked(new_bias, dtype, "biases")},
                    beyond=path.beyond)

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        conv = match.neighbour
        write_plan(index, conv, plan)
        splice(index, match, plan.beyond)


def _check_no_padding(conv: onnx.NodeProto, weight: np.ndarray, index: GraphIndex) -> None:
    """Refuse a Conv that pads its input: the padding would read 0, not the BN's shift."""
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attribute(conv, "pads", [])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        _check_same_pads_nothing(conv, weight, index, auto_pad)
    elif auto_pad == "NOTSET" and any(p != 0 for p in pads):
        raise Refusal(PADDING_PREVENTS_FOLD, f"Conv pads {list(pads)}: the border would see 0, not the BN's shift")


def _check_same_pads_nothing(conv: onnx.NodeProto, weight: np.ndarray, index: GraphIndex, auto_pad: str) -> None:
    """SAME pads an axis of size n by max(0, (ceil(n / s) - 1) * s + extent - n), extent = (k - 1) * d + 1:
    0 at any size for an extent of 1, otherwise only for some sizes, so n must be known. The kernel is
    the weight's (a kernel_shape attribute can only repeat it)."""
    kernel = weight.shape[2:]
    strides = attribute(conv, "strides", [1] * len(kernel))
    dilations = attribute(conv, "dilations", [1] * len(kernel))
    sizes = _spatial_sizes(index, conv.input[0], len(kernel))
    for axis, (k, s, d, n) in enumerate(zip(kernel, strides, dilations, sizes)):
        extent = (k - 1) * d + 1
        if extent == 1:
            continue
        if n is None:
            raise Refusal(PADDING_PREVENTS_FOLD, f"auto_pad={auto_pad} may pad spatial axis {axis}: its size "
                                                 "is unknown")
        pad = (-(-n // s) - 1) * s + extent - n
        if pad > 0:
            raise Refusal(PADDING_PREVENTS_FOLD, f"auto_pad={auto_pad} pads spatial axis {axis} (size {n}) by "
                                                 f"{pad}: the border would see 0, not the BN's shift")


def _spatial_sizes(index: GraphIndex, name: str, count: int) -> list[int | None]:
    """The `count` spatial sizes of tensor `name` ([N, C, spatial...]), None where not known."""
    tensor_type = index.tensor_type(name)
    if tensor_type is None or tensor_type.shape is None or len(tensor_type.shape) != count + 2:
        return [None] * count
    return [n if isinstance(n, int) else None for n in tensor_type.shape[2:]]


class BNThenLinear(FoldRule):
    """BN -> Gemm and BN -> MatMul, the BN's channels on the reduced axis, into the weight's rows."""
    name = "bn-linear"
    summary = "scaled the weight's rows and added shift @ W to the bias"

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        found = sole_consumer_of(bn, index, ("Gemm", "MatMul"))
        if found is not None and found.neighbour.op_type == "MatMul":
            found.bias_add = _bias_reader(found.neighbour, index)
        return found

    def check(self, match: Match, index: GraphIndex) -> Plan:
        node = match.neighbour
        check_links(match, index, "BN")
        weight = constant(index, node.input[1], f"{node.op_type} weight")
        dtype = weight_dtype(weight, f"{node.op_type} weight")
        if weight.ndim != 2:
            raise Refusal(RANK_UNSUPPORTED, f"{node.op_type} weight has rank {weight.ndim}, not 2")
        if node.op_type == "Gemm":
            return self._gemm_plan(match, index, weight, dtype)
        path = fold_path(match, index, node.input[0], None, weight.shape[0], "MatMul")
        new_weight, new_bias = fold_before_matmul(weight, path.scale, path.shift, dtype)
        old_bias = _mergeable_bias(match.bias_add, node, index, weight.shape[1])
        if old_bias is not None:
            new_bias = new_bias + old_bias.astype(np.float64)
        return Plan({1: cast_checked(new_weight, dtype, "weights")}, bias=cast_checked(new_bias, dtype, "biases"),
                    beyond=path.beyond, merge_bias=old_bias is not None)

    def _gemm_plan(self, match, index, weight, dtype) -> Plan:
        gemm = match.neighbour
        trans_b = bool(attribute(gemm, "transB", 0))
        k_by_n = weight.T if trans_b else weight
        reduced_axis = 0 if attribute(gemm, "transA", 0) else 1
        path = fold_path(match, index, gemm.input[0], reduced_axis, k_by_n.shape[0], "Gemm")
        scale, shift = path.scale, path.shift
        alpha, beta = float(attribute(gemm, "alpha", 1.0)), float(attribute(gemm, "beta", 1.0))
        c = optional_constant(index, gemm, 2, "Gemm C")
        c = 0.0 if c is None else c.astype(np.float64)
        new_k_by_n, response = fold_before_matmul(k_by_n, scale, shift, dtype)
        new_c = beta * c + alpha * response
        new_c = new_c.reshape(-1) if new_c.ndim == 2 and new_c.shape[0] == 1 else new_c
        new_weight = new_k_by_n.T if trans_b else new_k_by_n
        return Plan({1: cast_checked(new_weight, dtype, "weights"), 2: cast_checked(new_c, dtype, "biases")},
                    attributes={"beta": 1.0}, beyond=path.beyond)

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        node = match.neighbour
        new_bias = bias_name(node)  # before the weight is perhaps copied under another name
        write_plan(index, node, plan)
        splice(index, match, plan.beyond)
        if node.op_type == "Gemm":
            return
        if plan.merge_bias:
            add = match.bias_add
            position = 1 - list(add.input).index(node.output[0])
            set_folded_input(index, add, position, plan.bias)
            return
        output = node.output[0]
        product = index.context.fresh_name(f"{output}_unbiased")
        index.set_output(node, 0, product)
        bias = index.add_initializer(plan.bias, new_bias)
        add = onnx.helper.make_node("Add", [product, bias], [output],
                                    name=index.context.fresh_name(f"{node.name or 'MatMul'}_bias"))
        index.insert_node(index.position(node) + 1, add)


def _bias_reader(matmul: onnx.NodeProto, index: GraphIndex) -> onnx.NodeProto | None:
    """The Add of a constant that is the only reader of the MatMul's output (its bias), if any."""
    readers = index.value_readers(matmul.output[0])
    if len(readers) != 1 or index.is_output(matmul.output[0]):
        return None
    add = readers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    return add if data_position(add, index) == list(add.input).index(matmul.output[0]) else None


def _mergeable_bias(add, matmul, index: GraphIndex, columns: int) -> np.ndarray | None:
    """The bias Add's constant, when W * shift can join it: last axis 1 or N, and a rank no larger
    than the MatMul output's (so the sum broadcasts exactly as the old bias did); else None and the
    fold adds an Add of its own."""
    if add is None:
        return None
    bias = index.constants.value(add.input[1 - list(add.input).index(matmul.output[0])])
    tensor_type = index.tensor_type(matmul.output[0])
    if tensor_type is None or tensor_type.shape is None or bias.ndim > len(tensor_type.shape):
        return None
    return bias if bias.ndim == 0 or bias.shape[-1] in (1, columns) else None
