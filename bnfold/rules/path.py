"""The ops a BN folds across on its way to a linear op, and what they do to its channels.

A BN and its linear op may be separated by a path of *steps*, each reading the path tensor as its data
operand and writing the next one:

- transparent: Identity, and Dropout in inference form (output 0 equals input 0; `transparency_refusal`);
- affine: Add, Sub, Mul or Div of the path tensor and a compile-time constant (``x - c``, ``c - x``,
  ``x / c``; never ``c / x``), and other BatchNormalization nodes: per-channel affine maps that compose
  with the BN's own into one ``scale * x + shift``;
- shape: Reshape, Flatten, Squeeze, Unsqueeze (which keep the row-major order of the elements) and
  Transpose (which permutes the axes).

Past the BN, away from the linear op, the fold also takes the affine steps that follow (``Conv -> BN
-> Mul(layer scale)``) or precede (``Mul -> BN -> Conv``) it: its *beyond* steps.

Which BN channel an element carries is tracked from the BN to the linear op as :class:`Channels`: the
channel of each index along one axis, or of each row-major position. Through a reshape the row-major
position keeps its channel; through a Transpose an axis moves. At an axis ``j`` of a tensor of shape
``s``, position ``(flat // inner) % C`` gives the channel of index ``i`` alone exactly when
``inner % P == 0`` and ``(s[j] * P) % (inner * C) == 0``, ``P`` the product of the sizes after ``j``;
then index ``i`` carries channel ``(i * P // inner) % C``. The fold is exact when every index of the
linear op's channel axis carries one BN channel (:func:`channels_along`) and every affine constant is
one value per BN channel (:func:`per_channel`): the composed map is then one affine per index, which
folds as a BN would. A Reshape that regroups channels breaks the first condition (channel-axis-mismatch),
a constant that varies over space or the batch the second (not-per-channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..batchnorm import attribute
from ..constants import NotConstant
from ..graph import GraphIndex
from ..reasons import (ACTIVATION_QUANTIZED, AFFINE_CONSTANT_INVALID, CHANNEL_AXIS_MISMATCH, DROPOUT_IN_TRAINING_MODE, DROPOUT_MASK_USED,
                       MALFORMED_NEIGHBOUR, NOT_PER_CHANNEL, RANK_UNKNOWN, SHAPE_UNKNOWN)
from .base import Match, Refusal, bn_affine, bn_mode_refusal, require_exclusive

TRANSPARENT_OPS = ("Identity", "Dropout")
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
RESHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
SHAPE_OPS = RESHAPE_OPS + ("Transpose",)
QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear")  # walked through only to say why not (check_links)


def _default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


# ------------------------------------------------------------------------------------------ steps
def data_position(node: onnx.NodeProto, index: GraphIndex, beyond: bool = False) -> int | None:
    """The input position of the path tensor if `node` is a step (only affine steps when `beyond`),
    else None. Structure only, but an affine step needs its other operand to be a constant."""
    if not _default_domain(node) or not node.input or not node.output:
        return None
    if node.op_type in TRANSPARENT_OPS:
        return 0
    if node.op_type in SHAPE_OPS + QUANTIZE_OPS:
        return None if beyond else 0
    if node.op_type == "BatchNormalization":
        return 0 if _is_foldable_bn(node, index) else None
    if node.op_type in AFFINE_OPS and len(node.input) == 2 and node.input[0] != node.input[1]:
        constant_at = [i for i, name in enumerate(node.input) if is_constant(index, name)]
        if len(constant_at) == 1 and not (node.op_type == "Div" and constant_at[0] == 0):
            return 1 - constant_at[0]
    return None


def _is_foldable_bn(node: onnx.NodeProto, index: GraphIndex) -> bool:
    return node.name not in index.excluded and bn_mode_refusal(node, index) is None


def is_constant(index: GraphIndex, name: str) -> bool:
    """True if tensor `name` is a compile-time constant (bnfold.constants)."""
    try:
        index.constants.value(name)
    except NotConstant:
        return False
    return True


def transparency_refusal(node: onnx.NodeProto, index: GraphIndex) -> Refusal | None:
    """Why an Identity or Dropout may not equal its input, per the Dropout opset: before 7, is_test=0
    (the default) drops; from 12, a training_mode input that is not a constant false drops; its mask
    output, if read, would be lost. Any ratio is fine: inference-mode Dropout is the identity."""
    if node.op_type == "Identity":
        return None
    label, opset = f"Dropout {node.name!r}", index.context.bn_opset
    if opset < 7 and attribute(node, "is_test", 0) == 0:
        return Refusal(DROPOUT_IN_TRAINING_MODE, f"{label} has is_test=0 (opset {opset}): it drops values")
    if len(node.input) > 2 and node.input[2]:
        try:
            training = index.constants.value(node.input[2])
        except NotConstant:
            return Refusal(DROPOUT_IN_TRAINING_MODE, f"{label} training_mode {node.input[2]} is not a constant")
        if training.any():
            return Refusal(DROPOUT_IN_TRAINING_MODE, f"{label} has training_mode=true: it drops values")
    mask = node.output[1] if len(node.output) > 1 else ""
    if mask and (index.users(mask) or index.is_output(mask)):
        return Refusal(DROPOUT_MASK_USED, f"{label} mask output {mask} is read")
    return None


# ------------------------------------------------------------------------------------- the walks
def producer_of(bn: onnx.NodeProto, index: GraphIndex, ops: tuple[str, ...]) -> Match | None:
    """The node of type `ops` whose output reaches the BN's input through steps (the match's `chain`),
    with the affine steps that follow the BN (its `beyond`)."""
    name, chain = bn.input[0], []
    for _ in range(len(index.graph.node)):  # a bound: a malformed graph may have a cycle
        node = index.producer.get(name)
        if node is None or not _default_domain(node) or node.output[0] != name:
            return None
        if node.op_type in ops:
            return Match(bn, node, chain=tuple(reversed(chain)), beyond=_beyond_after(bn, index))
        position = data_position(node, index)
        if position is None:
            return None
        chain.append(node)
        name = node.input[position]
    return None


def sole_consumer_of(bn: onnx.NodeProto, index: GraphIndex, ops: tuple[str, ...]) -> Match | None:
    """The only value reader of the BN's output, or of the steps after it, if it is of type `ops` and
    reads the path as its data input (input 0): the BN must not be the weight operand of the op it
    would fold into. The affine steps before the BN are its `beyond`."""
    name, chain = bn.output[0], []
    for _ in range(len(index.graph.node)):
        users = index.value_readers(name)
        if len(users) != 1 or not _default_domain(users[0]):
            return None
        node = users[0]
        if node.op_type in ops:
            return Match(bn, node, chain=tuple(chain), beyond=_beyond_before(bn, index), before=False) \
                if node.input[0] == name else None
        position = data_position(node, index)
        if position is None or node.input[position] != name:
            return None
        chain.append(node)
        name = node.output[0]
    return None


def _beyond_after(bn: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, ...]:
    """The affine (and transparent) steps after the BN, each the only reader of the tensor before it."""
    steps, name = [], bn.output[0]
    while len(steps) < len(index.graph.node):
        users = index.value_readers(name)
        if len(users) != 1 or index.is_output(name):
            break
        position = data_position(users[0], index, beyond=True)
        if position is None or users[0].input[position] != name:
            break
        steps.append(users[0])
        name = users[0].output[0]
    return tuple(steps)


def _beyond_before(bn: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, ...]:
    """The affine (and transparent) steps before the BN, in data-flow order, each output read by the
    next node only."""
    steps, name, reader = [], bn.input[0], bn
    while len(steps) < len(index.graph.node):
        node = index.producer.get(name)
        readers = index.value_readers(name)
        if node is None or node.output[0] != name or index.is_output(name) or len(readers) != 1 \
                or readers[0] is not reader:
            break
        position = data_position(node, index, beyond=True)
        if position is None:
            break
        steps.append(node)
        name, reader = node.input[position], node
    return tuple(reversed(steps))


# -------------------------------------------------------------------------------------- channels
@dataclass(frozen=True)
class Channels:
    """The BN channel each element of a tensor carries: `labels[i]` for index i along `axis`, or, when
    `axis` is None, `labels[(flat // inner) % len(labels)]` for row-major position `flat`."""
    labels: np.ndarray
    axis: int | None = 1
    inner: int = 1


def _known(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def shape_of(index: GraphIndex, name: str, what: str) -> list:
    """The dims of tensor `name` (int, or None where unknown), or a rank-unknown refusal."""
    tensor_type = index.tensor_type(name)
    if tensor_type is None or tensor_type.shape is None:
        raise Refusal(RANK_UNKNOWN, f"the rank of {what} {name} is unknown")
    return [d if _known(d) else None for d in tensor_type.shape]


def _product_after(shape: list, axis: int, what: str) -> int:
    after = shape[axis + 1:]
    if not all(_known(d) for d in after):
        raise Refusal(SHAPE_UNKNOWN, f"{what} has shape {_text(shape)}: the sizes after axis {axis} are unknown")
    return int(np.prod(after, dtype=np.int64))


def _text(shape: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def flat_form(channels: Channels, shape: list, what: str) -> Channels:
    """`channels` by row-major position (what a reshape keeps)."""
    if len(channels.labels) == 1:
        return Channels(channels.labels, None, 1)
    if channels.axis is None:
        return channels
    return Channels(channels.labels, None, _product_after(shape, channels.axis, what))


def channels_along(channels: Channels, shape: list, axis: int, what: str) -> np.ndarray:
    """The BN channel of each index along `axis` of a tensor of `shape`, or a channel-axis-mismatch
    refusal when an index carries more than one channel (see the module docstring)."""
    if channels.axis == axis:
        return channels.labels
    if len(channels.labels) == 1:  # one channel: every element carries it, along any axis
        if shape[axis] is None:
            raise Refusal(SHAPE_UNKNOWN, f"{what} has shape {_text(shape)}: the size of axis {axis} is unknown")
        return np.repeat(channels.labels, shape[axis])
    if channels.axis is not None:
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"the BN's channels lie along axis {channels.axis} of {what}, "
                                             f"not axis {axis}")
    flat = channels
    size, after = shape[axis], _product_after(shape, axis, what)
    if size is None:
        raise Refusal(SHAPE_UNKNOWN, f"{what} has shape {_text(shape)}: the size of axis {axis} is unknown")
    count = len(flat.labels)
    if flat.inner % after or (size * after) % (flat.inner * count):
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"axis {axis} of {what} (shape {_text(shape)}) does not carry "
                                             f"one of the BN's {count} channels per index")
    return flat.labels[(np.arange(size, dtype=np.int64) * after // flat.inner) % count]


def through_shape_op(node: onnx.NodeProto, channels: Channels, index: GraphIndex, upstream: bool) -> Channels:
    """`channels` of the tensor on the BN's side of `node`, carried to its other side (`upstream`: from
    its output to its input)."""
    near = node.output[0] if upstream else node.input[0]
    shape = shape_of(index, near, f"{node.op_type} {node.name!r} {'output' if upstream else 'input'}")
    what = f"{node.op_type} {node.name!r}"
    if node.op_type in RESHAPE_OPS:
        return flat_form(channels, shape, what)
    perm = list(attribute(node, "perm", list(reversed(range(len(shape))))))
    if sorted(perm) != list(range(len(shape))):
        raise Refusal(MALFORMED_NEIGHBOUR, f"{what} perm {perm} is not a permutation of {len(shape)} axes")
    if channels.axis is None and len(channels.labels) == 1:
        return channels  # one channel everywhere, whatever the order
    axis, labels = _some_axis(channels, shape, what)
    far_axis = perm[axis] if upstream else perm.index(axis)
    return Channels(labels, far_axis)


def _some_axis(channels: Channels, shape: list, what: str) -> tuple[int, np.ndarray]:
    """An axis along which each index carries one BN channel (the first such), and its labels."""
    if channels.axis is not None:
        return channels.axis, channels.labels
    refusals = []  # a tensor of rank 0 holds one element: one channel, never this case
    for axis in range(len(shape)):
        try:
            return axis, channels_along(channels, shape, axis, what)
        except Refusal as refusal:
            refusals.append(refusal)
    raise refusals[0]


# ------------------------------------------------------------------------------ affine constants
def per_channel(node: onnx.NodeProto, position: int, channels: Channels, index: GraphIndex,
                count: int) -> np.ndarray:
    """The constant operand of affine step `node` as one float64 value per BN channel, or a refusal:
    not-per-channel when it varies along another axis or would broadcast the path tensor to a larger
    shape, affine-constant-invalid when it is not finite (or a divisor is 0)."""
    what = f"{node.op_type} {node.name!r}"
    value = np.asarray(index.constants.value(node.input[1 - position]), dtype=np.float64)
    if not np.isfinite(value).all() or (node.op_type == "Div" and (value == 0).any()):
        raise Refusal(AFFINE_CONSTANT_INVALID, f"{what} constant is not finite or divides by 0")
    shape = shape_of(index, node.input[position], f"{what} input")
    value = _aligned(node, value, position, len(shape), index)
    varying = [axis for axis, n in enumerate(value.shape) if n != 1]
    if not varying:
        return np.full(count, value.reshape(-1)[0])
    if len(varying) > 1:
        raise Refusal(NOT_PER_CHANNEL, f"{what} constant of shape {list(value.shape)} varies along axes {varying}")
    axis = varying[0]
    try:
        labels = channels_along(channels, shape, axis, f"{what} input")
    except Refusal as refusal:
        if refusal.reason != CHANNEL_AXIS_MISMATCH:
            raise
        raise Refusal(NOT_PER_CHANNEL, f"{what} constant varies along axis {axis}: {refusal.detail}") from None
    if len(labels) != value.shape[axis]:
        raise Refusal(NOT_PER_CHANNEL, f"{what} constant of shape {list(value.shape)} broadcasts axis {axis} "
                                       f"of its input (size {len(labels)})")
    return _by_channel(value.reshape(-1), labels, count, f"{what} constant")


def _aligned(node: onnx.NodeProto, value: np.ndarray, position: int, rank: int, index: GraphIndex) -> np.ndarray:
    """`value` with 1s inserted so that it has the path tensor's rank, aligned as the operator
    broadcasts: from the right; before opset 7 only the second operand broadcasts, from the `axis`
    attribute when broadcast=1, and not at all when broadcast=0 (the shapes must then match)."""
    start = rank - value.ndim
    if index.context.bn_opset < 7:
        if position == 1 or not attribute(node, "broadcast", 0):
            start = 0 if value.ndim == rank else -1
        else:
            start = int(attribute(node, "axis", start))
            start = start + rank if start < 0 else start
    if start < 0 or start + value.ndim > rank:
        raise Refusal(NOT_PER_CHANNEL, f"{node.op_type} {node.name!r} constant of shape {list(value.shape)} "
                                       f"does not broadcast onto a rank-{rank} input without growing it")
    return value.reshape((1,) * start + value.shape + (1,) * (rank - start - value.ndim))


def _by_channel(values: np.ndarray, labels: np.ndarray, count: int, what: str) -> np.ndarray:
    """values[i] as a per-channel vector (labels[i] is i's channel), if each channel has one value."""
    out = np.full(count, np.nan)
    out[labels] = values
    if np.isnan(out).any() or (out[labels] != values).any():
        raise Refusal(NOT_PER_CHANNEL, f"{what} takes different values within one BN channel")
    return out


# ------------------------------------------------------------------------------------ composition
@dataclass
class Affine:
    """scale * x + shift per BN channel, composed step by step in data-flow order."""
    scale: np.ndarray
    shift: np.ndarray

    def then(self, node: onnx.NodeProto, position: int, values: np.ndarray) -> None:
        """Compose the affine step `node` (path operand at `position`, constant `values`) after this map."""
        if node.op_type == "Add":
            self.shift = self.shift + values
        elif node.op_type == "Sub" and position == 0:
            self.shift = self.shift - values
        elif node.op_type == "Sub":
            self.scale, self.shift = -self.scale, values - self.shift
        elif node.op_type == "Mul":
            self.scale, self.shift = self.scale * values, self.shift * values
        else:  # Div, x / c
            self.scale, self.shift = self.scale / values, self.shift / values

    def then_bn(self, scale: np.ndarray, shift: np.ndarray) -> None:
        self.scale, self.shift = scale * self.scale, scale * self.shift + shift


@dataclass
class PathFold:
    """What a path folds to: per index of the linear op's channel axis, scale and shift; and the
    beyond steps that fold with it."""
    scale: np.ndarray
    shift: np.ndarray
    beyond: tuple[onnx.NodeProto, ...]


def fold_path(match: Match, index: GraphIndex, near: str, axis: int | None, count: int, what: str) -> PathFold:
    """Compose the affine map of `match` (its links checked by :func:`check_links` first), as seen along
    `axis` (None: the last) of tensor `near` (the linear op's output, or its data input), which has
    `count` channels."""
    producer_side = match.before
    bn_scale, bn_shift = bn_affine(match.bn, index, None)
    channels_count = len(bn_scale)
    state = Channels(np.arange(channels_count))
    steps = list(reversed(match.chain)) if producer_side else list(match.chain)
    values = {}
    for node in steps:  # from the BN towards the linear op
        if node.op_type in SHAPE_OPS:
            state = through_shape_op(node, state, index, upstream=producer_side)
        elif node.op_type not in TRANSPARENT_OPS:
            values[id(node)] = _step_values(node, state, index, channels_count)
    labels = _labels_at(state, index, near, axis, count, f"{what} {'output' if producer_side else 'input'}")
    beyond = _foldable_beyond(match, index, channels_count, values)
    affine = Affine(np.ones(channels_count), np.zeros(channels_count))
    middle = [n for n in match.chain if id(n) in values]
    ordered = (middle + [match.bn] + list(beyond)) if producer_side else (list(beyond) + [match.bn] + middle)
    for node in ordered:
        if node is match.bn:
            affine.then_bn(bn_scale, bn_shift)
        elif node.op_type == "BatchNormalization":
            affine.then_bn(*values[id(node)])
        elif id(node) in values:
            affine.then(node, data_position(node, index), values[id(node)])
    return PathFold(affine.scale[labels], affine.shift[labels], beyond)


def check_links(match: Match, index: GraphIndex, what: str) -> None:
    """Every transparent step is an identity, and every tensor from the linear op to the BN is read by
    the next node only and is not a graph output (the fold changes or removes it)."""
    for node in match.chain:
        if node.op_type in QUANTIZE_OPS:
            raise Refusal(ACTIVATION_QUANTIZED, f"{node.op_type} {node.name!r} lies between the BN and its "
                                                "linear op: folding would move the quantization grid")
        if node.op_type in TRANSPARENT_OPS:
            refusal = transparency_refusal(node, index)
            if refusal is not None:
                raise refusal
    start = match.bias_add or match.neighbour
    path = [start, *match.chain, match.bn] if match.before else [match.bn, *match.chain, match.neighbour]
    if match.before and match.bias_add is not None:
        require_exclusive(index, match.neighbour.output[0], match.bias_add, match.neighbour.op_type)
    for writer, reader in zip(path, path[1:]):
        label = {id(match.neighbour): what, id(match.bias_add): "Add", id(match.bn): "BN"}.get(
            id(writer), f"{writer.op_type} {writer.name!r}")
        require_exclusive(index, writer.output[0], reader, label)


def _step_values(node: onnx.NodeProto, state: Channels, index: GraphIndex, count: int):
    """An affine step's constant per BN channel; for another BN, its (scale, shift) per BN channel."""
    if node.op_type != "BatchNormalization":
        return per_channel(node, data_position(node, index), state, index, count)
    try:
        scale, shift = bn_affine(node, index, None)
    except Refusal as refusal:
        raise Refusal(refusal.reason, f"BN {node.name!r} on the path: {refusal.detail}") from None
    labels = state.labels if state.axis == 1 else \
        channels_along(state, shape_of(index, node.input[0], f"BN {node.name!r} input"), 1, f"BN {node.name!r} input")
    if len(labels) != len(scale):
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"BN {node.name!r} has {len(scale)} channels, its input {len(labels)}")
    what = f"BN {node.name!r}"
    return _by_channel(scale, labels, count, what), _by_channel(shift, labels, count, what)


