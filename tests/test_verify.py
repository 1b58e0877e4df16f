"""`bnfold verify`: the gate (pass/fail with numbers) and the diagnosis (bisect), on tiny graphs."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.fold as fold
from bnfold.cli import main
from bnfold.cli_options import add_verify_arguments, verify_options_from_args
from bnfold.compare import compare_arrays
from bnfold.errors import BnfoldError
from bnfold.inputs import parse_shape
from bnfold.verify import (DEFAULT_TOLERANCES, Tolerance, VerifyOptions, verify_against_reference,
                           verify_models)
from bnfold.verify_render import render_report

ROOT = Path(__file__).resolve().parent.parent
F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


# ------------------------------------------------------------------------------------------ builders
def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _init(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _bn_params(rng, channels):
    return {"scale": rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels),
            "B": rng.normal(0, 1, channels), "mean": rng.normal(0, 1, channels),
            "var": rng.uniform(0.1, 2.0, channels)}


def _two_convs(seed=0, dtype=np.float32, batch="N", perturb=None):
    """x -> conv1 -> bn1 -> relu -> conv2 -> bn2 -> y, and its exact fold (weights folded in float64).

    `perturb` (a relative amount) spoils the largest weight of the folded conv1: the wrong fold to catch.
    """
    rng = np.random.default_rng(seed)
    elem = {np.float32: F32, np.float16: F16}[dtype]
    weights = [rng.normal(0, 0.4, (6, 3, 3, 3)), rng.normal(0, 0.3, (4, 6, 3, 3))]
    biases = [rng.normal(0, 0.3, 6), rng.normal(0, 0.3, 4)]
    stats = [_bn_params(rng, 6), _bn_params(rng, 4)]
    ref_nodes, ref_inits, fold_nodes, fold_inits = [], [], [], []
    for i, (w, b, s) in enumerate(zip(weights, biases, stats), start=1):
        src, bn_out = ("x", "bn1_out") if i == 1 else ("relu_out", "y")
        conv = helper.make_node("Conv", [src, f"W{i}", f"b{i}"], [f"conv{i}_out"], name=f"conv{i}",
                                pads=[1, 1, 1, 1])
        bn_inputs = [f"conv{i}_out"] + [f"bn{i}_{k}" for k in s]
        ref_nodes += [conv, helper.make_node("BatchNormalization", bn_inputs, [bn_out], name=f"bn{i}")]
        ref_inits += [_init(f"W{i}", w.astype(dtype)), _init(f"b{i}", b.astype(dtype))]
        ref_inits += [_init(f"bn{i}_{k}", v.astype(dtype)) for k, v in s.items()]
        w_fold, b_fold = _fold(w, b, s, dtype)
        if i == 1 and perturb:
            w_fold.flat[np.argmax(np.abs(w_fold))] *= 1 + perturb
        folded_conv = onnx.NodeProto()
        folded_conv.CopyFrom(conv)
        folded_conv.output[0] = bn_out  # a fold keeps the BN's output name
        fold_nodes.append(folded_conv)
        fold_inits += [_init(f"W{i}", w_fold.astype(dtype)), _init(f"b{i}", b_fold.astype(dtype))]
        if i == 1:
            relu = helper.make_node("Relu", ["bn1_out"], ["relu_out"], name="relu")
            ref_nodes.append(relu)
            fold_nodes.append(relu)
    x = helper.make_tensor_value_info("x", elem, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", elem, None)
    return _model(ref_nodes, [x], [y], ref_inits), _model(fold_nodes, [x], [y], fold_inits)


def _fold(w, b, stats, dtype):
    """Conv weights and bias with the BN folded in, from the values as stored in `dtype`."""
    stored = {k: v.astype(dtype).astype(np.float64) for k, v in stats.items()}
    k = stored["scale"] / np.sqrt(stored["var"] + 1e-5)
    w_fold = w.astype(dtype).astype(np.float64) * k[:, None, None, None]
    return w_fold, (b.astype(dtype).astype(np.float64) - stored["mean"]) * k + stored["B"]


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _save(tmp_path, **models) -> dict[str, str]:
    paths = {}
    for name, model in models.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        paths[name] = str(path)
    return paths


def _cli(capsys, *argv):
    code = main(["verify", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------- the gate: pass and fail
def test_correct_fold_passes():
    reference, folded = _two_convs()
    report = verify_models(reference, folded)
    assert report and report.passed
    assert [s.label for s in report.samples] == ["seed 0 sample 0 batch 1", "seed 0 sample 0 batch 2"]
    comparison = report.samples[0].outputs[0]
    assert comparison.name == "y" and comparison.dtype == "float32" and comparison.shape == (1, 4, 8, 8)
    assert 0 < comparison.max_abs < 1e-4 and comparison.cosine > 0.999999


def test_wrong_fold_is_caught_and_bisect_names_the_node(tmp_path, capsys):
    reference, wrong = _two_convs(perturb=1e-3)
    report = verify_models(reference, wrong, VerifyOptions(bisect=True))
    assert not report
    assert report.samples[0].outputs[0].mismatched > 0
    bisect = report.bisect
    assert bisect.tensor == "bn1_out"
    assert (bisect.reference_node.name, bisect.reference_node.op_type) == ("bn1", "BatchNormalization")
    assert (bisect.candidate_node.name, bisect.candidate_node.op_type) == ("conv1", "Conv")
    # the tensors before it matched; the exact pass/fail of the tensor itself is in the comparison
    assert not bisect.comparison and bisect.compared == 1

    paths = _save(tmp_path, reference=reference, wrong=wrong)
    code, out, err = _cli(capsys, paths["reference"], paths["wrong"], "--bisect")
    assert code == 1, err
    assert "FAIL" in out and "'bn1_out'" in out and "bn1 (BatchNormalization)" in out
    assert "conv1 (Conv)" in out


def test_bisect_reports_second_layer_when_first_is_right():
    """A wrong second fold: bn1_out matches, y is the first to diverge."""
    reference, folded = _two_convs()
    folded = _spoil_initializer(folded, "b2", index=0, factor=1.01)
    report = verify_models(reference, folded, VerifyOptions(bisect=True))
    assert not report
    assert report.bisect.tensor == "y" and report.bisect.compared == 3  # bn1_out, relu_out, y
    assert report.bisect.candidate_node.name == "conv2"


def test_bisect_in_small_chunks_finds_the_same_tensor(monkeypatch):
    """With a tiny memory budget every tensor gets its own session: same answer, same count."""
    import bnfold.bisect

    reference, folded = _two_convs()
    folded = _spoil_initializer(folded, "b2", index=0, factor=1.01)
    monkeypatch.setattr(bnfold.bisect, "_BISECT_CHUNK_BYTES", 1)
    bisect = verify_models(reference, folded, VerifyOptions(bisect=True)).bisect
    assert (bisect.tensor, bisect.compared) == ("y", 3)


def test_bisect_skips_shared_names_of_different_types():
    """A tensor named alike but typed differently is not comparable: counted, not compared."""
    x = _vi("x", F32, [2, 3])
    reference = _model([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["y"])],
                       [x], [_vi("y", F32, [2, 3])])
    candidate = _model([helper.make_node("Cast", ["x"], ["t"], to=TensorProto.DOUBLE),
                        helper.make_node("Cast", ["t"], ["u"], to=F32),
                        helper.make_node("Relu", ["u"], ["y"])], [x], [_vi("y", F32, [2, 3])])
    bisect = verify_models(reference, candidate, VerifyOptions(bisect=True)).bisect
    assert (bisect.tensor, bisect.not_comparable) == ("y", 1)
    assert bisect.candidate_node.op_type == "Relu" and bisect.reference_node.op_type == "Neg"


def _spoil_initializer(model, name, index, factor):
    spoiled = onnx.ModelProto()
    spoiled.CopyFrom(model)
    for i, tensor in enumerate(spoiled.graph.initializer):
        if tensor.name == name:
            array = numpy_helper.to_array(tensor).copy()
            array.flat[index] *= factor
            spoiled.graph.initializer[i].CopyFrom(_init(name, array))
    return spoiled


def test_cli_pass_exit_0_and_table(tmp_path, capsys):
    reference, folded = _two_convs()
    paths = _save(tmp_path, reference=reference, folded=folded)
    code, out, err = _cli(capsys, paths["reference"], paths["folded"])
    assert code == 0, err
    assert out.startswith("PASS") and "max abs" in out and "cosine" in out
    assert "N (batch) = 1 and 2" in err and err.count("\n") == 1  # one note: the batch default
    assert "set them with --shape NAME=DxDx..." in err  # the CLI names the flag


def test_json_is_exactly_one_document(tmp_path, capsys):
    reference, wrong = _two_convs(perturb=1e-3)
    paths = _save(tmp_path, reference=reference, wrong=wrong)
    code, out, _ = _cli(capsys, paths["reference"], paths["wrong"], "--json", "--bisect")
    assert code == 1
    document = json.loads(out)  # raises if anything else is on stdout
    assert document["passed"] is False
    assert document["bisect"]["tensor"] == "bn1_out"
    output = document["samples"][0]["outputs"][0]
    assert output["name"] == "y" and output["mismatched_elements"] > 0
    assert set(output) >= {"max_abs_error", "max_rel_error", "mean_abs_error", "cosine_similarity",
                           "top1_agreement", "atol", "rtol"}


def test_report_is_json_serializable_and_renders():
    reference, folded = _two_convs()
    report = verify_models(reference, folded)
    json.dumps(report.to_dict(), allow_nan=False)
    text = render_report(report)
    assert text.startswith("PASS ") and "\x1b[" not in text
    worst = max(c.max_abs for sample in report.samples for c in sample.outputs)
    row = next(line for line in text.splitlines() if line.startswith("│ y "))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[:3] == ["y", "float32", "1x4x8x8, 2x4x8x8"]
    assert cells[3] == f"{worst:.2e}" and cells[-2:] == ["1e-04 / 1e-04", "ok"]


# -------------------------------------------------------------------------------- tolerance rule
def test_tolerance_rule_is_atol_plus_rtol_times_reference():
    tol = Tolerance(atol=1e-3, rtol=1e-2)
    a = np.array([0.0, 10.0], dtype=np.float64)
    inside = a + np.array([1e-3, 0.101 - 1e-9])
    outside = a + np.array([0.0, 0.1015])
    assert compare_arrays("t", a, inside, tol)
    result = compare_arrays("t", a, outside, tol)
    assert not result and result.mismatched == 1 and result.worst["index"] == (1,)
    # asymmetric: the reference's magnitude sets the allowance
    assert not compare_arrays("t", np.array([0.0]), np.array([0.05]), tol)
    assert compare_arrays("t", np.array([5.0]), np.array([5.05]), tol)


def test_defaults_per_dtype_and_overrides():
    assert set(DEFAULT_TOLERANCES) == {"float64", "float32", "float16", "bfloat16"}
    loose = [DEFAULT_TOLERANCES[d].rtol for d in ("float64", "float32", "float16")]
    assert loose == sorted(loose) and loose[0] < loose[-1]
    assert DEFAULT_TOLERANCES["float16"].rtol <= DEFAULT_TOLERANCES["bfloat16"].rtol
    options = VerifyOptions(atol=0.5)
    assert options.tolerance("float32") == Tolerance(0.5, DEFAULT_TOLERANCES["float32"].rtol)
    assert options.tolerance("int64") == Tolerance(0.5, 0.0)
    assert VerifyOptions().tolerance("int64") == Tolerance(0.0, 0.0)  # integers: exact


def test_integer_outputs_must_match_exactly():
    assert not compare_arrays("i", np.array([1, 2, 3]), np.array([1, 2, 4]), Tolerance(0, 0))
    assert compare_arrays("i", np.array([1, 2, 3]), np.array([1, 2, 3]), Tolerance(0, 0))


def test_metrics_and_top1_on_2d_outputs():
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    b = np.array([[1.0, 2.0, 3.5], [1.0, 2.0, 3.0]], dtype=np.float32)
    result = compare_arrays("logits", a, b, Tolerance(1e-5, 1e-5))
    assert result.top1 == 0.5
    assert result.max_abs == pytest.approx(2.0) and result.max_rel == pytest.approx(2.0)
    assert result.mean_abs == pytest.approx(4.5 / 6)
    assert result.cosine == pytest.approx(float(np.dot(a.ravel(), b.ravel())
                                                / np.linalg.norm(a) / np.linalg.norm(b)))


# ----------------------------------------------------------------------------------- NaN and Inf
def test_nan_in_output_fails_with_its_position(tmp_path, capsys):
    x = _vi("x", F32, [2, 3])
    reference = _model([helper.make_node("Add", ["x", "c"], ["y"])], [x], [_vi("y", F32, [2, 3])],
                       [_init("c", np.zeros(3, np.float32))])
    candidate = _model([helper.make_node("Add", ["x", "c"], ["y"])], [x], [_vi("y", F32, [2, 3])],
                       [_init("c", np.array([0, np.nan, 0], np.float32))])
    report = verify_models(reference, candidate)
    comparison = report.samples[0].outputs[0]
    assert not report and comparison.nonfinite == 2 and comparison.mismatched == 0
    assert [p["index"] for p in comparison.nonfinite_positions] == [(0, 1), (1, 1)]
    assert "[0, 1]" in comparison.reason()
    paths = _save(tmp_path, reference=reference, candidate=candidate)
    code, out, _ = _cli(capsys, paths["reference"], paths["candidate"], "--json")
    document = json.loads(out)
    assert code == 1
    assert document["samples"][0]["outputs"][0]["nonfinite_positions"][0]["index"] == [0, 1]
    assert document["samples"][0]["outputs"][0]["nonfinite_positions"][0]["candidate"] == "nan"


def test_nan_in_both_models_still_fails():
    x = _vi("x", F32, [4])
    model = _model([helper.make_node("Log", ["x"], ["y"])], [x], [_vi("y", F32, [4])])
    report = verify_models(model, model)  # normal inputs: some are negative, log gives NaN
    assert not report and report.samples[0].outputs[0].nonfinite > 0


# ------------------------------------------------------------------------------------ dtypes
def test_float16_fold_passes_and_wrong_float16_fold_fails():
    reference, folded = _two_convs(dtype=np.float16)
    report = verify_models(reference, folded)
    assert report, render_report(report)
    assert report.samples[0].outputs[0].dtype == "float16"
    assert report.samples[0].outputs[0].tolerance == DEFAULT_TOLERANCES["float16"]
    _, wrong = _two_convs(dtype=np.float16, perturb=0.1)
    assert not verify_models(reference, wrong)


def _bf16_model(factor: float, bf16_input: bool) -> onnx.ModelProto:
    """(x * factor) as bfloat16: onnxruntime's CPU provider runs Cast and Mul(float) only."""
    nodes = [helper.make_node("Mul", ["xf", "k"], ["prod"]),
             helper.make_node("Cast", ["prod"], ["y"], to=BF16)]
    if bf16_input:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=F32))
        x = _vi("x", BF16, [2, 5])
    else:
        nodes.insert(0, helper.make_node("Identity", ["x"], ["xf"]))
        x = _vi("x", F32, [2, 5])
    return _model(nodes, [x], [_vi("y", BF16, [2, 5])], [_init("k", np.float32(factor))])


