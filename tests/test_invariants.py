"""The invariants of docs/design.md ("Invariants"): shared weights, I/O kept, checker passes,
determinism, idempotence, the caller's model untouched, only bnfold's own leftovers removed. Invariant 1
(atomic output) is tested with the CLI, in test_cli_fold.py and test_io.py."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import (assert_same_function, bn_initializers, bn_node, bn_stats, conv_bn, if_model,
                            make_model, run_ort, tensor)


def shared_weight_model(rng) -> onnx.ModelProto:
    """Two Convs read one weight initializer; each has its own BN; a third reader keeps W alive."""
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    inits += bn_initializers(bn_stats(rng, 4), np.float32, "bn1") + bn_initializers(bn_stats(rng, 4), np.float32, "bn2")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             bn_node("c1", "y1", "bn1"), bn_node("c2", "y2", "bn2"),
             helper.make_node("Conv", ["x", "W"], ["y3"], name="conv3")]
    outputs = [tensor("y1", np.float32, None), tensor("y2", np.float32, None), tensor("y3", np.float32, None)]
    return make_model(nodes, [tensor("x", np.float32, [1, 3, 6, 6])], outputs, inits)


def test_shared_weights_each_fold_gets_its_own_copy(rng):
    """design.md, Invariants 4: a weight a third node reads stays as it was; each fold gets a copy."""
    model = shared_weight_model(rng)
    original_w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    folded, report = fold_model(model)
    assert report.folded == 2
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(weights["W"], original_w)  # conv3 still reads the untouched W
    conv_weights = [n.input[1] for n in folded.graph.node]
    assert len(set(conv_weights)) == 3
    assert_same_function(model, folded)


def test_two_convs_share_weight_only_between_them(rng):
    """design.md, Invariants 4: two folds of one shared weight get a copy each."""
    model = shared_weight_model(rng)
    del model.graph.node[4]
    del model.graph.output[2]
    folded, report = fold_model(model)
    assert report.folded == 2
    assert folded.graph.node[0].input[1] != folded.graph.node[1].input[1]
    assert_same_function(model, folded)


def test_callers_model_is_not_mutated(rng):
    """design.md, Passes: fold_model works on a copy; the caller's model is never edited."""
    model = conv_bn(rng)
    before = model.SerializeToString()
    fold_model(model)
    assert model.SerializeToString() == before


def test_io_opsets_metadata_and_untouched_nodes_are_kept(rng):
    """design.md, Invariants 2: inputs, outputs, opsets, IR version, metadata and untouched nodes kept."""
    model = conv_bn(rng)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="keep_me", doc_string="hello"))
    model.graph.output[0].name = "z"
    model.graph.doc_string = "graph doc"
    model.doc_string = "model doc"
    onnx.helper.set_model_props(model, {"author": "bnfold tests"})
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    folded, _ = fold_model(model)
    assert folded.graph.input == model.graph.input
    assert [o.name for o in folded.graph.output] == ["z"]
    assert folded.graph.output[0].type == model.graph.output[0].type
    assert folded.opset_import == model.opset_import and folded.ir_version == model.ir_version
    assert folded.metadata_props == model.metadata_props
    assert (folded.doc_string, folded.graph.doc_string) == ("model doc", "graph doc")
    assert folded.graph.node[-1] == model.graph.node[-1]


def test_checker_passes_and_output_is_deterministic_and_idempotent(rng):
    """design.md, Invariants 3 and 5: valid in, valid out; same input, same bytes; a folded model is
    a fixed point."""
    model = shared_weight_model(rng)
    first, _ = fold_model(model)
    second, _ = fold_model(model)
    onnx.checker.check_model(first, full_check=True)
    assert first.SerializeToString() == second.SerializeToString()
    again, report = fold_model(first)
    assert report.folded == 0
    assert again.SerializeToString() == first.SerializeToString()


def test_bn_inside_if_branch_reading_outer_weights(rng):
    """A BN in a subgraph is folded; the outer initializer it reads is copied, not changed
    (design.md, Invariants 4)."""
    model = if_model(rng)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].graph == "if:then_branch"
    then_branch = next(a.g for a in folded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Conv"]
    assert {t.name for t in folded.graph.initializer} >= {"W"}
    onnx.checker.check_model(folded, full_check=True)
    feeds = {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(folded, feeds)["y"], run_ort(model, feeds)["y"], atol=1e-5, rtol=1e-4)


def test_unused_parameters_are_removed_and_nothing_else(rng):
    """design.md, Invariants 7: the fold's leftovers go, an initializer unused in the input stays."""
    model = conv_bn(rng)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unrelated_unused"))
    folded, _ = fold_model(model)
    names = {t.name for t in folded.graph.initializer}
    assert "unrelated_unused" in names
    assert not names & {"bn_scale", "bn_B", "bn_mean", "bn_var"}
