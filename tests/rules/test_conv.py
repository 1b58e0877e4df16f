"""Conv + BN and ConvTranspose + BN: every rank, group count, bias and padding/stride attribute."""

import numpy as np
import onnx
import pytest

from bnfold.fold import fold_model
from tests.builders import assert_same_function, conv_bn, op_types

CONV_ATTRS = [
    {},
    {"strides": [2], "pads": [1, 0], "dilations": [2]},
    {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "SAME_LOWER", "strides": [2]},
    {"auto_pad": "VALID"},
]


def _spatial(attrs: dict, rank: int) -> dict:
    """Expand 1-D attribute lists to the conv's rank (pads have begin and end values)."""
    out = {}
    for key, value in attrs.items():
        if key == "pads":
            out[key] = [value[0]] * rank + [value[1]] * rank
        elif isinstance(value, list):
            out[key] = value * rank
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_bn_folds_exactly(rng, rank, groups, bias, transposed):
    model = conv_bn(rng, rank=rank, groups=groups, bias=bias, transposed=transposed, channels_in=4,
                    channels_out=8, spatial_size=5 if rank == 3 else 7)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].neighbour == "conv"
    assert op_types(folded) == [op_types(model)[0]]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded)


@pytest.mark.parametrize("attrs", CONV_ATTRS, ids=lambda a: ",".join(a) or "default")
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_bn_any_padding_stride_dilation(rng, attrs, transposed):
    if transposed and attrs.get("auto_pad", "").startswith("SAME"):
        attrs = {**attrs, "output_padding": [1] if "strides" in attrs else [0]}
    model = conv_bn(rng, rank=2, transposed=transposed, conv_attrs=_spatial(attrs, 2))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def test_conv_transpose_output_shape_and_padding(rng):
    model = conv_bn(rng, rank=2, groups=2, transposed=True,
                    conv_attrs={"strides": [2, 2], "output_padding": [1, 0], "pads": [1, 1, 0, 1]})
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)
    model = conv_bn(rng, rank=1, transposed=True, conv_attrs={"strides": [3], "output_shape": [23]})
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def test_depthwise_conv(rng):
    model = conv_bn(rng, rank=2, groups=8, channels_in=8, channels_out=8)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


def test_float16_folds_in_float64_and_rounds_once(rng):
    model = conv_bn(rng, dtype=np.float16)
    folded, report = fold_model(model)
    assert report.folded == 1
    weight = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}["W"]
    assert weight.dtype == np.float16
    assert_same_function(model, folded, atol=2e-2, rtol=2e-2)


def test_conv_then_two_bns_fold_in_turn(rng):
    from onnx import helper
    from tests.builders import bn_initializers, bn_node, bn_stats, make_model
    model = conv_bn(rng)
    graph = model.graph
    graph.node[1].output[0] = "mid"
    graph.node.append(bn_node("mid", "y", prefix="bn2"))
    graph.initializer.extend(bn_initializers(bn_stats(rng, 6), np.float32, prefix="bn2"))
    model = make_model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    folded, report = fold_model(model)
    assert report.folded == 2 and op_types(folded) == ["Conv"]
    assert_same_function(model, folded)
    del helper
