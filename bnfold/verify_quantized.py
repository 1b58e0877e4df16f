"""Equivalence of quantized models layer by layer: every QuantizeLinear fed the original's codes.

One int8 code that flips at a rounding boundary early in a quantized network moves everything after
it, so the final outputs cannot judge a fold. Instead the candidate is cut at every QuantizeLinear
output: each cut becomes a graph input fed with the codes the original computes there, so the input of
every quantizer is computed from the original's upstream codes and only the layer in between can make
it differ; differences never accumulate. Quantizers are matched by the name of their codes tensor,
which a fold never renames.

Per quantizer the input is compared in code units, ``x / scale + zero_point`` with each model's own
scale (a weight quantizer rescaled together with its weights compares equal), clipped to the code range
(beyond it every value saturates alike): the largest difference in quantization steps, and the codes
that differ ("flipped"). A quantizer passes when its input moves by at most ``max_steps`` and at most a
``max_flipped`` fraction of its codes flip: a correct fold moves inputs by float rounding only, which
flips a code now and then where a value sits on a rounding boundary. The graph outputs of the cut
candidate (the layers after the last quantizer, computed from the original's codes) are compared with
the original's under the usual tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from .compare import Comparison, Tolerance, compare_outputs, json_number
from .dtypes import onnx_type
from .errors import BnfoldError
from .inputs import Sample, dtype_name
from .runtime import create_session

DEFAULT_MAX_STEPS = 0.5  # under half a step, a code can move by one step at most
DEFAULT_MAX_FLIPPED = 0.01  # share of a quantizer's codes that may flip
_QUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")
_OWN = "/bnfold-own-codes"  # the cut candidate's quantizers write their own codes under name + this


@dataclass(frozen=True)
class Limits:
    """When a quantizer passes: its input moves by at most `max_steps` quantization steps and at most
    a `max_flipped` share of its codes differ, one code at least unless `max_flipped` is 0 (a single
    code flipped at a rounding boundary is harmless even in a 64-code classifier input)."""

    max_steps: float = DEFAULT_MAX_STEPS
    max_flipped: float = DEFAULT_MAX_FLIPPED

    def allowed_flips(self, elements: int) -> float:
        return max(1.0, self.max_flipped * elements) if self.max_flipped else 0.0


def check_limits(quantized: bool, max_steps: float | None, max_flipped: float | None,
                 bisect: bool) -> Limits:
    """The limits of the layer-by-layer check; refuse those given without it and values out of range."""
    if not quantized:
        for option, value in (("max_steps", max_steps), ("max_flipped", max_flipped)):
            if value is not None:
                raise BnfoldError("applies only to the layer-by-layer check of quantized models",
                                  option=option)
        return Limits()
    if bisect:
        raise BnfoldError("does not apply to the layer-by-layer check of quantized models: it names "
                          "every quantizer that differs", option="bisect")
    if max_steps is not None and not (math.isfinite(max_steps) and max_steps >= 0):
        raise BnfoldError(f"must be a finite number >= 0, got {max_steps}", option="max_steps")
    if max_flipped is not None and not 0 <= max_flipped <= 1:
        raise BnfoldError(f"must be a share between 0 and 1, got {max_flipped}", option="max_flipped")
    return Limits(DEFAULT_MAX_STEPS if max_steps is None else max_steps,
                  DEFAULT_MAX_FLIPPED if max_flipped is None else max_flipped)


# ---------------------------------------------------------------------------------------- quantizers
@dataclass(frozen=True)
class Quantizer:
    """One QuantizeLinear of a main graph: its tensors, how its scale broadcasts, its code type."""

    node: str
    codes: str
    input: str
    scale: str
    zero_point: str | None
    axis: int
    block_size: int
    code_type: int | None  # ONNX element type of the codes, when the graph states it


def quantizers(model: onnx.ModelProto) -> dict[str, Quantizer]:
    """The QuantizeLinear nodes of the main graph, by codes name, in node order."""
    types = _declared_types(model)
    found = {}
    for node in model.graph.node:
        if (node.op_type != "QuantizeLinear" or node.domain not in _QUANTIZE_DOMAINS
                or len(node.input) < 2 or not node.output or not node.output[0]):  # onnxruntime names the malformed
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        code_type = attrs.get("output_dtype") or (types.get(zero_point) if zero_point
                                                  else onnx.TensorProto.UINT8)
        found[node.output[0]] = Quantizer(node.name, node.output[0], node.input[0], node.input[1],
                                          zero_point, attrs.get("axis", 1), attrs.get("block_size", 0),
                                          code_type)
    return found


def require_quantizers(model: onnx.ModelProto, label: str) -> None:
    """Refuse a model without quantizers: there is nothing to compare layer by layer."""
    if not quantizers(model):
        raise BnfoldError(f"{label}: the model has no QuantizeLinear node, so there is nothing to "
                          "compare layer by layer")


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types the graph states: initializers, Constant nodes, inputs, outputs, value_info."""
    graph = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.output, *graph.value_info]
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    types.update((t.name, t.data_type) for t in graph.initializer)
    types.update((node.output[0], attr.t.data_type) for node in graph.node if node.op_type == "Constant"
                 for attr in node.attribute if attr.name == "value")
    return types


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class QuantizerComparison:
    """One quantizer on one sample: how far its input moved and how many codes flipped."""

    codes: str
    node: str
    limits: Limits
    problem: str | None = None  # missing in one model, or code types or shapes differ
    dtype: str | None = None
    granularity: str | None = None  # "tensor", "axis 0", "blocks of 32 on axis 1"
    elements: int = 0
    max_steps: float | None = None  # over finite elements
    flipped: int = 0
    max_code_change: int = 0
    nonfinite: int = 0  # elements NaN or Inf in either model's input

    @property
    def passed(self) -> bool:
        return (self.problem is None and self.nonfinite == 0 and self.max_steps <= self.limits.max_steps
                and self.flipped <= self.limits.allowed_flips(self.elements))

    def __bool__(self) -> bool:
        return self.passed

    @property
    def flipped_fraction(self) -> float:
        return self.flipped / self.elements if self.elements else 0.0

    def reason(self) -> str:
        """One phrase saying why it fails; empty when it passes."""
        if self.problem:
            return self.problem
        parts = []
        if self.nonfinite:
            parts.append(f"{self.nonfinite} NaN/Inf input element(s)")
        if self.max_steps > self.limits.max_steps:
            parts.append(f"input moved by up to {self.max_steps:.3g} quantization steps (limit "
                         f"{self.limits.max_steps:g})")
        if self.flipped > self.limits.allowed_flips(self.elements):
            parts.append(f"{self.flipped} of {self.elements} codes flipped ({self.flipped_fraction:.2%}, "
                         f"limit {self.limits.max_flipped:.2%}), by up to {self.max_code_change} step(s)")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"codes": self.codes, "node": self.node, "passed": self.passed, "problem": self.problem,
                "dtype": self.dtype, "granularity": self.granularity, "elements": self.elements,
                "max_steps": json_number(self.max_steps), "flipped_codes": self.flipped,
                "flipped_fraction": self.flipped_fraction, "max_code_change": self.max_code_change,
                "nonfinite_elements": self.nonfinite}


