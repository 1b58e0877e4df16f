"""What every fold rule shares: the rule protocol, refusals, BN parameters, and the graph moves.

A rule has three separate steps. ``match`` finds the linear op (structure only, through
:func:`~bnfold.rules.path.producer_of` or :func:`~bnfold.rules.path.sole_consumer_of`, which walk the
steps a BN folds across: rules/path.py). ``check`` tests every condition under which the fold is exact
and computes the new weights without touching the graph: it returns a :class:`Plan`, or raises
:class:`Refusal` with the first reason that fails. ``rewrite`` applies a plan to the graph, through
:func:`write_plan` and :func:`~bnfold.rules.path.splice`. Whether a tensor the fold changes is read by
anything else is checked in one place, :func:`require_exclusive`. ``inspect`` and ``--dry-run`` stop
after ``check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..batchnorm import attribute, declared_extra_outputs, training_mode_refusal
from ..constants import NotConstant
from ..dtypes import numpy_dtype
from ..graph import GraphIndex
from ..math import bn_scale_shift
from ..reasons import (BN_EXTRA_OUTPUTS_USED, CHANNEL_AXIS_MISMATCH, DTYPE_OVERFLOW, DTYPE_UNSUPPORTED,
                       INVALID_STATISTICS, MALFORMED_NEIGHBOUR, NEIGHBOUR_HAS_OTHER_CONSUMERS,
                       NEIGHBOUR_OUTPUT_IS_GRAPH_OUTPUT, NON_SPATIAL_BN, RANK_UNKNOWN, RANK_UNSUPPORTED,
                       WEIGHTS_NOT_CONSTANT)

FOLDABLE_DTYPES = {t: numpy_dtype(t) for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)}

__all__ = ["FOLDABLE_DTYPES", "FoldRule", "Match", "Plan", "Refusal", "attribute", "bn_affine",
           "bn_mode_refusal", "cast_checked", "constant", "conv_operands", "known_rank", "optional_constant",
           "require_exclusive", "set_attribute", "set_folded_input", "weight_dtype", "write_plan", "bias_name"]


class Refusal(Exception):
    """A fold that must not happen: `reason` is a stable reason code, `detail` says why in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Match:
    """A BatchNormalization and the linear op it would fold into (plus an Add for MatMul + bias): the
    steps between them (`chain`, data-flow order), the affine steps on the BN's far side (`beyond`,
    data-flow order), and whether the linear op comes `before` the BN."""
    bn: onnx.NodeProto
    neighbour: onnx.NodeProto
    bias_add: onnx.NodeProto | None = None
    chain: tuple[onnx.NodeProto, ...] = ()
    beyond: tuple[onnx.NodeProto, ...] = ()
    before: bool = True


@dataclass
class Plan:
    """The new values a rewrite writes: input position of the neighbour -> folded array, plus extras."""
    arrays: dict[int, np.ndarray]
    attributes: dict[str, float] = field(default_factory=dict)
    bias: np.ndarray | None = None  # for MatMul: the value of the (new or updated) Add
    beyond: tuple[onnx.NodeProto, ...] = ()  # the match's beyond steps that fold too
    merge_bias: bool = False  # BN -> MatMul: `bias` replaces the constant of the MatMul's bias Add
    quantized: tuple = ()  # (rules.quantized.QuantizedInputs, axis): new DequantizeLinear operands
    note: str = ""  # what the decision's detail adds to the rule's summary


class FoldRule:
    """Base of every rule; subclasses define name, summary (what a fold does), match, check, rewrite."""
    name = "rule"
    summary = ""

    def match(self, bn: onnx.NodeProto, index: GraphIndex) -> Match | None:
        raise NotImplementedError

    def check(self, match: Match, index: GraphIndex) -> Plan:
        raise NotImplementedError

    def rewrite(self, match: Match, plan: Plan, index: GraphIndex) -> None:
        raise NotImplementedError


# -------------------------------------------------------------------------------------- exclusivity
def require_exclusive(index: GraphIndex, name: str, reader: onnx.NodeProto, what: str) -> None:
    """Refuse unless `reader` is the only node reading the values of `name` and `name` is not a graph
    output: a fold changes `name`'s values (or removes it), which any other reader would see."""
    if index.is_output(name):
        raise Refusal(NEIGHBOUR_OUTPUT_IS_GRAPH_OUTPUT, f"{what} output {name} is a graph output")
    others = [n for n in index.value_readers(name) if n is not reader]
    if others:
        listed = ", ".join(f"{n.op_type} {n.name!r}" for n in others[:3])
        raise Refusal(NEIGHBOUR_HAS_OTHER_CONSUMERS, f"{what} output {name} is also read by {listed}")


