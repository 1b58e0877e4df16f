"""Element-wise comparison of tensors under a tolerance, with the statistics a report shows.

An element passes when ``|a - b| <= atol + rtol * |a|`` (a: the reference value), computed in float64.
The defaults per dtype (DEFAULT_TOLERANCES) were measured on correct folds; integers and bools must
match exactly. NaN or Inf in either tensor fails, with its positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .errors import BnfoldError
from .inputs import show_shape

_MAX_POSITIONS = 5  # NaN/Inf positions listed per output

@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|a - b| <= atol + rtol * |a|``, a being the reference value."""

    atol: float
    rtol: float


# Measured on correct folds (the README's "Tolerances" has the numbers): the largest error seen, as a
# share of the tolerance below, was 0.07 for float32 (sample models, random BN statistics included),
# 0.27 for float16, 0.35 for bfloat16 (emulated: onnxruntime's CPU provider runs no bfloat16 Conv or
# MatMul) and under 0.01 for float64. The error of a correct fold grows with the magnitude of the
# values: outputs in the hundreds need a larger atol. Integers and bools must match exactly.
DEFAULT_TOLERANCES = {
    "float64": Tolerance(atol=1e-9, rtol=1e-9),
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float16": Tolerance(atol=5e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=2e-1, rtol=5e-2),
}
_EXACT = Tolerance(atol=0.0, rtol=0.0)


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The default tolerance of `dtype` (exact for integers and bools), with `atol`/`rtol` if given."""
    default = DEFAULT_TOLERANCES.get(dtype, _EXACT)
    return Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)


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
            "max_abs_error": json_number(self.max_abs), "max_rel_error": json_number(self.max_rel),
            "mean_abs_error": json_number(self.mean_abs), "cosine_similarity": json_number(self.cosine),
            "top1_agreement": json_number(self.top1), "elements": self.elements,
            "mismatched_elements": self.mismatched, "worst": _clean(self.worst),
            "nonfinite_elements": self.nonfinite,
            "nonfinite_positions": [_clean(p) for p in self.nonfinite_positions],
        }


def json_number(x: float | None) -> float | str | None:
    """JSON has no NaN or Infinity: non-finite numbers become strings."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def _clean(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else json_number(v) if isinstance(v, float) else v
            for k, v in d.items()}


def _list(shape) -> list | None:
    return None if shape is None else list(shape)


def _value(x: float) -> str:
    return f"{x:.6g}"


def _position(p: dict) -> str:
    return (f"{list(p['index'])} (reference {_value(p['reference'])}, "
            f"candidate {_value(p['candidate'])})")


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance,
                   *, check_dtype: bool = True) -> Comparison:
    """Compare one tensor element-wise in float64; `reference` is `a` in the tolerance rule."""
    base = dict(name=name, dtype=str(candidate.dtype), shape=candidate.shape, tolerance=tolerance,
                reference_dtype=str(reference.dtype), reference_shape=reference.shape)
    if check_dtype and reference.dtype != candidate.dtype:
        return Comparison(**base, problem=f"dtype differs: reference {reference.dtype}, "
                                          f"candidate {candidate.dtype}")
    if reference.shape != candidate.shape:
        return Comparison(**base, problem=f"shape differs: reference {show_shape(reference.shape)}, "
                                          f"candidate {show_shape(candidate.shape)}")
    a, b = _float64(reference, name), _float64(candidate, name)
    finite = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(np.where(finite, a, 0.0) - np.where(finite, b, 0.0))  # inf - inf is no error here
    allowed = tolerance.atol + tolerance.rtol * np.abs(np.where(finite, a, 0.0))
    outside = diff > allowed
    return Comparison(**base, **_statistics(a, b, finite, diff), elements=a.size,
                      mismatched=int(outside.sum()), worst=_worst(a, b, diff - allowed),
                      nonfinite=int(a.size - finite.sum()),
                      nonfinite_positions=_nonfinite_positions(a, b, finite))


def _float64(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in "biuf" and "float" not in array.dtype.name:
        raise BnfoldError(f"output {name!r} is {array.dtype}: only numeric tensors can be compared")
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


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    tolerance: Callable[[str], Tolerance], *,
                    check_dtype: bool = True) -> tuple[Comparison, ...]:
    """Compare outputs by name: the reference's first, then those only the candidate has.

    `tolerance(dtype)` gives the tolerance of an output of that dtype."""
    results = []
    for name in list(reference) + [n for n in candidate if n not in reference]:
        if name not in candidate:
            array = reference[name]
            results.append(Comparison(name, str(array.dtype), None, tolerance(str(array.dtype)),
                                      problem="missing in the candidate",
                                      reference_dtype=str(array.dtype), reference_shape=array.shape))
        elif name not in reference:
            array = candidate[name]
            results.append(Comparison(name, str(array.dtype), array.shape,
                                      tolerance(str(array.dtype)),
                                      problem="missing in the reference"))
        else:
            results.append(compare_arrays(name, reference[name], candidate[name],
                                          tolerance(str(candidate[name].dtype)),
                                          check_dtype=check_dtype))
    return tuple(results)
