"""Identity and inference-mode Dropout between a BN and its linear op: folded through, and removed only
with the BN; every condition that makes such a node an identity has a refusal test."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, make_model, op_types, tensor

TRANSPARENT = ("Identity", "Dropout")


def transparent(kind: str, source: str, target: str, name: str, inits: list, opset: int) -> list:
    """One pass-through node `source` -> `target`: Identity, Dropout, Dropout with a ratio (any ratio is
    the identity in inference mode), or Dropout with a training_mode that is a constant false."""
    if kind == "Identity":
        return [helper.make_node("Identity", [source], [target], name=name)]
    attrs = {"is_test": 1} if opset < 7 else {}
    if kind == "Dropout" or opset < 12:
        return [helper.make_node("Dropout", [source], [target], name=name, **attrs)]
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), f"{name}_ratio"))
    if kind == "DropoutRatio":  # declares its (unused) mask output too
        return [helper.make_node("Dropout", [source, f"{name}_ratio"], [target, f"{name}_mask"], name=name)]
    off = helper.make_node("Constant", [], [f"{name}_off"], name=f"{name}_off", value=helper.make_tensor(
        f"{name}_off", TensorProto.BOOL, [], [False]))
    return [off, helper.make_node("Dropout", [source, f"{name}_ratio", f"{name}_off"], [target], name=name)]


def chain(kinds, source: str, target: str, prefix: str, inits: list, opset: int) -> list:
    """Pass-through nodes of `kinds`, in order, from `source` to `target`."""
    names = [source] + [f"{prefix}{i}" for i in range(len(kinds) - 1)] + [target]
    nodes = []
    for i, kind in enumerate(kinds):
        nodes += transparent(kind, names[i], names[i + 1], f"{prefix}{i}_{kind.lower()}", inits, opset)
    return nodes


def linear_then_bn(rng, kinds, neighbour="Conv", opset=17):
    """x -> Conv/Gemm/MatMul -> kinds... -> BN -> y."""
    inits = bn_initializers(bn_stats(rng, 6), np.float32)
    if neighbour == "Conv":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32), "W"))
        x_shape, inputs = [2, 4, 7, 7], ["x", "W"]
    else:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (4, 6)).astype(np.float32), "W"))
        x_shape, inputs = [5, 4], ["x", "W"]
    nodes = [helper.make_node(neighbour, inputs, ["lin_out"], name="linear")]
    nodes += chain(kinds, "lin_out", "bn_in", "t", inits, opset)
    nodes.append(bn_node("bn_in", "y", **({"is_test": 1} if opset < 7 else {})))
    return make_model(nodes, [tensor("x", np.float32, x_shape)], [tensor("y", np.float32, None)], inits, opset)


def bn_then_linear(rng, kinds, neighbour="Conv", opset=17):
    """x -> BN -> kinds... -> Conv (no padding) / Gemm -> y."""
    inits = bn_initializers(bn_stats(rng, 4), np.float32)
    if neighbour == "Conv":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32), "W"))
        x_shape = [2, 4, 7, 7]
    else:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (4, 6)).astype(np.float32), "W"))
        x_shape = [5, 4]
    nodes = [bn_node("x", "bn_out")] + chain(kinds, "bn_out", "lin_in", "t", inits, opset)
    nodes.append(helper.make_node(neighbour, ["lin_in", "W"], ["y"], name="linear"))
    return make_model(nodes, [tensor("x", np.float32, x_shape)], [tensor("y", np.float32, None)], inits, opset)


def assert_folded_through(model, rule, atol=1e-4, runnable=True):
    folded, report = fold_model(model)
    decision = report.decisions[0]
    assert decision.reason == "folded" and decision.rule == rule, decision
    assert not set(TRANSPARENT) & set(op_types(folded)), op_types(folded)
    assert "; removed " in decision.detail
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    onnx.checker.check_model(folded, full_check=True)
    if runnable:
        assert_same_function(model, folded, atol=atol)
    return folded


@pytest.mark.parametrize("kinds", [["Identity"], ["Dropout"], ["DropoutRatio"], ["DropoutOff"],
                                   ["Identity", "Dropout", "Identity"], ["DropoutOff", "Identity", "DropoutRatio"]],
                         ids=str)
def test_conv_then_chain_then_bn(rng, kinds):
    folded = assert_folded_through(linear_then_bn(rng, kinds), "conv-bn")
    assert op_types(folded) == ["Conv"] and folded.graph.node[0].output[0] == "y"
    assert not folded.graph.initializer[-1].name.endswith("_ratio")  # the Dropout's leftovers are gone


@pytest.mark.parametrize("neighbour, rule", [("Gemm", "gemm-bn"), ("MatMul", "matmul-bn")])
def test_gemm_and_matmul_then_chain_then_bn(rng, neighbour, rule):
    assert_folded_through(linear_then_bn(rng, ["Identity", "Dropout"], neighbour), rule)


def test_matmul_add_then_chain_then_bn(rng):
    model = linear_then_bn(rng, ["Identity"], "MatMul")
    graph = model.graph
    graph.node[0].output[0] = "mm"
    graph.node.insert(1, helper.make_node("Add", ["mm", "bias"], ["lin_out"], name="add"))
    graph.initializer.append(numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "bias"))
    folded = assert_folded_through(model, "matmul-bn")
    assert op_types(folded) == ["MatMul", "Add"]


@pytest.mark.parametrize("kinds, neighbour, rule", [
    (["Identity"], "Conv", "bn-conv"), (["Dropout"], "Gemm", "bn-linear"),
    (["DropoutOff", "Identity"], "MatMul", "bn-linear"), (["Identity", "DropoutRatio"], "Conv", "bn-conv")], ids=str)
def test_bn_then_chain_then_linear(rng, kinds, neighbour, rule):
    assert_folded_through(bn_then_linear(rng, kinds, neighbour), rule)


@pytest.mark.parametrize("opset", [6, 7, 10, 12, 13, 22])
def test_every_dropout_opset(rng, opset):
    """Opset 6 (is_test=1) runs on no oracle: onnxruntime has no BN before 7, onnx none for Dropout."""
    model = linear_then_bn(rng, ["Dropout", "DropoutRatio"], opset=opset)
    assert_folded_through(model, "conv-bn", runnable=opset >= 7)


def test_shape_readers_of_removed_tensors_are_redirected(rng):
    model = linear_then_bn(rng, ["Identity"])
    model.graph.node.insert(2, helper.make_node("Shape", ["bn_in"], ["shape"], name="shape"))
    model.graph.output.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    folded = assert_folded_through(model, "conv-bn")
    assert next(n for n in folded.graph.node if n.op_type == "Shape").input[0] == "y"


def test_unrelated_transparent_nodes_stay(rng):
    """design.md, Invariants 7: only the chain between the folded BN and its neighbour goes."""
    model = linear_then_bn(rng, ["Identity"])
    graph = model.graph
    graph.node[0].input[0] = "x_in"
    graph.node.insert(0, helper.make_node("Dropout", ["x"], ["x_in"], name="input_dropout"))
    graph.node[-1].output[0] = "bn_out"
    graph.node.append(helper.make_node("Identity", ["bn_out"], ["y"], name="output_identity"))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert [n.name for n in folded.graph.node] == ["input_dropout", "linear", "output_identity"]
    assert_same_function(model, folded, atol=1e-4)


def test_chain_inside_a_subgraph(rng):
    inner = linear_then_bn(rng, ["Identity", "Dropout"])
    branch = helper.make_graph(list(inner.graph.node), "then", [], [tensor("y", np.float32, None)],
                               list(inner.graph.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["x_copy"], name="else_identity")], "else",
                              [], [tensor("x_copy", np.float32, None)])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="if", then_branch=branch, else_branch=other)]
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    model = make_model(nodes, [tensor("x", np.float32, [2, 4, 7, 7])], [tensor("out", np.float32, None)], [cond])
    folded, report = fold_model(model)
    assert report.folded == 1
    branches = {a.name: a.g for a in folded.graph.node[0].attribute}
    then_branch, else_branch = branches["then_branch"], branches["else_branch"]
    assert [n.op_type for n in then_branch.node] == ["Conv"]
    assert [n.op_type for n in else_branch.node] == ["Identity"]
    assert_same_function(model, folded, atol=1e-4)


# ------------------------------------------------------------------------------------------- refusals
def refused(model, reason, text):
    """The BN stays with `reason`, and the whole model is exactly as it was."""
    folded, report = fold_model(model)
    decision = report.decisions[0]
    assert decision.reason == reason and text in decision.detail, decision
    assert folded.SerializeToString() == model.SerializeToString()


def _set_training_mode(model, source: str) -> onnx.ModelProto:
    dropout = next(n for n in model.graph.node if n.op_type == "Dropout")
    dropout.input[2] = source
    return model


def test_dropout_training_mode_true(rng):
    model = linear_then_bn(rng, ["DropoutOff"], opset=13)
    next(n for n in model.graph.node if n.op_type == "Constant").attribute[0].t.int32_data[:] = [1]
    refused(model, "dropout-in-training-mode", "training_mode=true")


@pytest.mark.parametrize("side", [linear_then_bn, bn_then_linear])
def test_dropout_training_mode_not_constant(rng, side):
    model = _set_training_mode(side(rng, ["Identity", "DropoutOff"], opset=13), "train")
    model.graph.input.append(helper.make_tensor_value_info("train", TensorProto.BOOL, []))
    refused(model, "dropout-in-training-mode", "not a constant")


@pytest.mark.parametrize("opset", [1, 6])
def test_dropout_is_test_zero_drops_before_opset7(rng, opset):
    model = linear_then_bn(rng, ["Dropout"], opset=6)
    model.opset_import[0].version = opset
    dropout = next(n for n in model.graph.node if n.op_type == "Dropout")
    del dropout.attribute[:]  # is_test defaults to 0: training
    refused(model, "dropout-in-training-mode", "is_test=0")


@pytest.mark.parametrize("read_by", ["graph output", "node"])
def test_dropout_mask_used(rng, read_by):
    model = linear_then_bn(rng, ["DropoutRatio"], opset=13)
    if read_by == "graph output":
        model.graph.output.append(helper.make_tensor_value_info("t0_dropoutratio_mask", TensorProto.BOOL, None))
    else:
        model.graph.node.append(helper.make_node("Not", ["t0_dropoutratio_mask"], ["keep"], name="not"))
        model.graph.output.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, None))
    refused(model, "dropout-mask-used", "mask")


@pytest.mark.parametrize("side", [linear_then_bn, bn_then_linear])
def test_chain_tensor_is_graph_output(rng, side):
    model = side(rng, ["Identity", "Identity"])
    model.graph.output.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, None))
    refused(model, "neighbour-output-is-graph-output", "Identity 't0_identity' output t0")


def test_chain_tensor_read_elsewhere(rng):
    model = linear_then_bn(rng, ["Identity", "Identity"])
    model.graph.node.append(helper.make_node("Relu", ["t0"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    refused(model, "neighbour-has-other-consumers", "also read by Relu 'relu'")


def test_chain_after_bn_read_elsewhere_has_no_neighbour(rng):
    model = bn_then_linear(rng, ["Identity", "Identity"])
    model.graph.node.append(helper.make_node("Relu", ["t0"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    refused(model, "no-foldable-neighbour", "Identity")


def test_custom_domain_identity_is_not_looked_through(rng):
    model = linear_then_bn(rng, ["Identity"])
    model.graph.node[1].domain = "custom"
    model.opset_import.append(helper.make_opsetid("custom", 1))
    refused(model, "no-foldable-neighbour", "Identity")


def test_identity_without_input_ends_the_walk(rng):
    """A malformed Identity (no input; fold_model does not run the checker) is no chain, not a crash."""
    model = linear_then_bn(rng, ["Identity"])
    del model.graph.node[1].input[:]
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "no-foldable-neighbour"


# ------------------------------------------------------------------------------------------- property
KINDS = st.sampled_from(["Identity", "Dropout", "DropoutRatio", "DropoutOff"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(KINDS, max_size=4), after=st.lists(KINDS, max_size=4), conv_first=st.booleans(),
       seed=st.integers(0, 2**16))
def test_chains_on_both_sides(before, after, conv_first, seed):
    """x -> (Conv | Relu) -> before... -> BN -> after... -> Conv: the BN folds into the first Conv if
    there is one, else into the second; only the chain it folds across goes."""
    rng = np.random.default_rng(seed)
    inits = bn_initializers(bn_stats(rng, 4), np.float32)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "W1"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (3, 4, 1, 1)).astype(np.float32), "W2"))
    first = helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]) if conv_first \
        else helper.make_node("Relu", ["x"], ["a"], name="relu")
    bn_in, conv_in = ("bn_in" if before else "a"), ("c" if after else "bn_out")
    nodes = [first] + chain(before, "a", bn_in, "b", inits, 13) + [bn_node(bn_in, "bn_out")]
    nodes += chain(after, "bn_out", conv_in, "f", inits, 13)
    nodes.append(helper.make_node("Conv", [conv_in, "W2"], ["y"], name="conv2"))
    model = make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5])], [tensor("y", np.float32, None)], inits, 13)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].rule == ("conv-bn" if conv_first else "bn-conv")
    kept = after if conv_first else before
    assert [n.op_type for n in folded.graph.node if n.op_type in TRANSPARENT] == \
        ["Identity" if k == "Identity" else "Dropout" for k in kept]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, atol=1e-4)