@pytest.mark.parametrize("bf16_input", [False, True])
def test_bfloat16_outputs_and_inputs(bf16_input):
    reference = _bf16_model(3.0, bf16_input)
    same = _bf16_model(3.0, bf16_input)
    report = verify_models(reference, same)
    assert report
    comparison = report.samples[0].outputs[0]
    assert comparison.dtype == "bfloat16" and comparison.tolerance == DEFAULT_TOLERANCES["bfloat16"]
    assert comparison.max_abs == 0.0
    wrong = verify_models(reference, _bf16_model(3.6, bf16_input))
    assert not wrong and wrong.samples[0].outputs[0].mismatched > 0


def test_int64_and_bool_inputs(tmp_path, capsys):
    """Generated integers are small and non-negative: valid as Gather indices into 8 rows."""
    table = np.arange(24, dtype=np.float32).reshape(8, 3)
    inputs = [_vi("x", F32, [4, 3]), _vi("idx", TensorProto.INT64, [4]),
              _vi("mask", TensorProto.BOOL, [4, 3])]
    nodes = [helper.make_node("Gather", ["table", "idx"], ["rows"]),
             helper.make_node("Where", ["mask", "x", "rows"], ["y"]),
             helper.make_node("Cast", ["mask"], ["count"], to=TensorProto.INT64)]
    outputs = [_vi("y", F32, [4, 3]), _vi("count", TensorProto.INT64, [4, 3])]
    reference = _model(nodes, inputs, outputs, [_init("table", table)])
    report = verify_models(reference, reference, VerifyOptions(samples=3))
    assert report and len(report.samples) == 3
    wrong = _model(nodes, inputs, outputs, [_init("table", table + np.eye(8, 3, dtype=np.float32))])
    assert not verify_models(reference, wrong, VerifyOptions(samples=3))


