"""bnfold.compare: what a comparison reports for given arrays (the tolerance rule at its boundary,
error statistics, NaN/Inf positions, dtype and shape mismatches, top-1, cosine, JSON form)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bnfold.compare import (DEFAULT_TOLERANCES, Comparison, Tolerance, compare_arrays, compare_outputs,
                            json_number, tolerance_for)
from bnfold.errors import BnfoldError

EXACT = Tolerance(0.0, 0.0)


def _f64(*values):
    return np.array(values, dtype=np.float64)


# ------------------------------------------------------------------------------- tolerance_for
def test_tolerance_for_uses_the_dtype_default_and_explicit_zero_overrides():
    assert tolerance_for("float32") == DEFAULT_TOLERANCES["float32"]
    assert tolerance_for("float16", atol=0.5) == Tolerance(0.5, DEFAULT_TOLERANCES["float16"].rtol)
    assert tolerance_for("float16", rtol=0.5) == Tolerance(DEFAULT_TOLERANCES["float16"].atol, 0.5)
    # 0.0 is a tolerance, not "unset"
    assert tolerance_for("float32", atol=0.0, rtol=0.0) == Tolerance(0.0, 0.0)
    assert tolerance_for("int64") == Tolerance(0.0, 0.0) and tolerance_for("bool") == Tolerance(0.0, 0.0)
    assert tolerance_for("int8", atol=1.0, rtol=2.0) == Tolerance(1.0, 2.0)


# ------------------------------------------------------------------- the rule at its boundary
def test_an_error_exactly_at_atol_plus_rtol_times_reference_passes():
    """Powers of two: |a - b| == atol + rtol*|a| holds exactly in float64."""
    tol = Tolerance(atol=0.25, rtol=0.0625)
    a = _f64(4.0, -4.0, 0.0)
    at_boundary = _f64(4.5, -4.5, 0.25)  # allowed 0.5, 0.5, 0.25
    result = compare_arrays("t", a, at_boundary, tol)
    assert result.passed and result.mismatched == 0 and result.reason() == ""
    just_over = at_boundary + _f64(2**-40, -(2**-40), 2**-40)
    result = compare_arrays("t", a, just_over, tol)
    assert not result.passed and result.mismatched == 3 and result.elements == 3


def test_the_reference_not_the_candidate_scales_the_rtol_term():
    tol = Tolerance(atol=0.0, rtol=0.5)
    assert compare_arrays("t", _f64(2.0), _f64(1.0), tol)  # allowed 1.0 = 0.5*|2|
    assert not compare_arrays("t", _f64(1.0), _f64(2.0), tol)  # allowed 0.5 = 0.5*|1|


def test_atol_and_rtol_add_up():
    tol = Tolerance(atol=0.5, rtol=0.25)
    assert compare_arrays("t", _f64(2.0), _f64(3.0), tol)  # |1| <= 0.5 + 0.5
    assert not compare_arrays("t", _f64(2.0), _f64(3.0), Tolerance(0.5, 0.0))
    assert not compare_arrays("t", _f64(2.0), _f64(3.0), Tolerance(0.0, 0.25))


def test_the_rule_is_computed_in_float64_not_the_tensor_dtype():
    """1 + 2**-20 vs 1 in float32: an error of 2**-20 that float32 arithmetic would see too, but a
    tolerance of 2**-21 must fail it while 2**-20 passes it exactly."""
    a = np.array([1.0], np.float32)
    b = np.array([1.0 + 2**-20], np.float32)
    assert compare_arrays("t", a, b, Tolerance(2**-20, 0.0))
    assert not compare_arrays("t", a, b, Tolerance(2**-21, 0.0))
    # float16 to float64: no overflow of 60000 + 60000
    big = np.array([60000.0], np.float16)
    result = compare_arrays("t", big, -big, Tolerance(0.0, 0.0))
    assert result.max_abs == 2 * float(big[0])


def test_integer_differences_are_exact_and_unsigned_do_not_wrap():
    a = np.array([0, 5], np.uint8)
    b = np.array([1, 5], np.uint8)
    result = compare_arrays("u", a, b, EXACT)
    assert not result and result.max_abs == 1.0 and result.mismatched == 1  # not 255


# -------------------------------------------------------------------------------- statistics
def test_statistics_of_a_known_difference():
    a = _f64(1.0, -2.0, 0.0, 4.0)
    b = _f64(1.5, -2.0, 0.25, 3.0)
    result = compare_arrays("t", a, b, Tolerance(0.0, 0.0))
    assert result.max_abs == 1.0
    assert result.max_rel == 0.5  # 0.5/1; the 0.25 at reference 0 is left out of the relative error
    assert result.mean_abs == pytest.approx((0.5 + 0 + 0.25 + 1.0) / 4)
    assert result.elements == 4 and result.mismatched == 3
    assert result.worst == {"index": (3,), "reference": 4.0, "candidate": 3.0}
    assert result.cosine == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert result.top1 is None  # 1-D: no rows


def test_max_rel_is_zero_when_every_reference_value_is_zero():
    result = compare_arrays("t", _f64(0.0, 0.0), _f64(0.0, 1e-3), Tolerance(1.0, 0.0))
    assert result.max_rel == 0.0 and result.max_abs == 1e-3 and result


def test_worst_is_the_element_nearest_the_tolerance_when_all_pass():
    """Relative to the allowance, not the largest absolute error."""
    tol = Tolerance(atol=0.0, rtol=0.5)
    a = _f64(100.0, 1.0)
    b = _f64(110.0, 1.4)  # excess -40 and -0.1
    result = compare_arrays("t", a, b, tol)
    assert result and result.worst["index"] == (1,)


def test_worst_index_is_the_nd_position():
    a = np.zeros((2, 3))
    b = a.copy()
    b[1, 2] = 7.0
    result = compare_arrays("t", a, b, EXACT)
    assert result.worst == {"index": (1, 2), "reference": 0.0, "candidate": 7.0}
    assert result.reason() == "1/6 element(s) outside tolerance, worst at [1, 2]: reference 0, candidate 7"


def test_empty_tensors_pass_with_no_statistics():
    result = compare_arrays("t", np.zeros((0, 3)), np.zeros((0, 3)), EXACT)
    assert result.passed and result.elements == 0 and result.worst is None
    assert result.max_abs is None and result.cosine is None and result.top1 is None


def test_cosine_is_one_for_both_zero_and_zero_for_one_zero():
    assert compare_arrays("t", np.zeros(3), np.zeros(3), EXACT).cosine == 1.0
    assert compare_arrays("t", np.zeros(3), _f64(1.0, 2.0, 3.0), Tolerance(10, 0)).cosine == 0.0
    assert compare_arrays("t", _f64(1.0, 0.0), _f64(0.0, 1.0), Tolerance(10, 0)).cosine == 0.0
    assert compare_arrays("t", _f64(1.0, 2.0), _f64(-1.0, -2.0), Tolerance(10, 0)).cosine == pytest.approx(-1.0)


def test_cosine_of_huge_and_tiny_values_does_not_overflow_or_underflow():
    huge = _f64(1e300, 2e300)
    assert compare_arrays("t", huge, huge, EXACT).cosine == pytest.approx(1.0)
    tiny = _f64(1e-300, 2e-300)
    assert compare_arrays("t", tiny, tiny, EXACT).cosine == pytest.approx(1.0)


def test_top1_is_the_share_of_rows_with_the_same_argmax():
    a = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    b = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert compare_arrays("t", a, b, EXACT).top1 == 0.5
    assert compare_arrays("t", a, a, EXACT).top1 == 1.0


def test_top1_only_for_2d_outputs_with_several_columns_and_all_finite():
    assert compare_arrays("t", np.ones((3, 1)), np.ones((3, 1)), EXACT).top1 is None
    assert compare_arrays("t", np.ones((2, 2, 2)), np.ones((2, 2, 2)), EXACT).top1 is None
    assert compare_arrays("t", np.ones((1, 2)), np.ones((1, 2)), EXACT).top1 == 1.0
    with_nan = np.array([[0.0, 1.0], [np.nan, 0.0]])
    assert compare_arrays("t", with_nan, with_nan, EXACT).top1 is None


# ------------------------------------------------------------------------------------ NaN / Inf
def test_nonfinite_elements_are_counted_apart_and_excluded_from_the_statistics():
    a = _f64(1.0, np.inf, 3.0, 4.0)
    b = _f64(1.0, 2.0, np.nan, 4.5)
    result = compare_arrays("t", a, b, Tolerance(0.0, 0.0))
    assert result.nonfinite == 2 and result.mismatched == 1 and not result
    assert result.max_abs == 0.5 and result.mean_abs == pytest.approx(0.25)
    assert result.max_rel == pytest.approx(0.125)
    assert result.cosine == pytest.approx(float(_f64(1, 4) @ _f64(1, 4.5) / np.linalg.norm(_f64(1, 4))
                                                / np.linalg.norm(_f64(1, 4.5))))
    assert result.worst["index"] == (3,)
    assert [p["index"] for p in result.nonfinite_positions] == [(1,), (2,)]
    assert result.nonfinite_positions[0]["reference"] == np.inf
    assert result.nonfinite_positions[0]["candidate"] == 2.0
    assert np.isnan(result.nonfinite_positions[1]["candidate"])


def test_nonfinite_alone_fails_and_has_no_mismatch():
    a = _f64(1.0, 2.0)
    b = _f64(1.0, np.inf)
    result = compare_arrays("t", a, b, Tolerance(1e9, 1e9))
    assert not result and result.mismatched == 0 and result.nonfinite == 1
    assert result.reason() == "1 NaN/Inf element(s) at [1] (reference 2, candidate inf)"
    assert result.max_abs == 0.0  # the finite element only
    inf_both = compare_arrays("t", _f64(np.inf), _f64(np.inf), EXACT)
    assert not inf_both and inf_both.nonfinite == 1


def test_all_nonfinite_gives_no_statistics_and_still_fails():
    result = compare_arrays("t", _f64(np.nan, np.nan), _f64(np.nan, 1.0), Tolerance(1, 1))
    assert not result and result.nonfinite == 2
    assert result.max_abs is None and result.max_rel is None and result.cosine is None


def test_nonfinite_positions_list_the_first_five_in_order_then_an_ellipsis():
    a = np.zeros((3, 4))
    b = a.copy()
    b[0, 1] = b[0, 3] = b[1, 0] = b[1, 2] = b[2, 1] = b[2, 3] = np.nan
    result = compare_arrays("t", a, b, EXACT)
    assert result.nonfinite == 6
    assert [p["index"] for p in result.nonfinite_positions] == [(0, 1), (0, 3), (1, 0), (1, 2), (2, 1)]
    assert result.reason().startswith("6 NaN/Inf element(s) at [0, 1] (reference 0, candidate nan), [0, 3]")
    assert result.reason().endswith("[2, 1] (reference 0, candidate nan), ...")
    b[2, 3] = 0.0
    five = compare_arrays("t", a, b, EXACT)
    assert five.nonfinite == 5 and not five.reason().endswith("...")


def test_reason_joins_nonfinite_and_mismatch():
    result = compare_arrays("t", _f64(1.0, 2.0, 3.0), _f64(np.nan, 2.0, 3.5), EXACT)
    assert result.reason() == ("1 NaN/Inf element(s) at [0] (reference 1, candidate nan); "
                               "1/3 element(s) outside tolerance, worst at [2]: reference 3, candidate 3.5")


def test_reason_values_are_six_significant_digits():
    result = compare_arrays("t", _f64(1.23456789), _f64(123456789.0), EXACT)
    assert result.reason().endswith("reference 1.23457, candidate 1.23457e+08")


# ---------------------------------------------------------------------- dtype and shape problems
def test_dtype_mismatch_is_a_problem_without_statistics():
    result = compare_arrays("y", np.zeros(2, np.float32), np.zeros(2, np.float16), EXACT)
    assert not result and result.problem == "dtype differs: reference float32, candidate float16"
    assert result.reason() == result.problem and result.max_abs is None and result.elements == 0
    assert (result.dtype, result.reference_dtype) == ("float16", "float32")
    assert (result.shape, result.reference_shape) == ((2,), (2,))
    unchecked = compare_arrays("y", np.zeros(2, np.float32), np.zeros(2, np.float16), EXACT, check_dtype=False)
    assert unchecked and unchecked.problem is None and unchecked.elements == 2


def test_shape_mismatch_is_a_problem():
    result = compare_arrays("y", np.zeros((1, 3)), np.zeros((3,)), EXACT)
    assert not result and result.problem == "shape differs: reference 1x3, candidate 3"
    assert (result.shape, result.reference_shape) == ((3,), (1, 3))
    scalar = compare_arrays("y", np.zeros(()), np.zeros((1,)), EXACT)
    assert scalar.problem == "shape differs: reference scalar, candidate 1"


def test_a_shape_mismatch_is_reported_even_without_the_dtype_check():
    result = compare_arrays("y", np.zeros(2, np.float32), np.zeros(3, np.float64), EXACT, check_dtype=False)
    assert result.problem.startswith("shape differs")


def test_only_numeric_tensors_can_be_compared():
    with pytest.raises(BnfoldError, match="output 's' is <U1: only numeric tensors can be compared"):
        compare_arrays("s", np.array(["a"]), np.array(["a"]), EXACT)
    with pytest.raises(BnfoldError, match="only numeric"):
        compare_arrays("c", np.array([1j]), np.array([1j]), EXACT)
    assert compare_arrays("b", np.array([True, False]), np.array([True, False]), EXACT)
    assert not compare_arrays("b", np.array([True, False]), np.array([True, True]), EXACT)


def test_bfloat16_tensors_are_compared_as_floats():
    bf16 = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16))
    bits = np.array([0x3F80, 0x4000], np.uint16)  # 1.0, 2.0 in bfloat16
    a = bits.view(bf16)
    assert compare_arrays("t", a, a, EXACT)


# ------------------------------------------------------------------------------ compare_outputs
def test_compare_outputs_orders_reference_names_first_then_candidate_only():
    reference = {"b": np.zeros(2, np.float32), "a": np.zeros(1, np.int64)}
    candidate = {"c": np.ones(3, np.float16), "a": np.zeros(1, np.int64)}
    results = compare_outputs(reference, candidate, tolerance_for)
    assert [c.name for c in results] == ["b", "a", "c"]
    missing, same, extra = results
    assert missing.problem == "missing in the candidate" and not missing
    assert (missing.dtype, missing.shape, missing.reference_shape, missing.reference_dtype) == \
        ("float32", None, (2,), "float32")
    assert missing.tolerance == DEFAULT_TOLERANCES["float32"]
    assert same and same.problem is None and same.tolerance == Tolerance(0.0, 0.0)
    assert extra.problem == "missing in the reference" and not extra
    assert (extra.dtype, extra.shape, extra.reference_shape) == ("float16", (3,), None)
    assert extra.tolerance == DEFAULT_TOLERANCES["float16"]


def test_compare_outputs_uses_the_candidate_dtype_tolerance_and_passes_check_dtype():
    reference = {"y": np.array([1.0])}  # float64, as saved reference outputs are
    candidate = {"y": np.array([1.001], np.float32)}
    checked = compare_outputs(reference, candidate, tolerance_for)
    assert checked[0].problem.startswith("dtype differs")
    loose = compare_outputs(reference, candidate, lambda dtype: Tolerance(1e-2, 0.0) if dtype == "float32"
                            else Tolerance(0.0, 0.0), check_dtype=False)
    assert loose[0] and loose[0].tolerance == Tolerance(1e-2, 0.0)


# ----------------------------------------------------------------------------------- JSON form
def test_json_number_turns_only_nonfinite_numbers_into_strings():
    assert json_number(None) is None
    assert json_number(1.5) == 1.5
    assert json_number(float("inf")) == "inf" and json_number(float("-inf")) == "-inf"
    assert json_number(float("nan")) == "nan"


def test_to_dict_is_strict_json_with_every_field():
    a = np.array([[1.0, np.inf], [2.0, 3.0]])
    b = np.array([[1.0, 1.0], [2.0, 4.0]])
    result = compare_arrays("out", a, b, Tolerance(0.5, 0.25))
    d = result.to_dict()
    json.dumps(d, allow_nan=False)
    assert d == {
        "name": "out", "passed": False, "problem": None, "dtype": "float64", "shape": [2, 2],
        "reference_dtype": "float64", "reference_shape": [2, 2], "atol": 0.5, "rtol": 0.25,
        "max_abs_error": 1.0, "max_rel_error": pytest.approx(1 / 3), "mean_abs_error": pytest.approx(1 / 3),
        "cosine_similarity": pytest.approx(result.cosine), "top1_agreement": None, "elements": 4,
        "mismatched_elements": 0, "worst": {"index": [1, 1], "reference": 3.0, "candidate": 4.0},
        "nonfinite_elements": 1,
        "nonfinite_positions": [{"index": [0, 1], "reference": "inf", "candidate": 1.0}],
    }


def test_to_dict_of_a_problem_has_no_statistics():
    d = Comparison("y", "float32", None, EXACT, problem="missing in the candidate",
                   reference_dtype="float32", reference_shape=(2,)).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["passed"] is False and d["shape"] is None and d["reference_shape"] == [2]
    assert d["worst"] is None and d["max_abs_error"] is None and d["nonfinite_positions"] == []
