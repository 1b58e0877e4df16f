"""Gemm + BN (transA, transB, alpha, beta, every C shape) and MatMul (+ Add) + BN."""

import numpy as np
import onnx
import pytest

from bnfold.fold import fold_model
from tests.builders import assert_same_function, gemm_bn, matmul_bn, op_types


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (6,), (1, 6), (5, 1), (5, 6)], ids=str)
def test_gemm_bn(rng, trans_a, trans_b, c_shape):
    model = gemm_bn(rng, trans_a=trans_a, trans_b=trans_b, c_shape=c_shape, alpha=0.7, beta=1.3)
    folded, report = fold_model(model)
    assert report.folded == 1, report.decisions
    assert op_types(folded) == ["Gemm"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded)


def test_gemm_beta_zero_ignores_c(rng):
    model = gemm_bn(rng, beta=0.0, c_shape=(6,))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6), (), (5, 6)], ids=str)
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_bn(rng, bias_shape, bias_first):
    model = matmul_bn(rng, bias_shape=bias_shape, bias_first=bias_first)
    folded, report = fold_model(model)
    assert report.folded == 1, report.decisions
    assert "BatchNormalization" not in op_types(folded)
    assert op_types(folded) == ["MatMul", "Add"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded)


def test_matmul_rank3_output_is_refused(rng):
    model = matmul_bn(rng, x_shape=[2, 6, 4], n=6)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "channel-axis-mismatch"
    assert op_types(folded) == op_types(model)


def test_matmul_unknown_rank_is_refused(rng):
    model = matmul_bn(rng)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    _, report = fold_model(model)
    assert report.decisions[0].reason == "rank-unknown"


def test_float64_gemm_is_exact_to_rounding(rng):
    model = gemm_bn(rng, dtype=np.float64, trans_b=1, c_shape=(5, 6))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded, atol=1e-12, rtol=1e-12)