# ------------------------------------------------------------------------------ dynamic dims
def test_dynamic_dims_default_and_note():
    x = _vi("x", F32, ["N", 3, "H", "W"])
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_vi("y", F32, ["N", 3, "H", "W"])])
    report = verify_models(model, model)
    assert report
    assert [s.input_shapes["x"] for s in report.samples] == [(1, 3, 32, 32), (2, 3, 32, 32)]
    assert report.notes == ("symbolic dims set to defaults: N (batch) = 1 and 2, H = 32, W = 32",)


def test_shape_flag_sets_dims_and_named_dims_follow(tmp_path, capsys):
    inputs = [_vi("a", F32, ["N", 4]), _vi("b", F32, ["N", 4])]
    model = _model([helper.make_node("Add", ["a", "b"], ["y"])], inputs, [_vi("y", F32, ["N", 4])])
    report = verify_models(model, model, VerifyOptions(shapes={"a": (5, 4)}))
    assert [s.input_shapes for s in report.samples] == [{"a": (5, 4), "b": (5, 4)}]
    assert report.notes == ()
    paths = _save(tmp_path, model=model)
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--shape", "a=5x4x1")
    assert code == 2 and err.count("\n") == 1 and "rank 2" in err
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--shape", "c=5x4")
    assert code == 2 and "no input 'c'" in err
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--shape", "a=5by4")
    assert code == 2 and err.startswith("bnfold: error: --shape: a=5by4: bad shape '5by4'")
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--shape", "a=5X4")  # x or X
    assert code == 0, err


