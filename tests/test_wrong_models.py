"""Graphs on which a fold would compute a different function: every check that prevents one is pinned.

Each test asserts the decision bnfold reports (the reason code) AND that the folded model computes
what the original does, by onnxruntime with graph optimizations off on seeded random inputs: a
wrong fold is caught even if a reason code is renamed. Every graph is chosen so that dropping the
check under test makes bnfold write a model that computes something else (shapes line up: square
weights, equal channel counts), or crash, rather than fail for an unrelated reason.
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from tests.builders import (assert_close, bn_initializers, bn_node, bn_stats, conv_bn, gemm_bn, make_model,
                            matmul_bn, op_types, random_feeds, run_ort, tensor)

F32 = np.float32


def fold_and_check(model, reason, *, feeds=None, oracle=True, atol=1e-5, rtol=1e-4):
    """Fold `model`, assert its only BN got `reason` (and stayed unless folded), and that onnxruntime
    (optimizations off) computes the same outputs from both models."""
    folded, report = bnfold.fold_model(model)
    assert len(report.decisions) == 1, report.decisions
    decision = report.decisions[0]
    assert decision.reason == reason, decision
    assert decision.detail
    bns = op_types(folded).count("BatchNormalization")
    assert bns == (0 if reason == "folded" else 1), op_types(folded)
    if reason != "folded":
        assert op_types(folded) == op_types(model)
    if oracle:
        feeds = feeds if feeds is not None else random_feeds(model, seed=3)
        assert_close(run_ort(model, feeds), run_ort(folded, feeds), atol, rtol, "onnxruntime: ")
    return folded, decision


def init(rng, name, shape, dtype=F32):
    return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(dtype), name)


def set_initializer(model, name, values):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values), name))
            return
    raise KeyError(name)


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# ------------------------------------------------------------ the tensor a fold changes is read elsewhere
# (builder, tensor the fold would change, its shape): neighbour -> BN graphs whose neighbour output
# (or MatMul -> Add intermediate) gets a second reader or becomes a graph output.
NEIGHBOUR_OUTPUTS = {
    "conv": (lambda rng: conv_bn(rng), "conv_out", [2, 6, 5, 5]),
    "conv-transpose": (lambda rng: conv_bn(rng, transposed=True), "conv_out", [2, 6, 9, 9]),
    "gemm": (lambda rng: gemm_bn(rng), "gemm_out", [5, 6]),
    "matmul": (lambda rng: matmul_bn(rng), "mm_out", [5, 6]),
    "matmul-then-add:matmul": (lambda rng: matmul_bn(rng, bias_shape=(6,)), "mm_out", [5, 6]),
    "matmul-then-add:add": (lambda rng: matmul_bn(rng, bias_shape=(6,)), "add_out", [5, 6]),
}


@pytest.mark.parametrize("case", NEIGHBOUR_OUTPUTS)
def test_neighbour_output_read_by_another_node_stays(rng, case):
    """Folding would rescale the tensor the extra Relu reads."""
    build, name, shape = NEIGHBOUR_OUTPUTS[case]
    model = build(rng)
    model.graph.node.append(helper.make_node("Relu", [name], ["other"], name="other_reader"))
    model.graph.output.append(tensor("other", F32, shape))
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "neighbour-has-other-consumers")


@pytest.mark.parametrize("case", NEIGHBOUR_OUTPUTS)
def test_neighbour_output_that_is_a_graph_output_stays(rng, case):
    """Folding would rescale (or remove) a tensor the caller reads."""
    build, name, shape = NEIGHBOUR_OUTPUTS[case]
    model = build(rng)
    model.graph.output.append(tensor(name, F32, shape))
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "neighbour-output-is-graph-output")


# ----------------------------------------------------------------------------- BN before its consumer
def bn_then(rng, op, *, c=4, n=6, x_shape=None, attrs=None, w_shape=None):
    """x -> BN(c channels) -> Conv (1x1 kernel unless w_shape says otherwise) / Gemm / MatMul -> y."""
    inits = bn_initializers(bn_stats(rng, c), F32)
    if op == "Conv":
        w_shape, x_shape = w_shape or (n, c, 1, 1), x_shape or [2, c, 5, 5]
    else:
        w_shape, x_shape = w_shape or (c, n), x_shape or [3, c]
    inits.append(init(rng, "W", w_shape))
    nodes = [bn_node("x", "bn_out"), helper.make_node(op, ["bn_out", "W"], ["y"], name="linear", **(attrs or {}))]
    return make_model(nodes, [tensor("x", F32, x_shape)], [tensor("y", F32, None)], inits)


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_bn_output_that_is_a_graph_output_is_not_folded_forward(rng, op):
    """BN -> Conv/Gemm/MatMul removes the BN: its output, also a graph output, would be left dangling."""
    model = bn_then(rng, op)
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    model.graph.output.append(tensor("bn_out", F32, x_shape))
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "neighbour-output-is-graph-output")


def _bn_on_weight(rng, op, k=4):
    """Op(x, BN(W)): the BN normalizes the constant weight operand; shapes are square, so treating W as
    the data input and BN(W) as the weight still gives a well-formed (but different) model."""
    inits = bn_initializers(bn_stats(rng, k), F32)
    if op == "Conv":
        inits.append(init(rng, "W", (k, k, 1, 1)))
        x_shape, y_shape = [k, k, 1, 1], [k, k, 1, 1]
    else:
        inits.append(init(rng, "W", (k, k)))
        x_shape, y_shape = [k, k], [k, k]
    nodes = [bn_node("W", "w_normalized"), helper.make_node(op, ["x", "w_normalized"], ["y"], name="linear")]
    return make_model(nodes, [tensor("x", F32, x_shape)], [tensor("y", F32, y_shape)], inits)


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_bn_feeding_the_weight_operand_is_not_folded_as_the_data_input(rng, op):
    """Only a BN feeding input 0 (the data) is a pre-activation BN; folding one that feeds input 1 would
    compute Op(W, BN'(..)) instead of Op(x, BN(W))."""
    fold_and_check(_bn_on_weight(rng, op), "no-foldable-neighbour")


def test_bn_over_the_sequence_axis_before_matmul_is_refused(rng):
    """[B, T, C] with BN over axis 1 (T) feeding MatMul over C: the BN does not act on the reduced axis,
    even when T == C makes the channel counts agree."""
    model = bn_then(rng, "MatMul", c=4, n=3, x_shape=[2, 4, 4])
    fold_and_check(model, "channel-axis-mismatch")


def test_bn_input_of_unknown_rank_before_matmul_is_refused(rng):
    model = bn_then(rng, "MatMul", c=4, n=3)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 4)).astype(F32)}
    fold_and_check(model, "rank-unknown", feeds=feeds)


