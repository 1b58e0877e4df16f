"""bnfold.dtypes: ONNX element types as the numpy dtypes of their values.

onnx before 1.19 mapped BFLOAT16 to float32, the type of its storage in int32_data: bnfold then refused
every valid model with a bfloat16 initializer of STUB_MIN_BYTES or more (memory-mapped, its raw_data
size checked against twice the width). CI runs these tests on the lowest supported onnx too
(constraints-lowest.txt).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.dtypes import numpy_dtype, onnx_type, to_array
from bnfold.fold import fold_file
from bnfold.io import open_model
from bnfold.mapped import STUB_MIN_BYTES, is_stub
from tests.builders import bn_initializers, bn_node, bn_stats, make_model

VALUE_TYPES = {
    TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64, TensorProto.BOOL: np.bool_, TensorProto.STRING: object,
    TensorProto.BFLOAT16: ml_dtypes.bfloat16, TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
    TensorProto.FLOAT8E4M3FNUZ: ml_dtypes.float8_e4m3fnuz, TensorProto.FLOAT8E5M2: ml_dtypes.float8_e5m2,
    TensorProto.FLOAT8E5M2FNUZ: ml_dtypes.float8_e5m2fnuz, TensorProto.INT4: ml_dtypes.int4,
    TensorProto.UINT4: ml_dtypes.uint4, TensorProto.FLOAT4E2M1: ml_dtypes.float4_e2m1fn,
}


@pytest.mark.parametrize("data_type", VALUE_TYPES, ids=TensorProto.DataType.Name)
def test_numpy_dtype_is_the_type_of_the_values(data_type):
    assert numpy_dtype(data_type) == np.dtype(VALUE_TYPES[data_type])


def test_numpy_dtype_holds_on_an_onnx_that_maps_to_storage_types(monkeypatch):
    """onnx before 1.19, simulated: BFLOAT16 and the float8 types map to their int32_data storage."""
    storage = {TensorProto.BFLOAT16: np.float32, TensorProto.FLOAT8E4M3FN: np.uint8,
               TensorProto.FLOAT8E4M3FNUZ: np.uint8, TensorProto.FLOAT8E5M2: np.uint8,
               TensorProto.FLOAT8E5M2FNUZ: np.uint8}
    newer = onnx.helper.tensor_dtype_to_np_dtype
    monkeypatch.setattr(onnx.helper, "tensor_dtype_to_np_dtype",
                        lambda data_type: np.dtype(storage.get(data_type) or newer(data_type)))
    for data_type in storage:
        assert numpy_dtype(data_type) == np.dtype(VALUE_TYPES[data_type]), TensorProto.DataType.Name(data_type)


def test_onnx_type_inverts_numpy_dtype():
    for name, data_type in TensorProto.DataType.items():
        if data_type != TensorProto.UNDEFINED:
            assert onnx_type(numpy_dtype(data_type)) == data_type, name


def test_types_without_a_counterpart_raise():
    with pytest.raises(KeyError):
        numpy_dtype(TensorProto.UNDEFINED)
    with pytest.raises(ValueError):
        onnx_type(np.dtype([("a", np.float32)]))


@pytest.mark.parametrize("data_type", [TensorProto.BFLOAT16, TensorProto.FLOAT8E5M2, TensorProto.FLOAT16],
                         ids=TensorProto.DataType.Name)
def test_itemsize_is_the_width_of_an_element_in_raw_data(data_type):
    values = np.linspace(-2, 2, 12).astype(numpy_dtype(data_type))
    tensor = numpy_helper.from_array(values, "t")
    assert tensor.data_type == data_type
    assert len(tensor.raw_data) == values.size * numpy_dtype(data_type).itemsize
    decoded = to_array(tensor)
    assert decoded.dtype == numpy_dtype(data_type)
    np.testing.assert_array_equal(decoded, values)


def test_a_bfloat16_weight_of_a_kib_or_more_is_mapped_and_folded(tmp_path, rng):
    """Gemm -> BN in bfloat16 (opset 15), the 2 KiB weight read through the memory map: the fold
    is the float64 result rounded once to bfloat16."""
    bf16 = ml_dtypes.bfloat16
    weight = rng.normal(size=(32, 32)).astype(bf16)
    assert weight.nbytes >= STUB_MIN_BYTES
    stats = bn_stats(rng, 32)
    inits = [numpy_helper.from_array(weight, "B"), *bn_initializers(stats, bf16)]
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm"), bn_node("g", "y")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3, 32])],
                       [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3, 32])], inits, opset=15)
    source, target = tmp_path / "bf16.onnx", tmp_path / "folded.onnx"
    onnx.save(model, source)
    mapped, mapping = open_model(source)
    mapping.close()
    assert is_stub(mapped.graph.initializer[0])

    report = fold_file(source, target)

    assert report.folded == 1
    folded = onnx.load(target)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    new_weight = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}[folded.graph.node[0].input[1]]
    gamma, var = (stats[k].astype(bf16).astype(np.float64) for k in ("scale", "var"))
    exact = weight.astype(np.float64) * (gamma / np.sqrt(var + 1e-5))[None, :]
    assert new_weight.dtype == bf16
    np.testing.assert_array_equal(new_weight, exact.astype(bf16))