def test_batch_statistics_only_show_at_batch_above_1():
    """A 'fold' that normalizes with the batch's own mean agrees at batch 1, and only there."""
    x = _vi("x", F32, ["N", 3])
    y = _vi("y", F32, ["N", 3])
    reference = _model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])
    batch_stats = _model([helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
                          helper.make_node("Add", ["x", "x"], ["twice"]),
                          helper.make_node("Sub", ["twice", "mean"], ["y"])], [x], [y], opset=17)
    report = verify_models(reference, batch_stats)
    assert not report
    assert [bool(s) for s in report.samples] == [True, False]
    assert [s.input_shapes["x"][0] for s in report.samples] == [1, 2]


# -------------------------------------------------------------------------- outputs by name
def _three_outputs(order, spoil=None):
    x = _vi("x", F32, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["n"]),
             helper.make_node("Mul", ["x", "k"], ["m"])]
    outs = {name: _vi(name, F32, [2, 3]) for name in ("r", "n", "m")}
    k = np.float32(2.0 if spoil != "m" else 2.1)
    return _model(nodes, [x], [outs[o] for o in order], [_init("k", k)])


def test_multiple_outputs_in_a_different_order():
    reference = _three_outputs(["r", "n", "m"])
    report = verify_models(reference, _three_outputs(["m", "r", "n"]))
    assert report and [c.name for c in report.samples[0].outputs] == ["r", "n", "m"]
    spoiled = verify_models(reference, _three_outputs(["n", "m", "r"], spoil="m"))
    assert not spoiled
    assert {c.name: c.passed for c in spoiled.samples[0].outputs} == {"r": True, "n": True, "m": False}