def test_bn_before_matmul_with_batched_weight_is_refused(rng):
    """x [M, K] @ W [B, K, N] gives [B, M, N]; with B == K the BN's channel count matches W's axis 0."""
    model = bn_then(rng, "MatMul", c=4, x_shape=[3, 4], w_shape=(4, 4, 5))
    fold_and_check(model, "rank-unsupported")


def test_bn_before_gemm_with_trans_a_is_refused(rng):
    """Gemm(transA=1) reduces over A's axis 0, not the BN's channel axis 1 (square A so shapes agree)."""
    model = bn_then(rng, "Gemm", c=4, n=3, x_shape=[4, 4], attrs={"transA": 1})
    fold_and_check(model, "channel-axis-mismatch")


@pytest.mark.parametrize("padding", [
    {"pads": [0, 0, 1, 1]},
    {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "SAME_LOWER"},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
], ids=str)
def test_bn_before_padded_conv_is_refused(rng, padding):
    """The padded border of the Conv sees 0, not the BN's shift: a fold changes the border outputs."""
    model = bn_then(rng, "Conv", w_shape=(6, 4, 3, 3), attrs=padding)
    fold_and_check(model, "padding-prevents-fold")


@pytest.mark.parametrize("attrs", [{"auto_pad": "VALID"}, {"auto_pad": "SAME_UPPER"}, {"pads": [0, 0, 0, 0]}],
                         ids=str)
def test_bn_before_unpadded_conv_folds(rng, attrs):
    """VALID, explicit zero pads and SAME with a 1x1 kernel at stride 1 pad nothing."""
    model = bn_then(rng, "Conv", attrs=attrs)
    fold_and_check(model, "folded")


def test_bn_before_conv_same_1x1_stride2_is_exact_either_way(rng):
    """SAME with a 1x1 kernel never pads, whatever the stride: the BN folds and the function does not
    change."""
    model = bn_then(rng, "Conv", x_shape=[2, 4, 7, 7], attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]})
    folded, report = bnfold.fold_model(model)
    assert report.decisions[0].reason == "folded"
    feeds = random_feeds(model, seed=3)
    assert_close(run_ort(model, feeds), run_ort(folded, feeds), 1e-5, 1e-4)


