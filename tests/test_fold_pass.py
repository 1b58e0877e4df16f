"""The fold pass (bnfold.passes.fold_batchnorm) and run_pipeline: decisions, excluded nodes, released names."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.batchnorm import training_mode_refusal
from bnfold.errors import BnfoldError
from bnfold.fold import fold_model
from bnfold.graph import ModelContext
from bnfold.passes import FoldBatchNorm, FoldOptions, PipelineState, run_pipeline
from tests.builders import bn_initializers, bn_node, bn_stats, conv_bn, make_model, tensor


def test_folded_decision_names_rule_and_neighbour(rng):
    _, report = fold_model(conv_bn(rng))
    d = report.decisions[0]
    assert (d.node, d.reason, d.rule, d.neighbour, d.neighbour_op, d.graph) == (
        "bn", "folded", d.rule, "conv", "Conv", "")
    assert d.rule


def test_excluded_bn_is_left_with_its_reason(rng):
    _, report = fold_model(conv_bn(rng), exclude_nodes=["bn"])
    d = report.decisions[0]
    assert (d.reason, d.detail) == ("excluded-by-user", "named by --exclude-node")
    assert next(p for p in report.passes if p.name == "fold-batchnorm").modified is False


def test_unknown_excluded_names_are_an_error(rng):
    with pytest.raises(BnfoldError) as info:
        fold_model(conv_bn(rng), exclude_nodes=["zz", "nope"])
    err = info.value
    assert err.message == "nope: no BatchNormalization node has that name" == str(err)
    assert err.note == "`bnfold inspect MODEL` lists their names"
    assert err.option == "exclude_nodes"


def test_bn_in_the_ai_onnx_domain_is_a_batchnorm(rng):
    model = conv_bn(rng)
    model.graph.node[1].domain = "ai.onnx"
    folded, report = fold_model(model)
    assert report.folded == 1 and [n.op_type for n in folded.graph.node] == ["Conv"]
    _, report = fold_model(model, exclude_nodes=["bn"])
    assert report.decisions[0].reason == "excluded-by-user"


@pytest.mark.parametrize("case", ["bn-then-conv", "relu-bn-gemm"])
def test_rules_after_the_first_are_tried(rng, case):
    """The first rule (Conv -> BN) does not match a BN fed by an input or a Relu; later rules still do."""
    inits = bn_initializers(bn_stats(rng, 4), np.float32)
    if case == "bn-then-conv":
        inits.append(numpy_helper.from_array(rng.normal(size=(6, 4, 1, 1)).astype(np.float32), "W"))
        nodes = [bn_node("x", "h"), helper.make_node("Conv", ["h", "W"], ["y"], name="conv")]
        x = tensor("x", np.float32, [2, 4, 3, 3])
        expected = ("conv", "Conv")
    else:
        inits.append(numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "B"))
        nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "h"),
                 helper.make_node("Gemm", ["h", "B"], ["y"], name="gemm")]
        x = tensor("x", np.float32, [5, 4])
        expected = ("gemm", "Gemm")
    _, report = fold_model(make_model(nodes, [x], [tensor("y", np.float32, None)], inits))
    d = report.decisions[0]
    assert d.reason == "folded" and (d.neighbour, d.neighbour_op) == expected


def test_released_names_accumulate_over_graphs(rng):
    model = conv_bn(rng)
    state = PipelineState(model, ModelContext(model), released={"earlier"})
    result = FoldBatchNorm().run(state)
    assert result.modified is True
    assert {"earlier", "bn_scale", "bn_B", "bn_mean", "bn_var"} <= state.released


def test_run_pipeline_runs_the_given_passes(rng):
    model = conv_bn(rng)
    state = PipelineState(model, ModelContext(model), FoldOptions())
    results = run_pipeline(state, passes=[FoldBatchNorm()])
    assert [r.name for r in results] == ["fold-batchnorm"]
    assert {"bn_scale", "bn_var"} <= {t.name for t in model.graph.initializer}  # no dead-code pass ran


def test_training_mode_details():
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)
    assert training_mode_refusal(bn, 15) == ("training-mode", "training_mode=1: normalizes with batch statistics")
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"])
    assert training_mode_refusal(bn, 9) == (
        "training-mode", "declares training outputs (rm, rv) at opset 9, which makes runtimes normalize with "
        "batch statistics")


def test_a_later_rule_folds_after_an_earlier_one_refuses(rng):
    """conv1 -> BN -> conv2: conv1's output is also a graph output, so conv-bn refuses; bn-conv (no
    padding) still folds the BN forward, and the decision is the later rule's."""
    from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, make_model, tensor
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), "W1"),
             onnx.numpy_helper.from_array(rng.normal(0, 0.5, (5, 4, 1, 1)).astype(np.float32), "W2"),
             *bn_initializers(bn_stats(rng, 4), np.float32)]
    nodes = [onnx.helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"), bn_node("c1", "b"),
             onnx.helper.make_node("Conv", ["b", "W2"], ["y"], name="conv2")]
    model = make_model(nodes, [tensor("x", np.float32, [1, 3, 5, 5])],
                       [tensor("y", np.float32, None), tensor("c1", np.float32, None)], inits)
    folded, report = fold_model(model)
    decision = report.decisions[0]
    assert (decision.reason, decision.rule, decision.neighbour) == ("folded", "bn-conv", "conv2")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv"]
    assert_same_function(model, folded)
