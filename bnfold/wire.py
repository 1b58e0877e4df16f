"""The protobuf wire format, as far as bnfold reads and writes ModelProto without (de)serializing it
whole: field numbers, varints, length-delimited records, and the encoded size of a tensor's values.

Reading a mapped model file record by record (bnfold.mapped) and writing one initializer at a time
(bnfold.io.write_model) both rest on these few rules of the encoding; they live here once.
"""

from __future__ import annotations

import numpy as np
import onnx

GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
DATA_LOCATION = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_location"].number

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5  # the wire types bnfold meets

# The fields of a TensorProto that hold its values, and how each element is encoded. float_data and
# double_data are packed fixed-width numbers; int32_data, int64_data and uint64_data are packed
# varints, whose width depends on the value (int32_data holds float16/bfloat16 bit patterns, int8,
# bool... one per element: 1 to 3 bytes for a float16, 10 for a negative int8, which protobuf
# sign-extends to 64 bits); string_data is one length-delimited record per element.
_FIXED_WIDTH = {"float_data": 4, "double_data": 8}
_VARINTS = ("int32_data", "int64_data", "uint64_data")
_FIELD_NUMBER = {f.name: f.number for f in onnx.TensorProto.DESCRIPTOR.fields}
VALUE_FIELDS = ("raw_data", *_FIXED_WIDTH, *_VARINTS, "string_data")


def fields(buffer, start: int, end: int):
    """Yield (field number, wire type, value start, value end, record start) of each record of the
    message in buffer[start:end]; a value of a length-delimited record excludes its length prefix."""
    pos = start
    while pos < end:
        at = pos
        key, pos = decode_varint(buffer, pos)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            _, value_end = decode_varint(buffer, pos)
        elif wire == FIXED64:
            value_end = pos + 8
        elif wire == LENGTH_DELIMITED:
            length, pos = decode_varint(buffer, pos)
            value_end = pos + length
        elif wire == FIXED32:
            value_end = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if value_end > end:
            raise ValueError("truncated protobuf message")
        yield field, wire, pos, value_end, at
        pos = value_end


def decode_varint(buffer, pos: int) -> tuple[int, int]:
    """The varint at buffer[pos] and the position after it."""
    result = shift = 0
    while True:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def record(field: int, body: bytes) -> bytes:
    """A length-delimited protobuf record: key, length, body."""
    return record_prefix(field, len(body)) + body


def record_prefix(field: int, length: int) -> bytes:
    """The key and length that precede a length-delimited record's body."""
    return encode_varint(field << 3 | LENGTH_DELIMITED) + encode_varint(length)


def copy_field(target, field, value) -> None:
    """Set one field of `target` from (descriptor, value) as given by ListFields()."""
    current = getattr(target, field.name)
    if hasattr(current, "extend"):  # a repeated field (FieldDescriptor.is_repeated needs protobuf 6.31)
        current.extend(value)
    elif field.message_type is not None:
        current.CopyFrom(value)
    else:
        setattr(target, field.name, value)


def tensor_payload_bytes(tensor: onnx.TensorProto) -> int:
    """How many bytes the tensor's values take once serialized: its raw_data, float_data,
    int32_data, string_data, int64_data, double_data and uint64_data records, keys and length
    prefixes included. Exactly tensor.ByteSize() minus the size of the same tensor without its
    values, computed without encoding the tensor (ByteSize() would, and would copy raw_data)."""
    total = _delimited_size(RAW_DATA, len(tensor.raw_data)) if tensor.HasField("raw_data") else 0
    for name, width in _FIXED_WIDTH.items():
        total += _packed_size(name, width * len(getattr(tensor, name)))
    for name in _VARINTS:
        values = getattr(tensor, name)
        total += _packed_size(name, _varints_size(values, name) if len(values) else 0)
    key = len(encode_varint(_FIELD_NUMBER["string_data"] << 3))
    total += sum(key + len(encode_varint(len(s))) + len(s) for s in tensor.string_data)
    return total


def _packed_size(name: str, body: int) -> int:
    """A packed repeated field is one length-delimited record, absent when the field is empty."""
    return _delimited_size(_FIELD_NUMBER[name], body) if body else 0


def _delimited_size(field: int, body: int) -> int:
    return len(record_prefix(field, body)) + body


def _varints_size(values, name: str) -> int:
    """Total varint width of integers as protobuf encodes them: negative int32/int64 values are
    sign-extended to 64 bits (10 bytes). The dtype is explicit: from the plain ints of protobuf
    before 7.34, numpy would make float64 of values past 2**63."""
    unsigned = np.asarray(values, np.uint64 if name == "uint64_data" else np.int64).view(np.uint64)
    width = np.ones(unsigned.shape, np.int64)
    for bits in range(7, 64, 7):
        width += unsigned >= np.uint64(1 << bits)
    return int(width.sum())