def _labels_at(state: Channels, index: GraphIndex, near: str, axis: int | None, count: int, what: str) -> np.ndarray:
    """The BN channel of each of the linear op's `count` channels (axis `axis`, None: the last, of
    tensor `near`, its `what`). With no shape op on the path no size is needed."""
    def axis_mismatch(axis: int) -> Refusal:
        return Refusal(CHANNEL_AXIS_MISMATCH, f"the BN's channels are axis {state.axis} of {what} {near}, "
                                              f"the channels it folds into are axis {axis}")
    if state.axis is not None and axis is not None and state.axis != axis:
        raise axis_mismatch(axis)
    if state.axis is not None and len(state.labels) != count:
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"BN has {len(state.labels)} channels, the neighbour {count}")
    if axis is None or state.axis is None:
        shape = shape_of(index, near, what)
        axis = len(shape) - 1 if axis is None else axis
    if state.axis is not None:
        if state.axis != axis:
            raise axis_mismatch(axis)
        return state.labels
    if not 0 <= axis < len(shape) or shape[axis] not in (None, count):
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"{what} {near} has shape {_text(shape)}, not {count} channels "
                                             f"on axis {axis}")
    shape[axis] = count
    return channels_along(state, shape, axis, f"{what} {near}")


def _foldable_beyond(match: Match, index: GraphIndex, count: int, values: dict) -> tuple[onnx.NodeProto, ...]:
    """The longest run of the match's beyond steps, from the BN outwards, that fold exactly (an affine
    step with a per-channel constant, an identity), without trailing transparent nodes."""
    outward = list(match.beyond) if match.before else list(reversed(match.beyond))
    taken = []
    for node in outward:
        try:
            if node.op_type in TRANSPARENT_OPS:
                refusal = transparency_refusal(node, index)
                if refusal is not None:
                    raise refusal
            else:
                values[id(node)] = _step_values(node, Channels(np.arange(count)), index, count)
        except (Refusal, NotConstant):
            break
        taken.append(node)
    while taken and taken[-1].op_type in TRANSPARENT_OPS:
        taken.pop()
    return tuple(taken) if match.before else tuple(reversed(taken))


