"""bnfold.math against direct float64 formulas, element by element (loops, not the vectorized code).

Each fold function is checked on shapes where a wrong axis, group, transpose or block boundary gives an
O(1) error; the loops below are the definitions in the module docstring written out per element.
"""

import tracemalloc
import warnings

import ml_dtypes

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


def test_fold_before_matmul_is_matmul_of_bn():
    rng = np.random.default_rng(7)
    k, n = 4, 3
    weight = rng.normal(0, 1, (k, n)).astype(np.float32)
    scale, shift = _affine(rng, k)
    new_w, new_b = bm.fold_before_matmul(weight, scale, shift)
    x = rng.normal(0, 1, (5, k))
    expected = (x * scale + shift) @ weight.astype(np.float64)
    np.testing.assert_allclose(x @ new_w + new_b, expected, rtol=1e-12, atol=1e-12)
    assert new_w.dtype == new_b.dtype == np.float64


# ------------------------------------------------- folds into the op after a BN: bounded, block by block
def _full_copy_fold_before_conv(weight, bias, scale, shift, groups):
    """fold_before_conv as it was, on a full float64 copy of the weight: the bits to keep."""
    weight = np.asarray(weight, dtype=np.float64)
    m, c_per_group = weight.shape[0], weight.shape[1]
    group_of = np.arange(m) // (m // groups)
    channel = group_of[:, None] * c_per_group + np.arange(c_per_group)[None, :]
    extra = (1,) * (weight.ndim - 2)
    new_weight = weight * scale[channel].reshape(m, c_per_group, *extra)
    spatial = tuple(range(2, weight.ndim))
    bias = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_weight, bias + (weight.sum(axis=spatial) * shift[channel]).sum(axis=1)


DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def _conv_case(rng, dtype, groups, kernel, m_per_group=5, c_per_group=3, transposed_view=False):
    weight = rng.normal(0, 1, (groups * m_per_group, c_per_group, *kernel)).astype(dtype)
    if transposed_view:  # a non-contiguous view: the block copies must keep its axis order
        weight = np.swapaxes(weight, -1, -2)
    scale, shift = _affine(rng, groups * c_per_group)
    return weight, rng.normal(0, 1, weight.shape[0]), scale, shift


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", [1, 7, 50, 1 << 14])
@pytest.mark.parametrize("groups,kernel,transposed_view", [(1, (3, 3), False), (2, (2, 5), True), (3, (4,), False),
                                                           (1, (2, 2, 3), False), (2, (1, 1), False)])
def test_fold_before_conv_is_bit_identical_to_the_full_copy(monkeypatch, dtype, block, groups, kernel,
                                                              transposed_view):
    """Blocks of one output channel up to the whole weight: the same bits as the full float64 copy, the
    weights rounded once to `out_dtype` exactly as casting the float64 result would."""
    monkeypatch.setattr(bm, "_BLOCK_ELEMENTS", block)
    weight, bias, scale, shift = _conv_case(np.random.default_rng(block), dtype, groups, kernel,
                                            transposed_view=transposed_view)
    expected_w, expected_b = _full_copy_fold_before_conv(weight, bias, scale, shift, groups)
    for out_dtype in (dtype, np.float64):
        new_w, new_b = bm.fold_before_conv(weight, bias, scale, shift, groups, out_dtype)
        assert new_w.dtype == out_dtype and new_w.shape == weight.shape
        np.testing.assert_array_equal(new_w, expected_w.astype(out_dtype), strict=True)
        np.testing.assert_array_equal(new_b, expected_b, strict=True)


def _full_copy_fold_before_matmul(weight, scale, shift):
    """fold_before_matmul as it was (the weight half is kept bit for bit; see the response test)."""
    weight = np.asarray(weight, dtype=np.float64)
    return weight * scale[:, None], shift @ weight


def _pairwise_columns(weight, shift):
    """Each column of shift @ W as numpy's own sum of a contiguous float64 vector (pairwise)."""
    return np.array([(np.ascontiguousarray(weight[:, j], dtype=np.float64) * shift).sum()
                     for j in range(weight.shape[1])])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("block", [1, 200, 1 << 14])