@dataclass(frozen=True)
class QuantizedSample:
    """Every quantizer, and every graph output computed from the original's codes, on one sample."""

    label: str
    quantizers: tuple[QuantizerComparison, ...]
    outputs: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(self.quantizers) and all(self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {"label": self.label, "passed": self.passed,
                "quantizers": [q.to_dict() for q in self.quantizers],
                "outputs": [c.to_dict() for c in self.outputs]}


@dataclass(frozen=True)
class QuantizedResult:
    """The layer-by-layer verdict: true when every quantizer and output passes on every sample."""

    limits: Limits
    samples: tuple[QuantizedSample, ...]

    @property
    def passed(self) -> bool:
        return all(self.samples)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        """One line: how many quantizers differ (the first named), the worst figures, the outputs."""
        rows = [q for s in self.samples for q in s.quantizers]
        names = list(dict.fromkeys(q.codes for q in rows))
        failing = [q for q in rows if not q]
        steps = [q.max_steps for q in rows if q.max_steps is not None]
        flipped, elements = sum(q.flipped for q in rows), sum(q.elements for q in rows)
        if failing:
            first = failing[0]
            head = (f"{len(dict.fromkeys(q.codes for q in failing))} of {len(names)} quantizer(s) differ, "
                    f"first {first.codes!r} ({first.reason()})")
        else:
            head = f"all {len(names)} quantizer(s) match"
        outputs = [c for s in self.samples for c in s.outputs]
        differ = len(dict.fromkeys(c.name for c in outputs if not c))
        tail = (f"; {differ} of {len(dict.fromkeys(c.name for c in outputs))} output(s) computed from the "
                "original's codes differ" if differ else "")
        worst = f"{max(steps):.3g}" if steps else "-"
        return (f"layer by layer: {head}; inputs moved by up to {worst} steps, {flipped} of {elements} "
                f"codes flipped over {len(self.samples)} sample(s){tail}")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "summary": self.summary(),
                "limits": {"max_steps": self.limits.max_steps, "max_flipped_fraction": self.limits.max_flipped},
                "samples": [s.to_dict() for s in self.samples]}


