"""ONNX element types as numpy dtypes, the same on every onnx version: the one place bnfold converts.

Before onnx 1.19, ``onnx.helper.tensor_dtype_to_np_dtype`` maps BFLOAT16 (and the float8 types) to the
numpy type of their *storage in int32_data* (float32, uint8), not to the type of their values; bnfold
needs the value type (ml_dtypes), whose itemsize is also the width of each element in raw_data.
pyproject.toml requires onnx 1.22 (whose checker also rejects malformed models that crash onnxruntime
before 1.28), which maps every type to its value type; the table below keeps bfloat16 and float8 right
even on an older onnx.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

_ML_DTYPES = {
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT8E4M3FN: "float8_e4m3fn",
    onnx.TensorProto.FLOAT8E4M3FNUZ: "float8_e4m3fnuz",
    onnx.TensorProto.FLOAT8E5M2: "float8_e5m2",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "float8_e5m2fnuz",
}


def numpy_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of the values of ONNX element type `data_type` (ml_dtypes for bfloat16 and float8).

    Raises KeyError for UNDEFINED and for numbers onnx does not know.
    """
    name = _ML_DTYPES.get(data_type)
    if name is not None:
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))


def onnx_type(dtype: np.dtype) -> int:
    """The ONNX element type of numpy `dtype` (the inverse of :func:`numpy_dtype`).

    Raises ValueError for a dtype no ONNX type holds.
    """
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, as an array of :func:`numpy_dtype` of its type."""
    return numpy_helper.to_array(tensor)
