"""Merge parallel branches over one input into one Conv (structural re-parameterization).

RepVGG, MobileOne, RepGhost and ACNet train with branches that sum into one output — k x k and 1 x 1
Convs (each with its BN, folded into it by the pass before), asymmetric 1 x k / k x 1 Convs, an
identity branch ``x`` or ``BN(x)`` — and deploy them as one Conv. For an Add or Sum whose operands are
all such branches over the same tensor x (and at least one Conv):

    sum_i conv(x, W_i, b_i) + s * x + t = conv(x, sum_i pad(W_i) + s * I, sum_i b_i + t)

Exact in real arithmetic when every Conv has the same group count, strides and dilations, the same
output channels, and a padding that puts its kernel on the same output grid: along each axis the
branch's first tap reads the merged kernel's tap ``(P - p_i) / d`` (an integer in ``[0, K - k_i]``)
and its output size equals the merged one (``p_i + q_i - (k_i - 1) d = P + Q - (K - 1) d``), P, Q, K
the pads and size of the largest kernel. An identity branch needs stride 1, as many input channels as
output channels (each output channel m then reads input slot ``m % (C/g)`` of its own group), and a
merged kernel with a tap at offset 0 (``P / d`` an integer, output size = input size). Weights are
summed in float64 and rounded once. Each branch's output must be read by the sum only. Adds are
merged in graph order, so a chain ``Add(Add(a, b), c)`` merges pairwise. An Add of an all-zero
constant that does not broadcast its other operand larger is the identity (exporters write ``x + 0``
for a branch that is absent) and is removed first. After merging, BNs the merge made foldable
(RepViT's ``BN(sum of branches)``) are folded; every BN this pass folds or merges has its decision in
the fold pass's result updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..batchnorm import attribute
from ..constants import NotConstant
from ..graph import GraphIndex, subgraph_names_used, walk_graphs
from ..math import merge_conv_kernels
from ..reasons import (EXCLUDED_BY_USER, FOLDED, IDENTITY_NOT_ONE_TO_ONE, MERGED, NON_BRANCH_OPERAND, PADDING_MISALIGNED,
                       BRANCH_MISMATCH, ZERO_ADD_REMOVED)
from ..rules.base import (Refusal, bn_affine, bn_mode_refusal, cast_checked, conv_operands, require_exclusive,
                          set_folded_input, weight_dtype)
from .base import Decision, Pass, PassResult, PipelineState
from .fold_batchnorm import fold_one, is_batchnorm


class Reparameterize(Pass):
    """Parallel Conv / identity branches summed -> one Conv, unless FoldOptions.reparameterize is off."""
    name = "reparameterize"

    def run(self, state: PipelineState) -> PassResult:
        result = PassResult(self.name)
        if not state.options.reparameterize:
            return result
        indexes: dict[int, GraphIndex] = {}
        for path, graph, parent in walk_graphs(state.model.graph):
            index = GraphIndex(graph, state.context, indexes.get(id(parent)) if parent is not None else None)
            indexes[id(graph)] = index
            index.excluded = state.options.exclude_nodes
            result.decisions += [d for node in list(graph.node) if (d := _remove_zero_add(node, index, path))]
            merges = [d for node in list(graph.node) if (d := _merge(node, index, state, path))]
            result.decisions += merges
            if any(d.reason == MERGED for d in merges):
                _fold_again(graph, index, state, path)
            state.released |= index.released
            state.context.release_reads()
        result.modified = any(d.reason in (MERGED, ZERO_ADD_REMOVED) for d in result.decisions)
        return result


def _is_sum(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Add", "Sum") and node.domain in ("", "ai.onnx")


# ------------------------------------------------------------------------------------------ x + 0
def _remove_zero_add(node: onnx.NodeProto, index: GraphIndex, path: str) -> Decision | None:
    """Remove `x + 0` (an all-zero constant that broadcasts onto x without growing it)."""
    if node.op_type != "Add" or not _is_sum(node) or len(node.input) != 2 or index.context.bn_opset < 7:
        return None
    for position in (0, 1):
        zero, data = node.input[position], node.input[1 - position]
        try:
            value = index.constants.value(zero)
        except NotConstant:
            continue
        if value.size and not value.any() and _broadcasts_within(value, index, data) \
                and not _is_constant(index, data) and _bypass(node, data, index):
            return Decision(node=node.name, reason=ZERO_ADD_REMOVED, op_type="Add", graph=path,
                            detail=f"adds an all-zero constant {zero} of shape {list(value.shape)}")
    return None


def _is_constant(index: GraphIndex, name: str) -> bool:
    try:
        index.constants.value(name)
    except NotConstant:
        return False
    return True


def _broadcasts_within(value: np.ndarray, index: GraphIndex, data: str) -> bool:
    """True if `value` broadcasts onto tensor `data` without changing its shape."""
    tensor_type = index.tensor_type(data)
    if tensor_type is None or tensor_type.shape is None or value.ndim > len(tensor_type.shape):
        return False
    dims = tensor_type.shape[len(tensor_type.shape) - value.ndim:]
    return all(n == 1 or n == d for n, d in zip(value.shape, dims))


def _bypass(add: onnx.NodeProto, data: str, index: GraphIndex) -> bool:
    """Let `add`'s readers read `data` instead and remove it; when its output is a graph output, the
    producer of `data` (read by `add` only) writes that name instead. False if neither can be done (a
    subgraph reads the output by name)."""
    output = add.output[0]
    if index.is_output(output):
        producer = index.producer.get(data)
        if producer is None or index.is_output(data) or len(index.users(data)) != 1:
            return False
        index.remove_node(add)
        index.set_output(producer, list(producer.output).index(data), output)
        return True
    if any(output in subgraph_names_used(reader) for reader in index.users(output)):
        return False
    index.remove_node(add)
    for reader in index.users(output):
        for i, name in enumerate(reader.input):
            if name == output:
                index.set_input(reader, i, data)
    return True


# --------------------------------------------------------------------------------------- branches
@dataclass
class Branch:
    """One operand of a sum: a Conv over `source`, a BN over `source`, or `source` itself."""
    name: str
    source: str
    node: onnx.NodeProto | None = None

    @property
    def kind(self) -> str:
        return "identity" if self.node is None else "conv" if self.node.op_type == "Conv" else "bn"


def _branch_node(name: str, index: GraphIndex) -> onnx.NodeProto | None:
    """The Conv or BN whose output 0 is `name` (whether a BN may merge is checked in _plan)."""
    node = index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx") or node.output[0] != name or not node.input:
        return None
    return node if node.op_type == "Conv" or is_batchnorm(node) else None


def _branches(names: list[str], index: GraphIndex) -> list[Branch] | None:
    """The operands as branches over the first tensor that two or more of them branch from, at least
    one a Conv (an operand is x itself, or a Conv or BN reading x); None if there is no such tensor.
    Operands that do not branch from it are Branch(name, name)."""
    nodes = {name: _branch_node(name, index) for name in names}
    candidates = list(dict.fromkeys([n for name in names for n in (name, *(
        [nodes[name].input[0]] if nodes[name] is not None else []))]))
    for source in candidates:
        group = [Branch(name, source, nodes[name] if name != source else None) for name in names
                 if name == source or (nodes[name] is not None and nodes[name].input[0] == source)]
        if len(group) >= 2 and any(b.kind == "conv" for b in group):
            return [Branch(name, source, nodes[name] if name != source else None)
                    if name == source or (nodes[name] is not None and nodes[name].input[0] == source)
                    else Branch(name, name) for name in names]
    return None


def _merge(node: onnx.NodeProto, index: GraphIndex, state: PipelineState, path: str) -> Decision | None:
    """Merge the sum `node` if its operands are branches over one input; None if it is no such sum."""
    if not _is_sum(node) or index.producer.get(node.output[0]) is not node:
        return None
    branches = _branches([name for name in node.input if name], index)
    if branches is None:
        return None
    source = next(b.source for b in branches if b.kind == "conv")
    decision = Decision(node=node.name, reason="", op_type=node.op_type, graph=path)
    try:
        if any(b.source != source for b in branches):
            other = next(b.name for b in branches if b.source != source)
            raise Refusal(NON_BRANCH_OPERAND, f"operand {other} is not a branch over {source}")
        plan = _plan(node, branches, index)
    except Refusal as refusal:
        decision.reason, decision.detail = refusal.reason, refusal.detail
        return decision
    kept = _rewrite(node, branches, plan, index)
    decision.reason = MERGED
    decision.detail = f"{len(branches)} branches over {source} merged into Conv {kept.name!r}: " + \
        ", ".join(f"{b.kind} {b.node.name!r}" if b.node is not None else "identity" for b in branches)
    for branch in branches:
        if branch.kind == "bn":
            _mark_folded(state, branch.node, kept, "merged into it as an identity branch (reparameterize)")
    return decision


# ------------------------------------------------------------------------------------------ check
@dataclass
class Geometry:
    """A Conv's spatial layout: kernel sizes, strides, dilations, pads at the start and at the end."""
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]


