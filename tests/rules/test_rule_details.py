"""What users see of each fold rule: the exact (reason, detail) of every refusal that `bnfold inspect`
prints for a BN left in place, the documented names of the initializers and Add nodes a fold creates
(`{node or BN name}_{W|B|C}_bnfold`), and the conditions and defaults each rule reads, checked against
onnxruntime (optimizations off) where a fold happens."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, tensor
from tests.builders import make_model as checked_model

F32, F64, F16 = np.float32, np.float64, np.float16


def make_model(nodes, inputs, outputs, initializers, opset=17):
    """builders.make_model when the model is valid; the refusal cases (integer weights, stale attributes,
    unknown shapes) are built as they are, since the checker rejects them before bnfold could."""
    try:
        return checked_model(nodes, inputs, outputs, initializers, opset)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        model = helper.make_model(helper.make_graph(nodes, "test", inputs, outputs, initializers),
                                  opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        return model


def _arr(value, name, dtype=F32):
    return numpy_helper.from_array(np.asarray(value).astype(dtype), name)


def _stats(c=2, **overrides):
    stats = {"scale": np.full(c, 1.5), "B": np.full(c, 0.25), "mean": np.full(c, 0.5), "var": np.full(c, 2.0)}
    stats.update({k: np.asarray(v, dtype=np.float64) for k, v in overrides.items()})
    return stats


def _decision(model):
    _, report = fold_model(model)
    return report.decisions[0]


# ------------------------------------------------------------------------------------------ builders
def _conv(*, w=None, b=None, stats=None, dtype=F32, w_input=False, b_input=False, extra=(), conv_out_output=False,
          bn_inputs=None, bn_in_graph_inputs=(), bn_shapes=None, opset=17, bn_attrs=None):
    """x[1,2,3,3] -> Conv(W[2,2,1,1], b) -> BN -> y, with the parts a refusal needs swapped in."""
    w = np.full((2, 2, 1, 1), 0.5) if w is None else np.asarray(w)
    stats = _stats() if stats is None else stats
    inputs = [tensor("x", dtype, [1, 2, 3, 3])]
    inits = []
    if w_input:
        inputs.append(tensor("W", dtype, list(w.shape)))
    else:
        inits.append(_arr(w, "W", w.dtype if w.dtype.kind == "i" else dtype))
    conv_inputs = ["x", "W"]
    if b is not None:
        conv_inputs.append("b")
        if b_input:
            inputs.append(tensor("b", dtype, [2]))
        else:
            inits.append(_arr(b, "b", dtype))
    for key, value in stats.items():
        if key in bn_in_graph_inputs:
            inputs.append(tensor(f"bn_{key}", dtype, [2]))
        else:
            shape = (bn_shapes or {}).get(key)
            inits.append(_arr(value.reshape(shape) if shape is not None else value, f"bn_{key}", dtype))
    bn = bn_node("conv_out", "y", **(bn_attrs or {}))
    if bn_inputs is not None:
        del bn.input[:]
        bn.input.extend(bn_inputs)
    nodes = [helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv"), bn, *extra]
    outputs = [tensor("y", dtype, None)] + [tensor(n.output[0], dtype, None) for n in extra]
    if conv_out_output:
        outputs.append(tensor("conv_out", dtype, None))
    return make_model(nodes, inputs, outputs, inits, opset)


def _gemm(*, b_matrix, c, stats, dtype=F64):
    inits = [_arr(b_matrix, "B", dtype), _arr(c, "C", dtype), *bn_initializers(stats, dtype)]
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm"), bn_node("g", "y")]
    return make_model(nodes, [tensor("x", dtype, [3, 2])], [tensor("y", dtype, [3, 2])], inits)


def _matmul_add(*, w, bias, stats, dtype=F64, x_shape=(3, 2)):
    inits = [_arr(w, "W", dtype), _arr(bias, "bias", dtype), *bn_initializers(stats, dtype)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="matmul"),
             helper.make_node("Add", ["mm_out", "bias"], ["add_out"], name="add"), bn_node("add_out", "y")]
    x = tensor("x", dtype, list(x_shape)) if x_shape is not None else onnx.helper.make_tensor_value_info(
        "x", onnx.TensorProto.DOUBLE if dtype == F64 else onnx.TensorProto.FLOAT, None)
    return make_model(nodes, [x], [tensor("y", dtype, None)], inits)


def _bn_conv(*, w, b, stats, dtype=F64):
    inits = [_arr(w, "W", dtype), _arr(b, "b", dtype), *bn_initializers(stats, dtype)]
    nodes = [bn_node("x", "a"), helper.make_node("Conv", ["a", "W", "b"], ["y"], name="conv")]
    return make_model(nodes, [tensor("x", dtype, [1, 2, 3, 3])], [tensor("y", dtype, None)], inits)


def _bn_gemm(*, w, c, stats, dtype=F64):
    inits = [_arr(w, "W", dtype), _arr(c, "C", dtype), *bn_initializers(stats, dtype)]
    nodes = [bn_node("x", "a"), helper.make_node("Gemm", ["a", "W", "C"], ["y"], name="gemm")]
    return make_model(nodes, [tensor("x", dtype, [3, 2])], [tensor("y", dtype, [3, 2])], inits)


def _bn_extra_outputs(opset, *, attrs=None, read_by_node=False):
    """Conv -> BN that declares its running statistics; they are graph outputs or read by a node."""
    stats = _stats()
    inits = [_arr(np.full((2, 2, 1, 1), 0.5), "W")] + bn_initializers(stats, F32)
    bn = bn_node("conv_out", "y", **(attrs or {}))
    bn.output.extend(["run_mean", "run_var"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"), bn]
    outputs = [tensor("y", F32, None)]
    if read_by_node:
        nodes.append(helper.make_node("Identity", ["run_mean"], ["m_copy"], name="copy"))
        outputs.append(tensor("m_copy", F32, None))
    else:
        outputs += [tensor("run_mean", F32, None), tensor("run_var", F32, None)]
    return make_model(nodes, [tensor("x", F32, [1, 2, 3, 3])], outputs, inits, opset)


HUGE = 1e200  # finite in float64, but a product of two of them is not

REFUSALS = {
    "conv output is a graph output": (
        lambda: _conv(conv_out_output=True),
        "neighbour-output-is-graph-output", "Conv output conv_out is a graph output"),
    "conv output read by 4 other nodes, 3 listed": (
        lambda: _conv(extra=[helper.make_node("Relu", ["conv_out"], [f"r{i}_out"], name=f"r{i}") for i in range(4)]),
        "neighbour-has-other-consumers",
        "Conv output conv_out is also read by Relu 'r0', Relu 'r1', Relu 'r2'"),
    "conv weight not constant": (
        lambda: _conv(w_input=True), "weights-not-constant",
        "Conv weight: W is a graph input"),
    "conv bias not constant": (
        lambda: _conv(b=[0.1, 0.2], b_input=True), "weights-not-constant",
        "Conv bias: b is a graph input"),
    "conv weight integer": (
        lambda: _conv(w=np.ones((2, 2, 1, 1), dtype=np.int32)), "dtype-unsupported",
        "Conv weight is int32, not a float type"),
    "BN var input missing": (
        lambda: _conv(bn_inputs=["conv_out", "bn_scale", "bn_B", "bn_mean", ""]), "weights-not-constant",
        "BN var is missing"),
    **{f"BN {key} not constant": (
        (lambda key=key: _conv(bn_in_graph_inputs=(key,))), "weights-not-constant",
        f"BN {key}: bn_{key} is a graph input") for key in ("scale", "B", "mean", "var")},
    "BN mean not 1-D": (
        lambda: _conv(bn_shapes={"mean": (2, 1)}), "channel-axis-mismatch",
        "BN mean has shape [2, 1], expected [C]"),
    "BN var NaN": (
        lambda: _conv(stats=_stats(var=[np.nan, 1.0])), "invalid-statistics", "a BN parameter is not finite"),
    # var + eps: -1 -> < 0; -eps -> exactly 0 (eps is stored as float32, var too); 5e-6 and 0.5 -> > 0
    "BN var + eps <= 0 counted": (
        lambda: _conv(w=np.full((4, 2, 1, 1), 0.5), stats=_stats(c=4, var=[-1.0, -1e-5, 5e-6, 0.5])),
        "invalid-statistics",
        "var + epsilon <= 0 in 2 channel(s)"),
    "BN shift overflows float64 (scale finite)": (
        lambda: _conv(dtype=F64, stats=_stats(scale=[HUGE, 1.0], mean=[HUGE, 0.0], var=[1.0, 1.0])),
        "dtype-overflow", "the BN's scale or shift overflows float64"),
    "conv weights overflow float64": (
        lambda: _conv(dtype=F64, w=np.full((2, 2, 1, 1), HUGE), b=[0.0, 0.0],
                      stats=_stats(scale=[HUGE, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0])),
        "dtype-overflow", "folded weights are not finite in float64"),
    "conv biases overflow float64": (
        lambda: _conv(dtype=F64, b=[HUGE, 0.0], stats=_stats(scale=[HUGE, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0])),
        "dtype-overflow", "folded biases are not finite in float64"),
    "gemm weights overflow float64": (
        lambda: _gemm(b_matrix=np.full((2, 2), HUGE), c=[0.0, 0.0],
                      stats=_stats(scale=[HUGE, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0])),
        "dtype-overflow", "folded weights are not finite in float64"),
    "gemm biases overflow float64": (
        lambda: _gemm(b_matrix=np.full((2, 2), 0.5), c=[HUGE, 0.0],
                      stats=_stats(scale=[HUGE, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0])),
        "dtype-overflow", "folded biases are not finite in float64"),
    "matmul + add biases overflow float64": (
        lambda: _matmul_add(w=np.full((2, 2), 0.5), bias=[HUGE, 0.0],
                            stats=_stats(scale=[HUGE, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0])),
        "dtype-overflow", "folded biases are not finite in float64"),
    "matmul output rank unknown": (
        lambda: _matmul_add(w=np.full((2, 2), 0.5), bias=[0.0, 0.0], stats=_stats(), x_shape=None),
        "rank-unknown", "the rank of MatMul output mm_out is unknown"),
    "bn-conv weights overflow float64": (
        lambda: _bn_conv(w=np.full((2, 2, 1, 1), HUGE), b=[0.0, 0.0],
                         stats=_stats(scale=[HUGE, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0], B=[0.0, 0.0])),
        "dtype-overflow", "folded weights are not finite in float64"),
    "bn-conv biases overflow float64": (
        lambda: _bn_conv(w=np.ones((2, 2, 1, 1)), b=[1e308, 0.0],
                         stats=_stats(scale=[1.0, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0], B=[1e308, 1e308])),
        "dtype-overflow", "folded biases are not finite in float64"),
    "bn-gemm biases overflow float64": (
        lambda: _bn_gemm(w=np.ones((2, 2)), c=[1e308, 0.0],
                         stats=_stats(scale=[1.0, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0], B=[1e308, 1e308])),
        "dtype-overflow", "folded biases are not finite in float64"),
    # opset 7-13: declared outputs mean training mode, but their being read is the first thing to say
    "opset 7 BN statistics outputs read": (
        lambda: _bn_extra_outputs(7), "bn-extra-outputs-used", "output(s) run_mean, run_var are read by the graph"),
    "opset 9 BN statistic read by a node": (
        lambda: _bn_extra_outputs(9, read_by_node=True), "bn-extra-outputs-used",
        "output(s) run_mean are read by the graph"),
    "opset 15 BN statistic read by a node (inference mode)": (
        lambda: _bn_extra_outputs(15, read_by_node=True), "bn-extra-outputs-used",
        "output(s) run_mean are read by the graph"),
    # opset 14+: training_mode=1 is the reason, whatever reads the statistics
    "opset 14 training_mode=1 with statistics read": (
        lambda: _bn_extra_outputs(14, attrs={"training_mode": 1}), "training-mode",
        "training_mode=1: normalizes with batch statistics"),
    # opset 9 dropped `spatial`: a stale spatial=0 must not make [C,1,1] statistics acceptable
    "opset 9 stale spatial=0 with [C,1,1] statistics": (
        lambda: _conv(opset=9, bn_attrs={"spatial": 0}, bn_shapes={k: (2, 1, 1) for k in ("scale", "B", "mean", "var")}),
        "channel-axis-mismatch", "BN scale has shape [2, 1, 1], expected [C]"),
    # spatial=0 accepts [C, ...] statistics constant per channel; a scalar is no per-channel vector
    "opset 8 spatial=0 with a scalar statistic": (
        lambda: _conv(opset=8, bn_attrs={"spatial": 0}, bn_shapes={"mean": ()},
                      stats=_stats(scale=[1.0, 2.0], B=[0.0, 1.0], mean=[0.3], var=[1.0, 2.0])),
        "channel-axis-mismatch", "BN mean has shape [], expected [C]"),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a refusal is the answer, not numpy's warnings
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_reason_and_detail(case):
    build, reason, detail = REFUSALS[case]
    decision = _decision(build())
    assert (decision.reason, decision.detail) == (reason, detail)


def test_float16_bias_overflow_refuses_without_numpy_warnings():
    """The cast to the weight's dtype is expected to overflow sometimes: users get a refusal, not noise."""
    model = _conv(dtype=F16, b=[60000.0, 1.0], stats=_stats(scale=[4.0, 1.0], var=[1.0, 1.0], mean=[0.0, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decision = _decision(model)
    assert (decision.reason, decision.detail) == ("dtype-overflow", "1 folded biases value(s) overflow float16")


# -------------------------------------------------------------------------------- folds, by oracle
def _folds(model, rule):
    folded, report = fold_model(model)
    decision = report.decisions[0]
    assert (decision.reason, decision.rule) == ("folded", rule), decision
    return folded


def test_bn_without_epsilon_uses_default(rng):
    """epsilon defaults to 1e-5; a tiny var makes a wrong default visible."""
    model = _conv(stats=_stats(var=[1e-5, 2e-5]))
    bn = model.graph.node[1]
    del bn.attribute[:]
    assert_same_function(model, _folds(model, "conv-bn"))


def test_conv_transpose_without_group_attribute(rng):
    inits = [_arr(rng.normal(size=(2, 3, 2, 2)), "W")] + bn_initializers(bn_stats(rng, 3), F32)
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["ct"], name="ct"), bn_node("ct", "y")]
    model = make_model(nodes, [tensor("x", F32, [1, 2, 3, 3])], [tensor("y", F32, None)], inits)
    assert_same_function(model, _folds(model, "conv-bn"))


def test_opset8_spatial0_two_dim_statistics_fold(rng):
    """spatial=0 statistics of shape [C, L] (here L = 1) that are constant per channel fold."""
    stats = bn_stats(rng, 3)
    inits = [_arr(rng.normal(size=(3, 2, 1)), "W")] + [_arr(v[:, None], f"bn_{k}") for k, v in stats.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", spatial=0)]
    model = checked_model(nodes, [tensor("x", F32, [2, 2, 1])], [tensor("y", F32, [2, 3, 1])], inits, opset=8)
    assert_same_function(model, _folds(model, "conv-bn"))


def test_ai_onnx_domain_neighbours_fold():
    """"ai.onnx" is the default domain spelled out: Conv and MatMul (behind an Add) in it still fold."""
    model = _conv()
    model.graph.node[0].domain = "ai.onnx"
    _folds(model, "conv-bn")
    model = _matmul_add(w=np.full((2, 2), 0.5), bias=[0.1, 0.2], stats=_stats())
    model.graph.node[0].domain = "ai.onnx"
    model.graph.value_info.append(tensor("mm_out", F64, [3, 2]))  # shape inference skips "ai.onnx" nodes
    _folds(model, "matmul-bn")


# --------------------------------------------------------------------------- names of what a fold adds
def _named(model, names):
    """Rename nodes (None: no name)."""
    for node in model.graph.node:
        if node.name in names:
            node.name = names[node.name] or ""
    return model


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def _inits(model):
    return {t.name for t in model.graph.initializer}


def _conv_shared(op="Conv"):
    """Conv/ConvTranspose (no bias) -> BN, its weight also read by a second node that stays."""
    rng = np.random.default_rng(0)
    w_shape = (2, 2, 1, 1)
    inits = [_arr(rng.normal(size=w_shape), "W")] + bn_initializers(bn_stats(rng, 2), F32)
    nodes = [helper.make_node(op, ["x", "W"], ["c"], name="conv"), bn_node("c", "y"),
             helper.make_node(op, ["x", "W"], ["z"], name="other")]
    return make_model(nodes, [tensor("x", F32, [1, 2, 3, 3])], [tensor("y", F32, None), tensor("z", F32, None)],
                      inits)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("conv_name", ["conv", None])
def test_conv_bn_new_initializer_names(op, conv_name):
    model = _named(_conv_shared(op), {"conv": conv_name})
    folded = _folds(model, "conv-bn")
    conv = _node(folded, op)
    assert list(conv.input[1:]) == ["W_bnfold", "W_bias"]
    assert _node(folded, op) is not None and "W" in _inits(folded)  # the shared weight is kept
    assert_same_function(model, folded)


@pytest.mark.parametrize("gemm_name", ["gemm", None])
def test_gemm_bn_new_initializer_names(gemm_name):
    rng = np.random.default_rng(0)
    inits = [_arr(rng.normal(size=(2, 2)), "B")] + bn_initializers(bn_stats(rng, 2), F32)
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm"), bn_node("g", "y"),
             helper.make_node("MatMul", ["x", "B"], ["z"], name="other")]
    model = _named(make_model(nodes, [tensor("x", F32, [3, 2])], [tensor("y", F32, [3, 2]), tensor("z", F32, None)],
                              inits), {"gemm": gemm_name})
    folded = _folds(model, "gemm-bn")
    assert list(_node(folded, "Gemm").input[1:]) == ["B_bnfold", "B_bias"]
    assert_same_function(model, folded)


def _matmul_shared(add):
    rng = np.random.default_rng(0)
    inits = [_arr(rng.normal(size=(2, 2)), "W"), _arr(rng.normal(size=2), "bias")]
    inits += bn_initializers(bn_stats(rng, 2), F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="matmul"),
             helper.make_node("MatMul", ["x", "W"], ["z"], name="other"),
             helper.make_node("Add", ["bias", "x"], ["z2"], name="other_add")]
    if add:
        nodes.append(helper.make_node("Add", ["mm_out", "bias"], ["add_out"], name="add"))
    nodes.append(bn_node("add_out" if add else "mm_out", "y"))
    outputs = [tensor(n, F32, None) for n in ("y", "z", "z2")]
    return make_model(nodes, [tensor("x", F32, [3, 2])], outputs, inits)


