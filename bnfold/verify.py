"""Numerical equivalence of two models, measured with onnxruntime: as a gate, and as a diagnosis.

Both models run in onnxruntime with graph optimizations disabled: onnxruntime fuses Conv+BatchNormalization
itself at session start, which would compare its fold with ours instead of the original with ours. They
get the same inputs (see :mod:`bnfold.inputs`) and every output is compared by name. An element passes
when ``|a - b| <= atol + rtol * |a|`` (a: reference), with defaults per dtype that were measured on
correct folds (see DEFAULT_TOLERANCES). Results are objects that are true when the models agree.

On a mismatch, ``bisect`` finds the first tensor, in the reference's topological order, that both models
compute under the same name and that differs: a folded BatchNormalization's output keeps its name, so a
wrong fold is named by the node that now produces it.
"""

from __future__ import annotations

import ctypes
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx

from .errors import BnfoldError, first_line
from .inputs import (InputSpec, Sample, generate_samples, input_specs, load_samples, merge_specs,
                     parse_shape, plan_shapes)
from .io import load_model

CPU = "CPUExecutionProvider"
_MAX_POSITIONS = 5  # NaN/Inf positions listed per output
_BISECT_CHUNK_BYTES = 1 << 30  # estimated bytes of intermediate tensors exposed per bisect session


