"""The arithmetic of folding, in float64, with no ONNX in sight.

Inference-mode BatchNormalization is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps),  shift = beta - mean * scale

Folding it into the linear op ``z = W x + b`` in front of it scales the weights of each output channel
and maps the bias through the same affine: ``W' = scale * W``, ``b' = scale * b + shift``. Folding it
into the linear op behind it (``z = W (scale * x + shift) + b``) scales each *input* channel of W and
moves ``W shift`` into the bias. Everything is computed in float64; the weights are rounded once to
`out_dtype` (float64 unless the caller asks for the weight's own dtype), the biases returned in float64.
Weights are worked on a block of rows (or columns) at a time, so no fold holds a float64 copy of a
whole weight.
"""

from __future__ import annotations

import numpy as np


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) of an inference-mode BatchNormalization, in float64."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + np.float64(eps))
    return scale, beta - mean * scale


def _per_axis(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a 1-D per-channel vector so it broadcasts along `axis` of an `ndim`-D array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


_BLOCK_ELEMENTS = 1 << 14  # float64 work in 128 KiB blocks: large temporaries would fragment the heap


def scale_rows(weight, factors: np.ndarray, out_dtype=np.float64) -> np.ndarray:
    """`weight * factors` in float64, rounded once to `out_dtype`. `factors` broadcasts against
    `weight` and its axis 0 is 1 or weight's axis 0; the product is formed a block of rows at a time."""
    weight = np.asarray(weight)
    out = np.empty(weight.shape, dtype=out_dtype)
    if weight.size == 0:
        return out
    rows = max(1, _BLOCK_ELEMENTS // max(1, weight.size // weight.shape[0]))
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows].astype(np.float64)
        block *= factors if factors.shape[0] == 1 else factors[start:start + rows]
        with np.errstate(over="ignore"):  # an overflowing cast is refused by the caller (cast_checked)
            out[start:start + rows] = block
    return out


def fold_after_conv(weight, bias, scale, shift, out_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Conv then BN: output channels are weight axis 0 ([M, C/g, k...]) whatever the group count."""
    weight = np.asarray(weight)
    new_weight = scale_rows(weight, _per_axis(scale, 0, weight.ndim), out_dtype)
    bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_weight, bias * scale + shift


def fold_after_conv_transpose(weight, bias, scale, shift, groups: int,
                              out_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose then BN: weight is [C_in, C_out/g, k...]; output channel g*(C_out/g)+j of group
    g is column j of the rows of that group, so scale is applied per (group, column) pair."""
    weight = np.asarray(weight)
    c_in, c_out_per_group = weight.shape[0], weight.shape[1]
    per_row = np.repeat(scale.reshape(groups, c_out_per_group), c_in // groups, axis=0)  # [C_in, C_out/g]
    factors = per_row.reshape(c_in, c_out_per_group, *([1] * (weight.ndim - 2)))
    bias = np.zeros(groups * c_out_per_group) if bias is None else np.asarray(bias, dtype=np.float64)
    return scale_rows(weight, factors, out_dtype), bias * scale + shift


def fold_after_gemm(b_matrix, c, scale, shift, trans_b: bool, beta: float,
                    out_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Gemm (Y = alpha A' B' + beta C) then BN on Y's axis 1: scale the columns of B' (rows of B when
    transB) and replace C by beta*C*scale + shift, to be used with beta = 1."""
    new_b = scale_rows(b_matrix, scale[:, None] if trans_b else scale[None, :], out_dtype)
    c_term = 0.0 if c is None else np.float64(beta) * np.asarray(c, dtype=np.float64)
    new_c = c_term * scale + shift
    return new_b, _compact_bias(new_c)


def fold_after_matmul(weight, bias, scale, shift, out_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """MatMul (X [M,K] @ W [K,N]) with an optional added bias, then BN over N."""
    bias_term = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return scale_rows(weight, scale[None, :], out_dtype), _compact_bias(bias_term * scale + shift)


def _compact_bias(bias: np.ndarray) -> np.ndarray:
    """A bias that broadcasts to a [M, N] output, as [N] when it does not vary along M."""
    if bias.ndim == 2 and bias.shape[0] == 1:
        return bias.reshape(-1)
    return bias


def _blocks(count: int, per_item: int):
    """Slices over `count` items of `per_item` elements each, `_BLOCK_ELEMENTS` elements (at least
    one item) a slice: the bound on float64 working memory."""
    step = max(1, _BLOCK_ELEMENTS // max(1, per_item))
    return (slice(start, start + step) for start in range(0, count, step))


def fold_before_conv(weight, bias, scale, shift, groups: int,
                     out_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """BN then a Conv that reads no padding: conv(scale*x + shift) = conv'(x) + sum(W * shift). Input
    channel c of W [M, C/g, k...] is channel (m // (M/g)) * (C/g) + c of the BN, for output channel m.
    Formed a block of output channels at a time: each channel's sums are the same whatever the block."""
    weight = np.asarray(weight)
    m, c_per_group = weight.shape[0], weight.shape[1]
    group_of = np.arange(m) // (m // groups)
    extra = (1,) * (weight.ndim - 2)
    spatial = tuple(range(2, weight.ndim))
    new_weight = np.empty(weight.shape, dtype=out_dtype)
    response = np.empty(m)
    for rows in _blocks(m, int(np.prod(weight.shape[1:]))):
        channel = group_of[rows, None] * c_per_group + np.arange(c_per_group)  # [rows, C/g]
        block = weight[rows].astype(np.float64)
        response[rows] = (block.sum(axis=spatial) * shift[channel]).sum(axis=1)
        block *= scale[channel].reshape(*channel.shape, *extra)
        with np.errstate(over="ignore"):  # an overflowing cast is refused by the caller (cast_checked)
            new_weight[rows] = block
    bias = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_weight, bias + response


def fold_before_matmul(weight, scale, shift, out_dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """BN over K then X [M,K] @ W [K,N]: (scale*x + shift) @ W = x @ (scale W) + shift @ W, returned
    as (scale W, shift @ W). Formed a block of columns at a time; each column of shift @ W is one
    pairwise sum over K, the same bits whatever the block (BLAS's would not be). The scaled weight
    keeps W's memory layout (W may be a transposed view)."""
    weight = np.asarray(weight)
    new_weight = np.empty_like(weight, dtype=np.dtype(out_dtype))  # None is float64, as for np.empty
    response = np.empty(weight.shape[1])
    for cols in _blocks(weight.shape[1], weight.shape[0]):
        block = weight[:, cols].T.astype(np.float64, order="C")  # [columns, K]: each sum along a row
        response[cols] = (block * shift).sum(axis=1)
        block *= scale
        with np.errstate(over="ignore"):
            new_weight[:, cols] = block.T
    return new_weight, response


def merge_conv_kernels(shape: tuple[int, ...], kernels: list, offsets: list, scales: list, identity=None,
                       out_dtype=np.float64) -> np.ndarray:
    """Parallel Conv branches as one kernel of `shape` ([M, C/g, K...]): the float64 sum of each kernel
    of `kernels`, scaled per output channel by its `scales` (its BN), zero-padded into it at its tap
    `offsets`, plus, when `identity` = (scale, taps) is given, the identity kernel scaled per output
    channel: scale[m] at input slot m % (C/g), tap `taps` (RepVGG's merge). Formed a block of output
    channels at a time."""
    out = np.empty(shape, dtype=out_dtype)
    m, per_group = shape[0], shape[1]
    for rows in _blocks(m, int(np.prod(shape[1:]))):
        channels = np.arange(m)[rows]
        block = np.zeros((len(channels),) + tuple(shape[1:]))
        for kernel, offset, scale in zip(kernels, offsets, scales):
            taps = tuple(slice(o, o + k) for o, k in zip(offset, kernel.shape[2:]))
            factors = scale[rows].reshape((-1,) + (1,) * (kernel.ndim - 1))
            block[(slice(None), slice(None)) + taps] += np.asarray(kernel[rows], dtype=np.float64) * factors
        if identity is not None:
            scale, taps = identity
            block[(np.arange(len(channels)), channels % per_group) + tuple(taps)] += scale[channels]
        with np.errstate(over="ignore"):  # an overflowing cast is refused by the caller (cast_checked)
            out[rows] = block
    return out
