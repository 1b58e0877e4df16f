"""Merge parallel branches over one input into one Conv (structural re-parameterization).

RepVGG, MobileOne, RepGhost and ACNet train with branches that sum into one output — k x k and 1 x 1
Conv+BN, asymmetric 1 x k / k x 1 Conv+BN, an identity branch ``x`` or ``BN(x)`` — and deploy them as
one Conv. For an Add or Sum whose operands are all such branches over the same tensor x (and at least
one Conv), with BN_i(y) = s_i * y + t_i (1 and 0 without a BN):

    sum_i BN_i(conv(x, W_i, b_i)) + s * x + t = conv(x, sum_i s_i pad(W_i) + s * I, sum_i (s_i b_i + t_i) + t)

Exact in real arithmetic when every Conv has the same group count, strides and dilations, the same
weight shape [M, C/g], and a padding that puts its kernel on the same output grid: along each axis the
branch's first tap reads the merged kernel's tap ``(P - p_i) / d`` (an integer in ``[0, K - k_i]``)
and its output size equals the merged one (``p_i + q_i - (k_i - 1) d = P + Q - (K - 1) d``), P, Q, K
the pads and size of the largest kernel. An identity branch needs stride 1, as many input channels as
output channels (each output channel m then reads input slot ``m % (C/g)`` of its own group), and a
merged kernel with a tap at offset 0 (``P / d`` an integer, output size = input size). This pass runs
before the BN fold so that each weight is computed in float64 from the original weights and BN
statistics and rounded once (the BNs of the branches fold here, not one by one first). Each tensor of a
branch must be read by the next node only. Adds are merged in graph order, so a chain
``Add(Add(a, b), c)`` merges pairwise. An Add of an all-zero constant that does not broadcast its
other operand larger is the identity (exporters write ``x + 0`` for a branch that is absent) and is
removed first. A BN that alone reads the sum (RepViT's ``BN(sum of branches)``) is merged too, its
affine applied last. The BNs merged here are reported by the fold pass that follows
(``state.batchnorm_decisions``).
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
from ..rules.path import is_constant
from .base import Decision, Pass, PassResult, PipelineState, recorded
from .fold_batchnorm import is_batchnorm


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
            result.decisions += [d for node in list(graph.node)
                                 if (d := recorded(state, lambda: _remove_zero_add(node, index, path)))]
            merges = [d for node in reversed(list(graph.node))
                      if (d := recorded(state, lambda: _merge(node, index, state, path)))]
            result.decisions += reversed(merges)
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
                and not is_constant(index, data) and _bypass(node, data, index):
            return Decision(node=node.name, reason=ZERO_ADD_REMOVED, op_type="Add", graph=path,
                            detail=f"adds an all-zero constant {zero} of shape {list(value.shape)}")
    return None


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
    """One operand `name` of a sum, over tensor `source`: a Conv (`conv`) reading it, perhaps followed
    by a BN (`bn`), a BN alone (an identity branch scaled by the BN), or `source` itself."""
    name: str
    source: str
    reader: onnx.NodeProto  # the sum that reads `name`
    conv: onnx.NodeProto | None = None
    bn: onnx.NodeProto | None = None

    @property
    def kind(self) -> str:
        return "conv" if self.conv is not None else "bn" if self.bn is not None else "identity"

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return [n for n in (self.conv, self.bn) if n is not None]

    def describe(self) -> str:
        return " + ".join(f"{n.op_type} {n.name!r}" for n in self.nodes) or "identity"


def _producer(name: str, index: GraphIndex, ops: tuple[str, ...]) -> onnx.NodeProto | None:
    node = index.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ops or not node.input:
        return None
    return node if node.output[0] == name else None


def _readings(name: str, reader: onnx.NodeProto, index: GraphIndex) -> list[Branch]:
    """Every way operand `name` branches from a tensor: itself, Conv(x), BN(x), BN(Conv(x))."""
    readings = [Branch(name, name, reader)]
    node = _producer(name, index, ("Conv", "BatchNormalization"))
    if node is not None and node.op_type == "Conv":
        readings.append(Branch(name, node.input[0], reader, conv=node))
    elif node is not None:
        readings.append(Branch(name, node.input[0], reader, bn=node))
        conv = _producer(node.input[0], index, ("Conv",))
        if conv is not None:
            readings.append(Branch(name, conv.input[0], reader, conv=conv, bn=node))
    return readings


def _branches(terms: list[tuple[str, onnx.NodeProto]], index: GraphIndex) -> list[Branch] | None:
    """The operands as branches over the first tensor that two or more of them branch from, one at
    least with a Conv; operands that do not branch from it are Branch(name, name). None if there is
    no such tensor: the sum is no candidate."""
    readings = [_readings(name, reader, index) for name, reader in terms]
    sources = list(dict.fromkeys(r.source for options in readings for r in options))
    for source in sources:
        chosen = [next((r for r in options if r.source == source), None) for options in readings]
        group = [r for r in chosen if r is not None]
        if len(group) >= 2 and any(r.kind == "conv" for r in group):
            return [r if r is not None else options[0] for r, options in zip(chosen, readings)]
    return None


def _terms(node: onnx.NodeProto, index: GraphIndex) -> tuple[list[tuple[str, onnx.NodeProto]], list]:
    """The operands of the sum `node` as (name, the sum reading it), with those of the Adds/Sums that
    feed it only expanded in place (``Add(Add(a, b), c)`` is a + b + c: merged at once, each weight
    rounded once), and those inner sums."""
    terms, inner = [], []
    for name in node.input:
        producer = index.producer.get(name)
        readers = index.value_readers(name)
        exclusive = producer is not None and _is_sum(producer) and producer.output[0] == name \
            and not index.is_output(name) and len(readers) == 1 and readers[0] is node
        if exclusive and len(inner) < len(index.graph.node):
            more_terms, more_inner = _terms(producer, index)
            terms += more_terms
            inner += [producer, *more_inner]
        elif name:
            terms.append((name, node))
    return terms, inner


def _merge(node: onnx.NodeProto, index: GraphIndex, state: PipelineState, path: str) -> Decision | None:
    """Merge the sum `node` if its operands are branches over one input; None if it is no such sum."""
    if not _is_sum(node) or index.producer.get(node.output[0]) is not node:
        return None
    terms, inner = _terms(node, index)
    branches = _branches(terms, index)
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
    kept = _rewrite(node, inner, branches, plan, index)
    decision.reason = MERGED
    decision.detail = f"{len(branches)} branches over {source} merged into Conv {kept.name!r}: " + \
        ", ".join(b.describe() for b in branches)
    merged_bns = [(b.bn, "with its Conv's branch" if b.conv is not None else "as an identity branch")
                  for b in branches if b.bn is not None]
    if plan.bn_after is not None:
        merged_bns.append((plan.bn_after, "after the sum of branches"))
    for bn, how in merged_bns:
        _record_merged_bn(state, bn, kept, path, f"merged {how} into Conv {kept.name!r} (reparameterize)")
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
    keep: onnx.NodeProto  # the Conv that stays (the largest kernel's)
    weight: np.ndarray
    bias: np.ndarray
    pads: list[int]
    bn_after: onnx.NodeProto | None = None  # the BN after the sum, merged too


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
        _check_branch(branch, index)
    convs = [b.conv for b in branches if b.kind == "conv"]
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
    affines = [_branch_affine(b, index, shape[0]) for b in branches if b.kind == "conv"]
    after = _bn_after(node, index, shape[0])
    post_scale, post_shift = (np.ones(shape[0]), np.zeros(shape[0])) if after is None else after[1]
    diagonal = None if identity is None else (post_scale * identity[0], identity[2])
    merged = merge_conv_kernels(shape, weights, offsets, [post_scale * a[0] for a in affines], diagonal, dtype)
    bias = np.zeros(shape[0])
    for (_, b, _), (scale, shift) in zip(operands, affines):  # BN(conv + b) = scale * conv + (scale * b + shift)
        bias = bias + (0.0 if b is None else scale * b.astype(np.float64)) + shift
    if identity is not None:
        bias = bias + identity[1]
    keep = convs[int(np.argmax([np.prod(w.shape[2:]) for w in weights]))]
    return MergePlan(keep, cast_checked(merged, dtype, "weights"),
                     cast_checked(post_scale * bias + post_shift, dtype, "biases"), list(begin) + list(end),
                     None if after is None else after[0])


def _bn_after(node: onnx.NodeProto, index: GraphIndex, outputs: int):
    """The BN that alone reads the sum (RepViT's BN(sum of branches)) and its (scale, shift), when it
    folds (inference mode, not excluded, valid statistics): merged too, so the weights are rounded
    once. None otherwise (the fold pass then decides it)."""
    readers = index.value_readers(node.output[0])
    bn = readers[0] if len(readers) == 1 and not index.is_output(node.output[0]) else None
    if bn is None or not is_batchnorm(bn) or bn.input[0] != node.output[0] or bn.name in index.excluded \
            or bn_mode_refusal(bn, index) is not None:
        return None
    try:
        return bn, bn_affine(bn, index, outputs)
    except Refusal:
        return None


def _check_branch(branch: Branch, index: GraphIndex) -> None:
    """Each tensor a branch changes is read by the next node only; its BN folds (inference mode, not
    excluded)."""
    nodes = branch.nodes
    for writer, reader in zip(nodes, nodes[1:] + [branch.reader]):
        require_exclusive(index, writer.output[0], reader, f"{writer.op_type} {writer.name!r}")
    if branch.bn is not None and branch.bn.name in index.excluded:
        raise Refusal(EXCLUDED_BY_USER, f"the branch's BN {branch.bn.name!r} is excluded by name")
    if branch.bn is not None and (refusal := bn_mode_refusal(branch.bn, index)) is not None:
        raise refusal


def _branch_affine(branch: Branch, index: GraphIndex, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-output-channel (scale, shift) of a Conv branch's BN; (1, 0) without one."""
    if branch.bn is None:
        return np.ones(outputs), np.zeros(outputs)
    return bn_affine(branch.bn, index, outputs)


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
            s, t = bn_affine(branch.bn, index, outputs)
            scale, shift = scale + s, shift + t
        else:
            scale = scale + 1.0
    return scale, shift, tuple(taps)


# ---------------------------------------------------------------------------------------- rewrite
def _rewrite(node: onnx.NodeProto, inner: list[onnx.NodeProto], branches: list[Branch], plan: MergePlan,
             index: GraphIndex) -> onnx.NodeProto:
    """The kept Conv takes the merged weight, bias and pads and writes the sum's output (or that of the
    BN after it); the other branch nodes, the sum, the sums inside it and that BN go."""
    keep = plan.keep
    output = (plan.bn_after or node).output[0]  # the name the kept Conv writes
    set_folded_input(index, keep, 2, plan.bias)  # first: a new bias is named after the weight's own name
    set_folded_input(index, keep, 1, plan.weight)
    _set_ints(keep, "auto_pad", None)  # VALID is pads of 0: the merged pads say it
    _set_ints(keep, "pads", plan.pads)
    if any(a.name == "kernel_shape" for a in keep.attribute):
        _set_ints(keep, "kernel_shape", list(plan.weight.shape[2:]))
    removed = {id(keep)}
    ends = [plan.bn_after] if plan.bn_after is not None else []
    for branch_node in [*ends, node, *inner, *(n for branch in branches for n in branch.nodes)]:
        if id(branch_node) not in removed:
            removed.add(id(branch_node))
            index.redirect_metadata_readers(branch_node.output[0], output)
            index.remove_node(branch_node)
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
def _record_merged_bn(state: PipelineState, bn: onnx.NodeProto, conv: onnx.NodeProto, path: str, how: str) -> None:
    """The decision for a BN this pass merged; the fold pass, which runs next, reports it."""
    state.batchnorm_decisions[id(bn)] = (bn, Decision(node=bn.name, reason=FOLDED, detail=how, rule="reparameterize",
                                                      neighbour=conv.name, neighbour_op=conv.op_type, graph=path))
