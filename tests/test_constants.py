"""Weights and BN parameters given as Constant nodes, Identity chains and constant expressions."""

import numpy as np
import onnx
import pytest
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


# ------------------------------------------------------------------ evaluator contract (docs/mutation.md)
def _index(nodes, inputs=(), initializers=(), opset=17):
    from bnfold.graph import GraphIndex, ModelContext
    model = helper.make_model(helper.make_graph(nodes, "g", list(inputs), [], list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    return GraphIndex(model.graph, ModelContext(model))


def _reference(node, feeds):
    return ReferenceEvaluator(node).run(None, feeds)


_QUICK_CASES = {
    "constant-tensor": (helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(
        np.array([[1.5, 2.0]], np.float32))), []),
    "constant-int": (helper.make_node("Constant", [], ["y"], value_int=7), []),
    "constant-ints": (helper.make_node("Constant", [], ["y"], value_ints=[3, 4]), []),
    "constant-float": (helper.make_node("Constant", [], ["y"], value_float=0.25), []),
    "constant-floats": (helper.make_node("Constant", [], ["y"], value_floats=[1.5, -2.0]), []),
    "identity": (helper.make_node("Identity", ["a"], ["y"]), [np.array([1.0, 2.0], np.float16)]),
    "expand": (helper.make_node("Expand", ["a", "s"], ["y"]),
               [np.array([[1.0], [2.0]], np.float32), np.array([3], np.int64)]),
    "expand-rank-up": (helper.make_node("Expand", ["a", "s"], ["y"]),
                       [np.array([1.0, 2.0], np.float64), np.array([3, 1], np.int64)]),
    "cast-int-to-float16": (helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT16),
                            [np.array([3, 4], np.int64)]),
    "cast-float64-to-float": (helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT),
                              [np.array([0.1, -3e38], np.float64)]),
    "castlike-uint8": (helper.make_node("CastLike", ["a", "b"], ["y"]),
                       [np.array([1, 200], np.uint8), np.zeros(0, np.float64)]),
}


@pytest.mark.parametrize("case", sorted(_QUICK_CASES))
def test_ops_around_weights_are_evaluated_in_numpy_like_the_reference(case):
    """The numpy path (not the ~0.5 ms ReferenceEvaluator) handles Constant, Identity, Expand and
    float-target Cast/CastLike, with the reference's values and dtype."""
    from bnfold.constants import _evaluate_in_numpy
    node, inputs = _QUICK_CASES[case]
    quick = _evaluate_in_numpy(node, inputs)
    assert quick is not None
    reference = _reference(node, dict(zip(node.input, inputs)))[0]
    assert quick.dtype == reference.dtype and quick.shape == reference.shape
    np.testing.assert_array_equal(quick, reference)


@pytest.mark.parametrize("node,inputs", [
    (helper.make_node("Cast", ["a"], ["y"], to=TensorProto.INT32), [np.array([1.5])]),  # not a float target
    (helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT), [np.array([True])]),  # bool input
    (helper.make_node("Neg", ["a"], ["y"]), [np.array([1.0])]),
    (helper.make_node("Identity", ["a"], ["y"]), [None]),
], ids=["cast-to-int", "cast-bool", "neg", "identity-of-nothing"])
def test_other_ops_are_left_to_the_reference(node, inputs):
    from bnfold.constants import _evaluate_in_numpy
    assert _evaluate_in_numpy(node, inputs) is None


def test_reads_type_only_is_castlike_second_input():
    from bnfold.constants import reads_type_only
    castlike = helper.make_node("CastLike", ["a", "b"], ["y"])
    assert reads_type_only(castlike, 1) and not reads_type_only(castlike, 0)
    assert not reads_type_only(helper.make_node("Add", ["a", "b"], ["y"]), 1)


@pytest.mark.parametrize("attrs,expected", [({}, [2, 3, 1, 4]), ({"start": 1}, [3, 1, 4]), ({"end": 2}, [2, 3]),
                                            ({"start": -2, "end": -1}, [1])], ids=str)
def test_shape_of_a_static_tensor(attrs, expected):
    index = _index([helper.make_node("Shape", ["x"], ["s"], **attrs), helper.make_node("Size", ["x"], ["n"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 1, 4])])
    shape = index.constants.value("s")
    assert shape.dtype == np.int64 and shape.tolist() == expected
    size = index.constants.value("n")
    assert size.dtype == np.int64 and size.shape == () and int(size) == 24


