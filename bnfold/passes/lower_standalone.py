"""Rewrite each BatchNormalization that no rule folded as one Mul and one Add
(``lower_standalone="mul-add"``; the default ``"keep"`` leaves them).

Some runtimes have no BatchNormalization kernel (microcontroller and NPU compilers, several mobile
runtimes). An inference-mode BN is the per-channel affine map ``y = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` over axis 1 of its input, so
``Add(Mul(x, scale), shift)`` computes it: exact in real arithmetic. The constants are computed in
float64 (:func:`bnfold.math.bn_scale_shift`) and rounded once to the input's dtype, shaped
``[C, 1, ..., 1]`` to broadcast over axis 1 (before opset 7, ``[C]`` with ``broadcast=1, axis=1``),
so the input's rank must be known (``rank-unknown`` otherwise). The Add produces the BN's output
name. A BN stays when it is excluded by name, in training mode or has its training outputs read,
when its parameters are not constants or not valid statistics, or when the constants would overflow
the input's dtype: the same conditions and reason codes as a fold.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import BnfoldError
from ..graph import GraphIndex, walk_graphs
from ..reasons import DTYPE_UNSUPPORTED, EXCLUDED_BY_USER, LOWERED, RANK_UNSUPPORTED
from ..rules.base import FOLDABLE_DTYPES, Refusal, bn_affine, bn_mode_refusal, cast_checked, known_rank
from .base import Decision, Pass, PassResult, PipelineState, recorded
from .fold_batchnorm import is_batchnorm

KEEP, MUL_ADD = "keep", "mul-add"
LOWERINGS = (KEEP, MUL_ADD)


def check_lowering(value: str) -> str:
    """`value` if it names a lowering, else a one-line error naming the option."""
    if value not in LOWERINGS:
        raise BnfoldError(f"unknown value {value!r}: expected {' or '.join(LOWERINGS)}", option="lower_standalone")
    return value


class LowerStandalone(Pass):
    """BN left by the fold -> Mul and Add, on request."""
    name = "lower-standalone"

    def run(self, state: PipelineState) -> PassResult:
        result = PassResult(self.name)
        if check_lowering(state.options.lower_standalone) == KEEP:
            return result
        indexes: dict[int, GraphIndex] = {}
        for path, graph, parent in walk_graphs(state.model.graph):
            index = GraphIndex(graph, state.context, indexes.get(id(parent)) if parent is not None else None)
            indexes[id(graph)] = index
            for node in list(graph.node):
                if is_batchnorm(node):
                    result.decisions.append(recorded(state, lambda: _lower_one(node, index, state.options.exclude_nodes,
                                                                               path)))
                    state.context.release_reads()
            state.released |= index.released
        result.modified = any(d.reason == LOWERED for d in result.decisions)
        return result


def _lower_one(bn: onnx.NodeProto, index: GraphIndex, excluded: frozenset[str], path: str) -> Decision:
    decision = Decision(node=bn.name, reason=LOWERED, graph=path)
    if bn.name and bn.name in excluded:
        decision.reason, decision.detail = EXCLUDED_BY_USER, "named by --exclude-node: kept as BatchNormalization"
        return decision
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are refused
            scale, shift = _constants(bn, index)
    except Refusal as refusal:
        decision.reason, decision.detail = refusal.reason, refusal.detail
        return decision
    mul, add = _rewrite(bn, index, scale, shift)
    decision.detail = f"now Mul {mul.name!r} then Add {add.name!r}, constants {list(scale.shape)} {scale.dtype.name}"
    return decision


def _constants(bn: onnx.NodeProto, index: GraphIndex) -> tuple[np.ndarray, np.ndarray]:
    """The BN's (scale, shift), shaped to broadcast over axis 1 of its input, in the input's dtype."""
    refusal = bn_mode_refusal(bn, index)
    if refusal is not None:
        raise refusal
    rank = known_rank(index, bn.input[0], "BN input")
    if rank < 2:
        raise Refusal(RANK_UNSUPPORTED, f"BN input {bn.input[0]} has rank {rank}, expected >= 2 (N, C, ...)")
    input_type = index.tensor_type(bn.input[0])
    dtype = FOLDABLE_DTYPES.get(input_type.elem_type)
    if dtype is None:
        raise Refusal(DTYPE_UNSUPPORTED, f"BN input {bn.input[0]} is not a float type bnfold lowers")
    channels = input_type.shape[1]
    scale, shift = bn_affine(bn, index, channels if isinstance(channels, int) and channels > 0 else None)
    shape = (len(scale),) + (1,) * (rank - 2) if index.context.bn_opset >= 7 else (len(scale),)
    return (cast_checked(scale.reshape(shape), dtype, "scale values"),
            cast_checked(shift.reshape(shape), dtype, "shift values"))


def _rewrite(bn: onnx.NodeProto, index: GraphIndex, scale: np.ndarray, shift: np.ndarray):
    """Replace `bn`, at its place in the graph, by Mul then Add; the Add produces the BN's output. Their
    constants are named after the BN's scale and B, `{name}_bnfold`, which they replace."""
    base, fresh = bn.name or "bn", index.context.fresh_name
    scaled = fresh(f"{bn.output[0]}_scaled")
    legacy = {"broadcast": 1, "axis": 1} if index.context.bn_opset < 7 else {}  # no numpy broadcasting yet
    mul = onnx.helper.make_node("Mul", [bn.input[0], index.add_initializer(scale, f"{bn.input[1]}_bnfold")],
                                [scaled], name=fresh(f"{base}_mul"), **legacy)
    add = onnx.helper.make_node("Add", [scaled, index.add_initializer(shift, f"{bn.input[2]}_bnfold")],
                                [bn.output[0]], name=fresh(f"{base}_add"), **legacy)
    position = index.position(bn)
    index.remove_node(bn)
    index.insert_node(position, mul)
    index.insert_node(position + 1, add)
    index.released.discard(bn.output[0])  # produced again: not a leftover, even if nothing reads it
    return mul, add