# ------------------------------------------------------------------------------------- rewriting
def removed_steps(match: Match, beyond: tuple[onnx.NodeProto, ...]) -> list[onnx.NodeProto]:
    """The nodes a fold removes besides the BN: every step but the shape ops, and `beyond`."""
    return [n for n in match.chain if n.op_type not in SHAPE_OPS] + list(beyond)


def splice(index: GraphIndex, match: Match, beyond: tuple[onnx.NodeProto, ...], bias_add=None) -> None:
    """Remove the BN and every step of the fold but the shape ops, which stay in order between the
    linear op (and `bias_add`, which reads its output) and the rest of the graph: each kept node reads
    the previous one, and on the producer side the last kept node writes the name the BN (or the last
    of `beyond`) wrote, so every reader outside the fold is unchanged."""
    if match.before:
        sequence = [match.neighbour, *([bias_add] if bias_add is not None else []), *match.chain, match.bn, *beyond]
    else:
        sequence = [*beyond, match.bn, *match.chain, match.neighbour]
    keep = {id(match.neighbour), id(bias_add)} | {id(n) for n in match.chain if n.op_type in SHAPE_OPS}
    kept = [n for n in sequence if id(n) in keep]
    first = sequence[0]
    running = None if id(first) in keep else first.input[0 if first is match.bn else data_position(first, index)]
    final = sequence[-1].output[0] if id(sequence[-1]) not in keep else None
    if final is not None:  # the last kept node takes over the name the removed tail wrote
        index.redirect_metadata_readers(kept[-1].output[0], final)
    for node in sequence:
        if id(node) not in keep:
            index.redirect_metadata_readers(node.output[0], running)
            index.remove_node(node)
            continue
        if running is not None and node is not bias_add and node.input[0] != running:
            index.set_input(node, 0, running)
        running = final if node is kept[-1] and final is not None else node.output[0]
    if final is not None:
        index.set_output(kept[-1], 0, final)