# ------------------------------------------------------------------------------- MatMul (+ Add) -> BN
def test_matmul_add_with_rank3_bias_is_refused(rng):
    """MatMul [M, N] + bias [1, M, N] is rank 3: the BN's channel axis is M, not MatMul's output column
    (M == N so the channel counts agree)."""
    model = matmul_bn(rng, bias_shape=(1, 4, 4), m=4, k=3, n=4)
    fold_and_check(model, "channel-axis-mismatch")


def test_matmul_add_with_non_constant_bias_is_refused(rng):
    model = matmul_bn(rng, bias_shape=(6,))
    bias = next(t for t in model.graph.initializer if t.name == "bias")
    model.graph.initializer.remove(bias)
    model.graph.input.append(tensor("bias", F32, [6]))
    fold_and_check(model, "weights-not-constant")


def test_matmul_with_batched_weight_and_rank2_output_is_refused(rng):
    """x [K] @ W [B, K, N] is [B, N] (rank 2): BN's channel axis is N, but W's axis 1 is K (K == N)."""
    inits = [init(rng, "W", (3, 4, 4))] + bn_initializers(bn_stats(rng, 4), F32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="matmul"), bn_node("mm_out", "y")]
    model = make_model(nodes, [tensor("x", F32, [4])], [tensor("y", F32, [3, 4])], inits)
    fold_and_check(model, "rank-unsupported")


# ------------------------------------------------------------------------------------ BN mode, per opset
def _with_attribute(model, name, value):
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute(name, value))
    return model


def _declared_training_outputs(rng, opset, used=False, training_mode=None):
    model = conv_bn(rng, opset=opset)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var"] + (["saved_mean", "saved_var"] if opset < 14 else []))
    if training_mode is not None:
        bn.attribute.append(helper.make_attribute("training_mode", training_mode))
    if used:
        model.graph.output.append(tensor("running_mean", F32, [6]))
    return model


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_1_is_refused_from_opset_14(rng, opset):
    """BN-14 introduced training_mode; with it set (and the running statistics declared, as the spec
    requires, but unread) the BN normalizes with batch statistics."""
    model = _declared_training_outputs(rng, opset, training_mode=1)
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "training-mode", oracle=False)


@pytest.mark.parametrize("opset", [7, 8, 9, 13])
def test_declared_training_outputs_are_training_mode_at_opsets_7_to_13(rng, opset):
    """BN-7..13 have no mode attribute: declaring the statistics outputs selects batch statistics."""
    model = _declared_training_outputs(rng, opset)
    fold_and_check(model, "training-mode", oracle=False)


def test_unused_declared_outputs_with_training_mode_0_fold_at_opset_14(rng):
    """From opset 14 the mode is training_mode (default 0), not the declared outputs. The spec calls
    the extra outputs invalid with training_mode=0 (onnxruntime will not load the model), so the oracle
    is the same model without them."""
    model = _declared_training_outputs(rng, 14)
    folded, decision = fold_and_check(model, "folded", oracle=False)
    without = onnx.ModelProto()
    without.CopyFrom(model)
    del without.graph.node[1].output[1:]
    feeds = random_feeds(model, seed=3)
    assert_close(run_ort(without, feeds), run_ort(folded, feeds), 1e-5, 1e-4)


@pytest.mark.parametrize("opset", [9, 14])
def test_read_bn_statistics_outputs_are_refused(rng, opset):
    fold_and_check(_declared_training_outputs(rng, opset, used=True), "bn-extra-outputs-used", oracle=False)


def test_opset6_is_test_1_without_extra_outputs_folds(rng):
    model = _with_attribute(conv_bn(rng, opset=6), "is_test", 1)
    folded, report = bnfold.fold_model(model)
    assert report.decisions[0].reason == "folded"
    assert op_types(folded) == ["Conv"]


def test_opset6_is_test_0_is_training_mode(rng):
    fold_and_check(conv_bn(rng, opset=6), "training-mode", oracle=False)


# --------------------------------------------------------------------------------------- BN parameters
@pytest.mark.parametrize("var, epsilon", [(-1.0, 1e-5), (0.0, 0.0), (np.nan, 1e-5)], ids=str)
def test_invalid_statistics_are_refused(rng, var, epsilon):
    """var + eps <= 0 (including exactly 0) or a non-finite statistic: no affine map to fold."""
    model = conv_bn(rng)
    values = initializer(model, "bn_var").copy()
    values[2] = var
    set_initializer(model, "bn_var", values)
    model.graph.node[1].attribute[0].f = epsilon
    fold_and_check(model, "invalid-statistics", oracle=False)


@pytest.mark.parametrize("name", ["scale", "B", "mean"])
def test_non_finite_statistic_is_invalid(rng, name):
    model = conv_bn(rng)
    values = initializer(model, f"bn_{name}").copy()
    values[1] = np.inf
    set_initializer(model, f"bn_{name}", values)
    fold_and_check(model, "invalid-statistics", oracle=False)