@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|a - b| <= atol + rtol * |a|``, a being the reference value."""

    atol: float
    rtol: float


# Measured on correct folds (the README's "Tolerances" has the numbers): the largest error seen, as a
# share of the tolerance below, was 0.07 for float32 (sample models, random BN statistics included),
# 0.27 for float16, 0.35 for bfloat16 (emulated: onnxruntime's CPU provider runs no bfloat16 Conv or
# MatMul) and under 0.01 for float64. The error of a correct fold grows with the magnitude of the
# values: outputs in the hundreds need a larger --atol. Integers and bools must match exactly.
DEFAULT_TOLERANCES = {
    "float64": Tolerance(atol=1e-9, rtol=1e-9),
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float16": Tolerance(atol=5e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=2e-1, rtol=5e-2),
}
_EXACT = Tolerance(atol=0.0, rtol=0.0)


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify. None means the documented default; `shapes` maps input names to shapes."""

    inputs: str | Path | None = None  # an .npz file or a folder of them
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    samples: int | None = None  # generated samples per batch value (default 1)
    seed: int | None = None  # default 0
    atol: float | None = None  # overrides the default of every dtype
    rtol: float | None = None
    provider: str | None = None  # default CPUExecutionProvider
    bisect: bool = False

    def tolerance(self, dtype: str) -> Tolerance:
        """The tolerance for outputs of `dtype`: the dtype's default, with --atol/--rtol applied."""
        default = DEFAULT_TOLERANCES.get(dtype, _EXACT)
        return Tolerance(default.atol if self.atol is None else self.atol,
                         default.rtol if self.rtol is None else self.rtol)


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Comparison:
    """One tensor compared: its error statistics, and why it fails (if it does)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    tolerance: Tolerance
    problem: str | None = None  # missing, shape or dtype differs: no statistics then
    reference_dtype: str | None = None
    reference_shape: tuple[int, ...] | None = None
    max_abs: float | None = None
    max_rel: float | None = None  # over elements whose reference value is not 0
    mean_abs: float | None = None
    cosine: float | None = None
    top1: float | None = None  # share of rows with the same argmax, for 2-D float outputs
    elements: int = 0
    mismatched: int = 0  # finite elements outside the tolerance
    worst: dict | None = None  # the element furthest outside (or nearest to) the tolerance
    nonfinite: int = 0  # elements that are NaN or Inf in either model
    nonfinite_positions: tuple[dict, ...] = ()

    @property
    def passed(self) -> bool:
        return self.problem is None and self.mismatched == 0 and self.nonfinite == 0

    def __bool__(self) -> bool:
        return self.passed

    def reason(self) -> str:
        """One phrase saying why it fails; empty when it passes."""
        if self.problem:
            return self.problem
        parts = []
        if self.nonfinite:
            where = ", ".join(_position(p) for p in self.nonfinite_positions)
            more = "" if self.nonfinite <= len(self.nonfinite_positions) else ", ..."
            parts.append(f"{self.nonfinite} NaN/Inf element(s) at {where}{more}")
        if self.mismatched:
            w = self.worst
            parts.append(f"{self.mismatched}/{self.elements} element(s) outside tolerance, worst at "
                         f"{list(w['index'])}: reference {_value(w['reference'])}, candidate "
                         f"{_value(w['candidate'])}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "passed": self.passed, "problem": self.problem,
            "dtype": self.dtype, "shape": _list(self.shape),
            "reference_dtype": self.reference_dtype, "reference_shape": _list(self.reference_shape),
            "atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
            "max_abs_error": _num(self.max_abs), "max_rel_error": _num(self.max_rel),
            "mean_abs_error": _num(self.mean_abs), "cosine_similarity": _num(self.cosine),
            "top1_agreement": _num(self.top1), "elements": self.elements,
            "mismatched_elements": self.mismatched, "worst": _clean(self.worst),
            "nonfinite_elements": self.nonfinite,
            "nonfinite_positions": [_clean(p) for p in self.nonfinite_positions],
        }


@dataclass(frozen=True)
class SampleResult:
    """Every output compared on one input sample."""

    label: str
    input_shapes: Mapping[str, tuple[int, ...]]
    outputs: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {"label": self.label, "passed": self.passed,
                "inputs": {k: list(v) for k, v in self.input_shapes.items()},
                "outputs": [c.to_dict() for c in self.outputs]}


@dataclass(frozen=True)
class NodeRef:
    name: str
    op_type: str

    def __str__(self) -> str:
        return f"{self.name or '(unnamed)'} ({self.op_type})"


@dataclass(frozen=True)
class BisectResult:
    """The first shared tensor that diverges, on `sample`; `tensor` is None if none does."""

    sample: str
    compared: int  # shared tensors compared, the diverging one included
    not_comparable: int  # shared names left out: no type information, or different types
    tensor: str | None = None
    comparison: Comparison | None = None
    reference_node: NodeRef | None = None
    candidate_node: NodeRef | None = None

    def summary(self) -> str:
        if self.tensor is None:
            return (f"none of the {self.compared} tensors both models compute under the same name "
                    f"diverges on {self.sample}; the difference arises in tensors only one model has")
        return (f"{self.tensor!r} is the first tensor that diverges ({self.compared - 1} shared "
                f"tensor(s) before it match), produced by {self.reference_node} in the reference and "
                f"{self.candidate_node} in the candidate; on {self.sample}: {self.comparison.reason()}")

    def to_dict(self) -> dict:
        return {"sample": self.sample, "tensor": self.tensor, "compared": self.compared,
                "not_comparable": self.not_comparable,
                "reference_node": _node_dict(self.reference_node),
                "candidate_node": _node_dict(self.candidate_node),
                "comparison": self.comparison.to_dict() if self.comparison else None}


@dataclass(frozen=True)
class VerifyReport:
    """The verdict: true when every output of every sample passes."""

    reference: str
    candidate: str
    provider: str
    samples: tuple[SampleResult, ...]
    notes: tuple[str, ...] = ()
    bisect: BisectResult | None = None
    against_saved_outputs: bool = False

    @property
    def passed(self) -> bool:
        return all(self.samples)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reference": self.reference, "candidate": self.candidate,
                "against_saved_outputs": self.against_saved_outputs, "provider": self.provider,
                "graph_optimizations": "disabled", "notes": list(self.notes),
                "samples": [s.to_dict() for s in self.samples],
                "bisect": self.bisect.to_dict() if self.bisect else None}


def _num(x: float | None) -> float | str | None:
    """JSON has no NaN or Infinity: non-finite numbers become strings."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def _clean(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else _num(v) if isinstance(v, float) else v
            for k, v in d.items()}


def _list(shape) -> list | None:
    return None if shape is None else list(shape)


def _node_dict(node: NodeRef | None) -> dict | None:
    return None if node is None else {"name": node.name, "op_type": node.op_type}


def _value(x: float) -> str:
    return f"{x:.6g}"