# -------------------------------------------------------------------------------------------- verify
def verify_quantized(reference: onnx.ModelProto, candidate: onnx.ModelProto, samples: Sequence[Sample],
                     provider: str, tolerance: Callable[[str], Tolerance], limits: Limits,
                     labels: tuple[str, str] = ("reference", "candidate")) -> QuantizedResult:
    """Compare every quantizer of `reference` with the same one of `candidate`, the candidate cut at
    every quantizer both have and fed the reference's codes there (see the module docstring)."""
    ref_q, cand_q = quantizers(reference), quantizers(candidate)
    ref_session = create_session(_exposing(reference, _tensors(ref_q.values())), provider=provider,
                                 label=labels[0])
    ref_runs = [ref_session.run(s.feeds, inputs_label=s.label) for s in samples]  # they type the cuts
    del ref_session
    problems = _structure_problems(ref_q, cand_q, ref_runs[0])
    cut = [name for name in ref_q if name in cand_q and name not in problems]
    cand_session = create_session(_cut(candidate, [cand_q[n] for n in cut], {n: ref_runs[0][n].dtype for n in cut}),
                                  provider=provider, label=f"{labels[1]} (cut at its quantizers)")
    finals = ([o.name for o in reference.graph.output if o.name not in cut],
              [o.name for o in candidate.graph.output if o.name not in cut])
    results = []
    for sample, ref_out in zip(samples, ref_runs):
        cand_out = cand_session.run({**sample.feeds, **{n: ref_out[n] for n in cut}}, inputs_label=sample.label)
        rows = [QuantizerComparison(n, q.node, limits, problem=problems[n]) if n in problems
                else _compare(q, cand_q[n], ref_out, cand_out, limits) for n, q in ref_q.items()]
        rows += [QuantizerComparison(n, q.node, limits, problem="not in the reference")
                 for n, q in cand_q.items() if n not in ref_q]
        outputs = compare_outputs({n: ref_out[n] for n in finals[0]}, {n: cand_out[n] for n in finals[1]},
                                  tolerance)
        results.append(QuantizedSample(sample.label, tuple(rows), outputs))
    return QuantizedResult(limits, tuple(results))


def _structure_problems(ref_q: dict, cand_q: dict, ref_out: dict) -> dict[str, str]:
    """Quantizers of the reference that cannot be compared: missing in the candidate, or codes of
    another type there. Integer codes only: steps of float8 codes are not uniform."""
    problems = {}
    for name in ref_q:
        dtype = ref_out[name].dtype
        if dtype.kind not in "iu":
            raise BnfoldError(f"quantizer {name!r} writes {dtype} codes: only integer codes are compared "
                              "layer by layer")
        if name not in cand_q:
            problems[name] = "missing in the candidate"
        elif cand_q[name].code_type not in (None, onnx_type(dtype)):
            problems[name] = (f"codes are {dtype} in the reference, {dtype_name(cand_q[name].code_type)} in "
                              "the candidate")
    return problems


def _tensors(found) -> list[str]:
    """The tensors of quantizers a run must expose: inputs, codes, scales and zero points."""
    return list(dict.fromkeys(name for q in found
                              for name in (q.input, q.codes, q.scale, q.zero_point) if name))


