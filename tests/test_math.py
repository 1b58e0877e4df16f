"""bnfold.math against direct float64 formulas, element by element (loops, not the vectorized code).

Each fold function is checked on shapes where a wrong axis, group, transpose or block boundary gives an
O(1) error; the loops below are the definitions in the module docstring written out per element.
"""

import warnings

import numpy as np
import pytest

from bnfold import math as bm


def _affine(rng, n):
    return rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n), rng.normal(0, 1, n)


def test_bn_scale_shift_is_the_inference_formula():
    gamma = np.array([1.5, -2.0, 0.25], np.float32)
    beta, mean = np.array([0.1, -0.2, 3.0]), np.array([1.0, 2.0, -4.0])
    var = np.array([1e-6, 4.0, 0.0])  # eps must count: var 0 would divide by zero
    eps = 1e-3
    scale, shift = bm.bn_scale_shift(gamma, beta, mean, var, eps)
    expected_scale = np.array([1.5 / np.sqrt(1e-6 + 1e-3), -2.0 / np.sqrt(4.001), 0.25 / np.sqrt(1e-3)])
    assert scale.dtype == shift.dtype == np.float64
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-15)
    np.testing.assert_allclose(shift, beta - mean * expected_scale, rtol=1e-15)
    x = np.array([0.3, -1.7, 2.2])  # and it is the BN itself
    np.testing.assert_allclose(scale * x + shift, gamma * (x - mean) / np.sqrt(var + eps) + beta, rtol=1e-14)


