"""BN before Conv / Gemm / MatMul (pre-activation): fold forward when no padding makes it inexact."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import (assert_same_function, bn_initializers, bn_node, bn_stats, make_model, op_types,
                            tensor)


def bn_conv(rng, *, groups=1, pads=None, auto_pad=None, kernel=3, strides=None, bias=True, c=4, m=6):
    inits = bn_initializers(bn_stats(rng, c), np.float32)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (m, c // groups, kernel, kernel)).astype(np.float32), "W"))
    inputs = ["bn_out", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, m).astype(np.float32), "b"))
        inputs.append("b")
    attrs = {"group": groups}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if strides is not None:
        attrs["strides"] = strides
    nodes = [bn_node("x", "bn_out"), helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)]
    return make_model(nodes, [tensor("x", np.float32, [2, c, 7, 7])], [tensor("y", np.float32, None)], inits)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strides", [None, [2, 2]])
def test_bn_conv_without_padding(rng, groups, bias, strides):
    model = bn_conv(rng, groups=groups, bias=bias, strides=strides, m=8)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].rule == "bn-conv"
    assert op_types(folded) == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}], ids=str)
def test_bn_conv_with_padding_is_refused(rng, kwargs):
    model = bn_conv(rng, **kwargs)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "padding-prevents-fold"
    assert op_types(folded) == op_types(model)


def test_bn_conv_same_padding_with_1x1_kernel_folds(rng):
    model = bn_conv(rng, auto_pad="SAME_UPPER", kernel=1)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def _bn_linear(rng, op, trans_b=0, with_c=True, k=4, n=6):
    inits = bn_initializers(bn_stats(rng, k), np.float32)
    w_shape = (n, k) if trans_b else (k, n)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W"))
    inputs = ["bn_out", "W"]
    attrs = {}
    if op == "Gemm":
        attrs = {"transB": trans_b, "alpha": 0.5, "beta": 2.0}
        if with_c:
            inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (n,)).astype(np.float32), "C"))
            inputs.append("C")
    nodes = [bn_node("x", "bn_out"), helper.make_node(op, inputs, ["y"], name="linear", **attrs)]
    return make_model(nodes, [tensor("x", np.float32, [3, k])], [tensor("y", np.float32, [3, n])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_bn_gemm(rng, trans_b, with_c):
    model = _bn_linear(rng, "Gemm", trans_b, with_c)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["Gemm"]
    assert_same_function(model, folded)


def test_bn_matmul(rng):
    model = _bn_linear(rng, "MatMul")
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["MatMul", "Add"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert_same_function(model, folded)


def test_bn_with_two_consumers_stays(rng):
    model = bn_conv(rng)
    model.graph.node.append(helper.make_node("Relu", ["bn_out"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", np.float32, [2, 4, 7, 7]))
    _, report = fold_model(model)
    assert report.decisions[0].reason == "no-foldable-neighbour"
