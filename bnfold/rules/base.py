"""What every fold rule shares: the rule protocol, refusals with reason codes, and BN parameters.

A rule has three separate steps. ``match`` finds the neighbouring op (structure only). ``check`` tests
every condition under which the fold is exact and computes the new weights without touching the graph:
it returns a :class:`Plan`, or raises :class:`Refusal` with the first reason that fails. ``rewrite``
applies a plan to the graph. ``inspect`` and ``--dry-run`` stop after ``check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx

from ..graph import GraphIndex, NotConstant
from ..math import bn_scale_shift

FOLDABLE_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}


class Refusal(Exception):
    """A fold that must not happen: `reason` is a stable reason code, `detail` says why in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Match:
    """A BatchNormalization and the linear op it would fold into (plus an Add for MatMul + bias)."""
    bn: onnx.NodeProto
    neighbour: onnx.NodeProto
    bias_add: onnx.NodeProto | None = None


@dataclass
class Plan:
    """The new values a rewrite writes: input index of the neighbour -> folded array, plus extras."""
    arrays: dict[int, np.ndarray]
    attributes: dict[str, float] = field(default_factory=dict)
    bias: np.ndarray | None = None  # for MatMul: the value of the (new or updated) Add


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


# ------------------------------------------------------------------------------------ BN helpers
def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def bn_mode_refusal(bn: onnx.NodeProto, index: GraphIndex) -> Refusal | None:
    """Why a BN computes with batch statistics or exposes values a fold would lose, per its opset."""
    opset = index.context.bn_opset
    extra = [name for name in bn.output[1:] if name]
    if opset < 7 and attribute(bn, "is_test", 0) == 0:
        return Refusal("training-mode", f"is_test=0 (opset {opset}): normalizes with batch statistics")
    if opset >= 14 and attribute(bn, "training_mode", 0) != 0:
        return Refusal("training-mode", "training_mode=1: normalizes with batch statistics")
    used = [name for name in extra if index.users(name) or index.is_output(name)]
    if used:
        return Refusal("bn-extra-outputs-used", f"output(s) {', '.join(used)} are read by the graph")
    if extra and 7 <= opset < 14:
        return Refusal("training-mode", f"declares training outputs ({', '.join(extra)}) at opset {opset}, "
                                        "which makes runtimes normalize with batch statistics")
    return None


def constant(index: GraphIndex, name: str, what: str) -> np.ndarray:
    """A constant input's value, or a refusal saying why it is not one."""
    if not name:
        raise Refusal("weights-not-constant", f"{what} is missing")
    try:
        return index.constant(name)
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
        raise Refusal("channel-axis-mismatch", f"BN parameters have different lengths {sorted(counts)}")
    count = counts.pop()
    if channels is not None and count != channels:
        raise Refusal("channel-axis-mismatch", f"BN has {count} channels, the neighbour {channels}")
    eps = float(attribute(bn, "epsilon", 1e-5))
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    if not all(np.isfinite(v).all() for v in (gamma, beta, mean, var)):
        raise Refusal("invalid-statistics", "a BN parameter is not finite")
    if (var + eps <= 0).any():
        raise Refusal("invalid-statistics", f"var + epsilon <= 0 in {int((var + eps <= 0).sum())} channel(s)")
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        raise Refusal("dtype-overflow", "the BN's scale or shift overflows float64")
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
        raise Refusal("non-spatial-bn", f"spatial=0 and BN {name} varies within a channel")
    raise Refusal("channel-axis-mismatch", f"BN {name} has shape {list(value.shape)}, expected [C]")


def weight_dtype(values: np.ndarray, what: str) -> np.dtype:
    """The dtype folded values are cast back to (the weight's own); refuse non-float weights."""
    if values.dtype not in FOLDABLE_DTYPES.values():
        raise Refusal("dtype-unsupported", f"{what} is {values.dtype.name}, not a float type")
    return values.dtype


def cast_checked(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round float64 results once to the weight's dtype; refuse if that is not finite (an inf or NaN
    in float64 stays one after the cast, so one check on the result covers both)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values if values.dtype == dtype else values.astype(dtype)
    if np.isfinite(cast).all():
        return cast
    if values.dtype == np.float64 and not np.isfinite(values).all():
        raise Refusal("dtype-overflow", f"folded {what} are not finite in float64")
    bad = int((~np.isfinite(cast)).sum())
    raise Refusal("dtype-overflow", f"{bad} folded {what} value(s) overflow {dtype.name}")


def single_consumer(index: GraphIndex, name: str, consumer: onnx.NodeProto, what: str) -> None:
    """Refuse when another node or a graph output also reads `name` (the fold would change it)."""
    if index.is_output(name):
        raise Refusal("neighbour-output-is-graph-output", f"{what} output {name} is a graph output")
    others = [n for n in index.value_readers(name) if n is not consumer]
    if others:
        listed = ", ".join(f"{n.op_type} {n.name!r}" for n in others[:3])
        raise Refusal("neighbour-has-other-consumers", f"{what} output {name} is also read by {listed}")


def set_folded_input(index: GraphIndex, node: onnx.NodeProto, position: int, values: np.ndarray,
                     base: str) -> None:
    """Point input `position` of `node` at `values`: overwrite its initializer if only `node` reads
    it, otherwise give the node its own new initializer (never change a shared one)."""
    current = node.input[position] if position < len(node.input) else ""
    if current and index.owns_initializer(current, node):
        index.replace_initializer(current, values)
    else:
        index.set_input(node, position, index.add_initializer(values, base))