@pytest.mark.parametrize("rows,cols", [(5000, 8), (3, 7000), (1, 20000)])
def test_scale_rows_across_blocks_is_the_elementwise_product(rows, cols):
    """More than one block of 2**14 elements (or one row wider than a block): every row gets its factor."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 1, (rows, cols)).astype(np.float32)
    factors = rng.normal(0, 1, (rows, 1))
    out = bm.scale_rows(weight, factors, np.float32)
    assert out.dtype == np.float32 and out.shape == weight.shape
    np.testing.assert_array_equal(out, (weight.astype(np.float64) * factors).astype(np.float32))


def test_scale_rows_with_one_factor_row_broadcasts_it_to_every_block():
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 1, (4000, 9))
    factors = rng.normal(0, 1, (1, 9))
    out = bm.scale_rows(weight, factors)
    assert out.dtype == np.float64  # the default output dtype
    np.testing.assert_array_equal(out, weight * factors)


def test_scale_rows_rounds_once_from_float64():
    """float16 in, float16 out: the product is formed in float64 and rounded once."""
    weight = np.array([[np.float16(0.1)], [np.float16(3.0)]])
    factors = np.array([[1.0 / 3.0], [1.0 / 3.0]])
    out = bm.scale_rows(weight, factors, np.float16)
    np.testing.assert_array_equal(out, (weight.astype(np.float64) * factors).astype(np.float16))
    assert out[1, 0] == np.float16(1.0)


def test_scale_rows_overflow_gives_inf_silently():
    """Overflow when rounding to the weight's dtype is the caller's to detect (cast_checked), not a warning."""
    weight = np.array([[60000.0, 1.0]], np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bm.scale_rows(weight, np.array([[2.0, 1.0]]), np.float16)
    assert np.isinf(out[0, 0]) and out[0, 1] == 1.0


def test_scale_rows_of_an_empty_weight():
    out = bm.scale_rows(np.zeros((0, 3), np.float32), np.ones((1, 3)), np.float32)
    assert out.shape == (0, 3) and out.dtype == np.float32


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_after_conv_scales_output_channels(with_bias):
    rng = np.random.default_rng(2)
    weight = rng.normal(0, 1, (6, 2, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 1, 6) if with_bias else None
    scale, shift = _affine(rng, 6)
    new_w, new_b = bm.fold_after_conv(weight, bias, scale, shift, np.float32)
    assert new_w.dtype == np.float32 and new_b.dtype == np.float64
    for m in range(6):
        np.testing.assert_array_equal(new_w[m], (weight[m].astype(np.float64) * scale[m]).astype(np.float32))
        b = bias[m] if with_bias else 0.0
        assert new_b[m] == pytest.approx(scale[m] * b + shift[m], rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("groups,with_bias", [(1, True), (2, False), (3, True)])
def test_fold_after_conv_transpose_scales_each_groups_columns(groups, with_bias):
    rng = np.random.default_rng(3)
    c_in, c_out_per_group = 2 * groups, 3
    weight = rng.normal(0, 1, (c_in, c_out_per_group, 2, 2))
    c_out = groups * c_out_per_group
    bias = rng.normal(0, 1, c_out) if with_bias else None
    scale, shift = _affine(rng, c_out)
    new_w, new_b = bm.fold_after_conv_transpose(weight, bias, scale, shift, groups)
    assert new_w.dtype == np.float64 and new_b.shape == (c_out,)
    for i in range(c_in):
        g = i // (c_in // groups)
        for j in range(c_out_per_group):
            np.testing.assert_array_equal(new_w[i, j], weight[i, j] * scale[g * c_out_per_group + j])
    expected_b = (bias if with_bias else np.zeros(c_out)) * scale + shift
    np.testing.assert_allclose(new_b, expected_b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("c_shape", [None, (), (6,), (1, 6), (5, 1), (5, 6)])
def test_fold_after_gemm_is_bn_of_gemm(trans_b, c_shape):
    """BN(A @ B' + beta C) == A @ B'' + C'' for the returned B'', C'' (alpha is kept by the rule)."""
    rng = np.random.default_rng(4)
    m, k, n, beta = 5, 4, 6, -0.75
    b_matrix = rng.normal(0, 1, (n, k) if trans_b else (k, n))
    c = None if c_shape is None else rng.normal(0, 1, c_shape)
    scale, shift = _affine(rng, n)
    new_b, new_c = bm.fold_after_gemm(b_matrix, c, scale, shift, trans_b, beta)
    assert new_b.shape == b_matrix.shape and new_b.dtype == np.float64
    a = rng.normal(0, 1, (m, k))
    b_prime = b_matrix.T if trans_b else b_matrix
    expected = (a @ b_prime + (0.0 if c is None else beta * c)) * scale + shift
    new_b_prime = new_b.T if trans_b else new_b
    np.testing.assert_allclose(a @ new_b_prime + new_c, expected, rtol=1e-12, atol=1e-12)
    # C'' is [N] unless the old C varied along M
    assert new_c.shape == ((m, n) if c_shape in ((5, 1), (5, 6)) else (n,))


@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6), (1,), (5, 6)])
def test_fold_after_matmul_is_bn_of_matmul(bias_shape):
    rng = np.random.default_rng(5)
    m, k, n = 5, 4, 6
    weight = rng.normal(0, 1, (k, n)).astype(np.float32)
    bias = None if bias_shape is None else rng.normal(0, 1, bias_shape)
    scale, shift = _affine(rng, n)
    new_w, new_b = bm.fold_after_matmul(weight, bias, scale, shift, np.float32)
    assert new_w.dtype == np.float32
    np.testing.assert_array_equal(new_w, (weight.astype(np.float64) * scale[None, :]).astype(np.float32))
    x = rng.normal(0, 1, (m, k))
    expected = (x @ weight.astype(np.float64) + (0.0 if bias is None else bias)) * scale + shift
    np.testing.assert_allclose(x @ (weight.astype(np.float64) * scale) + new_b, expected, rtol=1e-12, atol=1e-12)
    assert new_b.shape == ((5, 6) if bias_shape == (5, 6) else (n,))


@pytest.mark.parametrize("shape,expected", [((1, 6), (6,)), ((5, 6), (5, 6)), ((6,), (6,)), ((1, 1), (1,)),
                                            ((2, 1), (2, 1)), ((1, 2, 3), (1, 2, 3))])
def test_compact_bias_only_flattens_a_single_row(shape, expected):
    bias = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    out = bm._compact_bias(bias)
    assert out.shape == expected
    np.testing.assert_array_equal(out.reshape(-1), bias.reshape(-1))


@pytest.mark.parametrize("groups,with_bias,dtype", [(1, True, np.float64), (2, False, np.float64),
                                                   (3, True, np.float64), (1, False, np.float32)])