# BN parameter shapes the neighbour's channel count disagrees with (invalid models: no oracle runs them).
@pytest.mark.parametrize("build", [
    lambda rng: conv_bn(rng), lambda rng: gemm_bn(rng), lambda rng: matmul_bn(rng),
    lambda rng: bn_then(rng, "Conv", n=4), lambda rng: bn_then(rng, "Gemm"), lambda rng: bn_then(rng, "MatMul"),
], ids=["conv-bn", "gemm-bn", "matmul-bn", "bn-conv", "bn-gemm", "bn-matmul"])
def test_bn_with_one_channel_for_a_multichannel_neighbour_is_refused(rng, build):
    """A 1-element BN would broadcast over every channel if bnfold let numpy decide."""
    model = build(rng)
    for name in ("scale", "B", "mean", "var"):
        set_initializer(model, f"bn_{name}", initializer(model, f"bn_{name}")[:1].copy())
    _, decision = fold_and_check(model, "channel-axis-mismatch", oracle=False)
    assert "1" in decision.detail


def test_bn_parameters_of_different_lengths_are_refused(rng):
    model = conv_bn(rng)
    set_initializer(model, "bn_var", np.concatenate([initializer(model, "bn_var"), [1.0]]).astype(F32))
    fold_and_check(model, "channel-axis-mismatch", oracle=False)


def test_bn_parameters_of_rank_2_are_refused(rng):
    model = conv_bn(rng, opset=15)
    for name in ("scale", "B", "mean", "var"):
        set_initializer(model, f"bn_{name}", initializer(model, f"bn_{name}").reshape(6, 1))
    fold_and_check(model, "channel-axis-mismatch", oracle=False)


# ---------------------------------------------------------------------------------- weight shape and type
def test_conv_weight_of_rank_2_is_refused(rng):
    model = conv_bn(rng)
    set_initializer(model, "W", rng.normal(size=(6, 4)).astype(F32))
    fold_and_check(model, "rank-unsupported", oracle=False)


def test_bn_before_conv_with_weight_of_rank_2_is_refused(rng):
    model = bn_then(rng, "Conv")
    set_initializer(model, "W", rng.normal(size=(6, 4)).astype(F32))
    fold_and_check(model, "rank-unsupported", oracle=False)


@pytest.mark.parametrize("transposed", [False, True], ids=["Conv", "ConvTranspose"])
@pytest.mark.parametrize("shape", [(6, 1), (1, 6), (3,), (12,)], ids=str)
def test_conv_bias_not_one_per_output_channel_is_refused(rng, transposed, shape):
    """A bias must be [M]: a [6, 1] bias would broadcast against the folded one into another shape."""
    model = conv_bn(rng, transposed=transposed)
    set_initializer(model, "b", rng.normal(size=shape).astype(F32))
    _, decision = fold_and_check(model, "malformed-neighbour", oracle=False)
    assert "bias has shape" in decision.detail


def test_bn_before_conv_bias_not_one_per_output_channel_is_refused(rng):
    model = bn_then(rng, "Conv")
    model.graph.node[1].input.append("b")
    model.graph.initializer.append(init(rng, "b", (6, 1)))
    fold_and_check(model, "malformed-neighbour", oracle=False)


@pytest.mark.parametrize("transposed", [False, True], ids=["Conv", "ConvTranspose"])
@pytest.mark.parametrize("groups", [0, -1, 4], ids=str)
def test_conv_group_that_does_not_divide_the_weight_is_refused(rng, transposed, groups):
    """group 4 does not divide the weight's axis 0 (6 output channels; 4 input channels of a
    ConvTranspose divide, so its weight is given 6 rows); 0 and negative groups are no groups."""
    model = conv_bn(rng, transposed=transposed, channels_in=6 if transposed else 4)
    next(a for a in model.graph.node[0].attribute if a.name == "group").i = groups
    _, decision = fold_and_check(model, "malformed-neighbour", oracle=False)
    assert f"group={groups}" in decision.detail


def test_bn_before_conv_group_that_does_not_divide_the_weight_is_refused(rng):
    model = bn_then(rng, "Conv")
    model.graph.node[1].attribute.append(helper.make_attribute("group", 4))
    fold_and_check(model, "malformed-neighbour", oracle=False)


@pytest.mark.parametrize("shape", [(4, 6, 1), (6,)], ids=str)
def test_gemm_b_not_of_rank_2_is_refused(rng, shape):
    model = gemm_bn(rng)
    set_initializer(model, "B", rng.normal(size=shape).astype(F32))
    fold_and_check(model, "rank-unsupported", oracle=False)


