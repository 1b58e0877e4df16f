"""BN after a linear op with DequantizeLinear weights: folded into the quantization scales (codes kept,
flipped channels negated), the bias mapped or re-quantized; each refusal fails if its check goes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import bn_initializers, bn_node, bn_stats, make_model, op_types, tensor

F32 = np.float32
C, M = 4, 6


def run(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def qdq_conv_bn(rng, *, flip=(), codes=None, per_tensor=False, uint8=False, bias=None, opset=17, axis=0,
                quantized_input=True, shared_dq=False, bn_scale_zero=False):
    """x -> [Q -> DQ] -> Conv(DQ(W codes)) [+ bias] -> BN -> y."""
    w = rng.normal(0, 0.5, (M, C, 3, 3))
    code_type = np.uint8 if uint8 else np.int8
    if per_tensor:
        scale = np.array(np.abs(w).max() / 127, F32)
        q = np.rint(w / scale) + (128 if uint8 else 0)
        zero = np.array(128 if uint8 else 0, code_type)
    else:
        scale = (np.abs(w).reshape(M, -1).max(1) / 127).astype(F32)
        q = np.rint(w / scale[:, None, None, None]) + (128 if uint8 else 0)
        zero = np.full(M, 128 if uint8 else 0, code_type)
    q = (codes if codes is not None else q).astype(code_type)
    stats = bn_stats(rng, M)
    stats["scale"] = np.abs(stats["scale"])  # channels flip only where asked
    for c in flip:
        stats["scale"][c] *= -1
    if bn_scale_zero:
        stats["scale"][2] = 0
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"),
             numpy_helper.from_array(zero, "Wz"), numpy_helper.from_array(np.array(0.02, F32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz"), *bn_initializers(stats, F32)]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], name="dqw",
                              **({"axis": axis} if not per_tensor else {}))]
    data = "x"
    if quantized_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx")]
        data = "xd"
    conv_inputs = [data, "W"]
    if bias == "float":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, M).astype(F32), "b"))
        conv_inputs.append("b")
    elif bias == "int32":
        inits += [numpy_helper.from_array(rng.integers(-3000, 3000, M).astype(np.int32), "bq"),
                  numpy_helper.from_array((0.02 * scale * np.ones(M)).astype(F32), "bs")]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], name="dqb", axis=0))
        conv_inputs.append("b")
    nodes += [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "y")]
    outputs = [tensor("y", F32, None)]
    if shared_dq:
        nodes.append(helper.make_node("Conv", [data, "W"], ["other"], name="other", pads=[1, 1, 1, 1]))
        outputs.append(tensor("other", F32, None))
    return make_model(nodes, [tensor("x", F32, [1, C, 5, 5])], outputs, inits, opset)


def assert_folds_exactly(model, rng, atol):
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded", report.decisions[0]
    assert "BatchNormalization" not in op_types(folded)
    assert op_types(folded).count("QuantizeLinear") == op_types(model).count("QuantizeLinear")
    onnx.checker.check_model(folded, full_check=True)
    x = rng.normal(size=(1, C, 5, 5)).astype(F32)
    np.testing.assert_allclose(run(folded, x), run(model, x), atol=atol, rtol=1e-4)
    return folded, report


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def dq_inputs(model, consumer):
    conv = next(n for n in model.graph.node if n.name == consumer)
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    return [initializer(model, name) for name in dq.input]


def test_per_channel_int8_weights_fold_into_the_scales_codes_unchanged(rng):
    model = qdq_conv_bn(rng)
    folded, _ = assert_folds_exactly(model, rng, atol=1e-3)  # the created int32 bias: half a step
    codes, scale, _ = dq_inputs(folded, "conv")
    np.testing.assert_array_equal(codes, initializer(model, "Wq"))
    assert (scale > 0).all()
    bias_dq = next(n for n in folded.graph.node if n.op_type == "DequantizeLinear" and n.output[0] ==
                   next(c for c in folded.graph.node if c.name == "conv").input[2])
    assert initializer(folded, bias_dq.input[0]).dtype == np.int32
    np.testing.assert_allclose(initializer(folded, bias_dq.input[1]), 0.02 * scale, rtol=1e-6)


def test_a_negative_bn_scale_negates_that_channels_codes(rng):
    model = qdq_conv_bn(rng, flip=(1, 4))
    folded, _ = assert_folds_exactly(model, rng, atol=1e-3)
    codes, scale, _ = dq_inputs(folded, "conv")
    original = initializer(model, "Wq")
    negative = initializer(model, "bn_scale") < 0
    assert list(np.flatnonzero(negative)) == [1, 4]
    np.testing.assert_array_equal(codes[negative], -original[negative])
    np.testing.assert_array_equal(codes[~negative], original[~negative])
    assert (scale > 0).all()
    assert "(2 row(s) changed)" in fold_model(model)[1].decisions[0].detail


def test_a_code_without_negation_is_refused_never_clamped(rng):
    model = qdq_conv_bn(rng, flip=(1,))
    codes = initializer(model, "Wq").copy()
    codes[1, 0, 0, 0] = -128
    model = qdq_conv_bn(np.random.default_rng(1234), flip=(1,), codes=codes)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "negated-code-out-of-range"
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()


def test_uint8_per_tensor_with_zero_point_becomes_per_axis(rng):
    model = qdq_conv_bn(rng, per_tensor=True, uint8=True)
    folded, _ = assert_folds_exactly(model, rng, atol=1e-3)
    codes, scale, zero = dq_inputs(folded, "conv")
    assert scale.shape == (M,) and zero.shape == (M,) and (zero == 128).all()


def test_per_tensor_needs_opset_13_to_become_per_axis(rng):
    model = qdq_conv_bn(rng, per_tensor=True, opset=12, quantized_input=False, bias="float")
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "quantization-opset-too-old"
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()


def test_float_bias_maps_as_a_float_bias(rng):
    model = qdq_conv_bn(rng, bias="float", quantized_input=False)
    folded, _ = assert_folds_exactly(model, rng, atol=1e-4)
    assert op_types(folded).count("DequantizeLinear") == 1


def test_int32_bias_is_requantized_at_the_new_scale_within_half_a_step(rng):
    model = qdq_conv_bn(rng, bias="int32")
    folded, report = assert_folds_exactly(model, rng, atol=1e-3)
    conv = next(n for n in folded.graph.node if n.name == "conv")
    dqb = next(n for n in folded.graph.node if n.output[0] == conv.input[2])
    codes, scale = initializer(folded, dqb.input[0]), initializer(folded, dqb.input[1]).astype(np.float64)
    stats = {k: initializer(model, f"bn_{k}").astype(np.float64) for k in ("scale", "B", "mean", "var")}
    s = stats["scale"] / np.sqrt(stats["var"] + float(F32(1e-5)))
    old = initializer(model, "bq") * initializer(model, "bs").astype(np.float64)
    target = s * old + stats["B"] - stats["mean"] * s
    assert (np.abs(codes * scale - target) <= 0.5 * scale * (1 + 1e-9)).all()
    assert op_types(folded).count("DequantizeLinear") == op_types(model).count("DequantizeLinear")
    assert "int32 bias re-quantized at the new scale" in report.decisions[0].detail
    assert "at most half a bias step" in report.decisions[0].detail


def test_a_shared_weight_quantizer_is_copied_not_changed(rng):
    model = qdq_conv_bn(rng, shared_dq=True)
    folded, _ = assert_folds_exactly(model, rng, atol=1e-3)
    x = rng.normal(size=(1, C, 5, 5)).astype(F32)
    other = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["other"], {"x": x})[0]
    np.testing.assert_array_equal(other(folded), other(model))
    np.testing.assert_array_equal(initializer(folded, "Ws"), initializer(model, "Ws"))


def test_weights_quantized_along_another_axis_are_refused(rng):
    model = qdq_conv_bn(rng, quantized_input=False, bias="float")
    dq = model.graph.node[0]
    dq.attribute[0].i = 1  # per-axis along input channels: shapes do not even fit, but the rule must say so
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "channel-axis-mismatch"


def test_a_zero_bn_scale_is_refused(rng):
    model = qdq_conv_bn(rng, bn_scale_zero=True, bias="float", quantized_input=False)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "quantized-scale-invalid"
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()


def test_a_bn_after_an_activation_quantizer_is_refused(rng):
    """Conv -> Q -> DQ -> BN: folding would move the quantization grid."""
    w = numpy_helper.from_array(rng.normal(size=(M, C, 1, 1)).astype(F32), "W")
    inits = [w, numpy_helper.from_array(np.array(0.05, F32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             *bn_initializers(bn_stats(rng, M), F32)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="q"),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="dq"), bn_node("cd", "y")]
    model = make_model(nodes, [tensor("x", F32, [1, C, 5, 5])], [tensor("y", F32, None)], inits)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "activation-quantized"
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_quantized_b(rng, trans_b):
    w = rng.normal(0, 0.5, (C, M))
    b = w.T if trans_b else w
    axis = 0 if trans_b else 1
    scale = (np.abs(b).max(axis=1 - axis) / 127).astype(F32)
    q = np.rint(b / (scale[:, None] if axis == 0 else scale[None, :])).astype(np.int8)
    inits = [numpy_helper.from_array(q, "Bq"), numpy_helper.from_array(scale, "Bs"),
             *bn_initializers(bn_stats(rng, M), F32)]
    nodes = [helper.make_node("DequantizeLinear", ["Bq", "Bs"], ["B"], name="dq", axis=axis),
             helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm", transB=trans_b), bn_node("g", "y")]
    model = make_model(nodes, [tensor("x", F32, [3, C])], [tensor("y", F32, None)], inits)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded" and "BatchNormalization" not in op_types(folded)
    x = rng.normal(size=(3, C)).astype(F32)
    np.testing.assert_allclose(run(folded, x), run(model, x), atol=1e-5, rtol=1e-4)


def test_matmul_with_quantized_weight(rng):
    w = rng.normal(0, 0.5, (C, M))
    scale = (np.abs(w).max(axis=0) / 127).astype(F32)
    inits = [numpy_helper.from_array(np.rint(w / scale).astype(np.int8), "Wq"), numpy_helper.from_array(scale, "Ws"),
             *bn_initializers(bn_stats(rng, M), F32)]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"), bn_node("m", "y")]
    model = make_model(nodes, [tensor("x", F32, [3, C])], [tensor("y", F32, None)], inits)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded"
    assert op_types(folded) == ["DequantizeLinear", "MatMul", "Add"]
    x = rng.normal(size=(3, C)).astype(F32)
    np.testing.assert_allclose(run(folded, x), run(model, x), atol=1e-5, rtol=1e-4)