def _position(p: dict) -> str:
    return (f"{list(p['index'])} (reference {_value(p['reference'])}, "
            f"candidate {_value(p['candidate'])})")


# --------------------------------------------------------------------------------------- comparison
def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance,
                   *, check_dtype: bool = True) -> Comparison:
    """Compare one tensor element-wise in float64; `reference` is `a` in the tolerance rule."""
    base = dict(name=name, dtype=str(candidate.dtype), shape=candidate.shape, tolerance=tolerance,
                reference_dtype=str(reference.dtype), reference_shape=reference.shape)
    if check_dtype and reference.dtype != candidate.dtype:
        return Comparison(**base, problem=f"dtype differs: reference {reference.dtype}, "
                                          f"candidate {candidate.dtype}")
    if reference.shape != candidate.shape:
        return Comparison(**base, problem=f"shape differs: reference {_shape(reference.shape)}, "
                                          f"candidate {_shape(candidate.shape)}")
    a, b = _float64(reference, name), _float64(candidate, name)
    finite = np.isfinite(a) & np.isfinite(b)
    diff = np.where(finite, np.abs(a - b), 0.0)
    allowed = tolerance.atol + tolerance.rtol * np.abs(np.where(finite, a, 0.0))
    outside = diff > allowed
    return Comparison(**base, **_statistics(a, b, finite, diff), elements=a.size,
                      mismatched=int(outside.sum()), worst=_worst(a, b, diff - allowed),
                      nonfinite=int(a.size - finite.sum()),
                      nonfinite_positions=_nonfinite_positions(a, b, finite))


def _float64(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in "biuf" and "float" not in array.dtype.name:
        raise BnfoldError(f"output {name!r} is {array.dtype}: verify compares numeric tensors only")
    return array.astype(np.float64)


def _statistics(a: np.ndarray, b: np.ndarray, finite: np.ndarray, diff: np.ndarray) -> dict:
    """Max abs, max rel, mean abs error and cosine similarity over the elements finite in both."""
    if not finite.any():
        return {}
    nonzero = finite & (a != 0)
    rel = diff[nonzero] / np.abs(a[nonzero])
    stats = {"max_abs": float(diff.max()), "max_rel": float(rel.max()) if rel.size else 0.0,
             "mean_abs": float(diff[finite].mean()), "cosine": _cosine(a[finite], b[finite])}
    if a.ndim == 2 and a.shape[1] > 1 and finite.all():
        stats["top1"] = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    return stats


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    if scale == 0.0:
        return 1.0  # both all zeros: the same vector
    a, b = a / scale, b / scale
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norms) if norms else 0.0


def _worst(a: np.ndarray, b: np.ndarray, excess: np.ndarray) -> dict | None:
    if a.size == 0:
        return None
    flat = int(np.argmax(excess))
    index = np.unravel_index(flat, a.shape)
    return {"index": tuple(int(i) for i in index), "reference": float(a.flat[flat]),
            "candidate": float(b.flat[flat])}


def _nonfinite_positions(a: np.ndarray, b: np.ndarray, finite: np.ndarray) -> tuple[dict, ...]:
    flats = np.flatnonzero(~finite)[:_MAX_POSITIONS]
    return tuple({"index": tuple(int(i) for i in np.unravel_index(f, a.shape)),
                  "reference": float(a.flat[f]), "candidate": float(b.flat[f])} for f in flats)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    options: VerifyOptions, *, check_dtype: bool = True) -> tuple[Comparison, ...]:
    """Compare outputs by name: the reference's first, then those only the candidate has."""
    results = []
    for name in list(reference) + [n for n in candidate if n not in reference]:
        if name not in candidate:
            array = reference[name]
            results.append(Comparison(name, str(array.dtype), None, options.tolerance(str(array.dtype)),
                                      problem="missing in the candidate",
                                      reference_dtype=str(array.dtype), reference_shape=array.shape))
        elif name not in reference:
            array = candidate[name]
            results.append(Comparison(name, str(array.dtype), array.shape,
                                      options.tolerance(str(array.dtype)),
                                      problem="missing in the reference"))
        else:
            tolerance = options.tolerance(str(candidate[name].dtype))
            results.append(compare_arrays(name, reference[name], candidate[name], tolerance,
                                          check_dtype=check_dtype))
    return tuple(results)