def test_missing_output_fails_as_a_mismatch(tmp_path, capsys):
    reference = _three_outputs(["r", "n", "m"])
    candidate = _three_outputs(["r", "n"])
    report = verify_models(reference, candidate)
    assert not report
    assert report.samples[0].outputs[-1].problem == "missing in the candidate"
    paths = _save(tmp_path, reference=reference, candidate=candidate)
    assert _cli(capsys, paths["reference"], paths["candidate"])[0] == 1


def test_output_shape_and_dtype_must_match():
    x = _vi("x", F32, [2, 3])
    reference = _model([helper.make_node("Identity", ["x"], ["y"])], [x], [_vi("y", F32, [2, 3])])
    reshaped = _model([helper.make_node("Reshape", ["x", "s"], ["y"])], [x], [_vi("y", F32, [3, 2])],
                      [_init("s", np.array([3, 2], np.int64))])
    as_double = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], [x],
                       [_vi("y", TensorProto.DOUBLE, [2, 3])])
    assert "shape differs" in verify_models(reference, reshaped).samples[0].outputs[0].problem
    assert "dtype differs" in verify_models(reference, as_double).samples[0].outputs[0].problem


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("candidate_input, message", [
    (_vi("z", F32, ["N", 3]), "declare different inputs"),
    (_vi("x", F16, ["N", 3]), "is float32 in the reference but float16"),
    (_vi("x", F32, ["N", 3, 1]), "rank 2 in the reference but rank 3"),
    (_vi("x", F32, [4, 5]), "dim 1 is 3 in the reference but 5"),
])
def test_inputs_declared_differently_exit_2(tmp_path, capsys, candidate_input, message):
    reference = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", F32, ["N", 3])],
                       [_vi("y", F32, None)])
    name = candidate_input.name
    elem = candidate_input.type.tensor_type.elem_type
    candidate = _model([helper.make_node("Identity", [name], ["y"])], [candidate_input],
                       [_vi("y", elem, None)])
    paths = _save(tmp_path, reference=reference, candidate=candidate)
    code, out, err = _cli(capsys, paths["reference"], paths["candidate"])
    assert code == 2 and out == ""
    assert err.startswith("bnfold: error:") and message in err and err.count("\n") == 1