def test_matmul_add_bias_not_per_output_column_is_refused(rng):
    model = matmul_bn(rng, bias_shape=(6,))
    set_initializer(model, "bias", rng.normal(size=(5,)).astype(F32))
    fold_and_check(model, "channel-axis-mismatch", oracle=False)


def test_integer_conv_weight_is_dtype_unsupported(rng):
    model = conv_bn(rng)
    set_initializer(model, "W", rng.integers(-3, 3, size=(6, 4, 3, 3)).astype(np.int32))
    fold_and_check(model, "dtype-unsupported", oracle=False)


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_consumer_weight_overridable_in_ir4_is_refused(rng, op):
    model = bn_then(rng, op)
    model.graph.input.append(tensor("W", F32, list(initializer(model, "W").shape)))
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "weights-overridable")


def test_bn_statistic_overridable_in_ir4_is_refused(rng):
    model = matmul_bn(rng)
    model.graph.input.append(tensor("bn_mean", F32, [6]))
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "weights-overridable")


def test_float16_overflow_is_refused(rng):
    model = gemm_bn(rng, dtype=np.float16)
    set_initializer(model, "bn_scale", np.full(6, 60000.0, np.float16))
    set_initializer(model, "B", np.full((4, 6), 100.0, np.float16))
    fold_and_check(model, "dtype-overflow", oracle=False)


def test_training_mode_1_wins_over_read_statistics_outputs(rng):
    """training_mode=1 is the first reason: the BN normalizes with batch statistics whoever reads them."""
    model = _declared_training_outputs(rng, 15, used=True, training_mode=1)
    onnx.checker.check_model(model, full_check=True)
    fold_and_check(model, "training-mode", oracle=False)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_float64_scale_overflow_is_refused(rng):
    """gamma / sqrt(var + eps) overflows float64 itself (the float64 weight cannot hold the fold)."""
    model = conv_bn(rng, dtype=np.float64)
    set_initializer(model, "bn_scale", np.full(6, 1e300))
    set_initializer(model, "bn_var", np.full(6, 1e-300))
    model.graph.node[1].attribute[0].f = 0.0
    fold_and_check(model, "dtype-overflow", oracle=False)


# ------------------------------------------------------------------------------- structure of the match
def test_bn_read_by_its_conv_and_another_node_stays(rng):
    model = bn_then(rng, "Conv")
    model.graph.node.append(helper.make_node("Relu", ["bn_out"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", F32, [2, 4, 5, 5]))
    fold_and_check(model, "no-foldable-neighbour")


def test_matmul_with_rank3_output_is_refused(rng):
    """[B, T, K] @ [K, N]: BN's channel axis 1 is T, not MatMul's output column (T == N)."""
    fold_and_check(matmul_bn(rng, x_shape=[2, 6, 4], n=6), "channel-axis-mismatch")


def _custom_domain_model(rng, layout):
    """A Conv/MatMul of a non-default domain next to the BN: bnfold knows nothing of what it computes."""
    custom = {"domain": "com.example"}
    inits = bn_initializers(bn_stats(rng, 4), F32)
    if layout == "conv-bn":
        inits.append(init(rng, "W", (4, 3, 1, 1)))
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", **custom), bn_node("c", "y")]
        x_shape, inner = [2, 3, 5, 5], ("c", [2, 4, 5, 5])
    elif layout == "bn-conv":
        inits.append(init(rng, "W", (6, 4, 1, 1)))
        nodes = [bn_node("x", "b"), helper.make_node("Conv", ["b", "W"], ["y"], name="conv", **custom)]
        x_shape, inner = [2, 4, 5, 5], ("b", [2, 4, 5, 5])
    else:  # matmul-add-bn
        inits += [init(rng, "W", (3, 4)), init(rng, "bias", (4,))]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul", **custom),
                 helper.make_node("Add", ["m", "bias"], ["a"], name="add"), bn_node("a", "y")]
        x_shape, inner = [5, 3], ("m", [5, 4])
    graph = helper.make_graph(nodes, "custom", [tensor("x", F32, x_shape)], [tensor("y", F32, None)], inits,
                              value_info=[tensor(inner[0], F32, inner[1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


@pytest.mark.parametrize("layout", ["conv-bn", "bn-conv", "matmul-add-bn"])
def test_ops_of_other_domains_are_not_neighbours(rng, layout):
    fold_and_check(_custom_domain_model(rng, layout), "no-foldable-neighbour", oracle=False)