def test_shape_of_a_constant_without_declared_type():
    """No declared type: Shape and Size evaluate the (constant) input to get its shape."""
    index = _index([helper.make_node("Identity", ["w0"], ["w"]), helper.make_node("Shape", ["w"], ["s"], start=1),
                    helper.make_node("Size", ["w"], ["n"])],
                   initializers=[numpy_helper.from_array(np.zeros((2, 5), np.float32), "w0")])
    assert index.constants.value("s").tolist() == [5]
    assert int(index.constants.value("n")) == 10


@pytest.mark.parametrize("dims", [["N", 3], [0, 3]], ids=["symbolic", "zero"])
def test_shape_of_a_graph_input_without_static_shape_is_not_constant(dims):
    from bnfold.constants import NotConstant
    index = _index([helper.make_node("Size", ["x"], ["n"], name="size")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)])
    with pytest.raises(NotConstant) as info:
        index.constants.value("n")
    assert info.value.reason == "weights-not-constant"
    assert info.value.detail == "n is the shape of x, which is not static" == str(info.value)


def test_castlike_of_an_input_of_unknown_dtype_is_not_constant():
    from bnfold.constants import NotConstant
    index = _index([helper.make_node("CastLike", ["w", "t"], ["y"], name="castlike")],
                   initializers=[numpy_helper.from_array(np.ones(2, np.float32), "w")])
    with pytest.raises(NotConstant) as info:
        index.constants.value("y")
    assert (info.value.reason, info.value.detail) == (
        "weights-not-constant", "the dtype of t (read by CastLike) is unknown")