def test_unknown_provider_lists_the_available_ones(tmp_path, capsys):
    reference, folded = _two_convs()
    paths = _save(tmp_path, reference=reference, folded=folded)
    code, _, err = _cli(capsys, paths["reference"], paths["folded"], "--provider", "NoSuch")
    assert code == 2 and "available:" in err and "CPUExecutionProvider" in err and err.count("\n") == 1
    code, _, _ = _cli(capsys, paths["reference"], paths["folded"], "--provider", "cpu")
    assert code == 0


def test_missing_model_file_and_wrong_arity(tmp_path, capsys):
    reference, _ = _two_convs()
    paths = _save(tmp_path, reference=reference)
    code, _, err = _cli(capsys, paths["reference"], tmp_path / "absent.onnx")
    assert code == 2 and "no such file" in err
    code, _, err = _cli(capsys, paths["reference"])
    assert code == 2 and "REFERENCE and CANDIDATE" in err


# ------------------------------------------------------------------------------ saved inputs
def _gemm_model():
    x = _vi("x", F32, ["N", 3])
    w = np.array([[1.0, -2.0], [0.5, 1.5], [2.0, 0.0]], np.float32)
    return _model([helper.make_node("Gemm", ["x", "w"], ["y"])], [x], [_vi("y", F32, ["N", 2])],
                  [_init("w", w)]), w


def test_inputs_from_npz_file_and_folder(tmp_path, capsys):
    model, _ = _gemm_model()
    paths = _save(tmp_path, model=model)
    folder = tmp_path / "feeds"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.ones((4, 3), np.float32))
    np.savez(folder / "b.npz", **{"input:x": np.zeros((1, 3), np.float64)})  # exact float64 converts
    report = verify_models(paths["model"], paths["model"], VerifyOptions(inputs=folder))
    assert report and [s.label for s in report.samples] == ["a.npz", "b.npz"]
    assert report.samples[0].input_shapes == {"x": (4, 3)}
    np.savez(tmp_path / "bad.npz", z=np.ones((1, 3), np.float32))
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--inputs", tmp_path / "bad.npz")
    assert code == 2 and "'z' is not an input" in err
    np.savez(tmp_path / "lossy.npz", x=np.full((1, 3), 0.1, np.float64))
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--inputs", tmp_path / "lossy.npz")
    assert code == 2 and "do not convert exactly" in err
    code, _, err = _cli(capsys, paths["model"], paths["model"], "--inputs", folder, "--samples", "2")
    assert code == 2 and err.startswith("bnfold: error: --samples: does not apply")


