"""Every reason code that leaves a BN in place, each on the smallest graph that needs it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.fold import fold_model
from bnfold.rules.base import Refusal, weight_dtype
from tests.builders import (assert_same_function, bn_initializers, bn_node, bn_stats, conv_bn, make_model,
                            op_types, run_reference, tensor)


def refused(model, reason):
    folded, report = fold_model(model)
    decision = report.decisions[0]
    assert decision.reason == reason, decision
    assert decision.detail
    assert op_types(folded).count("BatchNormalization") == op_types(model).count("BatchNormalization")
    return decision


def conv_relu_bn(rng):
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")]
    inits += bn_initializers(bn_stats(rng, 4), np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), bn_node("r", "y")]
    return make_model(nodes, [tensor("x", np.float32, [1, 3, 6, 6])], [tensor("y", np.float32, None)], inits)


def test_never_folds_across_a_nonlinear_op(rng):
    decision = refused(conv_relu_bn(rng), "no-foldable-neighbour")
    assert "Relu" in decision.detail


def test_neighbour_with_other_consumers(rng):
    model = conv_bn(rng)
    model.graph.node.append(helper.make_node("Relu", ["conv_out"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", np.float32, [2, 6, 5, 5]))
    refused(model, "neighbour-has-other-consumers")


def test_neighbour_output_is_graph_output(rng):
    model = conv_bn(rng)
    model.graph.output.append(tensor("conv_out", np.float32, [2, 6, 5, 5]))
    refused(model, "neighbour-output-is-graph-output")


def test_weights_from_graph_input(rng):
    model = conv_bn(rng)
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(weight.dims)))
    del model.graph.initializer[0]
    refused(model, "weights-not-constant")


def test_bn_statistics_from_graph_input(rng):
    model = conv_bn(rng)
    mean = next(t for t in model.graph.initializer if t.name == "bn_mean")
    model.graph.input.append(helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, list(mean.dims)))
    model.graph.initializer.remove(mean)
    refused(model, "weights-not-constant")


def test_initializer_listed_as_input_is_overridable_in_ir4(rng):
    model = conv_bn(rng)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 4, 3, 3]))
    refused(model, "weights-overridable")


def test_initializer_listed_as_input_folds_in_ir3(rng):
    model = conv_bn(rng, opset=8)
    model.ir_version = 3
    for tensor_ in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor_.name, tensor_.data_type, tensor_.dims))
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert report.folded == 1
    onnx.checker.check_model(folded, full_check=True)
    assert {t.name for t in folded.graph.initializer} <= {v.name for v in folded.graph.input}
    assert_same_function(model, folded)


def test_quantized_weights(rng):
    """BN before a Conv whose weight is DequantizeLinear: scaling input channels has no per-channel
    quantization scale to go into (a BN after it folds: tests/rules/test_quantized.py)."""
    q = rng.integers(-127, 128, (6, 4, 1, 1)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(np.array(0.01, np.float32), "Ws"),
             numpy_helper.from_array(np.array(0, np.int8), "Wz"), *bn_initializers(bn_stats(rng, 4), np.float32)]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], name="dq"), bn_node("x", "h"),
             helper.make_node("Conv", ["h", "W"], ["y"], name="conv")]
    model = make_model(nodes, [tensor("x", np.float32, [1, 4, 5, 5])], [tensor("y", np.float32, None)], inits)
    refused(model, "quantized-weights")


def test_training_mode_opset14(rng):
    model = conv_bn(rng, opset=15)
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    refused(model, "training-mode")


def test_is_test_zero_is_training_at_opset6(rng):
    model = conv_bn(rng, opset=6)
    refused(model, "training-mode")


@pytest.mark.parametrize("opset", [6, 7, 9, 14, 15])
def test_every_bn_opset_is_read(rng, opset):
    model = conv_bn(rng, opset=opset)
    if opset < 7:
        model.graph.node[1].attribute.append(helper.make_attribute("is_test", 1))
    model.graph.node[1].attribute[0].f = 1e-2  # epsilon must be honoured
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def test_opset15_mixed_parameter_dtypes(rng):
    model = conv_bn(rng, opset=15)
    for t in model.graph.initializer:
        if t.name in ("bn_mean", "bn_var"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert report.folded == 1
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 4, 7, 7)).astype(np.float32)}
    np.testing.assert_allclose(run_reference(folded, feeds)["y"], run_reference(model, feeds)["y"], atol=1e-5, rtol=1e-4)


def _bn_training_outputs(rng, opset, used):
    model = conv_bn(rng, opset=opset)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var"])
    if used:
        model.graph.output.append(tensor("running_mean", np.float32, [6]))
    return model


def test_extra_outputs_used(rng):
    refused(_bn_training_outputs(rng, 9, used=True), "bn-extra-outputs-used")


def test_declared_training_outputs_mean_training_before_opset14(rng):
    refused(_bn_training_outputs(rng, 9, used=False), "training-mode")


def _spatial0(rng, varying):
    c, h = 3, 4
    inits = [numpy_helper.from_array(rng.normal(size=(c, c, 1, 1)).astype(np.float32), "W")]
    for name, value in bn_stats(rng, c).items():
        per_channel = np.repeat(value[:, None, None], h, axis=1).repeat(h, axis=2)
        if varying:
            per_channel = per_channel * rng.uniform(0.9, 1.1, per_channel.shape)
        inits.append(numpy_helper.from_array(per_channel.astype(np.float32), f"bn_{name}"))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", spatial=0)]
    return make_model(nodes, [tensor("x", np.float32, [2, c, h, h])], [tensor("y", np.float32, [2, c, h, h])],
                      inits, opset=7)


def test_non_spatial_bn_varying_within_channel(rng):
    refused(_spatial0(rng, varying=True), "non-spatial-bn")


def test_non_spatial_bn_constant_per_channel_folds(rng):
    model = _spatial0(rng, varying=False)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def test_gemm_trans_a_before_is_channel_mismatch(rng):
    inits = bn_initializers(bn_stats(rng, 5), np.float32)
    inits.append(numpy_helper.from_array(rng.normal(size=(5, 3)).astype(np.float32), "B"))
    nodes = [bn_node("x", "a"), helper.make_node("Gemm", ["a", "B"], ["y"], name="gemm", transA=1)]
    model = make_model(nodes, [tensor("x", np.float32, [5, 5])], [tensor("y", np.float32, [5, 3])], inits)
    refused(model, "channel-axis-mismatch")


@pytest.mark.parametrize("var", [-1.0, np.nan])
def test_invalid_statistics(rng, var):
    model = conv_bn(rng)
    for t in model.graph.initializer:
        if t.name == "bn_var":
            values = numpy_helper.to_array(t).copy()
            values[2] = var
            t.CopyFrom(numpy_helper.from_array(values, t.name))
    refused(model, "invalid-statistics")


def test_float16_overflow_is_refused_not_written_as_inf(rng):
    model = conv_bn(rng, dtype=np.float16)
    for t in model.graph.initializer:
        if t.name == "bn_var":
            values = numpy_helper.to_array(t).copy()
            values[0] = 0.0
            t.CopyFrom(numpy_helper.from_array(values, t.name))
    model.graph.node[1].attribute[0].f = 1e-12
    decision = refused(model, "dtype-overflow")
    assert "float16" in decision.detail


def test_integer_weights_are_dtype_unsupported():
    with pytest.raises(Refusal) as info:
        weight_dtype(np.ones((2, 2), np.int32), "weight")
    assert info.value.reason == "dtype-unsupported"


def test_excluded_by_user(rng):
    model = conv_bn(rng)
    folded, report = fold_model(model, exclude_nodes=["bn"])
    assert report.decisions[0].reason == "excluded-by-user"
    assert op_types(folded) == op_types(model)


def test_opset1_bn_with_consumed_inputs_folds(rng):
    """Opset 1 BN: `consumed_inputs` is required and `is_test` defaults to training."""
    inits = [numpy_helper.from_array(rng.normal(size=(6, 4, 3, 3)).astype(np.float32), "W")]
    inits += bn_initializers(bn_stats(rng, 6), np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             bn_node("c", "y", epsilon=1e-3, is_test=1, consumed_inputs=[0, 0, 0, 1, 1])]
    inputs = [tensor("x", np.float32, [2, 4, 7, 7])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]  # IR 3 lists them
    model = make_model(nodes, inputs, [tensor("y", np.float32, [2, 6, 5, 5])], inits, opset=1, ir_version=3)
    folded, report = fold_model(model)
    assert report.folded == 1
    # No runtime implements BN-1: the oracle is the BN formula in numpy over the reference's Conv.
    conv_only = make_model(nodes[:1], inputs, [tensor("c", np.float32, [2, 6, 5, 5])], inits, opset=1, ir_version=3)
    feeds = {"x": rng.normal(size=(2, 4, 7, 7)).astype(np.float32)}
    conv = run_reference(conv_only, feeds)["c"].astype(np.float64)
    p = {t.name[3:]: numpy_helper.to_array(t).astype(np.float64)[None, :, None, None] for t in inits[1:]}
    expected = p["scale"] * (conv - p["mean"]) / np.sqrt(p["var"] + 1e-3) + p["B"]
    np.testing.assert_allclose(run_reference(folded, feeds)["y"], expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_gemm_folds_and_rounds_once(rng):
    import ml_dtypes
    bf16 = ml_dtypes.bfloat16
    stats = bn_stats(rng, 6)
    b_matrix = rng.normal(size=(4, 6)).astype(bf16)
    inits = [numpy_helper.from_array(b_matrix, "B"), numpy_helper.from_array(np.zeros(6, bf16), "C")]
    inits += bn_initializers(stats, bf16)
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm"), bn_node("g", "y")]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [3, 4])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [3, 6])]
    model = make_model(nodes, inputs, outputs, inits, opset=15)
    folded, report = fold_model(model)
    assert report.folded == 1
    new_b = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}[folded.graph.node[0].input[1]]
    gamma, beta, mean, var = (stats[k].astype(bf16).astype(np.float64) for k in ("scale", "B", "mean", "var"))
    exact = b_matrix.astype(np.float64) * (gamma / np.sqrt(var + 1e-5))[None, :]
    assert new_b.dtype == bf16
    np.testing.assert_array_equal(new_b.astype(np.float64), exact.astype(bf16).astype(np.float64))


def test_float16_weights_are_the_float64_result_rounded_once(rng):
    model = conv_bn(rng, dtype=np.float16)
    folded, _ = fold_model(model)
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    gamma, var = old["bn_scale"].astype(np.float64), old["bn_var"].astype(np.float64)
    exact = old["W"].astype(np.float64) * (gamma / np.sqrt(var + 1e-5))[:, None, None, None]
    np.testing.assert_array_equal(new[folded.graph.node[0].input[1]], exact.astype(np.float16))
