"""Weights and BN parameters given as Constant nodes, Identity chains and constant expressions."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.fold import fold_model
from tests.builders import assert_same_function, conv_bn, make_model, op_types


def _to_constant_nodes(model: onnx.ModelProto, names) -> onnx.ModelProto:
    graph = model.graph
    constants = []
    for t in list(graph.initializer):
        if t.name in names:
            constants.append(helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t))
            graph.initializer.remove(t)
    return make_model(constants + list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))


def test_parameters_from_constant_nodes_fold_and_leftovers_go(rng):
    model = _to_constant_nodes(conv_bn(rng), {"W", "bn_scale", "bn_B", "bn_mean", "bn_var"})
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["Conv"]  # the Constant nodes that fed the BN and the old weight are gone
    assert_same_function(model, folded)


def test_weight_through_identity(rng):
    model = conv_bn(rng)
    model.graph.node[0].input[1] = "W_id"
    model.graph.node.insert(0, helper.make_node("Identity", ["W"], ["W_id"], name="identity"))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["Conv"]
    assert [t.name for t in folded.graph.initializer if t.name == "W"] == []
    assert_same_function(model, folded)


def dynamo_style_zero_bias(rng) -> onnx.ModelProto:
    """What torch's dynamo exporter (optimize=False) writes for a Conv without bias: a zero bias of
    the weight's output-channel count, built with Shape/Gather/Expand and cast like the input."""
    model = conv_bn(rng, bias=False)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero_idx"),
                              numpy_helper.from_array(np.array(0.0, np.float64), "zero")])
    nodes = [helper.make_node("Shape", ["W"], ["w_shape"], name="shape", start=0, end=1),
             helper.make_node("Expand", ["zero", "w_shape"], ["zeros64"], name="expand"),
             helper.make_node("CastLike", ["zeros64", "x"], ["bias"], name="castlike")]
    graph.node[0].input.append("bias")
    return make_model(nodes + list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))


def test_dynamo_zero_bias_expression_is_evaluated(rng):
    model = dynamo_style_zero_bias(rng)
    folded, report = fold_model(model)
    assert report.folded == 1, report.decisions
    assert op_types(folded) == ["Conv"]  # Shape/Expand/CastLike leftovers removed
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded)


def test_shape_of_a_dynamic_tensor_is_not_constant(rng):
    model = conv_bn(rng, bias=False)
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape", start=0, end=1),
             helper.make_node("Cast", ["x_shape"], ["n"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Expand", ["n", "c_out"], ["bias"], name="expand")]
    graph.initializer.append(numpy_helper.from_array(np.array([6], np.int64), "c_out"))
    graph.node[0].input.append("bias")
    model = make_model(nodes + list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    _, report = fold_model(model)
    assert report.decisions[0].reason == "weights-not-constant"
    assert "not static" in report.decisions[0].detail


def test_bn_output_name_survives_as_graph_output(rng):
    model = conv_bn(rng)
    folded, _ = fold_model(model)
    assert [o.name for o in folded.graph.output] == ["y"]
    assert folded.graph.node[0].output[0] == "y"


def test_dtype_only_reader_of_bn_output_does_not_block_a_forward_fold(rng):
    """torch's dynamo exporter casts a Conv's zero bias like the Conv's input: when that input is a
    BN output, the CastLike reads only its dtype, and the BN must still fold into the Conv."""
    from tests.builders import bn_initializers, bn_node, bn_stats, tensor
    inits = bn_initializers(bn_stats(rng, 4), np.float32)
    inits += [numpy_helper.from_array(rng.normal(size=(6, 4, 1, 1)).astype(np.float32), "W"),
              numpy_helper.from_array(np.zeros(6, np.float64), "zeros")]
    nodes = [bn_node("x", "bn_out"), helper.make_node("CastLike", ["zeros", "bn_out"], ["bias"], name="castlike"),
             helper.make_node("Conv", ["bn_out", "W", "bias"], ["y"], name="conv")]
    model = make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5])], [tensor("y", np.float32, None)], inits)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].rule == "bn-conv"
    assert op_types(folded) == ["Conv"]
    assert_same_function(model, folded)


def test_every_constant_attribute_form_is_read(rng):
    """Constant nodes with value_float(s)/value_int(s) evaluate like onnx's reference does."""
    from bnfold.graph import GraphIndex, ModelContext
    nodes = [helper.make_node("Constant", [], ["a"], value_floats=[1.5, -2.0]),
             helper.make_node("Constant", [], ["b"], value_float=0.25),
             helper.make_node("Constant", [], ["c"], value_ints=[3, 4]),
             helper.make_node("Constant", [], ["d"], value_int=7),
             helper.make_node("Cast", ["c"], ["e"], to=TensorProto.FLOAT16),
             helper.make_node("Expand", ["b", "c"], ["f"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    index = GraphIndex(model.graph, ModelContext(model))
    for name in "abcdef":
        value = index.constants.value(name)
        reference = ReferenceEvaluator(helper.make_model(helper.make_graph(
            nodes, "g", [], [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)]))).run(None, {})[0]
        assert value.dtype == reference.dtype and np.array_equal(value, reference), name
