"""The committed QAT-style sample resnet_qat.onnx (sample_models/make_qat.py): its Q/DQ layout is the one
onnxruntime fuses into int8 QLinearConv, and only its BatchNorms keep onnxruntime from doing so.

No torch: the tests read the committed file. The proof of the layout is a fold by hand (BN into the
dequantized float weights, then quantized again as make_qat quantizes): onnxruntime at ORT_ENABLE_ALL
turns every Conv of that model into QLinearConv, and none of the committed one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.runtime import create_session, session_options

MODEL = Path(__file__).resolve().parent.parent / "sample_models" / "resnet_qat.onnx"

# resnet_small (ResNet-18 layout): 20 Conv + BN. Q/DQ pairs on the inputs of the 20 Convs, both inputs
# of the 8 residual Adds, the MaxPool and the Gemm: 38; DequantizeLinear on top: 20 Conv weights, the
# Gemm's weight and int32 bias.
COUNTS = {"Conv": 20, "BatchNormalization": 20, "QuantizeLinear": 38, "DequantizeLinear": 38 + 22}
FLOAT_CONV = ("Conv", "FusedConv")  # onnxruntime may fuse a float Conv with its activation
INT8_MAX = 127


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(MODEL))


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _readers(model: onnx.ModelProto) -> Counter:
    return Counter(name for node in model.graph.node for name in node.input)


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op types (any domain) of the graph onnxruntime runs at ORT_ENABLE_ALL, one thread, on CPU."""
    import onnxruntime as ort

    options = session_options("all", threads=1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_model_is_valid_with_the_expected_op_counts(model):
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert {op: ops[op] for op in COUNTS} == COUNTS
    assert model.opset_import[0].version >= 13  # per-axis DequantizeLinear


def test_every_conv_reads_dequantized_input_and_per_channel_int8_weights_and_feeds_its_bn(model):
    producers, constants = _producers(model), _constants(model)
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        x, w = (producers[name] for name in conv.input[:2])
        assert len(conv.input) == 2 and x.op_type == w.op_type == "DequantizeLinear"
        assert producers[x.input[0]].op_type == "QuantizeLinear"
        codes, scale, zero = (constants[name] for name in w.input)
        assert codes.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
        assert scale.shape == zero.shape == (codes.shape[0],) and (scale > 0).all()
        assert helper.get_attribute_value(w.attribute[0]) == 0  # axis 0: output channels
        assert (np.abs(codes.reshape(len(codes), -1)).max(axis=1) == INT8_MAX).all()  # max-abs / 127
        (reader,) = [n for n in model.graph.node if conv.output[0] in n.input]
        assert reader.op_type == "BatchNormalization"


def test_activation_quantizers_are_uint8_per_tensor_pairs_with_constants_of_their_own(model):
    constants, readers = _constants(model), _readers(model)
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for q in quantizers:
        (dq,) = [n for n in model.graph.node if q.output[0] in n.input]
        assert dq.op_type == "DequantizeLinear"
        q_scale, q_zero = (constants[name] for name in q.input[1:])
        dq_scale, dq_zero = (constants[name] for name in dq.input[1:])
        assert q_zero.dtype == np.uint8 and q_scale.shape == q_zero.shape == ()
        assert q_scale == dq_scale and q_zero == dq_zero
    assert max(readers[name] for name in _constants(model)) == 1  # no constant is shared


def test_onnxruntime_fuses_no_conv_while_the_bns_are_there(model, tmp_path):
    ops = _optimized_ops(model, tmp_path)
    assert ops["QLinearConv"] == 0
    assert sum(ops[op] for op in FLOAT_CONV) == 20 and ops["BatchNormalization"] == 20


def test_the_same_model_folded_by_hand_runs_every_conv_as_qlinearconv(model, tmp_path):
    folded = _fold_by_hand(model)
    onnx.checker.check_model(folded, full_check=True)
    ops = _optimized_ops(folded, tmp_path)
    assert ops["QLinearConv"] == 20
    assert sum(ops[op] for op in FLOAT_CONV) == 0 and ops["BatchNormalization"] == 0
    inputs = {"input": np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)}
    original, rewritten = (create_session(m).run(inputs)["output"] for m in (model, folded))
    assert np.abs(rewritten - original).max() <= 0.05 * np.abs(original).max()  # the same network


# ------------------------------------------------------------------------------------ fold by hand
def _fold_by_hand(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each BN folded into its Conv's dequantized float weights, which are then quantized again per
    channel (max-abs / 127, int8), with the BN shift as an int32 bias at input scale x weight scale."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    producers, constants = _producers(folded), _constants(folded)
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        (bn,) = [n for n in graph.node if conv.output[0] in n.input]
        gamma, beta, mean, var = (constants[name].astype(np.float64) for name in bn.input[1:])
        epsilon = next(a.f for a in bn.attribute if a.name == "epsilon")
        factor = gamma / np.sqrt(var + epsilon)
        x_dq, w_dq = (producers[name] for name in conv.input[:2])
        codes, scale, _ = (constants[name] for name in w_dq.input)
        weight = codes * scale.astype(np.float64).reshape(-1, 1, 1, 1) * factor.reshape(-1, 1, 1, 1)
        new_scale = np.abs(weight.reshape(len(weight), -1)).max(axis=1) / INT8_MAX
        new_codes = np.round(weight / new_scale.reshape(-1, 1, 1, 1)).astype(np.int8)
        bias_scale = (float(constants[x_dq.input[1]]) * new_scale).astype(np.float32)
        bias = np.round((beta - mean * factor) / bias_scale).astype(np.int32)
        _replace(graph, w_dq.input[0], new_codes)
        _replace(graph, w_dq.input[1], new_scale.astype(np.float32))
        prefix = f"{conv.name}/hand_bias"
        graph.initializer.extend([numpy_helper.from_array(bias, f"{prefix}_codes"),
                                  numpy_helper.from_array(bias_scale, f"{prefix}_scale")])
        graph.node.insert(list(graph.node).index(conv), helper.make_node(
            "DequantizeLinear", [f"{prefix}_codes", f"{prefix}_scale"], [prefix], axis=0))
        conv.input.append(prefix)
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
    return folded


def _replace(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    (tensor,) = [t for t in graph.initializer if t.name == name]
    tensor.CopyFrom(numpy_helper.from_array(value, name))