@pytest.mark.parametrize("names, add_name", [({}, "matmul_bias"), ({"matmul": None}, "MatMul_bias")])
def test_matmul_bn_new_names(names, add_name):
    model = _named(_matmul_shared(add=False), names)
    folded = _folds(model, "matmul-bn")
    matmul = next(n for n in folded.graph.node if n.op_type == "MatMul" and n.output[0] == "mm_out")
    add = next(n for n in folded.graph.node if n.op_type == "Add" and n.output[0] == "y")
    assert matmul.input[1] == "W_bnfold"
    assert list(add.input) == ["mm_out", "W_bias"] and add.name == add_name
    assert_same_function(model, folded)


@pytest.mark.parametrize("names", [{}, {"matmul": None, "add": None}])
def test_matmul_add_bn_new_names(names):
    model = _named(_matmul_shared(add=True), names)
    folded = _folds(model, "matmul-bn")
    matmul = next(n for n in folded.graph.node if n.op_type == "MatMul" and n.output[0] == "mm_out")
    add = next(n for n in folded.graph.node if n.op_type == "Add" and n.output[0] == "y")
    assert matmul.input[1] == "W_bnfold"
    assert list(add.input) == ["mm_out", "bias_bnfold"]
    assert_same_function(model, folded)


@pytest.mark.parametrize("conv_name", ["conv", None])
def test_bn_conv_new_initializer_names(conv_name):
    rng = np.random.default_rng(0)
    inits = [_arr(rng.normal(size=(2, 2, 1, 1)), "W")] + bn_initializers(bn_stats(rng, 2), F32)
    nodes = [bn_node("x", "a"), helper.make_node("Conv", ["a", "W"], ["y"], name="conv"),
             helper.make_node("Conv", ["x", "W"], ["z"], name="other")]
    model = _named(make_model(nodes, [tensor("x", F32, [1, 2, 3, 3])], [tensor("y", F32, None),
                                                                          tensor("z", F32, None)], inits),
                   {"conv": conv_name})
    folded = _folds(model, "bn-conv")
    conv = next(n for n in folded.graph.node if n.output[0] == "y")
    assert list(conv.input) == ["x", "W_bnfold", "W_bias"]
    assert_same_function(model, folded)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("node_name", ["lin", None])
def test_bn_linear_new_names(op, node_name):
    rng = np.random.default_rng(0)
    inits = [_arr(rng.normal(size=(2, 2)), "W")] + bn_initializers(bn_stats(rng, 2), F32)
    nodes = [bn_node("x", "a"), helper.make_node(op, ["a", "W"], ["y"], name="lin"),
             helper.make_node("MatMul", ["x", "W"], ["z"], name="other")]
    model = _named(make_model(nodes, [tensor("x", F32, [3, 2])], [tensor("y", F32, [3, 2]), tensor("z", F32, None)],
                              inits), {"lin": node_name})
    folded = _folds(model, "bn-linear")
    node = _node(folded, op)
    if op == "Gemm":
        assert list(node.input) == ["x", "W_bnfold", "W_bias"]
    else:
        assert list(node.input) == ["x", "W_bnfold"]
        add = next(n for n in folded.graph.node if n.output[0] == "y")
        assert add.op_type == "Add" and add.input[1] == "W_bias"
        assert add.name == f"{node_name or 'MatMul'}_bias"
    assert_same_function(model, folded)
