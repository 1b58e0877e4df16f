"""The arithmetic of folding, in float64, with no ONNX in sight.

Inference-mode BatchNormalization is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps),  shift = beta - mean * scale

Folding it into the linear op ``z = W x + b`` in front of it scales the weights of each output channel
and maps the bias through the same affine: ``W' = scale * W``, ``b' = scale * b + shift``. Folding it
into the linear op behind it (``z = W (scale * x + shift) + b``) scales each *input* channel of W and
moves ``W shift`` into the bias. Every function takes and returns float64 arrays; callers cast once.
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


def fold_after_conv(weight, bias, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    """Conv then BN: output channels are weight axis 0 ([M, C/g, k...]) whatever the group count."""
    new_weight = np.array(weight, dtype=np.float64)  # a copy, scaled in place: one float64 buffer
    new_weight *= _per_axis(scale, 0, new_weight.ndim)
    bias = np.zeros(new_weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_weight, bias * scale + shift


def fold_after_conv_transpose(weight, bias, scale, shift, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose then BN: weight is [C_in, C_out/g, k...]; output channel g*(C_out/g)+j of group
    g is column j of the rows of that group, so scale is applied per (group, column) pair."""
    new_weight = np.array(weight, dtype=np.float64)
    c_in, c_out_per_group = new_weight.shape[0], new_weight.shape[1]
    grouped = new_weight.reshape(groups, c_in // groups, c_out_per_group, *new_weight.shape[2:])
    grouped *= scale.reshape(groups, 1, c_out_per_group, *([1] * (new_weight.ndim - 2)))
    c_out = groups * c_out_per_group
    bias = np.zeros(c_out) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_weight, bias * scale + shift


def fold_after_gemm(b_matrix, c, scale, shift, trans_b: bool, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Gemm (Y = alpha A' B' + beta C) then BN on Y's axis 1: scale the columns of B' (rows of B when
    transB) and replace C by beta*C*scale + shift, to be used with beta = 1."""
    b_matrix = np.asarray(b_matrix, dtype=np.float64)
    new_b = b_matrix * (scale[:, None] if trans_b else scale[None, :])
    c_term = 0.0 if c is None else np.float64(beta) * np.asarray(c, dtype=np.float64)
    new_c = c_term * scale + shift
    return new_b, _compact_bias(new_c)


def fold_after_matmul(weight, bias, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    """MatMul (X [M,K] @ W [K,N]) with an optional added bias, then BN over N."""
    weight = np.asarray(weight, dtype=np.float64)
    bias_term = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return weight * scale[None, :], _compact_bias(bias_term * scale + shift)


def _compact_bias(bias: np.ndarray) -> np.ndarray:
    """A bias that broadcasts to a [M, N] output, as [N] when it does not vary along M."""
    if bias.ndim == 2 and bias.shape[0] == 1:
        return bias.reshape(-1)
    return bias


def fold_before_conv(weight, bias, scale, shift, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """BN then Conv without padding: conv(scale*x + shift) = conv'(x) + sum(W * shift). Input channel
    c of W [M, C/g, k...] is channel (m // (M/g)) * (C/g) + c of the BN, for output channel m."""
    weight = np.asarray(weight, dtype=np.float64)
    m, c_per_group = weight.shape[0], weight.shape[1]
    group_of = np.arange(m) // (m // groups)
    channel = group_of[:, None] * c_per_group + np.arange(c_per_group)[None, :]  # [M, C/g]
    extra = (1,) * (weight.ndim - 2)
    new_weight = weight * scale[channel].reshape(m, c_per_group, *extra)
    spatial = tuple(range(2, weight.ndim))
    bias = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_weight, bias + (weight.sum(axis=spatial) * shift[channel]).sum(axis=1)


def fold_before_matmul(weight, bias, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    """BN over K then X [M,K] @ W [K,N] (+ bias): (scale*x + shift) @ W = x @ (scale W) + shift @ W."""
    weight = np.asarray(weight, dtype=np.float64)
    bias_term = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return weight * scale[:, None], bias_term + shift @ weight
