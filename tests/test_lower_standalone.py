"""The lower-standalone pass (bnfold/passes/lower_standalone.py): each BatchNormalization no rule
folds becomes Mul then Add when asked, and computes what the BN did, by onnxruntime (optimizations
off) and onnx's reference evaluator; every BN it must not lower stays with its reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import reasons
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.fold import fold_model

from .builders import (assert_close, bn_initializers, bn_node, bn_stats, make_model, op_types, oracles_for,
                       random_feeds, run_reference, tensor)


def relu_bn(rng, *, shape=(2, 6, 5, 5), dtype=np.float32, opset=17, stats=None, conv=True,
            extra_outputs=(), **bn_attrs) -> onnx.ModelProto:
    """x -> [Conv ->] Relu -> BN -> y: nothing linear next to the BN."""
    channels = shape[1] if len(shape) > 1 else 1  # onnx reads a rank-1 input as one channel
    nodes, inits, source = [], [], "x"
    if conv:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (channels, channels, 1, 1)).astype(dtype), "W"))
        nodes.append(helper.make_node("Conv", ["x", "W"], ["c"], name="conv"))
        source = "c"
    nodes += [helper.make_node("Relu", [source], ["r"], name="relu"), bn_node("r", "y", **bn_attrs)]
    nodes[-1].output.extend(extra_outputs)
    inits += bn_initializers(stats or bn_stats(rng, channels), dtype)
    return make_model(nodes, [tensor("x", dtype, list(shape))], [tensor("y", dtype, list(shape))], inits, opset)


def lower(model, **options):
    return fold_model(model, lower_standalone="mul-add", **options)


def decisions(report, name: str = "lower-standalone") -> list[tuple[str, str]]:
    return [(d.node, d.reason) for r in report.passes if r.name == name for d in r.decisions]


def assert_computes(original: onnx.ModelProto, lowered: onnx.ModelProto, atol=1e-5, rtol=1e-4) -> None:
    """The lowered model, run by onnxruntime and by the reference evaluator, gives what the original
    gives under every oracle that can run it."""
    feeds = random_feeds(original)
    runs = oracles_for(lowered)
    assert [name for name, _ in runs] == ["onnxruntime", "reference"]
    expected = [run(original, feeds) for _, run in oracles_for(original)]
    assert expected
    for values in expected:
        for name, run in runs:
            assert_close(values, run(lowered, feeds), atol, rtol, f"{name}: ")


def test_bn_after_relu_becomes_mul_then_add(rng):
    model = relu_bn(rng)
    lowered, report = lower(model)
    assert decisions(report, "fold-batchnorm") == [("bn", reasons.NO_FOLDABLE_NEIGHBOUR)]
    assert decisions(report) == [("bn", reasons.LOWERED)]
    assert op_types(lowered) == ["Conv", "Relu", "Mul", "Add"]
    mul, add = lowered.graph.node[2:]
    assert (mul.name, add.name) == ("bn_mul", "bn_add") and list(add.output) == ["y"]
    constants = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    assert mul.input[1] == "bn_scale_bnfold" and add.input[1] == "bn_B_bnfold"
    assert constants["bn_scale_bnfold"].shape == (6, 1, 1) and constants["bn_B_bnfold"].dtype == np.float32
    assert set(constants) == {"W", "bn_scale_bnfold", "bn_B_bnfold"}  # the BN's parameters are gone
    onnx.checker.check_model(lowered, full_check=True)
    assert_computes(model, lowered)


def test_constants_are_computed_in_float64_and_rounded_once(rng):
    stats = bn_stats(rng, 6)
    lowered, _ = lower(relu_bn(rng, stats=stats))
    constants = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    gamma, beta, mean, var = (stats[k].astype(np.float32).astype(np.float64) for k in ("scale", "B", "mean", "var"))
    scale = gamma / np.sqrt(var + np.float64(np.float32(1e-5)))
    assert np.array_equal(constants["bn_scale_bnfold"].ravel(), scale.astype(np.float32))
    assert np.array_equal(constants["bn_B_bnfold"].ravel(), (beta - mean * scale).astype(np.float32))


def test_keep_is_the_default_and_changes_nothing(rng):
    model = relu_bn(rng)
    kept, report = fold_model(model)
    assert decisions(report) == []
    assert kept.SerializeToString() == model.SerializeToString()


def test_folded_bn_is_folded_not_lowered(rng):
    """Conv -> BN -> Relu -> BN: the first folds (the fold pass runs first), the second is lowered."""
    stats = [bn_stats(rng, 6), bn_stats(rng, 6)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "b1", prefix="bn1"),
             helper.make_node("Relu", ["b1"], ["r"], name="relu"), bn_node("r", "y", prefix="bn2")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32), "W"),
             *bn_initializers(stats[0], np.float32, "bn1"), *bn_initializers(stats[1], np.float32, "bn2")]
    model = make_model(nodes, [tensor("x", np.float32, [1, 4, 7, 7])], [tensor("y", np.float32, [1, 6, 5, 5])],
                       inits)
    lowered, report = lower(model)
    assert decisions(report, "fold-batchnorm") == [("bn1", reasons.FOLDED), ("bn2", reasons.NO_FOLDABLE_NEIGHBOUR)]
    assert decisions(report) == [("bn2", reasons.LOWERED)]
    assert op_types(lowered) == ["Conv", "Relu", "Mul", "Add"]
    assert_computes(model, lowered)


def test_excluded_bn_is_kept(rng):
    model = relu_bn(rng)
    kept, report = lower(model, exclude_nodes=["bn"])
    assert decisions(report) == [("bn", reasons.EXCLUDED_BY_USER)]
    assert kept.SerializeToString() == model.SerializeToString()


def test_unknown_rank_is_refused(rng):
    model = relu_bn(rng, conv=False)
    for value in (model.graph.input[0], model.graph.output[0]):  # onnx's full checker wants them, bnfold not
        value.type.tensor_type.ClearField("shape")
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.RANK_UNKNOWN)]
    assert kept.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 9), (1, 6, 3, 4, 5)])
def test_every_rank_broadcasts_over_axis_1(rng, shape):
    model = relu_bn(rng, shape=shape, conv=False)
    lowered, report = lower(model)
    assert decisions(report) == [("bn", reasons.LOWERED)]
    scale = next(t for t in lowered.graph.initializer if t.name == "bn_scale_bnfold")
    assert list(scale.dims) == [6] + [1] * (len(shape) - 2)
    assert_computes(model, lowered)


def test_float16_input_gets_float16_constants(rng):
    model = relu_bn(rng, dtype=np.float16)
    lowered, report = lower(model)
    assert decisions(report) == [("bn", reasons.LOWERED)]
    assert {t.data_type for t in lowered.graph.initializer} == {TensorProto.FLOAT16}
    onnx.checker.check_model(lowered, full_check=True)
    assert_computes(model, lowered, atol=5e-2, rtol=1e-2)


def test_constants_that_overflow_the_input_dtype_are_refused(rng):
    stats = bn_stats(rng, 6)
    stats["scale"][2], stats["var"][2] = 1e4, 0.0  # scale = 1e4 / sqrt(1e-5) > float16's 65504
    model = relu_bn(rng, dtype=np.float16, stats=stats)
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.DTYPE_OVERFLOW)]
    assert kept.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("opset", [7, 8])
def test_spatial_0_constant_per_channel_is_lowered(rng, opset):
    """spatial=0 (opsets 7-8) has parameters per activation, [C, H, W]; constant over H, W they are
    one value per channel."""
    stats = {k: np.repeat(v[:, None, None], 5, 1).repeat(5, 2) for k, v in bn_stats(rng, 6).items()}
    model = relu_bn(rng, opset=opset, stats=stats, spatial=0)
    lowered, report = lower(model)
    assert decisions(report) == [("bn", reasons.LOWERED)]
    assert_computes(model, lowered)


def test_spatial_0_varying_inside_a_channel_is_refused(rng):
    stats = {k: np.repeat(v[:, None, None], 5, 1).repeat(5, 2) for k, v in bn_stats(rng, 6).items()}
    stats["mean"][1, 2, 3] += 1.0
    model = relu_bn(rng, opset=8, stats=stats, spatial=0)
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.NON_SPATIAL_BN)]
    assert kept.SerializeToString() == model.SerializeToString()


def test_opset_6_uses_the_broadcast_attributes_of_its_mul_and_add(rng):
    """Before opset 7, Mul and Add broadcast only with broadcast=1, a [C] constant aligned at axis=1.
    No runtime at hand runs them (onnxruntime starts at opset 7, the reference evaluator ignores the
    attributes), so the check reads them as the operator defines them: the constant placed at axis 1."""
    model = relu_bn(rng, opset=6, is_test=1)
    lowered, report = lower(model)
    assert decisions(report) == [("bn", reasons.LOWERED)]
    onnx.checker.check_model(lowered, full_check=True)
    for node in lowered.graph.node[2:]:
        assert {a.name: a.i for a in node.attribute} == {"broadcast": 1, "axis": 1}
    assert [list(t.dims) for t in lowered.graph.initializer if t.name.endswith("_bnfold")] == [[6], [6]]
    as_defined = onnx.ModelProto()
    as_defined.CopyFrom(lowered)
    for tensor_ in as_defined.graph.initializer:
        if tensor_.name.endswith("_bnfold"):
            tensor_.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor_).reshape(-1, 1, 1), tensor_.name))
    for node in as_defined.graph.node:
        del node.attribute[:]
    feeds = random_feeds(model)
    assert_close(run_reference(model, feeds), run_reference(as_defined, feeds), 1e-5, 1e-4)


def test_training_mode_bn_is_kept_unless_assumed_inference(rng):
    model = relu_bn(rng, opset=15, training_mode=1, extra_outputs=["rm", "rv"])
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.TRAINING_MODE)]
    lowered, report = lower(model, assume_inference=True)
    assert decisions(report, "assume-inference") == [("bn", reasons.INFERENCE_ASSUMED)]
    assert decisions(report) == [("bn", reasons.LOWERED)]
    assert op_types(lowered) == ["Conv", "Relu", "Mul", "Add"]
    inference = relu_bn(np.random.default_rng(1234), opset=15)
    del inference.graph.initializer[:]
    inference.graph.initializer.extend(model.graph.initializer)
    assert_computes(inference, lowered)


def test_bn_in_a_subgraph_is_lowered_with_the_rank_of_an_outer_tensor(rng):
    """An If branch's BN reads the main graph's Relu output: its rank comes from the outer graph."""
    branch = helper.make_graph([bn_node("r", "inner")], "branch", [], [tensor("inner", np.float32, [2, 6, 5, 5])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [tensor("x", np.float32, [2, 6, 5, 5]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [tensor("y", np.float32, [2, 6, 5, 5])], bn_initializers(bn_stats(rng, 6), np.float32))
    lowered, report = lower(model)
    lowered_in = [(d.graph, d.node, d.reason) for p in report.passes if p.name == "lower-standalone" for d in p.decisions]
    assert lowered_in == [("if:else_branch", "bn", reasons.LOWERED), ("if:then_branch", "bn", reasons.LOWERED)]
    assert [n.op_type for n in lowered.graph.node[1].attribute[0].g.node] == ["Mul", "Add"]
    onnx.checker.check_model(lowered, full_check=True)
    assert_computes(model, lowered)


def test_bad_value_is_an_error_naming_the_option(rng):
    with pytest.raises(BnfoldError) as caught:
        fold_model(relu_bn(rng), lower_standalone="depthwise")
    assert caught.value.option == "lower_standalone" and "'depthwise'" in caught.value.message


# ------------------------------------------------------------------------------------- command line
@pytest.fixture
def relu_bn_file(tmp_path, rng):
    path = tmp_path / "model.onnx"
    onnx.save(relu_bn(rng), path)
    return path


@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_bad_value_is_one_line_and_exit_2(relu_bn_file, tmp_path, capsys, command):
    out = ["-o", str(tmp_path / "out.onnx")] if command == "fold" else []
    assert main([command, str(relu_bn_file), *out, "--lower-standalone", "depthwise"]) == 2
    err = capsys.readouterr().err
    assert err == "bnfold: error: --lower-standalone: unknown value 'depthwise': expected keep or mul-add\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_fold_lowers_and_reports_it(relu_bn_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["fold", str(relu_bn_file), "-o", str(out), "--lower-standalone", "mul-add", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    passes = {p["name"]: p["decisions"] for p in document["passes"]}
    assert [(d["node"], d["reason"]) for d in passes["lower-standalone"]] == [("bn", "lowered")]
    assert document["op_counts"]["after"] == {"Add": 1, "Conv": 1, "Mul": 1, "Relu": 1}
    assert_computes(onnx.load(relu_bn_file), onnx.load(out))


def test_inspect_shows_what_would_be_lowered(relu_bn_file, capsys):
    assert main(["inspect", str(relu_bn_file), "--lower-standalone", "mul-add"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any("lower-standalone" in row and "lowered" in row for row in rows)
    assert main(["inspect", str(relu_bn_file)]) == 0
    assert not any("lowered" in row for row in capsys.readouterr().out.splitlines())


def test_rank_1_is_refused(rng):
    """A rank-1 input is one channel (onnx's shape inference reads it so); bnfold lowers ranks >= 2."""
    model = relu_bn(rng, shape=(1,), conv=False, stats=bn_stats(rng, 1))
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.RANK_UNSUPPORTED)]
    assert kept.SerializeToString() == model.SerializeToString()