@pytest.mark.parametrize("transposed", [False, True], ids=["KxN", "view of NxK"])
def test_fold_before_matmul_blocks(monkeypatch, dtype, block, transposed):
    """The scaled weight is the full copy's, bit for bit, in W's own layout. The response is each
    column's pairwise sum, identical at every block size; BLAS's `shift @ W` (the full copy's) sums in
    an order that depends on the matrix's width, so it is matched to float64 rounding only."""
    monkeypatch.setattr(bm, "_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(block)
    k, n = 300, 13
    weight = rng.normal(0, 1, (n, k) if transposed else (k, n)).astype(dtype)
    weight = weight.T if transposed else weight
    scale, shift = _affine(rng, k)
    expected_w, blas_response = _full_copy_fold_before_matmul(weight, scale, shift)
    new_w, response = bm.fold_before_matmul(weight, scale, shift, dtype)
    assert new_w.dtype == dtype and new_w.flags.f_contiguous == transposed
    np.testing.assert_array_equal(new_w, expected_w.astype(dtype), strict=True)
    np.testing.assert_array_equal(response, _pairwise_columns(weight, shift), strict=True)
    magnitude = np.abs(weight.astype(np.float64)).T @ np.abs(shift)
    assert (np.abs(response - blas_response) <= 1e-14 * magnitude).all()
    np.testing.assert_array_equal(bm.fold_before_matmul(weight, scale, shift)[0], expected_w, strict=True)


def test_fold_before_matmul_response_beyond_numpy_buffer():
    """K longer than numpy's 8192-element buffer: still one pairwise sum per column."""
    rng = np.random.default_rng(11)
    weight = rng.normal(0, 1, (20001, 3)).astype(np.float32)
    scale, shift = _affine(rng, 20001)
    _, response = bm.fold_before_matmul(weight, scale, shift)
    np.testing.assert_array_equal(response, _pairwise_columns(weight, shift))


@pytest.mark.parametrize("fold,shape", [("conv", (256, 256, 4, 8)), ("matmul", (2048, 1024)),
                                        ("matmul", (1 << 17, 16))], ids=str)
def test_folds_before_use_bounded_float64_memory(fold, shape):
    """tracemalloc sees numpy's buffers: beyond the float32 result, the peak is a few float64 blocks of
    2**14 elements, or of one item (output channel, column) when an item is larger, far below the
    float64 copy of the weight (16 MiB here) that the full copy held."""
    rng = np.random.default_rng(12)
    weight = rng.normal(0, 1, shape).astype(np.float32)
    if fold == "conv":
        run, args, item = bm.fold_before_conv, (weight, None, *_affine(rng, shape[1]), 1, np.float32), weight[0].size
    else:
        run, args, item = bm.fold_before_matmul, (weight, *_affine(rng, shape[0]), np.float32), shape[0]
    tracemalloc.start()
    try:
        new_w, _ = run(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert new_w.dtype == np.float32
    assert peak - new_w.nbytes < 4 * 8 * max(bm._BLOCK_ELEMENTS, item) < weight.size * 8 / 2


@pytest.mark.parametrize("count,per_item,expected", [
    (10, 4096, [(0, 4), (4, 8), (8, 12)]),   # 4 items of 4096 elements make a block of 2**14
    (3, 1 << 15, [(0, 1), (1, 2), (2, 3)]),  # an item larger than a block is a block of its own
    (5, 1, [(0, 1 << 14)]),                  # items of 1 element (or 0: an empty column)
    (5, 0, [(0, 1 << 14)]),
    (0, 7, []),
])
def test_blocks_cover_every_item_once_within_the_bound(count, per_item, expected):
    assert [(b.start, b.stop) for b in bm._blocks(count, per_item)] == expected


@pytest.mark.parametrize("fold", ["conv", "matmul"])
def test_folds_before_overflow_gives_inf_silently(fold):
    """As scale_rows: an overflowing rounding is the caller's to refuse (cast_checked), not a warning."""
    weight = np.array([[[60000.0, 1.0]]], np.float16) if fold == "conv" else np.array([[60000.0, 1.0]], np.float16)
    scale, shift = np.array([2.0]), np.array([0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if fold == "conv":
            new_w, _ = bm.fold_before_conv(weight, None, scale, shift, 1, np.float16)
        else:
            new_w, _ = bm.fold_before_matmul(weight, scale, shift, np.float16)
    assert np.isinf(new_w.reshape(-1)[0]) and new_w.reshape(-1)[1] == 2.0


def test_fold_before_conv_of_an_empty_weight():
    new_w, new_b = bm.fold_before_conv(np.zeros((0, 2, 3), np.float32), None, np.ones(2), np.ones(2), 1, np.float32)
    assert new_w.shape == (0, 2, 3) and new_b.shape == (0,)


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
