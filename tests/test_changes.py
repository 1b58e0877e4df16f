"""Names that map back: each decision lists the initializers it rewrote or created and the nodes it
removed or added; a weight the folded node owns keeps its name, a new one is named after the
original (bnfold.changes, rules.base.set_folded_input)."""

from dataclasses import asdict

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import fold_file, fold_model
from bnfold.changes import CREATED, NODE_ADDED, NODE_REMOVED, REWRITTEN, ChangeLog
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, make_model, tensor

F32 = np.float32


def _conv_bn(rng, *, weight="conv1.weight", bias=None, extra_nodes=(), extra_inits=(), extra_outputs=()):
    """x -> Conv(weight[, bias]) -> BN 'bn1' -> y, plus whatever the test adds."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), weight)]
    inputs = ["x", weight]
    if bias is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, 4).astype(np.float32), bias))
        inputs.append(bias)
    inits += bn_initializers(bn_stats(rng, 4), F32, prefix="bn1") + list(extra_inits)
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv1", pads=[1, 1, 1, 1]), bn_node("c", "y", "bn1"),
             *extra_nodes]
    outputs = [tensor("y", F32, [1, 4, 5, 5])] + [tensor(name, F32, None) for name in extra_outputs]
    return make_model(nodes, [tensor("x", F32, [1, 3, 5, 5])], outputs, inits)


def _changes(report, pass_name="fold-batchnorm"):
    result = next(p for p in report.passes if p.name == pass_name)
    return [asdict(d.changes) for d in result.decisions]


def _initializers(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------ the log
def test_capture_holds_only_the_edits_inside_it():
    log = ChangeLog()
    log.record(REWRITTEN, "before", "")
    with log.capture() as changes:
        log.record(CREATED, "new", "")
        log.record(REWRITTEN, "new", "")  # created, then written again: created
        log.record(REWRITTEN, "w", "")
        log.record(REWRITTEN, "w", "")
        log.record(NODE_REMOVED, "bn", "BatchNormalization")
        log.record(NODE_ADDED, "tmp", "Add")
        log.record(NODE_REMOVED, "tmp", "Add")  # added and removed again: neither
    log.record(REWRITTEN, "after", "")
    assert asdict(changes) == {"initializers_rewritten": ["w"], "initializers_created": ["new"],
                               "nodes_removed": [{"name": "bn", "op_type": "BatchNormalization"}],
                               "nodes_added": []}


def test_unnamed_nodes_are_counted_not_merged():
    log = ChangeLog()
    with log.capture() as changes:
        for _ in range(3):
            log.record(NODE_REMOVED, "", "Identity")
        log.record(NODE_ADDED, "", "Identity")
    assert changes.nodes_removed == [{"name": "", "op_type": "Identity"}] * 2 and changes.nodes_added == []


# --------------------------------------------------------------------------- a fold's changes
def test_an_owned_weight_keeps_its_name_and_a_created_bias_is_named_after_it(rng):
    model = _conv_bn(rng)
    folded, report = fold_model(model)
    assert list(folded.graph.node[0].input) == ["x", "conv1.weight", "conv1.bias"]
    assert _changes(report) == [{"initializers_rewritten": ["conv1.weight"], "initializers_created": ["conv1.bias"],
                                 "nodes_removed": [{"name": "bn1", "op_type": "BatchNormalization"}],
                                 "nodes_added": []}]
    assert set(_initializers(folded)) == {"conv1.weight", "conv1.bias"}
    assert_same_function(model, folded)


def test_an_owned_bias_keeps_its_name(rng):
    model = _conv_bn(rng, bias="conv1.bias")
    folded, report = fold_model(model)
    assert _changes(report)[0]["initializers_rewritten"] == ["conv1.bias", "conv1.weight"]
    assert _changes(report)[0]["initializers_created"] == []
    assert_same_function(model, folded)


@pytest.mark.parametrize("weight, bias", [("W", "W_bias"), ("layer.kernel", "layer.kernel_bias"),
                                          ("weight", "bias")])
def test_a_created_bias_is_derived_from_any_weight_name(rng, weight, bias):
    folded, _ = fold_model(_conv_bn(rng, weight=weight))
    assert folded.graph.node[0].input[2] == bias


def test_a_name_already_taken_gets_a_suffix(rng):
    taken = numpy_helper.from_array(np.zeros(2, np.float32), "conv1.bias")
    model = _conv_bn(rng, extra_inits=[taken],
                     extra_nodes=[helper.make_node("Neg", ["conv1.bias"], ["z"], name="other")], extra_outputs=["z"])
    folded, report = fold_model(model)
    assert folded.graph.node[0].input[2] == "conv1.bias_2"
    assert _changes(report)[0]["initializers_created"] == ["conv1.bias_2"]
    np.testing.assert_array_equal(_initializers(folded)["conv1.bias"], np.zeros(2, np.float32))


def test_a_shared_weight_is_copied_under_a_derived_name(rng):
    other = helper.make_node("Conv", ["x", "conv1.weight"], ["z"], name="other", pads=[1, 1, 1, 1])
    model = _conv_bn(rng, extra_nodes=[other], extra_outputs=["z"])
    folded, report = fold_model(model)
    assert list(folded.graph.node[0].input) == ["x", "conv1.weight_bnfold", "conv1.bias"]
    assert _changes(report)[0]["initializers_rewritten"] == []
    assert _changes(report)[0]["initializers_created"] == ["conv1.bias", "conv1.weight_bnfold"]
    np.testing.assert_array_equal(_initializers(folded)["conv1.weight"], _initializers(model)["conv1.weight"])
    assert_same_function(model, folded)


def test_a_weight_read_for_its_shape_only_is_still_owned(rng):
    """dynamo's zero bias reads the weight through Shape: the weight keeps its values' shape and
    dtype, so it is overwritten in place, and the computed bias becomes `conv1.bias`."""
    shape = helper.make_node("Shape", ["conv1.weight"], ["wshape"], name="shape", start=0, end=1)
    model = _conv_bn(rng, extra_nodes=[shape])
    model.graph.output.append(helper.make_tensor_value_info("wshape", onnx.TensorProto.INT64, [1]))
    folded, report = fold_model(model)
    assert _changes(report)[0]["initializers_rewritten"] == ["conv1.weight"]
    assert_same_function(model, folded)


def test_a_weight_read_for_its_shape_is_copied_when_the_shape_changes(rng):
    """Merging a 1x3 and a 3x1 branch grows the kept Conv's kernel to 3x3: a Shape reader of its
    weight would see that, so the weight is copied, not overwritten."""
    from tests.test_reparameterize import Block
    block = Block(rng)
    block.add(block.conv("c13", (1, 3), pads=[0, 1, 0, 1]), block.conv("c31", (3, 1), pads=[1, 0, 1, 0]), "y")
    block.nodes += [helper.make_node("Shape", [f"{name}_W"], [f"{name}_shape"], name=f"{name}_shape")
                    for name in ("c13", "c31")]
    model = block.model("y")
    model.graph.output.extend(helper.make_tensor_value_info(f"{name}_shape", onnx.TensorProto.INT64, [4])
                              for name in ("c13", "c31"))
    folded, report = fold_model(model)
    merged = next(p for p in report.passes if p.name == "reparameterize").decisions[0]
    assert merged.reason == "merged"  # into c13, the first branch
    assert (merged.changes.initializers_rewritten, merged.changes.initializers_created) == (["c13_B"], ["c13_W_bnfold"])
    assert {"c13_W", "c31_W"} <= set(_initializers(folded))
    assert_same_function(model, folded, atol=1e-4)


def test_steps_folded_along_are_listed_as_removed(rng):
    model = _conv_bn(rng)
    model.graph.node.insert(1, helper.make_node("Identity", ["c"], ["i"], name="step"))
    model.graph.node[2].input[0] = "i"
    folded, report = fold_model(model)
    assert sorted(n["name"] for n in _changes(report)[0]["nodes_removed"]) == ["bn1", "step"]
    assert_same_function(model, folded)


def test_a_refused_bn_changes_nothing(rng):
    model = _conv_bn(rng, extra_nodes=[helper.make_node("Relu", ["c"], ["r"], name="relu")], extra_outputs=["r"])
    _, report = fold_model(model)
    assert report.decisions[0].reason == "neighbour-has-other-consumers"
    assert _changes(report) == [{"initializers_rewritten": [], "initializers_created": [], "nodes_removed": [],
                                 "nodes_added": []}]


def test_matmul_bn_lists_the_add_it_inserts(rng):
    inits = [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "fc.weight")]
    inits += bn_initializers(bn_stats(rng, 6), F32)
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["m"], name="fc"), bn_node("m", "y")]
    model = make_model(nodes, [tensor("x", F32, [5, 4])], [tensor("y", F32, [5, 6])], inits)
    folded, report = fold_model(model)
    assert _changes(report) == [{"initializers_rewritten": ["fc.weight"], "initializers_created": ["fc.bias"],
                                 "nodes_removed": [{"name": "bn", "op_type": "BatchNormalization"}],
                                 "nodes_added": [{"name": "fc_bias", "op_type": "Add"}]}]
    assert_same_function(model, folded)


def test_other_passes_list_their_changes(rng):
    from tests.test_lower_standalone import relu_bn
    _, report = fold_model(relu_bn(rng), lower_standalone="mul-add")
    assert _changes(report, "lower-standalone") == [{
        "initializers_rewritten": [], "initializers_created": ["bn_scale_bnfold", "bn_B_bnfold"],
        "nodes_removed": [{"name": "bn", "op_type": "BatchNormalization"}],
        "nodes_added": [{"name": "bn_mul", "op_type": "Mul"}, {"name": "bn_add", "op_type": "Add"}]}]
    dead = next(p for p in report.passes if p.name == "remove-dead-code")
    assert all(d.changes.nodes_removed == [{"name": d.node, "op_type": d.op_type}] for d in dead.decisions)


def test_a_merge_lists_every_branch_node_it_removed(rng):
    from tests.test_reparameterize import Block
    block = Block(rng)
    block.add(block.conv("c3", (3, 3), pads=[1, 1, 1, 1], bias=False), block.conv("c1", (1, 1), bias=False), "y")
    _, report = fold_model(block.model("y"))
    merged = next(p for p in report.passes if p.name == "reparameterize").decisions[0]
    removed = {n["name"] for n in merged.changes.nodes_removed}
    kept = {"c3", "c1"} - removed
    assert len(kept) == 1 and len(removed) == 2  # the other Conv and the Add
    assert merged.changes.initializers_created == [f"{kept.pop()}_W_bias"]


# ------------------------------------------------------------------ names of a torch model
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_folded_weights_map_to_the_fused_torch_model_by_name(tmp_path, exporter):
    """Export a torch model, fold it, and fuse its Conv+BN pairs in torch (the deploy form): every
    initializer the fold rewrote or created is a parameter of the fused model with the same name
    and values, and every fused parameter is in the folded model under its own name."""
    torch = pytest.importorskip("torch")
    from bnfold.export import export_model
    from bnfold.zoo import SAMPLES
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    built = []
    sample = SAMPLES["resnet_small"]

    def factory():
        built.append(sample.factory())
        return built[-1]

    path = tmp_path / "model.onnx"
    export_model(factory, path, input_shapes=[(1, 3, 32, 32)], exporter=exporter, randomize_bn=True)
    report = fold_file(path, tmp_path / "folded.onnx")
    module = built[-1].eval()
    for seq in module.modules():
        children = list(seq.children())
        if isinstance(seq, torch.nn.Sequential) and len(children) >= 2 \
                and isinstance(children[0], torch.nn.Conv2d) and isinstance(children[1], torch.nn.BatchNorm2d):
            seq[0] = fuse_conv_bn_eval(children[0], children[1])
            seq[1] = torch.nn.Identity()
    fused = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    folded = _initializers(onnx.load(tmp_path / "folded.onnx"))
    touched = [n for d in report.decisions for n in d.changes.initializers_rewritten + d.changes.initializers_created]
    assert report.folded == report.total and len(touched) == 2 * report.total
    for name in touched:
        np.testing.assert_allclose(folded[name], fused[name], rtol=1e-5, atol=1e-6, err_msg=name)
    convs = [k for k in fused if k.endswith((".weight", ".bias")) and fused[k].ndim in (1, 4) and k in folded]
    assert set(touched) <= set(convs)


def test_a_computed_weight_is_replaced_by_an_initializer_named_after_it(rng):
    """A weight from a Constant node is no initializer to overwrite: the folded one is created as
    `<name>_bnfold`, and the bias, still named after the weight's own name, `conv1.bias`."""
    model = _conv_bn(rng)
    weight = model.graph.initializer[0]
    del model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["conv1.weight"], name="w", value=weight))
    folded, report = fold_model(model)
    assert list(folded.graph.node[0].input) == ["x", "conv1.weight_bnfold", "conv1.bias"]
    assert _changes(report)[0]["initializers_created"] == ["conv1.bias", "conv1.weight_bnfold"]
    assert_same_function(model, folded)