def test_input_declared_with_a_non_float_type_is_refused(rng):
    """A malformed model (fold_model runs no checker): the BN's input declared int32."""
    model = relu_bn(rng, conv=False)
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.INT32, [2, 6, 5, 5]))
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.DTYPE_UNSUPPORTED)]
    assert kept.SerializeToString() == model.SerializeToString()


def test_channel_count_other_than_the_inputs_is_refused(rng):
    """A malformed model: 6 BN parameters for an input with 5 channels would broadcast wrongly."""
    model = relu_bn(rng, conv=False)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    kept, report = lower(model)
    assert decisions(report) == [("bn", reasons.CHANNEL_AXIS_MISMATCH)]
    assert kept.SerializeToString() == model.SerializeToString()


def test_bn_whose_output_nothing_reads_stays_as_mul_add(rng):
    """A BN already unused in the input: lowered, and its Mul and Add stay (bnfold removes only its
    own leftovers, design.md Invariants 7)."""
    model = relu_bn(rng, conv=False)
    model.graph.output[0].name = "r"
    lowered, report = lower(model)
    assert decisions(report) == [("bn", reasons.LOWERED)]
    assert op_types(lowered) == ["Relu", "Mul", "Add"]


def test_the_summary_counts_the_lowered_bns():
    """densenet_small keeps 8 BNs after folding; with mul-add the report says all 8 were lowered."""
    from pathlib import Path

    from rich.console import Console

    from bnfold.report import summary_table
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "densenet_small.onnx"
    _, report = fold_model(onnx.load(sample), lower_standalone="mul-add")
    assert (report.to_dict()["lowered"], report.left_by_reason) == (8, {"no-foldable-neighbour": 8})
    console = Console(record=True, width=120)
    console.print(summary_table(report))
    assert "of those, lowered to Mul + Add │        8" in console.export_text()
    _, kept = fold_model(onnx.load(sample))
    assert kept.to_dict()["lowered"] == 0


def test_the_benchmark_turns_each_lowered_pair_into_a_depthwise_conv(rng):
    """benchmarks/lower_standalone.py measures a third form, a 1x1 depthwise Conv built from the
    Mul + Add this pass writes: it must find every pair and compute the same."""
    from tests.builders import load_benchmark
    model = relu_bn(rng)
    lowered, _ = lower(model)
    conv = load_benchmark("lower_standalone").depthwise(lowered)
    assert op_types(conv) == ["Conv", "Relu", "Conv"]
    assert_computes(model, conv)