def test_against_reference_file_and_folder(tmp_path, capsys):
    model, w = _gemm_model()
    paths = _save(tmp_path, model=model)
    rng = np.random.default_rng(3)
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(2):
        x = rng.standard_normal((2, 3)).astype(np.float32)
        np.savez(folder / f"r{i}.npz", **{"input:x": x, "output:y": x.astype(np.float64) @ w})
    report = verify_against_reference(folder, paths["model"])
    assert report and report.against_saved_outputs and len(report.samples) == 2
    assert report.samples[0].outputs[0].tolerance == DEFAULT_TOLERANCES["float32"]
    code, out, _ = _cli(capsys, "--against-reference", folder / "r0.npz", paths["model"])
    assert code == 0 and "saved outputs" in out

    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.savez(tmp_path / "off.npz", **{"input:x": x, "output:y": x.astype(np.float64) @ w * 1.01})
    code, out, _ = _cli(capsys, "--against-reference", tmp_path / "off.npz", paths["model"], "--json")
    assert code == 1 and json.loads(out)["passed"] is False
    np.savez(tmp_path / "no_outputs.npz", **{"input:x": x})
    code, _, err = _cli(capsys, "--against-reference", tmp_path / "no_outputs.npz", paths["model"])
    assert code == 2 and "no saved outputs" in err
    code, _, err = _cli(capsys, "--against-reference", folder, paths["model"], "--bisect")
    assert code == 2 and err.startswith("bnfold: error: --bisect: does not apply")


# ---------------------------------------------------------------------- flags for fold --verify
def test_shared_flags_build_options():
    parser = argparse.ArgumentParser()
    add_verify_arguments(parser)
    args = parser.parse_args(["--shape", "x=2x3", "--shape", "y=4", "--samples", "3", "--seed", "7",
                              "--atol", "1e-3", "--rtol", "0", "--provider", "cpu"])
    options = verify_options_from_args(args)
    assert options == VerifyOptions(shapes={"x": (2, 3), "y": (4,)}, samples=3, seed=7, atol=1e-3,
                                    rtol=0.0, provider="cpu")
    with pytest.raises(SystemExit):
        parser.parse_args(["--atol", "-1"])
    with pytest.raises(BnfoldError, match="given twice"):
        verify_options_from_args(parser.parse_args(["--shape", "x=1", "--shape", "x=2"]))
    scalar = verify_options_from_args(parser.parse_args(["--shape", "s="]))
    assert scalar.shapes == {"s": ()}


@pytest.mark.parametrize("text, expected", [("x=1x3x224x224", ("x", (1, 3, 224, 224))),
                                            ("a=b=2X5", ("a=b", (2, 5))), ("s=", ("s", ())),
                                            ("x= 4x2 ", ("x", (4, 2)))])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["x", "=1x2", "x=1xa", "x=0x3", "x=1x", "x=-1", "x=1.5"])
def test_parse_shape_rejects_with_the_option_named(text):
    with pytest.raises(BnfoldError) as info:
        parse_shape(text)
    assert info.value.option == "shapes" and "--" not in info.value.message


def test_seed_makes_inputs_reproducible():
    reference, folded = _two_convs()
    first = verify_models(reference, folded, VerifyOptions(seed=5))
    again = verify_models(reference, folded, VerifyOptions(seed=5))
    other = verify_models(reference, folded, VerifyOptions(seed=6))
    assert first.to_dict() == again.to_dict()
    assert first.samples[0].outputs[0].max_abs != other.samples[0].outputs[0].max_abs


# ------------------------------------------------------------------------ sample models + fold
def _sample_models() -> list[Path]:
    return sorted((ROOT / "sample_models").glob("*.onnx"))