def known_rank(index: GraphIndex, name: str, what: str) -> int:
    """The rank of tensor `name` (declared or inferred), or a rank-unknown refusal."""
    tensor_type = index.tensor_type(name)
    if tensor_type is None or tensor_type.shape is None:
        raise Refusal(RANK_UNKNOWN, f"the rank of {what} {name} is unknown")
    return len(tensor_type.shape)


# ------------------------------------------------------------------------------------ BN parameters
def bn_mode_refusal(bn: onnx.NodeProto, index: GraphIndex) -> Refusal | None:
    """Why a BN computes with batch statistics or exposes values a fold would lose, per its opset."""
    opset = index.context.bn_opset
    training = training_mode_refusal(bn, opset)
    if training is not None and not 7 <= opset < 14:
        return Refusal(*training)
    used = [name for name in declared_extra_outputs(bn) if index.users(name) or index.is_output(name)]
    if used:
        return Refusal(BN_EXTRA_OUTPUTS_USED, f"output(s) {', '.join(used)} are read by the graph")
    return Refusal(*training) if training is not None else None


def constant(index: GraphIndex, name: str, what: str) -> np.ndarray:
    """A constant input's value, or a refusal saying why it is not one."""
    if not name:
        raise Refusal(WEIGHTS_NOT_CONSTANT, f"{what} is missing")
    try:
        return index.constants.value(name)
    except NotConstant as exc:
        raise Refusal(exc.reason, f"{what}: {exc.detail}") from None


def optional_constant(index: GraphIndex, node: onnx.NodeProto, position: int, what: str) -> np.ndarray | None:
    """The value of an optional input (a bias, Gemm's C), or None when the node omits it."""
    if len(node.input) <= position or not node.input[position]:
        return None
    return constant(index, node.input[position], what)


def bn_affine(bn: onnx.NodeProto, index: GraphIndex, channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The BN's per-channel (scale, shift) in float64, after checking statistics and channel count."""
    names = ("scale", "B", "mean", "var")
    values = [constant(index, bn.input[i + 1], f"BN {name}") for i, name in enumerate(names)]
    values = [_per_channel(v, name, bn, index) for v, name in zip(values, names)]
    counts = {v.shape[0] for v in values}
    if len(counts) != 1:
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"BN parameters have different lengths {sorted(counts)}")
    count = counts.pop()
    if channels is not None and count != channels:
        raise Refusal(CHANNEL_AXIS_MISMATCH, f"BN has {count} channels, the neighbour {channels}")
    eps = float(attribute(bn, "epsilon", 1e-5))
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    if not all(np.isfinite(v).all() for v in (gamma, beta, mean, var)):
        raise Refusal(INVALID_STATISTICS, "a BN parameter is not finite")
    if (var + eps <= 0).any():
        raise Refusal(INVALID_STATISTICS, f"var + epsilon <= 0 in {int((var + eps <= 0).sum())} channel(s)")
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        raise Refusal(DTYPE_OVERFLOW, "the BN's scale or shift overflows float64")
    return scale, shift


def _per_channel(value: np.ndarray, name: str, bn: onnx.NodeProto, index: GraphIndex) -> np.ndarray:
    """BN parameters as 1-D per-channel vectors; spatial=0 (opset < 9) only if constant per channel."""
    spatial = attribute(bn, "spatial", 1) if index.context.bn_opset < 9 else 1
    if value.ndim == 1:
        return value
    if spatial == 0 and value.ndim > 1:
        rows = value.reshape(value.shape[0], -1)
        if (rows == rows[:, :1]).all():
            return rows[:, 0]
        raise Refusal(NON_SPATIAL_BN, f"spatial=0 and BN {name} varies within a channel")
    raise Refusal(CHANNEL_AXIS_MISMATCH, f"BN {name} has shape {list(value.shape)}, expected [C]")