# ------------------------------------------------------------------------------------- onnxruntime
def resolve_provider(name: str | None) -> str:
    """The onnxruntime provider called `name` ('cuda' or 'CUDAExecutionProvider'); raise if absent."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if name is None:
        return CPU
    wanted = name.lower()
    for provider in available:
        if provider.lower() in (wanted, wanted + "executionprovider"):
            return provider
    raise BnfoldError(f"--provider {name}: onnxruntime has no such provider here",
                      note=f"available: {', '.join(available)}")


class _Session:
    """One model in onnxruntime, optimizations off, returning numpy arrays for every dtype."""

    def __init__(self, model: onnx.ModelProto | str, provider: str, label: str):
        """`model` is a proto, or the path of a file onnxruntime reads itself (no second copy)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers would drown the report
        providers = [provider] if provider == CPU else [provider, CPU]
        self.label = label
        try:
            with _serialized(model) as source:
                self._session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types for bad models
            raise BnfoldError(f"{label}: onnxruntime cannot load the model ({first_line(exc)})") from exc
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, sample: Sample, names: list[str] | None = None) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        names = names or self.output_names
        feeds = {name: _ort_value(ort, array) for name, array in sample.feeds.items()}
        try:
            values = self._session.run_with_ort_values(names, feeds)
        except Exception as exc:  # onnxruntime raises several unrelated types for run failures
            raise BnfoldError(f"{self.label}: onnxruntime failed on {sample.label} ({first_line(exc)})",
                              note="if a symbolic dim got a default that does not fit, set it with "
                                   "--shape NAME=DxDx...") from exc
        return {name: _to_numpy(value, name, self.label) for name, value in zip(names, values)}


class _serialized:
    """What onnxruntime loads: a path as is; a proto as bytes, or above 2 GiB as a temporary file."""

    def __init__(self, model: onnx.ModelProto | str):
        self._model = model
        self._folder = None

    def __enter__(self):
        if isinstance(self._model, str):
            return self._model
        try:
            return self._model.SerializeToString()
        except ValueError:  # protobuf refuses messages of 2 GiB or more
            pass
        import tempfile

        self._folder = tempfile.TemporaryDirectory(prefix="bnfold-verify-")
        path = Path(self._folder.name) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(self._model)  # saving with external data rewrites the tensors it saves
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return str(path)

    def __exit__(self, *exc_info):
        if self._folder is not None:
            self._folder.cleanup()