def test_castlike_reads_only_the_dtype_of_a_typed_input():
    index = _index([helper.make_node("CastLike", ["w", "x"], ["y"], name="castlike")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N"])],
                   [numpy_helper.from_array(np.array([1.0, 1e-8]), "w")])
    value = index.constants.value("y")
    assert value.dtype == np.float16 and value.tolist() == [1.0, np.float16(1e-8)]


def test_nodes_outside_the_default_domain_and_random_ops_are_not_constant():
    from bnfold.constants import NotConstant
    custom = helper.make_node("Relu", ["w"], ["a"], name="custom", domain="com.example")
    random = helper.make_node("RandomNormal", [], ["b"], name="random", shape=[2])
    default = helper.make_node("Identity", ["w"], ["c"], name="identity", domain="ai.onnx")
    quantized = helper.make_node("DequantizeLinear", ["q", "s"], ["d"], name="dq")
    index = _index([custom, random, default, quantized],
                   initializers=[numpy_helper.from_array(np.ones(2, np.float32), "w"),
                                 numpy_helper.from_array(np.ones(2, np.int8), "q"),
                                 numpy_helper.from_array(np.array(0.5, np.float32), "s")])
    for name, reason, detail in [("a", "weights-not-constant", "a is computed by Relu 'custom'"),
                                 ("b", "weights-not-constant", "b is computed by RandomNormal 'random'"),
                                 ("d", "quantized-weights", "d comes from DequantizeLinear 'dq'")]:
        with pytest.raises(NotConstant) as info:
            index.constants.value(name)
        assert (info.value.reason, info.value.detail) == (reason, detail)
    np.testing.assert_array_equal(index.constants.value("c"), [1.0, 1.0])  # "ai.onnx" is the default domain


def test_reference_evaluation_uses_the_model_opset_and_reports_failures():
    """Ops outside the numpy path go through onnx's reference at the model's opset; a failure is a
    weights-not-constant refusal naming the node, on one line."""
    from bnfold.constants import NotConstant
    # Split's `split` is an attribute at opset 11 and an input from 13: the opset must reach the evaluator
    split = helper.make_node("Split", ["w"], ["p", "q"], name="split", axis=0, split=[1, 3])
    index = _index([split], initializers=[numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")], opset=11)
    assert index.constants.value("q").tolist() == [1.0, 2.0, 3.0]
    bad = helper.make_node("Reshape", ["w", "shape"], ["r"], name="reshape")
    index = _index([bad], initializers=[numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"),
                                        numpy_helper.from_array(np.array([3], np.int64), "shape")])
    with pytest.raises(NotConstant) as info:
        index.constants.value("r")
    assert info.value.reason == "weights-not-constant"
    assert info.value.detail.startswith("cannot evaluate Reshape 'reshape': ") and "\n" not in info.value.detail


def test_reference_evaluation_runs_at_the_model_opset_not_the_newest():
    """Clip's bounds are attributes at opset 6 and inputs from opset 11: evaluated at the newest opset
    the node would fail (a bare node ignores the model's opsets), so it is wrapped in a graph."""
    clip = helper.make_node("Clip", ["w"], ["c"], name="clip", min=-1.0, max=1.0)
    index = _index([clip], initializers=[numpy_helper.from_array(np.array([-3, 0.5, 3], np.float32), "w")],
                   opset=6)
    assert index.constants.value("c").tolist() == [-1.0, 0.5, 1.0]


def test_reference_evaluation_of_a_node_with_an_omitted_optional_output():
    """An empty optional output name does not shift which value belongs to which output."""
    split = helper.make_node("Split", ["w", "sizes"], ["", "q"], name="split", axis=0)
    index = _index([split], initializers=[numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"),
                                          numpy_helper.from_array(np.array([1, 3], np.int64), "sizes")])
    assert index.constants.value("q").tolist() == [1.0, 2.0, 3.0]


def test_a_huge_constant_expression_is_not_materialized(monkeypatch):
    import bnfold.constants as constants
    monkeypatch.setattr(constants, "_LARGE_CONSTANT", 16)  # bytes: 4 float32 are allowed, 5 are not
    index = _index([helper.make_node("Neg", ["w"], ["ok"], name="ok"), helper.make_node("Neg", ["v"], ["big"], name="big")],
                   initializers=[numpy_helper.from_array(np.ones(4, np.float32), "w"),
                                 numpy_helper.from_array(np.ones(5, np.float32), "v")])
    assert index.constants.value("ok").tolist() == [-1.0] * 4
    with pytest.raises(constants.NotConstant) as info:
        index.constants.value("big")
    assert (info.value.reason, info.value.detail) == ("weights-not-constant", "Neg 'big' yields a huge constant")


def test_constant_chain_depth_limit(monkeypatch):
    import bnfold.constants as constants
    monkeypatch.setattr(constants, "_MAX_DEPTH", 3)
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"], name=f"id{i}") for i in range(5)]
    index = _index(nodes, initializers=[numpy_helper.from_array(np.ones(1, np.float32), "t0")])
    assert index.constants.value("t3").tolist() == [1.0]  # depth 3 reaches t0
    with pytest.raises(constants.NotConstant) as info:
        _index(nodes, initializers=[numpy_helper.from_array(np.ones(1, np.float32), "t0")]).constants.value("t5")
    assert "too deep" in info.value.detail


def test_forget_drops_a_cached_value():
    index = _index([helper.make_node("Neg", ["w"], ["n"], name="neg")],
                   initializers=[numpy_helper.from_array(np.ones(2, np.float32), "w")])
    assert index.constants.value("n").tolist() == [-1.0, -1.0]
    index.graph.node[0].op_type = "Identity"  # what a rewrite would change
    assert index.constants.value("n").tolist() == [-1.0, -1.0]  # cached
    index.constants.forget("n")
    assert index.constants.value("n").tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ reason codes and words (mutation testing)
def _not_constant(index, name):
    from bnfold.constants import NotConstant
    with pytest.raises(NotConstant) as info:
        index.constants.value(name)
    return info.value.reason, info.value.detail


def test_not_constant_reasons_and_details(monkeypatch):
    import bnfold.constants as constants
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    index = _index([helper.make_node("Neg", ["x"], ["n"], name="neg")],
                   [helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])], [w])
    assert _not_constant(index, "w") == ("weights-overridable", "initializer w is also a graph input")
    assert _not_constant(index, "ghost") == ("weights-not-constant", "ghost has no producer")
    monkeypatch.setattr(constants, "_MAX_DEPTH", 0)
    index = _index([helper.make_node("Neg", ["w"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["b"], name="b")],
                   initializers=[w])
    assert _not_constant(index, "b") == ("weights-not-constant",
                                         "a is computed by a constant chain too deep to evaluate")


def test_constant_of_shape_is_not_a_constant_node():
    """ConstantOfShape has one attribute named `value`, like a Constant: it must still fill the shape."""
    node = helper.make_node("ConstantOfShape", ["s"], ["y"], name="cos",
                            value=numpy_helper.from_array(np.array([2.5], np.float32)))
    index = _index([node], initializers=[numpy_helper.from_array(np.array([2, 3], np.int64), "s")])
    np.testing.assert_array_equal(index.constants.value("y"), np.full((2, 3), 2.5, np.float32))



def test_shape_of_a_tensor_of_unknown_type_is_not_constant():
    """Shape needs a static shape: when nothing types its input (a custom op's output) it falls back on
    the input's value, and a value that is not constant is a refusal, not a crash."""
    from bnfold.constants import NotConstant
    nodes = [helper.make_node("Foo", ["x"], ["u"], name="foo", domain="com.example"),
             helper.make_node("Shape", ["u"], ["s"], name="shape")]
    index = _index(nodes, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])])
    assert index.tensor_type("u") is None
    with pytest.raises(NotConstant) as info:
        index.constants.value("s")
    assert (info.value.reason, info.value.detail) == ("weights-not-constant", "s is the shape of u, which is not static")
