"""Property tests: random Conv / ConvTranspose / Gemm configurations and BN statistics.

Float64 graphs are run with onnx's reference evaluator, so the folded model must agree with the
original to ~1e-10: any wrong axis, group or transpose would show as an O(1) error. ConvTranspose with
groups is checked against torch in float64 (the reference evaluator cannot run it) and, in float32,
against onnxruntime with optimizations off.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.fold import fold_model
from bnfold.math import bn_scale_shift, fold_after_conv_transpose
from tests.builders import assert_same_function, conv_bn, gemm_bn, random_feeds, run_reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_reference_equal(model, folded):
    feeds = random_feeds(model, seed=7)
    expected = run_reference(model, feeds)
    actual = run_reference(folded, feeds)
    for name in expected:
        scale = np.abs(expected[name]).max() + 1.0
        assert np.abs(expected[name] - actual[name]).max() <= 1e-10 * scale


@SETTINGS
@given(rank=st.integers(1, 2), groups=st.integers(1, 3), cin=st.integers(1, 3), cout=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2), pad=st.integers(0, 2),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_bn_property(rank, groups, cin, cout, kernel, stride, dilation, pad, bias, seed):
    rng = np.random.default_rng(seed)
    attrs = {"strides": [stride] * rank, "dilations": [dilation] * rank, "pads": [pad] * (2 * rank)}
    model = conv_bn(rng, rank=rank, groups=groups, bias=bias, dtype=np.float64, channels_in=cin * groups,
                    channels_out=cout * groups, kernel=kernel, conv_attrs=attrs, spatial_size=6)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_reference_equal(model, folded)


@SETTINGS
@given(trans_a=st.integers(0, 1), trans_b=st.integers(0, 1), alpha=st.floats(-2, 2), beta=st.floats(-2, 2),
       c_shape=st.sampled_from([None, (), (6,), (1, 6), (5, 1), (5, 6)]), seed=st.integers(0, 2**16))
def test_gemm_bn_property(trans_a, trans_b, alpha, beta, c_shape, seed):
    model = gemm_bn(np.random.default_rng(seed), trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta,
                    c_shape=c_shape, dtype=np.float64)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_reference_equal(model, folded)


@SETTINGS
@given(groups=st.integers(1, 3), cin=st.integers(1, 3), cout=st.integers(1, 3), kernel=st.integers(1, 3),
       stride=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_transpose_math_against_torch(groups, cin, cout, kernel, stride, bias, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    c_in, c_out = cin * groups, cout * groups
    weight = rng.normal(size=(c_in, cout, kernel, kernel))
    b = rng.normal(size=c_out) if bias else None
    gamma, beta, mean = rng.normal(size=c_out), rng.normal(size=c_out), rng.normal(size=c_out)
    var = rng.uniform(1e-3, 10, c_out)
    x = torch.tensor(rng.normal(size=(2, c_in, 5, 5)))
    conv = torch.nn.functional.conv_transpose2d(x, torch.tensor(weight), None if b is None else torch.tensor(b),
                                                stride=stride, groups=groups)
    expected = torch.nn.functional.batch_norm(conv, torch.tensor(mean), torch.tensor(var), torch.tensor(gamma),
                                              torch.tensor(beta), training=False, eps=1e-5)
    scale, shift = bn_scale_shift(gamma, beta, mean, var, 1e-5)
    new_w, new_b = fold_after_conv_transpose(weight, b, scale, shift, groups)
    actual = torch.nn.functional.conv_transpose2d(x, torch.tensor(new_w), torch.tensor(new_b), stride=stride,
                                                  groups=groups)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), stride=st.integers(1, 2),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_transpose_graph_float32_onnxruntime(rank, groups, stride, bias, seed):
    model = conv_bn(np.random.default_rng(seed), rank=rank, groups=groups, bias=bias, transposed=True,
                    channels_in=4, channels_out=8, conv_attrs={"strides": [stride] * rank}, spatial_size=4)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded, atol=2e-5, rtol=2e-4)
