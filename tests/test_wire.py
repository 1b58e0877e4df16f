"""bnfold.wire against protobuf's own encoder: varints, records, the record walker, payload sizes."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.wire import (FIXED32, FIXED64, GRAPH, INITIALIZER, LENGTH_DELIMITED, RAW_DATA, VALUE_FIELDS, VARINT,
                         copy_field, decode_varint, encode_varint, fields, record, record_prefix,
                         tensor_payload_bytes)

# Every 7-bit boundary of a varint, up to the largest uint64.
BOUNDARIES = sorted({0, 1, 2**64 - 1} | {v for bits in range(7, 64, 7) for v in (2**bits - 1, 2**bits)})


def test_field_numbers_are_onnx_s():
    assert (GRAPH, INITIALIZER, RAW_DATA) == (7, 5, 9)
    assert (VARINT, FIXED64, LENGTH_DELIMITED, FIXED32) == (0, 1, 2, 5)


def test_value_fields_are_every_field_that_holds_values():
    """A tensor whose values are in none of these holds none (external data excepted)."""
    holding = {f.name for f in TensorProto.DESCRIPTOR.fields if f.name.endswith("_data")} - {"external_data"}
    assert sorted(VALUE_FIELDS) == sorted(holding) and len(VALUE_FIELDS) == 7


@pytest.mark.parametrize("value", BOUNDARIES)
def test_varints_match_protobuf_and_read_back(value):
    """A uint64_data value of a TensorProto is encoded as a plain varint after a 2-byte packed header."""
    tensor = TensorProto()
    tensor.uint64_data.append(value)
    encoded = tensor.SerializeToString()  # key 0x52, length, varint
    assert encode_varint(value) == encoded[2:]
    assert decode_varint(encoded, 2) == (value, len(encoded))
    assert decode_varint(b"\xff" + encode_varint(value) + b"\x01", 1) == (value, 1 + len(encode_varint(value)))


def test_known_varint_bytes():
    assert encode_varint(0) == b"\x00" and encode_varint(1) == b"\x01" and encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01" and encode_varint(300) == b"\xac\x02"
    assert decode_varint(b"\xac\x02", 0) == (300, 2)


def test_record_is_what_protobuf_writes_for_a_submessage():
    model = onnx.ModelProto()
    model.graph.name = "g" * 200  # a length over 127: a two-byte length prefix
    body = model.graph.SerializeToString()
    assert record(GRAPH, body) == model.SerializeToString()
    assert record_prefix(GRAPH, len(body)) + body == model.SerializeToString()
    tensor = TensorProto()
    tensor.raw_data = b"\x01\x02\x03"
    assert record(RAW_DATA, b"\x01\x02\x03") == tensor.SerializeToString()
    graph = onnx.GraphProto()
    graph.initializer.add().name = "w"
    assert record(INITIALIZER, graph.initializer[0].SerializeToString()) == graph.SerializeToString()


def test_fields_walks_every_wire_type_with_value_spans():
    double_record = encode_varint(3 << 3 | FIXED64) + struct.pack("<d", 1.5)
    attribute = helper.make_attribute("a", 2.5)  # name (length-delimited), f (fixed32), type (varint)
    message = double_record + attribute.SerializeToString()
    buffer = b"xx" + message + b"yy"  # walk a slice of a larger buffer
    records = list(fields(buffer, 2, 2 + len(message)))
    assert [(field, wire) for field, wire, *_ in records] == [(3, FIXED64), (1, LENGTH_DELIMITED), (2, FIXED32),
                                                              (20, VARINT)]
    (_, _, s0, e0, a0), (_, _, s1, e1, a1), (_, _, s2, e2, a2), (_, _, s3, e3, a3) = records
    assert a0 == 2 and struct.unpack("<d", buffer[s0:e0]) == (1.5,)
    assert a1 == e0 and buffer[s1:e1] == b"a" and s1 == a1 + 2  # key, length, then the value
    assert a2 == e1 and struct.unpack("<f", buffer[s2:e2]) == (2.5,) and s2 == a2 + 1
    assert a3 == e2 and decode_varint(buffer, s3)[0] == onnx.AttributeProto.FLOAT and e3 == s3 + 1
    assert e3 == 2 + len(message)


def test_fields_of_a_tensor_finds_its_raw_data():
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2], np.array([1, 2], np.float32).tobytes(), raw=True)
    buffer = tensor.SerializeToString()
    raw = [(start, end) for field, wire, start, end, _ in fields(buffer, 0, len(buffer)) if field == RAW_DATA]
    assert len(raw) == 1 and buffer[raw[0][0]:raw[0][1]] == tensor.raw_data


def test_fields_rejects_a_truncated_message_and_unknown_wire_types():
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2], np.array([1, 2], np.float32).tobytes(), raw=True)
    buffer = tensor.SerializeToString()
    with pytest.raises(ValueError, match="truncated"):
        list(fields(buffer, 0, len(buffer) - 1))
    fixed64 = encode_varint(1 << 3 | FIXED64) + bytes(8)
    with pytest.raises(ValueError, match="truncated"):
        list(fields(fixed64, 0, len(fixed64) - 1))
    fixed32 = encode_varint(1 << 3 | FIXED32) + bytes(4)
    with pytest.raises(ValueError, match="truncated"):
        list(fields(fixed32, 0, len(fixed32) - 1))
    assert len(list(fields(fixed32 + fixed64, 0, len(fixed32) + len(fixed64)))) == 2
    group = encode_varint(1 << 3 | 3)  # start group: not used by ONNX
    with pytest.raises(ValueError, match="unsupported protobuf wire type 3"):
        list(fields(group + b"\x00", 0, 2))


def test_copy_field_copies_repeated_message_and_scalar_fields():
    source = helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3, 3])
    target = onnx.NodeProto()
    for field, value in source.ListFields():
        copy_field(target, field, value)
    assert target == source
    model = helper.make_model(helper.make_graph([source], "g", [], []), producer_name="p")
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        copy_field(copy, field, value)
    assert copy == model


@pytest.mark.parametrize("field", ["int64_data", "uint64_data", "int32_data"])
def test_payload_bytes_at_every_varint_boundary(field):
    """The width of each varint, checked against ByteSize() at each 7-bit boundary, negatives
    included (sign-extended to 10 bytes)."""
    limit = {"int64_data": 2**63, "uint64_data": 2**64, "int32_data": 2**31}[field]
    values = [v for v in BOUNDARIES if v < limit]
    if field != "uint64_data":
        values += [-v for v in values if v]
        values.append(-limit)
    for value in values:
        tensor = TensorProto()
        getattr(tensor, field).append(value)
        assert tensor_payload_bytes(tensor) == tensor.ByteSize(), value
    tensor = TensorProto()
    getattr(tensor, field).extend(values)
    assert tensor_payload_bytes(tensor) == tensor.ByteSize()


def test_payload_bytes_of_every_value_field_together():
    """Keys and length prefixes of each field, over 127 bytes (two-byte lengths) and under."""
    tensor = TensorProto()
    tensor.name = "not counted"
    tensor.dims.extend([3])
    tensor.raw_data = bytes(200)
    tensor.float_data.extend([1.0] * 40)
    tensor.double_data.extend([1.0] * 3)
    tensor.int32_data.extend([1, -1])
    tensor.int64_data.extend([2**40])
    tensor.uint64_data.extend([5])
    tensor.string_data.extend([b"", b"a" * 130])
    bare = TensorProto()
    bare.name, bare.dims[:] = tensor.name, tensor.dims
    assert tensor_payload_bytes(tensor) == tensor.ByteSize() - bare.ByteSize()
    empty_raw = TensorProto()
    empty_raw.raw_data = b""  # set but empty: protobuf still writes its key and a zero length
    assert tensor_payload_bytes(empty_raw) == empty_raw.ByteSize() == 2
    assert tensor_payload_bytes(TensorProto()) == 0