@pytest.mark.parametrize("path", _sample_models() or [None], ids=lambda p: p.stem if p else "none")
def test_correct_fold_passes_on_every_sample_model(path):
    if path is None:
        pytest.skip("no committed sample models")
    model = onnx.load(str(path))
    folded, fold_report = fold.fold_model(model)
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # judged layer by layer
    report = verify_models(model, folded, VerifyOptions(quantized=True) if quantized else VerifyOptions())
    assert report, render_report(report)


def _sample_references() -> list[Path]:
    return [p for p in sorted((ROOT / "sample_models").glob("*.npz")) if p.with_suffix(".onnx").exists()]


@pytest.mark.parametrize("saved", _sample_references() or [None], ids=lambda p: p.stem if p else "none")
def test_sample_model_and_its_fold_match_the_saved_float64_outputs(saved):
    """The files `bnfold export --reference` writes are what --against-reference reads."""
    if saved is None:
        pytest.skip("no committed sample references")
    model = onnx.load(str(saved.with_suffix(".onnx")))
    folded, _ = fold.fold_model(model)
    for candidate in (model, folded):
        report = verify_against_reference(saved, candidate)
        assert report, render_report(report)


def test_a_named_batch_dim_is_the_batch_wherever_it_appears():
    inputs = [_vi("a", F32, ["N", 4]), _vi("b", F32, [4, "N"])]
    nodes = [helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
             helper.make_node("Add", ["a", "bt"], ["y"])]
    model = _model(nodes, inputs, [_vi("y", F32, ["N", 4])])
    report = verify_models(model, model)
    assert report, render_report(report)
    assert [s.input_shapes for s in report.samples] == [{"a": (1, 4), "b": (4, 1)},
                                                        {"a": (2, 4), "b": (4, 2)}]


# ------------------------------------------------------------------------------------- promises
def test_verify_runs_onnxruntime_with_graph_optimizations_off(monkeypatch):
    """onnxruntime's own Conv+BN fusion would compare its fold with ours: every session verify
    creates (bisect's included) must have every graph optimization disabled."""
    import onnxruntime as ort

    levels = []
    real = ort.InferenceSession

    def recording(model, sess_options=None, *args, **kwargs):
        levels.append(sess_options.graph_optimization_level)
        return real(model, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    reference, wrong = _two_convs(perturb=1e-3)
    report = verify_models(reference, wrong, VerifyOptions(bisect=True))
    assert report.bisect is not None and len(levels) >= 4  # two to compare, two or more to bisect
    assert set(levels) == {ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    assert report.to_dict()["graph_optimizations"] == "disabled"


def test_readme_tolerance_table_is_default_tolerances():
    """The README's "Tolerances" table documents DEFAULT_TOLERANCES: changing either side fails."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([0-9.e+-]+) / ([0-9.e+-]+) \|", text, flags=re.MULTILINE)
    documented = {dtype: Tolerance(float(atol), float(rtol)) for dtype, atol, rtol in rows}
    assert documented == DEFAULT_TOLERANCES


def _imported_after(code: str) -> set[str]:
    """The top-level modules imported by running `code` in a fresh interpreter."""
    script = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_building_the_parser_imports_neither_onnxruntime_nor_matplotlib():
    imported = _imported_after("import bnfold.cli\nbnfold.cli.build_parser()")
    assert "onnxruntime" not in imported and "matplotlib" not in imported and "torch" not in imported


def test_candidate_label_names_the_candidate_in_errors(tmp_path, rng):
    """fold --verify verifies a staged copy: its errors and report name the output the user asked for."""
    from bnfold.verify import verify_models
    from tests.builders import conv_bn
    reference = tmp_path / "m.onnx"
    onnx.save(conv_bn(rng), reference)
    broken = conv_bn(rng)
    broken.graph.node[0].op_type = "NoSuchOp"
    staged = tmp_path / ".staged.tmp"
    staged.write_bytes(broken.SerializeToString())
    with pytest.raises(BnfoldError) as caught:
        verify_models(reference, staged, candidate_label="out.onnx")
    assert "out.onnx" in caught.value.message and ".staged.tmp" not in caught.value.message
    report = verify_models(reference, reference, candidate_label="out.onnx")
    assert (report.reference, report.candidate) == (str(reference), "out.onnx")
