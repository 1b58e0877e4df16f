"""The conditions of each fold rule, as users see them: the reason code and the detail words of every
refusal, the names of what a fold adds, and the attribute defaults each rule reads (docs/mutation.md)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, op_types, tensor
from tests.builders import make_model as checked_model

F32 = np.float32


def make_model(nodes, inputs, outputs, initializers):
    """builders.make_model when the model is valid; the refusal cases (integer or mixed-dtype weights,
    unknown shapes) are built as they are, since the checker rejects them before bnfold could."""
    try:
        return checked_model(nodes, inputs, outputs, initializers)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        model = helper.make_model(helper.make_graph(nodes, "test", inputs, outputs, initializers),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        return model


def _init(rng, name, shape, dtype=F32, scale=0.5):
    values = rng.normal(0, scale, shape)
    if np.dtype(dtype) == np.float16:
        values = np.clip(values, -6e4, 6e4)  # finite float16 weights (the fold may overflow them)
    return numpy_helper.from_array(values.astype(dtype), name)


def _decision(model):
    _, report = fold_model(model)
    return report.decisions[0]


# ------------------------------------------------------------------------------------------ builders
def _gemm(rng, *, extra=(), x_input=False, c_input=False, b_dtype=F32, c=True, attrs=None, bn_channels=6):
    inits = [] if x_input else [_init(rng, "B", (4, 6), b_dtype)]
    inputs = [tensor("x", F32, [5, 4])] + ([tensor("B", F32, [4, 6])] if x_input else [])
    if c and not c_input:
        inits.append(_init(rng, "C", (6,)))
    if c_input:
        inputs.append(tensor("C", F32, [6]))
    inits += bn_initializers(bn_stats(rng, bn_channels), F32)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"] if c else ["x", "B"], ["g"], name="gemm", **(attrs or {})),
             bn_node("g", "y"), *extra]
    outputs = [tensor("y", F32, None)] + [tensor(n.output[0], F32, None) for n in extra]
    return make_model(nodes, inputs, outputs, inits)


def _matmul(rng, *, add=True, extra=(), w_input=False, bias_input=False, w_dtype=F32, x_shape=(5, 4),
            bias_shape=(6,), w_scale=0.5, bias_scale=0.5, mm_name="matmul", bn_name="bn"):
    inits = [] if w_input else [_init(rng, "W", (4, 6), w_dtype, w_scale)]
    inputs = [tensor("x", F32, list(x_shape))] + ([tensor("W", F32, [4, 6])] if w_input else [])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name=mm_name)]
    bn_in = "m"
    if add:
        if bias_input:
            inputs.append(tensor("bias", F32, list(bias_shape)))
        else:
            inits.append(_init(rng, "bias", bias_shape, scale=bias_scale))
        nodes.append(helper.make_node("Add", ["m", "bias"], ["a"], name="add"))
        bn_in = "a"
    inits += bn_initializers(bn_stats(rng, 6), F32)
    bn = bn_node(bn_in, "y")
    bn.name = bn_name
    nodes += [bn, *extra]
    outputs = [tensor("y", F32, None)] + [tensor(n.output[0], F32, None) for n in extra]
    return make_model(nodes, inputs, outputs, inits)


def _bn_then(rng, op, *, w_shape=(6, 4, 1, 1), x_shape=(2, 4, 3, 3), w_input=False, bias_input=False,
             w_dtype=F32, bias=True, bn_output=False, attrs=None, bn_scale=None, op_name="next", bn_name="bn"):
    stats = bn_stats(rng, 4)
    if bn_scale is not None:
        stats["scale"] = np.full(4, bn_scale)
    inits = bn_initializers(stats, F32)
    inputs = [tensor("x", F32, list(x_shape) if x_shape is not None else None)]
    if w_input:
        inputs.append(tensor("W", F32, list(w_shape)))
    else:
        inits.append(_init(rng, "W", w_shape, w_dtype))
    n_out = w_shape[0] if op == "Conv" else w_shape[1] if op == "MatMul" else w_shape[1]
    if bias:
        if bias_input:
            inputs.append(tensor("b", F32, [n_out]))
        else:
            inits.append(_init(rng, "b", (n_out,)))
    bn = bn_node("x", "h")
    bn.name = bn_name
    nodes = [bn, helper.make_node(op, ["h", "W", "b"] if bias else ["h", "W"], ["y"], name=op_name, **(attrs or {}))]
    outputs = [tensor("y", F32, None)] + ([tensor("h", F32, None)] if bn_output else [])
    return make_model(nodes, inputs, outputs, inits)


def _relu(source):
    return helper.make_node("Relu", [source], ["r"], name="relu")


# ----------------------------------------------------------------------------------- refusal details
REFUSALS = {
    "gemm-output-shared": (lambda rng: _gemm(rng, extra=[_relu("g")]),
                           "neighbour-has-other-consumers", "Gemm output g is also read by Relu 'relu'"),
    "gemm-b-input": (lambda rng: _gemm(rng, x_input=True), "weights-not-constant", "Gemm B: B is a graph input"),
    "gemm-c-input": (lambda rng: _gemm(rng, c_input=True), "weights-not-constant", "Gemm C: C is a graph input"),
    "gemm-b-int": (lambda rng: _gemm(rng, b_dtype=np.int32), "dtype-unsupported", "Gemm B is int32, not a float type"),
    "add-output-shared": (lambda rng: _matmul(rng, extra=[_relu("a")]),
                          "neighbour-has-other-consumers", "Add output a is also read by Relu 'relu'"),
    "matmul-output-shared-add": (lambda rng: _matmul(rng, extra=[_relu("m")]),
                                 "neighbour-has-other-consumers", "MatMul output m is also read by Relu 'relu'"),
    "matmul-output-shared": (lambda rng: _matmul(rng, add=False, extra=[_relu("m")]),
                             "neighbour-has-other-consumers", "MatMul output m is also read by Relu 'relu'"),
    "matmul-w-input": (lambda rng: _matmul(rng, w_input=True), "weights-not-constant",
                       "MatMul right operand: W is a graph input"),
    "matmul-bias-input": (lambda rng: _matmul(rng, bias_input=True), "weights-not-constant",
                          "Add bias: bias is a graph input"),
    "matmul-w-int": (lambda rng: _matmul(rng, w_dtype=np.int32), "dtype-unsupported",
                     "MatMul right operand is int32, not a float type"),
    "matmul-rank-3": (lambda rng: _matmul(rng, add=False, x_shape=(2, 5, 4)), "channel-axis-mismatch",
                      "the BN's channels are axis 1 of MatMul output m, the channels it folds into are axis 2"),
    "matmul-weights-overflow": (lambda rng: _matmul(rng, add=False, w_dtype=np.float16, w_scale=3e4),
                                "dtype-overflow", None),
    "bn-conv-bn-output": (lambda rng: _bn_then(rng, "Conv", bn_output=True), "neighbour-output-is-graph-output",
                          "BN output h is a graph output"),
    "bn-conv-w-input": (lambda rng: _bn_then(rng, "Conv", w_input=True), "weights-not-constant",
                        "Conv weight: W is a graph input"),
    "bn-conv-b-input": (lambda rng: _bn_then(rng, "Conv", bias_input=True), "weights-not-constant",
                        "Conv bias: b is a graph input"),
    "bn-conv-w-int": (lambda rng: _bn_then(rng, "Conv", w_dtype=np.int32), "dtype-unsupported",
                      "Conv weight is int32, not a float type"),
    "bn-matmul-bn-output": (lambda rng: _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=(5, 4), bias=False,
                                                 bn_output=True),
                            "neighbour-output-is-graph-output", "BN output h is a graph output"),
    "bn-gemm-w-input": (lambda rng: _bn_then(rng, "Gemm", w_shape=(4, 6), x_shape=(5, 4), w_input=True),
                        "weights-not-constant", "Gemm weight: W is a graph input"),
    "bn-matmul-w-int": (lambda rng: _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=(5, 4), bias=False,
                                             w_dtype=np.int32),
                        "dtype-unsupported", "MatMul weight is int32, not a float type"),
    "bn-gemm-c-input": (lambda rng: _bn_then(rng, "Gemm", w_shape=(4, 6), x_shape=(5, 4), bias_input=True),
                        "weights-not-constant", "Gemm C: b is a graph input"),
    "bn-gemm-trans-a": (lambda rng: _bn_then(rng, "Gemm", w_shape=(5, 6), x_shape=(4, 5), attrs={"transA": 1}),
                        "channel-axis-mismatch", "the BN's channels are axis 1 of Gemm input h, the channels it folds into are axis 0"),
    "bn-matmul-rank-unknown": (lambda rng: _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=None, bias=False),
                               "rank-unknown", "the rank of MatMul input h is unknown"),
    "bn-matmul-rank-3": (lambda rng: _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=(2, 4, 5), bias=False),
                         "channel-axis-mismatch",
                         "the BN's channels are axis 1 of MatMul input h, the channels it folds into are axis 2"),
    "bn-matmul-weights-overflow": (lambda rng: _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=(5, 4), bias=False,
                                                        w_dtype=np.float16, bn_scale=1e6),
                                   "dtype-overflow", None),
    "bn-gemm-weights-overflow": (lambda rng: _bn_then(rng, "Gemm", w_shape=(4, 6), x_shape=(5, 4),
                                                      w_dtype=np.float16, bn_scale=1e6),
                                 "dtype-overflow", None),
}
OVERFLOW_DETAILS = {
    "matmul-weights-overflow": r"\d+ folded weights value\(s\) overflow float16",
    "bn-matmul-weights-overflow": r"\d+ folded weights value\(s\) overflow float16",
    "bn-gemm-weights-overflow": r"\d+ folded weights value\(s\) overflow float16",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_reason_and_detail(rng, case):
    """What `bnfold fold` prints for a BN it leaves: the reason code and the sentence saying why."""
    import re
    build, reason, detail = REFUSALS[case]
    model = build(rng)
    folded, report = fold_model(model)
    decision = report.decisions[0]
    assert decision.reason == reason
    if detail is None:
        assert re.fullmatch(OVERFLOW_DETAILS[case], decision.detail), decision.detail
    else:
        assert decision.detail == detail
    assert op_types(folded) == op_types(model)


def test_bn_then_matmul_biases_overflow(rng):
    """BN -> MatMul where only shift @ W overflows float16: the biases, not the weights, are named."""
    model = _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=(5, 4), bias=False, w_dtype=np.float16)
    for name in ("bn_B",):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(np.full(4, 6e4, F32), name))
    for name in ("bn_mean",):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(np.zeros(4, F32), name))
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.CopyFrom(numpy_helper.from_array(np.ones((4, 6), np.float16), "W"))
    decision = _decision(model)
    assert (decision.reason, decision.detail) == ("dtype-overflow", "6 folded biases value(s) overflow float16")


# ------------------------------------------------------------------------------- attribute defaults
def test_bn_then_gemm_reads_the_schema_defaults(rng):
    """A Gemm with no transB/alpha/beta attributes means transB=0, alpha=beta=1."""
    model = _bn_then(rng, "Gemm", w_shape=(4, 6), x_shape=(5, 4))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def test_gemm_then_bn_reads_the_schema_defaults(rng):
    model = _gemm(rng)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


@pytest.mark.parametrize("c_shape", [(1, 6), (5, 1), (5, 6), (1, 1)])
def test_bn_then_gemm_keeps_c_compact(rng, c_shape):
    """C'' = beta C + alpha shift @ W is [N] unless the old C varied along M."""
    model = _bn_then(rng, "Gemm", w_shape=(4, 6), x_shape=(5, 4), attrs={"alpha": 0.5, "beta": -2.0})
    c = next(t for t in model.graph.initializer if t.name == "b")
    c.CopyFrom(_init(rng, "b", c_shape))
    model = make_model(list(model.graph.node), list(model.graph.input), list(model.graph.output),
                       list(model.graph.initializer))
    folded, report = fold_model(model)
    assert report.folded == 1
    new_c = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[2])
    assert list(new_c.dims) == ([5, 6] if c_shape[0] == 5 else [6])
    assert_same_function(model, folded)


@pytest.mark.parametrize("bias_shape", [(1,), (5, 1), (1, 6)])
def test_matmul_add_bias_broadcast_along_columns_folds(rng, bias_shape):
    model = _matmul(rng, bias_shape=bias_shape)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


# --------------------------------------------------------------------------------- padding conditions
def test_same_padding_with_a_kernel_of_1_along_one_axis_only_is_refused(rng):
    """auto_pad=SAME with a 3x1 kernel pads the first spatial axis (kernel read from the weight)."""
    model = _bn_then(rng, "Conv", w_shape=(6, 4, 3, 1), attrs={"auto_pad": "SAME_UPPER"})
    decision = _decision(model)
    assert (decision.reason, decision.detail) == (
        "padding-prevents-fold",
        "auto_pad=SAME_UPPER pads spatial axis 0 (size 3) by 2: the border would see 0, not the BN's shift")


def test_same_padding_with_an_input_of_the_wrong_rank_is_refused(rng):
    """A declared input of rank 3 for a 2-D kernel (a malformed model): its sizes prove nothing, so
    SAME 3x3 stride 3 is refused though its size 9 alone would pad nothing."""
    model = _bn_then(rng, "Conv", w_shape=(6, 4, 3, 3), x_shape=(2, 4, 9), attrs={"auto_pad": "SAME_UPPER",
                                                                                 "strides": [3, 3]})
    decision = _decision(model)
    assert (decision.reason, decision.detail) == (
        "padding-prevents-fold", "auto_pad=SAME_UPPER may pad spatial axis 0: its size is unknown")


@pytest.mark.parametrize("typed", [True, False], ids=["rank unknown", "type unknown"])
def test_same_padding_with_an_input_of_unknown_rank_is_refused(rng, typed):
    """SAME 3x3 stride 3 pads nothing at size 9, but nothing says the size is 9: x has no shape, or the
    BN reads the output of an op shape inference does not know (no type at all)."""
    model = _bn_then(rng, "Conv", w_shape=(6, 4, 3, 3), x_shape=None, attrs={"auto_pad": "SAME_UPPER",
                                                                           "strides": [3, 3]})
    if not typed:
        model.graph.node.insert(0, helper.make_node("Opaque", ["x"], ["x_opaque"], name="opaque", domain="custom"))
        model.graph.node[1].input[0] = "x_opaque"
        model.opset_import.append(helper.make_opsetid("custom", 1))
    decision = _decision(model)
    assert (decision.reason, decision.detail) == (
        "padding-prevents-fold", "auto_pad=SAME_UPPER may pad spatial axis 0: its size is unknown")


def test_explicit_pads_detail(rng):
    model = _bn_then(rng, "Conv", w_shape=(6, 4, 3, 3), attrs={"pads": [0, 1, 0, 1]})
    decision = _decision(model)
    assert (decision.reason, decision.detail) == (
        "padding-prevents-fold", "Conv pads [0, 1, 0, 1]: the border would see 0, not the BN's shift")


# ------------------------------------------------------------------------------ names a fold adds
def test_new_initializers_are_named_after_the_weight(rng):
    """A bias the Conv did not have is named after its weight (`W_bias`, whatever the nodes are
    called), and a shared weight gets its own copy `W_bnfold`."""
    for op_name, bn_name in (("conv1", "bn"), ("", "norm")):
        model = _bn_then(rng, "Conv", bias=False, op_name=op_name, bn_name=bn_name)
        folded, _ = fold_model(model)
        assert list(folded.graph.node[0].input) == ["x", "W", "W_bias"]
    # W also read by a second Conv: the folded Conv gets its own copy
    model = _bn_then(rng, "Conv", op_name="conv1")
    graph = model.graph
    graph.node.append(helper.make_node("Conv", ["x", "W"], ["z"], name="other"))
    graph.output.append(tensor("z", F32, None))
    model = make_model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert folded.graph.node[0].input[1] == "W_bnfold" and folded.graph.node[1].input[1] == "W"
    assert_same_function(model, folded)


@pytest.mark.parametrize("shared", ["W", "b"])
def test_bn_then_gemm_names_its_copies(rng, shared):
    model = _bn_then(rng, "Gemm", w_shape=(4, 6), x_shape=(5, 4), op_name="fc")
    graph = model.graph
    other = helper.make_node("Add", [shared, shared], ["z"], name="other")
    graph.node.append(other)
    graph.output.append(tensor("z", F32, None))
    model = make_model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert f"{shared}_bnfold" in folded.graph.node[0].input
    assert_same_function(model, folded)


@pytest.mark.parametrize("names", [("mm", "norm"), ("", "norm"), ("", "")])
def test_matmul_then_bn_names_its_bias_and_add(rng, names):
    mm_name, bn_name = names
    model = _matmul(rng, add=False, mm_name=mm_name, bn_name=bn_name)
    folded, report = fold_model(model)
    assert report.folded == 1
    add = folded.graph.node[1]
    assert add.op_type == "Add" and add.name == f"{mm_name or 'MatMul'}_bias"
    assert add.input[1] == "W_bias"
    assert_same_function(model, folded)


def test_matmul_add_then_bn_names_a_shared_bias_copy(rng):
    model = _matmul(rng)
    graph = model.graph
    graph.node.append(helper.make_node("Neg", ["bias"], ["z"], name="other"))
    graph.output.append(tensor("z", F32, None))
    model = make_model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert "bias_bnfold" in [i for n in folded.graph.node for i in n.input]
    assert_same_function(model, folded)


@pytest.mark.parametrize("names", [("fc", "norm"), ("", "norm")])
def test_bn_then_matmul_names_its_bias_and_add(rng, names):
    op_name, bn_name = names
    model = _bn_then(rng, "MatMul", w_shape=(4, 6), x_shape=(5, 4), bias=False, op_name=op_name, bn_name=bn_name)
    folded, report = fold_model(model)
    assert report.folded == 1
    matmul, add = folded.graph.node
    assert add.name == f"{op_name or 'MatMul'}_bias"
    assert add.input == [matmul.output[0], "W_bias"]
    assert matmul.output[0] == "y_unbiased" and add.output[0] == "y"
    assert_same_function(model, folded)
