"""ONNX element types as numpy dtypes, the same on every supported onnx version.

Before onnx 1.19, ``onnx.helper.tensor_dtype_to_np_dtype`` maps BFLOAT16 (and the float8 types) to the
numpy type of their *storage in int32_data* (float32, uint8), not to the type of their values; bnfold
needs the value type (ml_dtypes), whose itemsize is also the width of each element in raw_data.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx

_ML_DTYPES = {
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT8E4M3FN: "float8_e4m3fn",
    onnx.TensorProto.FLOAT8E4M3FNUZ: "float8_e4m3fnuz",
    onnx.TensorProto.FLOAT8E5M2: "float8_e5m2",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "float8_e5m2fnuz",
}


def numpy_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of the values of ONNX element type `data_type` (ml_dtypes for bfloat16 and float8)."""
    name = _ML_DTYPES.get(data_type)
    if name is not None:
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