def _ort_value(ort, array: np.ndarray):
    """numpy -> OrtValue; bfloat16 and the other ml_dtypes go as raw bytes with their ONNX type."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind != "V":
        return ort.OrtValue.ortvalue_from_numpy(array)
    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    raw = array.view(np.dtype(f"u{array.dtype.itemsize}"))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_type)


def _to_numpy(value, name: str, label: str) -> np.ndarray:
    """OrtValue -> numpy. onnxruntime cannot give bfloat16 (or float8) to numpy: copy their bytes."""
    if not value.is_tensor():
        raise BnfoldError(f"{label}: output {name!r} is not a tensor; verify compares tensors only")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.element_type()))
    if dtype.kind != "V":
        return value.numpy()
    shape = tuple(value.shape())
    size = value.tensor_size_in_bytes()
    if size != dtype.itemsize * math.prod(shape) or "cpu" not in value.device_name().lower():
        raise BnfoldError(f"{label}: output {name!r} is {dtype} and cannot be read back",
                          note="verify reads packed types from CPU memory only")
    if size == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_uint8 * size).from_address(value.data_ptr())
    return np.frombuffer(raw, np.uint8).copy().view(dtype).reshape(shape)


# -------------------------------------------------------------------------------------------- verify
def verify_models(reference: str | Path | onnx.ModelProto, candidate: str | Path | onnx.ModelProto,
                  options: VerifyOptions | None = None) -> VerifyReport:
    """Run both models on the same inputs and compare every output; bisect on a mismatch if asked."""
    options = options or VerifyOptions()
    ref_model, ref_label = _load(reference, "reference")
    cand_model, cand_label = _load(candidate, "candidate")
    specs = merge_specs(input_specs(ref_model), input_specs(cand_model))
    samples, notes = _samples(specs, options)
    provider = resolve_provider(options.provider)
    ref_session = _Session(_source(reference, ref_model), provider, ref_label)
    cand_session = _Session(_source(candidate, cand_model), provider, cand_label)
    results = tuple(SampleResult(s.label, _shapes(s), compare_outputs(ref_session.run(s),
                                                                     cand_session.run(s), options))
                    for s in samples)
    del ref_session, cand_session  # bisect builds its own sessions: free these first
    bisect = None
    failing = next((s for s, r in zip(samples, results) if not r), None)
    if options.bisect and failing is not None:
        bisect = bisect_models(ref_model, cand_model, failing, provider, options,
                               labels=(ref_label, cand_label))
    return VerifyReport(ref_label, cand_label, provider, results, tuple(notes), bisect)


def verify_against_reference(saved: str | Path, model: str | Path | onnx.ModelProto,
                             options: VerifyOptions | None = None) -> VerifyReport:
    """Compare `model` with outputs saved by `bnfold export --reference` (an .npz file or folder).

    Saved outputs are float64; the model's outputs are compared after an exact cast to float64, with
    the tolerance of the model's output dtype.
    """
    options = options or VerifyOptions()
    given = _flags_given(options, "--inputs", "--shape", "--samples", "--seed", "--bisect")
    if given:
        raise BnfoldError(f"--against-reference takes its inputs from the saved file: "
                          f"{', '.join(given)} does not apply")
    proto, label = _load(model, "model")
    samples = load_samples(saved, input_specs(proto), with_outputs=True)
    provider = resolve_provider(options.provider)
    session = _Session(_source(model, proto), provider, label)
    results = tuple(SampleResult(s.label, _shapes(s), compare_outputs(s.expected, session.run(s), options,
                                                                     check_dtype=False))
                    for s in samples)
    return VerifyReport(str(saved), label, provider, results, against_saved_outputs=True)


def _load(source: str | Path | onnx.ModelProto, role: str) -> tuple[onnx.ModelProto, str]:
    if isinstance(source, onnx.ModelProto):
        return source, f"{role} (in memory)"
    # onnxruntime is the judge of what runs: the checker's stricter opinion is not needed here.
    return load_model(source, check=False), str(source)


def _source(given: str | Path | onnx.ModelProto, loaded: onnx.ModelProto) -> onnx.ModelProto | str:
    """The file for onnxruntime to read when there is one: serializing a large proto again is slow."""
    return loaded if isinstance(given, onnx.ModelProto) else str(given)


def _samples(specs: list[InputSpec], options: VerifyOptions) -> tuple[list[Sample], list[str]]:
    if options.inputs is not None:
        given = _flags_given(options, "--shape", "--samples", "--seed")
        if given:
            raise BnfoldError(f"--inputs gives the input values: {', '.join(given)} does not apply")
        return load_samples(options.inputs, specs), []
    if options.samples is not None and options.samples < 1:
        raise BnfoldError(f"--samples {options.samples}: must be at least 1")
    if options.seed is not None and options.seed < 0:
        raise BnfoldError(f"--seed {options.seed}: must be 0 or more")
    plan = plan_shapes(specs, options.shapes)
    samples = generate_samples(specs, plan, 1 if options.samples is None else options.samples,
                               0 if options.seed is None else options.seed)
    return samples, [plan.note] if plan.note else []


def _flags_given(options: VerifyOptions, *flags: str) -> list[str]:
    """Which of `flags` the options set (to say which ones do not apply)."""
    values = {"--inputs": options.inputs, "--shape": options.shapes or None,
              "--samples": options.samples, "--seed": options.seed, "--bisect": options.bisect or None}
    return [flag for flag in flags if values[flag] is not None]


def _shapes(sample: Sample) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in sample.feeds.items()}


# -------------------------------------------------------------------------------------------- bisect
def bisect_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, sample: Sample,
                  provider: str, options: VerifyOptions,
                  labels: tuple[str, str] = ("reference", "candidate")) -> BisectResult:
    """Find the first tensor, in the reference's node order, that both compute and that differs.

    Shared tensors (same name, same element type in both after shape inference) are exposed as extra
    outputs of copies of both models, a chunk of about _BISECT_CHUNK_BYTES at a time, so that a large
    model never holds all its intermediate tensors at once.
    """
    ref_types, cand_types = _tensor_types(reference, sample), _tensor_types(candidate, sample)
    ref_nodes, cand_nodes = _producers(reference), _producers(candidate)
    shared = [n for n in ref_nodes if n in cand_nodes]
    comparable = [n for n in shared if n in ref_types and n in cand_types
                  and ref_types[n].elem_type == cand_types[n].elem_type]
    not_comparable = len(shared) - len(comparable)
    compared = 0
    for chunk in _chunks(comparable, ref_types, sample):
        ref_out = _Session(_exposing(reference, chunk, ref_types), provider, labels[0]).run(sample, chunk)
        cand_out = _Session(_exposing(candidate, chunk, cand_types), provider, labels[1]).run(sample, chunk)
        for name in chunk:
            compared += 1
            result = compare_arrays(name, ref_out[name], cand_out[name],
                                    options.tolerance(str(cand_out[name].dtype)))
            if not result:
                return BisectResult(sample.label, compared, not_comparable, name, result,
                                    ref_nodes[name], cand_nodes[name])
    return BisectResult(sample.label, compared, not_comparable)


def _producers(model: onnx.ModelProto) -> dict[str, NodeRef]:
    """Each tensor computed by a node of the main graph -> that node, in node (topological) order."""
    return {out: NodeRef(node.name, node.op_type)
            for node in model.graph.node for out in node.output if out}


def _tensor_types(model: onnx.ModelProto, sample: Sample) -> dict[str, onnx.TypeProto.Tensor]:
    """Tensor types of the main graph's values, inferred with the sample's input shapes.

    Inferring from concrete input shapes gives concrete intermediate shapes, which size the chunks.
    """
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for value_info in concrete.graph.input:
        if value_info.name in sample.feeds and value_info.type.HasField("tensor_type"):
            shape = value_info.type.tensor_type.shape
            shape.Clear()
            for size in sample.feeds[value_info.name].shape:
                shape.dim.add().dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, strict_mode=False)
    except Exception:  # custom domains, models over 2 GB...: fall back on the declared value_info
        inferred = model
    graph = inferred.graph
    return {vi.name: vi.type.tensor_type
            for vi in list(graph.value_info) + list(graph.output)
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type}


def _exposing(model: onnx.ModelProto, names: list[str], types: dict) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (typed, shapes left to onnxruntime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n].elem_type, None)
                             for n in names if n not in present)
    return copy


def _chunks(names: list[str], types: dict, sample: Sample) -> Iterator[list[str]]:
    """Consecutive runs of `names` whose estimated size stays under _BISECT_CHUNK_BYTES."""
    chunk, size = [], 0
    for name in names:
        estimate = _estimated_bytes(types[name], sample)
        if chunk and size + estimate > _BISECT_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(name)
        size += estimate
    if chunk:
        yield chunk


def _estimated_bytes(tensor_type: onnx.TypeProto.Tensor, sample: Sample) -> int:
    """Inferred dims; a dim still unknown counts as the largest input dim of the sample."""
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    largest = max((d for a in sample.feeds.values() for d in a.shape), default=1)
    dims = [d.dim_value if d.HasField("dim_value") else largest for d in tensor_type.shape.dim]
    return itemsize * math.prod(dims)


# --------------------------------------------------------------------------------------- rendering
def render_report(report: VerifyReport, *, width: int = 120) -> str:
    """The report as plain text (a table and the reasons for failures), for any stream."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    _print(console, report)
    return console.file.getvalue()