# ------------------------------------------------------------------------------------------ dtypes
def conv_operands(index: GraphIndex, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None, int]:
    """A Conv's or ConvTranspose's (weight, bias, group), refused unless they fit as the operator
    defines them: weight [M, C/g, k...] (ConvTranspose [C, M/g, k...]), group >= 1 dividing the
    weight's axis 0, bias [M]. The checker does not always see a malformed one (shapes unknown)."""
    what = conv.op_type
    weight = constant(index, conv.input[1], f"{what} weight")
    bias = optional_constant(index, conv, 2, f"{what} bias")
    if weight.ndim < 3:
        raise Refusal(RANK_UNSUPPORTED, f"{what} weight has rank {weight.ndim}, expected >= 3")
    groups = int(attribute(conv, "group", 1))
    if groups < 1 or weight.shape[0] % groups:
        raise Refusal(MALFORMED_NEIGHBOUR, f"{what} group={groups} does not divide its weight's "
                                           f"{weight.shape[0]} {'input' if what == 'ConvTranspose' else 'output'} channels")
    outputs = weight.shape[1] * groups if what == "ConvTranspose" else weight.shape[0]
    if bias is not None and bias.shape != (outputs,):
        raise Refusal(MALFORMED_NEIGHBOUR, f"{what} bias has shape {list(bias.shape)}, not [{outputs}]")
    return weight, bias, groups


def weight_dtype(values: np.ndarray, what: str) -> np.dtype:
    """The dtype folded values are cast back to (the weight's own); refuse non-float weights."""
    if values.dtype not in FOLDABLE_DTYPES.values():
        raise Refusal(DTYPE_UNSUPPORTED, f"{what} is {values.dtype.name}, not a float type")
    return values.dtype


def cast_checked(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round float64 results once to the weight's dtype; refuse if that is not finite (an inf or NaN
    in float64 stays one after the cast, so one check on the result covers both)."""
    with np.errstate(over="ignore"):
        cast = values if values.dtype == dtype else values.astype(dtype)
    if np.isfinite(cast).all():
        return cast
    if values.dtype == np.float64 and not np.isfinite(values).all():
        raise Refusal(DTYPE_OVERFLOW, f"folded {what} are not finite in float64")
    bad = int((~np.isfinite(cast)).sum())
    raise Refusal(DTYPE_OVERFLOW, f"{bad} folded {what} value(s) overflow {dtype.name}")


# -------------------------------------------------------------------------------------- rewriting
def write_plan(index: GraphIndex, node: onnx.NodeProto, plan: Plan) -> None:
    """Point each input position of `node` in `plan.arrays` at its folded values (a bias it lacked
    is created: set_folded_input) and set the plan's attributes. The bias goes first: one it creates is
    named after the weight, which must not be renamed (copied) yet."""
    for position in sorted(plan.arrays, reverse=True):
        set_folded_input(index, node, position, plan.arrays[position])
    for name, value in plan.attributes.items():
        set_attribute(node, name, value)


def set_folded_input(index: GraphIndex, node: onnx.NodeProto, position: int, values: np.ndarray) -> None:
    """Point input `position` of `node` at `values`. An initializer only `node` reads is overwritten
    and keeps its name (`conv1.weight` still maps to the training code's `conv1.weight`); any other
    input is never changed: the node gets a new initializer. A copy of a shared one is named after it,
    `{name}_bnfold`; a bias `node` lacked or computed (dynamo's zero bias) is named after the weight
    (bias_name); any other computed input `{name}_bnfold`."""
    current = node.input[position] if position < len(node.input) else ""
    if current and index.owns_initializer(current, node, values):
        index.replace_initializer(current, values)
        return
    is_bias = position == 2 and node.op_type in ("Conv", "ConvTranspose", "Gemm")
    name = bias_name(node) if is_bias and current not in index.initializers else f"{current}_bnfold"
    index.set_input(node, position, index.add_initializer(values, name))


def bias_name(node: onnx.NodeProto) -> str:
    """The name of a bias a fold creates for `node`, derived from its weight (input 1) as training
    code names them: `conv1.weight` -> `conv1.bias`, any other `W` -> `W_bias` (fresh_name adds `_2`,
    `_3`, ... if the name is taken)."""
    weight = node.input[1]
    return f"{weight[:-len('weight')]}bias" if weight.endswith("weight") else f"{weight}_bias"


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or add) attribute `name` of `node` (its type from `value`: a float, an int, ...)."""
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(onnx.helper.make_attribute(name, value))
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