def test_fold_before_conv_scales_input_channels_and_adds_the_shift_response(groups, with_bias, dtype):
    """In float64 even for a float32 weight: the bias sums W * shift over the kernel, which float32
    accumulation would round."""
    rng = np.random.default_rng(6)
    m, c_per_group = 2 * groups, 2
    weight = rng.normal(0, 1, (m, c_per_group, 5, 7)).astype(dtype)
    channels = groups * c_per_group
    bias = rng.normal(0, 1, m) if with_bias else None
    scale, shift = _affine(rng, channels)
    new_w, new_b = bm.fold_before_conv(weight, bias, scale, shift, groups)
    for o in range(m):
        g = o // (m // groups)
        expected_bias = bias[o] if with_bias else 0.0
        for c in range(c_per_group):
            bn_channel = g * c_per_group + c
            np.testing.assert_array_equal(new_w[o, c], weight[o, c].astype(np.float64) * scale[bn_channel])
            expected_bias += weight[o, c].astype(np.float64).sum() * shift[bn_channel]
        assert new_b[o] == pytest.approx(expected_bias, rel=1e-13, abs=1e-13)
    assert new_w.dtype == new_b.dtype == np.float64


def test_fold_before_conv_1d():
    weight = np.array([[[1.0, 2.0, 3.0]], [[-1.0, 0.5, 0.0]]])  # [M=2, C=1, k=3]
    new_w, new_b = bm.fold_before_conv(weight, None, np.array([2.0]), np.array([0.5]), 1)
    np.testing.assert_array_equal(new_w, 2.0 * weight)
    np.testing.assert_array_equal(new_b, [3.0, -0.25])


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_before_matmul_is_matmul_of_bn(with_bias):
    rng = np.random.default_rng(7)
    k, n = 4, 3
    weight = rng.normal(0, 1, (k, n)).astype(np.float32)
    bias = rng.normal(0, 1, n) if with_bias else None
    scale, shift = _affine(rng, k)
    new_w, new_b = bm.fold_before_matmul(weight, bias, scale, shift)
    x = rng.normal(0, 1, (5, k))
    expected = (x * scale + shift) @ weight.astype(np.float64) + (bias if with_bias else 0.0)
    np.testing.assert_allclose(x @ new_w + new_b, expected, rtol=1e-12, atol=1e-12)
    assert new_w.dtype == np.float64


# ------------------------------------------------------------------ dtype contract (mutation testing)
def test_bn_scale_shift_is_float64_from_float16_statistics():
    from bnfold.math import bn_scale_shift
    gamma, beta, mean, var = (np.array(v, np.float16) for v in ([1.1, -0.7], [0.3, 0.9], [0.2, -1.3], [0.9, 0.01]))
    scale, shift = bn_scale_shift(gamma, beta, mean, var, 1e-5)
    g64, b64, m64, v64 = (a.astype(np.float64) for a in (gamma, beta, mean, var))
    oracle = g64 / np.sqrt(v64 + 1e-5)
    assert scale.dtype == shift.dtype == np.float64
    np.testing.assert_allclose(scale, oracle, rtol=1e-12)
    np.testing.assert_allclose(shift, b64 - m64 * oracle, rtol=1e-12)


def test_biases_are_float64_whatever_the_input_dtypes():
    """The module returns biases in float64 even when scale/shift/bias come in narrower dtypes."""
    from bnfold.math import fold_after_conv, fold_after_conv_transpose
    scale = np.array([1.1, -0.3], np.float32)
    shift = np.array([0.7, 0.2], np.float32)
    bias = np.array([0.1, 0.3], np.float16)
    oracle = bias.astype(np.float64) * scale.astype(np.float64) + shift.astype(np.float64)
    _, b1 = fold_after_conv(np.ones((2, 1, 1, 1), np.float32), bias, scale, shift)
    _, b2 = fold_after_conv_transpose(np.ones((1, 2, 1, 1), np.float32), bias, scale, shift, groups=1)
    for b in (b1, b2):
        assert b.dtype == np.float64
        np.testing.assert_allclose(b, oracle, rtol=1e-12)


def test_out_dtype_reaches_the_weights():
    from bnfold.math import fold_after_conv_transpose, fold_after_gemm
    scale, shift = np.array([2.0, 0.5, 3.0, 1.5]), np.zeros(4)
    w, _ = fold_after_conv_transpose(np.ones((2, 2, 3), np.float32), None, scale, shift, groups=2,
                                     out_dtype=np.float32)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w[:, :, 0], [[2.0, 0.5], [3.0, 1.5]])
    b, _ = fold_after_gemm(np.ones((3, 4), np.float16), None, scale, shift, trans_b=False, beta=1.0,
                           out_dtype=np.float16)
    assert b.dtype == np.float16


def test_scale_rows_of_a_vector():
    from bnfold.math import scale_rows
    out = scale_rows(np.arange(5.0), np.arange(5.0))
    np.testing.assert_array_equal(out, np.arange(5.0) ** 2)