def print_report(report: VerifyReport, file=None) -> None:
    """Print the report with rich (colours only on a terminal)."""
    from rich.console import Console

    console = Console(file=file or sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    _print(console, report)


def _print(console, report: VerifyReport) -> None:
    from rich.table import Table

    verdict = "[green]PASS[/green]" if report else "[bold red]FAIL[/bold red]"
    what = "saved outputs" if report.against_saved_outputs else "reference"
    labels = [s.label for s in report.samples]
    shown = ", ".join(labels[:3]) + (f", ... ({len(labels)} in all)" if len(labels) > 3 else "")
    console.print(f"{verdict} {report.candidate} vs {what} {report.reference}", soft_wrap=True)
    console.print(f"  {len(labels)} sample(s): {shown}; {report.provider}, graph optimizations "
                  "disabled", markup=False, soft_wrap=True)
    table = Table(caption="result: FAIL n/m = failed on n of m samples" if not report else None)
    for column in ("output", "dtype", "shape", "max abs", "max rel", "mean abs", "cosine", "top-1",
                   "atol / rtol", "result"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left",
                         no_wrap=column != "output")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    for sample in report.samples:
        for comparison in sample.outputs:
            if not comparison:
                console.print(f"  {comparison.name} on {sample.label}: {comparison.reason()}",
                              markup=False, soft_wrap=True)
    if report.bisect is not None:
        console.print(f"bisect: {report.bisect.summary()}", markup=False, soft_wrap=True)


_NUMERIC = {"max abs", "max rel", "mean abs", "cosine", "top-1", "atol / rtol"}


def _rows(report: VerifyReport) -> list[tuple[str, ...]]:
    """One row per output: the worst figures over all samples."""
    by_name: dict[str, list[Comparison]] = {}
    for sample in report.samples:
        for comparison in sample.outputs:
            by_name.setdefault(comparison.name, []).append(comparison)
    rows = []
    for name, comparisons in by_name.items():
        shapes = dict.fromkeys(_shape(c.shape) for c in comparisons if c.shape is not None)
        failed = sum(not c for c in comparisons)
        result = "ok" if not failed else f"FAIL {failed}/{len(comparisons)}"
        tol = comparisons[0].tolerance
        rows.append((name, comparisons[0].dtype, ", ".join(shapes) or "-",
                     _worst_of(comparisons, "max_abs", max), _worst_of(comparisons, "max_rel", max),
                     _worst_of(comparisons, "mean_abs", max),
                     _worst_of(comparisons, "cosine", min, "{:.6f}"),
                     _worst_of(comparisons, "top1", min, "{:.1%}"),
                     f"{tol.atol:.0e} / {tol.rtol:.0e}", result))
    return rows


def _worst_of(comparisons: list[Comparison], attr: str, pick, fmt: str = "{:.2e}") -> str:
    values = [getattr(c, attr) for c in comparisons if getattr(c, attr) is not None]
    return fmt.format(pick(values)) if values else "-"


# ------------------------------------------------------------------------------- command-line flags
def add_verify_arguments(parser) -> None:
    """The input and tolerance flags `verify` and `fold --verify` share."""
    parser.add_argument("--inputs", metavar="FILE.npz|DIR",
                        help="input values: one .npz (keys: input names) or a folder of them, one "
                             "sample each (default: seeded random inputs)")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=DxDx...",
                        help="concrete shape of an input with symbolic dims (repeatable); default: "
                             "a symbolic dim 0 is tried at 1 and 2, any other symbolic dim is 32")
    parser.add_argument("--samples", type=int, metavar="N",
                        help="random input samples per batch size (default 1)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the random inputs (default 0)")
    parser.add_argument("--atol", type=_tolerance, metavar="A",
                        help="absolute tolerance for every output dtype (default: per dtype)")
    parser.add_argument("--rtol", type=_tolerance, metavar="R",
                        help="relative tolerance for every output dtype (default: per dtype)")
    parser.add_argument("--provider", metavar="P",
                        help="onnxruntime execution provider, e.g. cuda (default: CPU)")


def _tolerance(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def options_from_args(args) -> VerifyOptions:
    """VerifyOptions from the flags of add_verify_arguments (and --bisect, where the parser has it)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in args.shape or ():
        name, shape = parse_shape(text)
        if name in shapes:
            raise BnfoldError(f"--shape {name}=...: given twice")
        shapes[name] = shape
    return VerifyOptions(inputs=args.inputs, shapes=shapes, samples=args.samples, seed=args.seed,
                         atol=args.atol, rtol=args.rtol, provider=args.provider,
                         bisect=getattr(args, "bisect", False))