@dataclass
class MergePlan:
    keep: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray
    pads: list[int]


def _geometry(conv: onnx.NodeProto, weight: np.ndarray) -> Geometry:
    rank = weight.ndim - 2
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise Refusal(PADDING_MISALIGNED, f"Conv {conv.name!r} has auto_pad={auto_pad}: its pads depend on the "
                                          "input size")
    pads = [0] * (2 * rank) if auto_pad == "VALID" else list(attribute(conv, "pads", [0] * (2 * rank)))
    return Geometry(tuple(weight.shape[2:]), tuple(attribute(conv, "strides", [1] * rank)),
                    tuple(attribute(conv, "dilations", [1] * rank)), tuple(pads[:rank]), tuple(pads[rank:]))


def _plan(node: onnx.NodeProto, branches: list[Branch], index: GraphIndex) -> MergePlan:
    """Every condition of an exact merge, and the merged weight and bias (module docstring)."""
    for branch in branches:
        if branch.node is not None:
            require_exclusive(index, branch.name, node, f"{branch.node.op_type} {branch.node.name!r}")
        if branch.kind == "bn" and branch.node.name in index.excluded:
            raise Refusal(EXCLUDED_BY_USER, f"the identity branch's BN {branch.node.name!r} is excluded by name")
        if branch.kind == "bn" and (refusal := bn_mode_refusal(branch.node, index)) is not None:
            raise refusal
    convs = [b.node for b in branches if b.kind == "conv"]
    operands = [conv_operands(index, conv) for conv in convs]
    weights = [w for w, _, _ in operands]
    dtype = weight_dtype(weights[0], "Conv weight")
    groups = operands[0][2]
    geometries = [_geometry(conv, w) for conv, w in zip(convs, weights)]
    first = weights[0]
    for conv, weight, (_, _, g), geometry in zip(convs, weights, operands, geometries):
        same = (weight.ndim == first.ndim and weight.shape[:2] == first.shape[:2] and weight.dtype == dtype
                and g == groups and geometry.strides == geometries[0].strides
                and geometry.dilations == geometries[0].dilations)
        if not same:
            raise Refusal(BRANCH_MISMATCH, f"Conv {conv.name!r} differs from Conv {convs[0].name!r} in weight "
                                           "shape, dtype, group, strides or dilations")
    kernel, begin, end = _merged_layout(convs, geometries)
    offsets = [tuple((b - g.begin[a]) // g.dilations[a] for a, b in enumerate(begin)) for g in geometries]
    identity = _identity(branches, index, first, groups, geometries[0], kernel, begin, end)
    shape = (first.shape[0], first.shape[1]) + kernel
    diagonal = None if identity is None else (identity[0], identity[2])
    merged = merge_conv_kernels(shape, weights, offsets, diagonal, dtype)
    bias = sum((np.zeros(shape[0]) if b is None else b.astype(np.float64) for _, b, _ in operands), np.zeros(shape[0]))
    if identity is not None:
        bias = bias + identity[1]
    keep = convs[int(np.argmax([np.prod(w.shape[2:]) for w in weights]))]
    return MergePlan(keep, cast_checked(merged, dtype, "weights"), cast_checked(bias, dtype, "biases"),
                     list(begin) + list(end))


def _merged_layout(convs, geometries: list[Geometry]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The merged kernel size and pads per axis (those of the largest kernel), after checking that every
    branch lies on its output grid."""
    rank = len(geometries[0].kernel)
    kernel, begin, end = [], [], []
    for axis in range(rank):
        widest = max(geometries, key=lambda g: g.kernel[axis])
        size, p, q, d = widest.kernel[axis], widest.begin[axis], widest.end[axis], widest.dilations[axis]
        for conv, g in zip(convs, geometries):
            k, offset = g.kernel[axis], p - g.begin[axis]
            if offset % d or not 0 <= offset // d <= size - k or \
                    g.begin[axis] + g.end[axis] - (k - 1) * d != p + q - (size - 1) * d:
                raise Refusal(PADDING_MISALIGNED, f"Conv {conv.name!r} (kernel {k}, pads {g.begin[axis]}/"
                                                  f"{g.end[axis]}) is not on the output grid of a kernel {size} "
                                                  f"with pads {p}/{q} along spatial axis {axis}")
        kernel.append(size)
        begin.append(p)
        end.append(q)
    return tuple(kernel), tuple(begin), tuple(end)


def _identity(branches, index, weight, groups, geometry: Geometry, kernel, begin, end):
    """(scale, shift, taps) of the identity branches (x: scale 1; BN(x): its scale and shift), summed;
    None when there are none. Refused unless each output channel reads its own input channel."""
    identities = [b for b in branches if b.kind != "conv"]
    if not identities:
        return None
    outputs, inputs = weight.shape[0], weight.shape[1] * groups
    taps = []
    for axis, (p, q, size) in enumerate(zip(begin, end, kernel)):
        d, s = geometry.dilations[axis], geometry.strides[axis]
        if s != 1 or p % d or not 0 <= p // d < size or p + q != (size - 1) * d:
            raise Refusal(IDENTITY_NOT_ONE_TO_ONE, f"the merged Conv does not map x onto itself along spatial axis "
                                                   f"{axis} (stride {s}, pads {p}/{q}, kernel {size})")
        taps.append(p // d)
    if inputs != outputs:
        raise Refusal(IDENTITY_NOT_ONE_TO_ONE, f"the Convs map {inputs} input channels to {outputs} outputs: an "
                                               "identity branch needs as many of each")
    scale, shift = np.zeros(outputs), np.zeros(outputs)
    for branch in identities:
        if branch.kind == "bn":
            s, t = bn_affine(branch.node, index, outputs)
            scale, shift = scale + s, shift + t
        else:
            scale = scale + 1.0
    return scale, shift, tuple(taps)


# ---------------------------------------------------------------------------------------- rewrite
def _rewrite(node: onnx.NodeProto, branches: list[Branch], plan: MergePlan, index: GraphIndex) -> onnx.NodeProto:
    """The kept Conv takes the merged weight, bias and pads and writes the sum's output; the other
    branch nodes and the sum go."""
    keep, output = plan.keep, node.output[0]
    base = keep.name or output
    set_folded_input(index, keep, 1, plan.weight, f"{base}_W_bnfold")
    set_folded_input(index, keep, 2, plan.bias, f"{base}_B_bnfold")
    _set_ints(keep, "auto_pad", None)  # VALID is pads of 0: the merged pads say it
    _set_ints(keep, "pads", plan.pads)
    if any(a.name == "kernel_shape" for a in keep.attribute):
        _set_ints(keep, "kernel_shape", list(plan.weight.shape[2:]))
    index.remove_node(node)
    removed = {id(keep)}
    for branch in branches:
        if branch.node is not None and id(branch.node) not in removed:
            removed.add(id(branch.node))
            index.redirect_metadata_readers(branch.name, output)
            index.remove_node(branch.node)
    index.redirect_metadata_readers(keep.output[0], output)
    index.set_output(keep, 0, output)
    return keep


def _set_ints(node: onnx.NodeProto, name: str, values: list[int] | None) -> None:
    """Replace attribute `name` by `values`; remove it for None, or for pads that are all 0."""
    for i in reversed(range(len(node.attribute))):
        if node.attribute[i].name == name:
            del node.attribute[i]
    if values is not None and (name != "pads" or any(values)):
        node.attribute.append(onnx.helper.make_attribute(name, values))


# --------------------------------------------------------------------------------- BN decisions
def _mark_folded(state: PipelineState, bn: onnx.NodeProto, conv: onnx.NodeProto, how: str) -> None:
    """Update the fold pass's decision for `bn`: this pass folded it."""
    entry = state.batchnorm_decisions.get(id(bn))
    if entry is not None:
        decision = entry[1]
        decision.reason, decision.detail = FOLDED, how
        decision.rule, decision.neighbour, decision.neighbour_op = "reparameterize", conv.name, conv.op_type


def _fold_again(graph: onnx.GraphProto, index: GraphIndex, state: PipelineState, path: str) -> None:
    """Fold the BNs left by the fold pass that a merge put next to a Conv (RepViT's BN after the sum)."""
    for node in list(graph.node):
        entry = state.batchnorm_decisions.get(id(node))
        if entry is None or entry[1].folded or not is_batchnorm(node):
            continue
        decisions = fold_one(node, index, state.options.exclude_nodes, path)
        if decisions[0][1].folded:
            for bn, decision in decisions:
                previous = state.batchnorm_decisions.get(id(bn))
                if previous is not None:
                    previous[1].__dict__.update(decision.__dict__)
                    previous[1].detail += " (after reparameterize)"
