"""Each condition of bnfold.rules.quantized, pinned by reason code, detail text and result: a test
fails when a condition, a message or a returned operand changes."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from bnfold.graph import GraphIndex, ModelContext
from bnfold.rules.base import Refusal
from bnfold.rules.quantized import Dequantized, _checked_scale, _input_scale, dequantized, fold_weight_scale, int32_bias
from tests.builders import tensor
from tests.rules.test_quantized import C, M, assert_folds_exactly, initializer, qdq_conv_bn

F32 = np.float32


def index_of(inits, nodes=()):
    """A GraphIndex over loose initializers and nodes; "x" (and "xq") are graph inputs, not constants."""
    graph = helper.make_graph(list(nodes), "g", [tensor("x", F32, [1, C]), tensor("xq", F32, [1, C])], [],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return GraphIndex(model.graph, ModelContext(model))


def dq_node(inputs, **attrs):
    return helper.make_node("DequantizeLinear", inputs, ["W"], name="dqw", **attrs)


def refusal(call):
    with pytest.raises(Refusal) as info:
        call()
    return info.value.reason, info.value.detail


def weight(codes, scale, zero=None, axis=0):
    return Dequantized(dq_node(["q", "s"]), np.asarray(codes), np.asarray(scale), None if zero is None else
                       np.asarray(zero), axis)


CODES = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)


# --- dequantized ---------------------------------------------------------------------------------

def test_block_quantization_is_refused():
    index = index_of({"q": CODES, "s": np.ones((3, 2), F32)})
    assert refusal(lambda: dequantized(index, dq_node(["q", "s"], axis=0, block_size=2), "W")) == (
        "quantized-weights", "W is block-quantized (block_size): not folded")


@pytest.mark.parametrize("position, what", [(0, "W codes"), (1, "W scale"), (2, "W zero point")])
def test_a_non_constant_operand_is_named_in_the_refusal(position, what):
    inputs = ["q", "s", "z"]
    inputs[position] = "xq"
    index = index_of({"q": CODES, "s": np.ones(3, F32), "z": np.zeros(3, np.int8)})
    reason, detail = refusal(lambda: dequantized(index, dq_node(inputs, axis=0), "W"))
    assert detail.startswith(f"{what}: "), detail


def test_float_codes_are_refused():
    index = index_of({"q": CODES.astype(F32), "s": np.ones(3, F32)})
    assert refusal(lambda: dequantized(index, dq_node(["q", "s"], axis=0), "W")) == (
        "dtype-unsupported", "W codes are float32: not folded")


def test_a_two_dimensional_scale_without_zero_point_is_refused():
    index = index_of({"q": CODES, "s": np.ones((3, 1), F32)})
    assert refusal(lambda: dequantized(index, dq_node(["q", "s"], axis=0), "W")) == (
        "quantized-weights", "W scale of shape [3, 1] is not per-tensor or per-axis")


def test_axis_defaults_to_1_and_a_negative_axis_counts_from_the_end():
    index = index_of({"q": CODES, "s": np.ones(4, F32), "t": np.ones(3, F32)})
    assert dequantized(index, dq_node(["q", "s"]), "W").axis == 1
    assert dequantized(index, dq_node(["q", "t"], axis=-2), "W").axis == 0


# --- fold_weight_scale ---------------------------------------------------------------------------

def test_equal_positive_factors_keep_a_per_tensor_scale():
    source = weight(CODES, np.array(0.5, F32), np.array(1, np.int8))
    new = fold_weight_scale(source, 0, np.array([2.0, 2.0, 2.0]), 17, "W")
    assert (new.position, new.source, new.codes, new.zero_point) == (1, source, None, source.zero_point)
    assert new.scale.dtype == np.float32 and new.scale.shape == () and new.scale == 1.0


def test_a_single_channel_per_tensor_fold():
    """One output channel: factors[0] is the only factor."""
    source = weight(CODES[:1], np.array([0.5], F32))
    new = fold_weight_scale(source, 0, np.array([3.0]), 12, "W")
    assert new.codes is None and new.scale.shape == (1,) and new.scale[0] == 1.5


def test_a_scale_of_shape_1_is_per_tensor():
    new = fold_weight_scale(weight(CODES, np.array([0.5], F32)), 0, np.array([2.0, 2.0, 2.0]), 17, "W")
    assert new.codes is None and new.scale.shape == (1,) and new.scale[0] == 1.0


def test_a_scale_of_one_element_in_two_dimensions_is_not_per_tensor():
    source = weight(CODES, np.ones((1, 1), F32))
    assert refusal(lambda: fold_weight_scale(source, 0, np.ones(3), 17, "W")) == (
        "channel-axis-mismatch", "W is quantized along axis 0, its output channels are axis 0")


def test_another_quantization_axis_is_refused():
    source = weight(CODES, np.ones(4, F32), axis=1)
    assert refusal(lambda: fold_weight_scale(source, 0, np.ones(3), 17, "W")) == (
        "channel-axis-mismatch", "W is quantized along axis 1, its output channels are axis 0")


def test_per_tensor_to_per_axis_needs_opset_13():
    source = weight(CODES, np.array(0.5, F32))
    factors = np.array([1.0, 2.0, 4.0])
    assert refusal(lambda: fold_weight_scale(source, 0, factors, 12, "W")) == (
        "quantization-opset-too-old", "W has a per-tensor scale; per-channel scales need DequantizeLinear opset 13 "
                                      "(the model imports 12)")
    new = fold_weight_scale(source, 0, factors, 13, "W")
    np.testing.assert_array_equal(new.scale, np.array([0.5, 1.0, 2.0], F32))


@pytest.mark.parametrize("per_tensor", [True, False])
def test_a_zero_factor_is_refused_by_name(per_tensor):
    source = weight(CODES, np.array(0.5, F32) if per_tensor else np.full(3, 0.5, F32))
    assert refusal(lambda: fold_weight_scale(source, 0, np.array([0.0, 0.0, 0.0]), 17, "W")) == (
        "quantized-scale-invalid", "W: a folded scale is 0 or not finite in float32")


def test_a_zero_factor_is_not_a_flip():
    """-128 in a channel scaled by 0: the scale is invalid; negating its codes is never tried."""
    codes = CODES.copy()
    codes[1, 0] = -128
    source = weight(codes, np.full(3, 0.5, F32))
    assert refusal(lambda: fold_weight_scale(source, 0, np.array([1.0, 0.0, 1.0]), 17, "W"))[0] == \
        "quantized-scale-invalid"


def test_positive_factors_keep_the_codes():
    new = fold_weight_scale(weight(CODES, np.full(3, 0.5, F32)), 0, np.array([1.0, 2.0, 3.0]), 17, "W")
    assert new.codes is None


def test_a_flip_negates_codes_and_zero_point_of_that_channel():
    zero = np.array([1, 2, 3], np.int8)
    new = fold_weight_scale(weight(CODES, np.full(3, 0.5, F32), zero), 0, np.array([1.0, -2.0, 1.0]), 17, "W")
    np.testing.assert_array_equal(new.codes, np.stack([CODES[0], -CODES[1], CODES[2]]))
    assert new.zero_point.dtype == np.int8
    np.testing.assert_array_equal(new.zero_point, [1, -2, 3])
    np.testing.assert_array_equal(new.scale, np.array([0.5, 1.0, 0.5], F32))


def test_a_code_without_negation_is_refused_by_name():
    codes = CODES.copy()
    codes[1, 0] = -128
    source = weight(codes, np.full(3, 0.5, F32))
    assert refusal(lambda: fold_weight_scale(source, 0, np.array([1.0, -1.0, 1.0]), 17, "W")) == (
        "negated-code-out-of-range", "W: 1 code(s) of a channel the BN flips have no negation in int8")


def test_a_zero_point_without_negation_is_refused_by_name():
    source = weight(CODES, np.full(3, 0.5, F32), np.array([0, -128, 0], np.int8))
    assert refusal(lambda: fold_weight_scale(source, 0, np.array([1.0, -1.0, 1.0]), 17, "W")) == (
        "negated-code-out-of-range", "W zero point: 1 code(s) of a channel the BN flips have no negation in int8")


def test_uint8_code_zero_negates_to_itself():
    codes = np.zeros((3, 4), np.uint8)
    codes[0] = 7
    new = fold_weight_scale(weight(codes, np.full(3, 0.5, F32)), 0, np.array([1.0, -1.0, 1.0]), 17, "W")
    np.testing.assert_array_equal(new.codes, codes)


# --- _checked_scale --------------------------------------------------------------------------------

def test_a_scale_overflowing_its_dtype_is_refused_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert refusal(lambda: _checked_scale(np.array([1e300]), np.float32, "W")) == (
            "quantized-scale-invalid", "W: a folded scale is 0 or not finite in float32")


# --- int32_bias ------------------------------------------------------------------------------------

def conv_index(input_scale=None):
    """A Conv reading x, through a DequantizeLinear of scale `input_scale` when given."""
    inits = {"w": np.ones((3, 4), F32)}
    nodes = []
    data = "x"
    if input_scale is not None:
        inits["xs"] = np.asarray(input_scale, F32)
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"], name="dqx"))
        data = "xd"
    nodes.append(helper.make_node("Conv", [data, "w"], ["c"], name="conv"))
    index = index_of(inits, nodes)
    return index, nodes[-1]


def bias(codes, scale, zero=None):
    return Dequantized(dq_node(["bq", "bs"]), np.asarray(codes), np.asarray(scale), None if zero is None else
                       np.asarray(zero), 0)


@pytest.mark.parametrize("codes, zero", [(np.ones(3, np.int8), None), (np.ones(3, np.int32), np.array([0, 1, 0], np.int32))])
def test_a_bias_not_int32_with_zero_point_0_is_refused(codes, zero):
    index, conv = conv_index(0.5)
    old = bias(codes, np.ones(3, F32), zero)
    assert refusal(lambda: int32_bias(index, conv, old, np.ones(3, F32), np.ones(3), np.zeros(3), "B")) == (
        "quantized-weights", "B is not int32 codes with zero point 0")


def test_without_an_input_scale_the_bias_keeps_its_scale_times_the_factor():
    index, conv = conv_index()
    old = bias(np.array([10, 20, 30], np.int32), np.array([0.5, 0.25, 2.0]), np.zeros(3, np.int32))
    new = int32_bias(index, conv, old, np.ones(3, F32), np.array([2.0, -1.0, 0.5]), np.zeros(3), "B")
    assert new.position == 2 and new.source is old
    assert new.scale.dtype == np.float64
    np.testing.assert_array_equal(new.scale, [1.0, 0.25, 1.0])
    np.testing.assert_array_equal(new.codes, [10, -20, 30])
    assert new.zero_point.dtype == np.int32
    np.testing.assert_array_equal(new.zero_point, np.zeros(3))


def test_without_an_input_scale_or_a_bias_there_is_no_int32_bias():
    index, conv = conv_index()
    assert int32_bias(index, conv, None, np.ones(3, F32), np.ones(3), np.ones(3), "B") is None


def test_a_zero_bias_scale_is_refused_by_name():
    index, conv = conv_index()
    old = bias(np.ones(3, np.int32), np.ones(3, F32))
    assert refusal(lambda: int32_bias(index, conv, old, np.ones(3, F32), np.zeros(3), np.zeros(3), "B")) == (
        "quantized-scale-invalid", "B scales: a folded scale is 0 or not finite in float32")


def test_int32_bias_codes_at_the_input_scale_times_the_weight_scale():
    index, conv = conv_index(0.5)
    old = bias(np.array([4, 8, 12], np.int32), np.array(0.25, F32))
    new = int32_bias(index, conv, old, np.array([1.0, 2.0, 4.0], F32), np.array([1.0, 1.0, -1.0]),
                     np.array([1.0, 0.0, 0.0]), "B")
    np.testing.assert_array_equal(new.scale, np.array([0.5, 1.0, 2.0], F32))
    np.testing.assert_array_equal(new.codes, [4, 2, -2])  # (1 + 1) / 0.5, 2 / 1, -3 / 2 -> -2 (nearest even)
    assert new.zero_point is None and new.source is old


@pytest.mark.parametrize("shift, fits", [(2.0 ** 31 - 1, True), (-2.0 ** 31, True), (2.0 ** 31, False),
                                         (-2.0 ** 31 - 1, False)])
def test_a_requantized_bias_must_fit_int32(shift, fits):
    index, conv = conv_index(1.0)
    call = lambda: int32_bias(index, conv, None, np.array([1.0], np.float64), np.ones(1), np.array([shift]), "B")
    if fits:
        assert call().codes[0] == shift
    else:
        assert refusal(call) == ("dtype-overflow", "B: a re-quantized bias leaves int32")


def test_a_per_axis_input_scale_is_not_an_input_scale():
    index, conv = conv_index(np.array([0.5, 0.25], F32))
    assert _input_scale(index, conv) is None
    index, conv = conv_index(np.array([0.5], F32))
    assert _input_scale(index, conv) == 0.5


# --- write_dequantized, through fold_model ---------------------------------------------------------

def test_a_created_int32_bias_gets_a_named_dequantize_node(rng):
    folded, _ = assert_folds_exactly(qdq_conv_bn(rng), rng, atol=1e-3)
    conv = next(n for n in folded.graph.node if n.name == "conv")
    dqb = next(n for n in folded.graph.node if n.output[0] == conv.input[2])
    assert (dqb.name, dqb.output[0]) == ("W_bias_DequantizeLinear", "W_bias")
    assert list(dqb.input) == ["W_bias_quantized", "W_bias_scale"]


def test_a_sole_reader_changes_the_weight_quantizer_in_place(rng):
    model = qdq_conv_bn(rng, flip=(1,))
    folded, _ = assert_folds_exactly(model, rng, atol=1e-3)
    conv = next(n for n in folded.graph.node if n.name == "conv")
    dqw = next(n for n in folded.graph.node if n.output[0] == conv.input[1])
    assert (dqw.name, dqw.output[0], list(dqw.input)) == ("dqw", "W", ["Wq", "Ws", "Wz"])
    assert [n.name for n in folded.graph.node].count("dqw") == 1
    assert not (initializer(folded, "Wq") == initializer(model, "Wq")).all()


def test_a_shared_weight_quantizer_copy_is_named_after_it(rng):
    model = qdq_conv_bn(rng, shared_dq=True, flip=(1,))
    folded, _ = assert_folds_exactly(model, rng, atol=1e-3)
    conv = next(n for n in folded.graph.node if n.name == "conv")
    copy = next(n for n in folded.graph.node if n.output[0] == conv.input[1])
    assert copy.name == "dqw_bnfold" and copy.output[0] == "W_bnfold"
    assert list(copy.input) == ["Wq_bnfold", "Ws_bnfold", "Wz_bnfold"]
    np.testing.assert_array_equal(initializer(folded, "Wq"), initializer(model, "Wq"))


def test_a_weight_quantizer_whose_output_is_a_graph_output_is_copied(rng):
    model = qdq_conv_bn(rng, flip=(1,))
    model.graph.output.append(tensor("W", F32, [M, C, 3, 3]))
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded"
    dqw = next(n for n in folded.graph.node if n.name == "dqw")
    assert list(dqw.input) == ["Wq", "Ws", "Wz"]
    for name in dqw.input:
        np.testing.assert_array_equal(initializer(folded, name), initializer(model, name))