def _exposing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _add_outputs(copy.graph, names)
    return copy


def _add_outputs(graph: onnx.GraphProto, names: list[str]) -> None:
    """Make `names` graph outputs too, their types left to onnxruntime."""
    present = {o.name for o in graph.output}
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)


def _cut(candidate: onnx.ModelProto, cuts: list[Quantizer], dtypes: dict[str, np.dtype]) -> onnx.ModelProto:
    """A copy of `candidate` whose quantizers in `cuts` write their codes under name + _OWN, their
    codes names becoming graph inputs (of `dtypes`) that feed every consumer; it outputs the original
    graph outputs that are not cut, and each cut quantizer's input, own codes, scale and zero point."""
    copy = onnx.ModelProto()
    copy.CopyFrom(candidate)
    graph = copy.graph
    names = {q.codes for q in cuts}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.output and node.output[0] in names:
            node.output[0] += _OWN
    graph.input.extend(onnx.helper.make_tensor_value_info(q.codes, onnx_type(dtypes[q.codes]), None)
                       for q in cuts)
    kept = [o for o in graph.output if o.name not in names]
    del graph.output[:]
    graph.output.extend(kept)
    _add_outputs(graph, [name + _OWN if name == q.codes else name for q in cuts for name in _tensors([q])])
    return copy


def _compare(ref: Quantizer, cand: Quantizer, ref_out: dict, cand_out: dict, limits: Limits) -> QuantizerComparison:
    """One quantizer: the candidate's input (from the reference's upstream codes) and its own codes
    against the reference's."""
    x_ref, x_cand = ref_out[ref.input], cand_out[cand.input]
    codes_ref, codes_cand = ref_out[ref.codes], cand_out[cand.codes + _OWN]
    base = dict(codes=ref.codes, node=ref.node, limits=limits, dtype=str(codes_ref.dtype),
                granularity=_granularity(ref_out[ref.scale], ref))
    if x_ref.shape != x_cand.shape:
        return QuantizerComparison(**base, problem=f"input shape differs: reference {x_ref.shape}, "
                                                   f"candidate {x_cand.shape}")
    u_ref = _code_units(x_ref, ref, ref_out, codes_ref.dtype)
    u_cand = _code_units(x_cand, cand, cand_out, codes_ref.dtype)
    finite = np.isfinite(x_ref) & np.isfinite(x_cand)
    moved = np.abs(codes_ref.astype(np.int64) - codes_cand.astype(np.int64))
    return QuantizerComparison(**base, elements=codes_ref.size,
                               max_steps=float(np.abs(u_ref - u_cand)[finite].max(initial=0.0)),
                               flipped=int(np.count_nonzero(moved)), max_code_change=int(moved.max(initial=0)),
                               nonfinite=int(finite.size - np.count_nonzero(finite)))


def _code_units(x: np.ndarray, q: Quantizer, run: dict, dtype: np.dtype) -> np.ndarray:
    """Where rounding puts each element: x / scale + zero_point in float64 (`q`'s scale and zero point
    as `run` computed them), clipped to the code range of `dtype`."""
    info = np.iinfo(dtype)
    units = x.astype(np.float64) / _broadcast(run[q.scale], x, q)
    if q.zero_point:
        units += _broadcast(run[q.zero_point], x, q)
    return np.clip(units, info.min, info.max)


def _broadcast(param: np.ndarray, x: np.ndarray, q: Quantizer) -> np.ndarray:
    """A scale or zero point laid over `x`: one value, one per index of `axis`, or one per block."""
    param = np.asarray(param, np.float64)
    if param.size == 1:
        return param.reshape(())
    axis = q.axis % x.ndim
    if param.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = param.size
        return param.reshape(shape)
    return np.repeat(param, q.block_size, axis=axis).take(np.arange(x.shape[axis]), axis=axis)


def _granularity(scale: np.ndarray, q: Quantizer) -> str:
    if scale.size == 1:
        return "tensor"
    if scale.ndim == 1:
        return f"axis {q.axis}"
    return f"blocks of {q.block_size} on axis {q.axis}"
