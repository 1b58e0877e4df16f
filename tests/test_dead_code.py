"""The dead-code pass (bnfold.passes.dead_code): what it removes after a fold, and what it must keep."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from bnfold.graph import ModelContext
from bnfold.passes import PipelineState
from bnfold.passes.dead_code import RemoveDeadCode
from tests.builders import bn_initializers, bn_node, bn_stats, conv_bn, make_model, tensor

BN_PARAMS = {"bn_scale", "bn_B", "bn_mean", "bn_var"}


def _run(model, released):
    state = PipelineState(model, ModelContext(model), released=set(released))
    return RemoveDeadCode().run(state)


def _trivial_if(name="if"):
    then_graph = helper.make_graph([helper.make_node("Identity", ["y"], ["t"], name="then_id")], "then", [],
                                   [tensor("t", np.float32, None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["y"], ["e"], name="else_id")], "else", [],
                                   [tensor("e", np.float32, None)])
    return helper.make_node("If", ["cond"], ["z"], name=name, then_branch=then_graph, else_branch=else_graph)


def test_only_initializers_removed_is_a_modification_even_with_a_later_subgraph(rng):
    """Conv -> BN folds; dead code then removes only the BN parameter initializers (no node). A subgraph
    visited after the main graph removes nothing: the count must add up over graphs, and the main graph's
    released names must not be replaced by the subgraph's."""
    model = conv_bn(rng)
    model.graph.node.append(_trivial_if())
    model.graph.input.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    model.graph.output.append(tensor("z", np.float32, None))
    folded, report = fold_model(model)
    assert report.folded == 1
    dead = report.passes[-1]
    assert dead.name == "remove-dead-code" and dead.decisions == [] and dead.modified is True
    assert not BN_PARAMS & {t.name for t in folded.graph.initializer}


def test_value_info_of_removed_tensors_goes_and_of_kept_ones_stays(rng):
    model = conv_bn(rng)
    model.graph.value_info.extend([tensor("bn_scale", np.float32, [6]), tensor("W", np.float32, [6, 4, 3, 3]),
                                   tensor("conv_out", np.float32, None)])
    folded, _ = fold_model(model)
    names = [v.name for v in folded.graph.value_info]
    assert "bn_scale" not in names
    assert "W" in names


def _split_model(read_q: bool, extra_dead: bool = False):
    """w -> Split -> p, q; a Relu reads q when `read_q`; `c` an unused initializer when `extra_dead`."""
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")]
    nodes = [helper.make_node("Split", ["w"], ["p", "q"], name="split", axis=0, num_outputs=2)]
    outputs = [tensor("y", np.float32, None)]
    nodes.append(helper.make_node("Relu", ["x"], ["y"], name="relu"))
    if read_q:
        nodes.append(helper.make_node("Neg", ["q"], ["n"], name="neg"))
        outputs.append(tensor("n", np.float32, None))
    if extra_dead:
        inits.append(numpy_helper.from_array(np.ones(2, np.float32), "c"))
    model = make_model(nodes, [tensor("x", np.float32, [2])], outputs, inits, opset=18)
    model.graph.value_info.extend([tensor("p", np.float32, [2]), tensor("q", np.float32, [2])])
    return model


def test_a_node_with_a_still_read_output_stays():
    model = _split_model(read_q=True)
    result = _run(model, {"p"})
    assert [n.name for n in model.graph.node] == ["split", "relu", "neg"]
    assert result.decisions == [] and result.modified is False
    assert [t.name for t in model.graph.initializer] == ["w"]
    assert [v.name for v in model.graph.value_info] == ["p", "q"]  # p is still produced


def test_all_outputs_of_a_removed_node_are_dead_and_the_cascade_goes_on():
    """Released c, p, q: q (popped first) removes Split, making p dead too; popping p again must not stop
    the walk before c. The value_info of p and q goes with their producer."""
    model = _split_model(read_q=False, extra_dead=True)
    result = _run(model, {"c", "p", "q"})
    assert [n.name for n in model.graph.node] == ["relu"]
    assert model.graph.initializer == []
    assert list(model.graph.value_info) == []
    assert [(d.node, d.reason, d.op_type, d.detail, d.graph) for d in result.decisions] == [
        ("split", "removed", "Split", "Split only fed what other passes disconnected", "")]
    assert result.modified is True


def test_second_output_of_a_removed_node_loses_its_value_info():
    model = _split_model(read_q=False)
    _run(model, {"p"})
    assert [n.name for n in model.graph.node] == ["relu"] and list(model.graph.value_info) == []


def test_removed_node_with_an_empty_optional_output():
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")]
    nodes = [helper.make_node("Dropout", ["w"], ["d", ""], name="dropout"),
             helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = make_model(nodes, [tensor("x", np.float32, [2])], [tensor("y", np.float32, None)], inits)
    result = _run(model, {"d"})
    assert [n.name for n in model.graph.node] == ["relu"] and model.graph.initializer == []
    assert [d.node for d in result.decisions] == ["dropout"]


def _ir3_model(rng):
    stats = bn_stats(rng, 4)
    inits = bn_initializers(stats, np.float32) + [numpy_helper.from_array(
        rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    graph = helper.make_graph(nodes, "g", [tensor("x", np.float32, [1, 4, 3, 3])] +
                              [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits],
                              [tensor("y", np.float32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    return model


def test_ir3_initializers_leave_the_graph_inputs_with_them(rng):
    folded, report = fold_model(_ir3_model(rng))
    assert report.folded == 1
    inputs = [i.name for i in folded.graph.input]
    assert inputs[0] == "x" and set(inputs[1:]) == {t.name for t in folded.graph.initializer}
    assert not BN_PARAMS & set(inputs)


def test_ir4_graph_inputs_are_the_model_interface_and_stay():
    """From IR 4 an input named like an initializer is a real input (the initializer its default):
    removing the unread initializer must not change the model's inputs."""
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [tensor("x", np.float32, [2]), tensor("w", np.float32, [2])],
                       [tensor("y", np.float32, None)], [w], ir_version=4, opset=9)
    result = _run(model, {"w"})
    assert [i.name for i in model.graph.input] == ["x", "w"]
    assert result.modified is True and model.graph.initializer == []


def test_removed_constant_nodes_in_a_subgraph_name_their_graph(rng):
    """BN parameters given as Constant nodes inside an If branch: their removal names the branch."""
    stats = bn_stats(rng, 4)
    consts = [helper.make_node("Constant", [], [f"bn_{k}"], name=f"const_{k}",
                               value=numpy_helper.from_array(v.astype(np.float32), f"bn_{k}"))
              for k, v in stats.items()]
    then_nodes = consts + [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "t_out")]
    then_graph = helper.make_graph(then_nodes, "then", [], [tensor("t_out", np.float32, [1, 4, 5, 5])])
    else_graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["e_out"], name="conv_else")], "else",
                                   [], [tensor("e_out", np.float32, [1, 4, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
                               tensor("x", np.float32, [1, 4, 5, 5])], [tensor("y", np.float32, [1, 4, 5, 5])],
                       [numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "W")])
    _, report = fold_model(model)
    assert report.folded == 1
    decisions = sorted((d.node, d.reason, d.op_type, d.detail, d.graph) for d in report.passes[-1].decisions)
    assert decisions == sorted((f"const_{k}", "removed", "Constant", "Constant only fed what other passes "
                                "disconnected", "if:then_branch") for k in stats)
