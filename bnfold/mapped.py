"""Models whose large initializers stay in the memory-mapped input file until a fold changes them.

Folding touches the BN parameters and the weights next to them; everything else only needs to be
copied to the output. So the file is mapped, its protobuf wire format is walked just deep enough to
find each initializer of the main graph, and every initializer with a large ``raw_data`` payload is
parsed as a *stub*: its name, dtype, dims and other fields, without the payload, marked with a
``data_location = EXTERNAL`` entry that points back into the mapped file. Values are read as
zero-copy numpy views; on save, an unchanged stub is written as the original bytes of its record.
The loaded ModelProto therefore costs a fraction of the model's size, and saving copies bytes
instead of re-encoding them.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import onnx

from .wire import (DATA_LOCATION, GRAPH, INITIALIZER, LENGTH_DELIMITED, RAW_DATA, copy_field, fields, record,
                   tensor_payload_bytes)

MARK = "bnfold:mapped"  # external_data location of a stub; never written to a file
# Fixed-width types whose raw_data is a plain little-endian array (packed 4-bit types are excluded).
_STUB_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
               onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
               onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
               onnx.TensorProto.BOOL}
_STUB_MIN_BYTES = 1024  # smaller payloads are parsed normally


class MappedFile:
    """An open, read-only mapping of a model file; stubs refer to byte spans inside it."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as handle:
            self.buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        try:
            self.buffer.close()
        except BufferError:  # a numpy view is still alive; the mapping closes when it is collected
            pass

    def body(self, stub: onnx.TensorProto) -> memoryview:
        """The serialized TensorProto of an unchanged stub, as it is in the file."""
        start, end = _span(stub, "record")
        return memoryview(self.buffer)[start:end]

    def span(self, stub: onnx.TensorProto) -> tuple[int, int]:
        return _span(stub, "record")

    def release(self, span: tuple[int, int]) -> None:
        """Drop a stub's pages from this process's memory (they are re-read from the page cache if
        used again): after a weight is folded or written, its old bytes need not stay resident."""
        start, end = span
        page = mmap.PAGESIZE
        first = start - start % page
        try:
            self.buffer.madvise(mmap.MADV_DONTNEED, first, end - first)
        except (AttributeError, OSError, ValueError):  # not on every platform; only a memory saving
            pass

    def size(self, stub: onnx.TensorProto) -> int:
        start, end = _span(stub, "record")
        return end - start

    def array(self, stub: onnx.TensorProto) -> np.ndarray:
        """The stub's values as a read-only view of the mapped file."""
        start, end = _span(stub, "data")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(stub.data_type)).newbyteorder("<")
        return np.frombuffer(self.buffer, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=start).reshape(tuple(stub.dims))

    def tensor(self, stub: onnx.TensorProto) -> onnx.TensorProto:
        """A complete TensorProto for a stub (payload included)."""
        full = onnx.TensorProto()
        full.ParseFromString(self.body(stub).tobytes())
        return full


def payload_mismatch(stub: onnx.TensorProto) -> str | None:
    """What onnx's checker would say of a stub's raw_data size, or None if it is right."""
    start, end = _span(stub, "data")
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(stub.data_type)).itemsize
    expected = int(np.prod(stub.dims, dtype=np.int64)) * itemsize
    if any(d < 0 for d in stub.dims) or end - start != expected:
        return (f"TensorProto (tensor name: {stub.name}) raw_data size ({end - start} bytes) does not match "
                f"the declared shape and type ({expected} bytes)")
    return None


def weightless(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy of `model` in which every stub and every main-graph initializer over `keep_bytes` is
    declared as a graph input instead: the same names, types and shapes without the payload. onnx's
    checker and shape inference see the same graph for a fraction of the memory."""
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            copy_field(copy, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            copy_field(copy.graph, field, value)
    declared = {v.name for v in model.graph.input}
    for tensor in model.graph.initializer:
        if not is_stub(tensor) and tensor_payload_bytes(tensor) <= keep_bytes:
            copy.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            copy.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return copy


def is_stub(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == MARK for e in tensor.external_data)


def _span(stub: onnx.TensorProto, kind: str) -> tuple[int, int]:
    entries = {e.key: e.value for e in stub.external_data}
    return int(entries[f"{kind}_start"]), int(entries[f"{kind}_end"])


def load_mapped(path: str | os.PathLike) -> tuple[onnx.ModelProto, MappedFile]:
    """Parse `path` with the main graph's large initializers left in the file as stubs."""
    source = MappedFile(path)
    buffer = source.buffer
    head = bytearray()
    graph = bytearray()
    for field, wire, start, end, at in fields(buffer, 0, len(buffer)):
        if field == GRAPH and wire == LENGTH_DELIMITED:
            graph += _graph_skeleton(buffer, start, end)
        else:
            head += buffer[at:end]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(head) + record(GRAPH, bytes(graph)))
    return model, source


def _graph_skeleton(buffer, start: int, end: int) -> bytearray:
    out = bytearray()
    for field, wire, value_start, value_end, at in fields(buffer, start, end):
        stub = _stub(buffer, value_start, value_end) if field == INITIALIZER and wire == LENGTH_DELIMITED else None
        out += record(INITIALIZER, stub.SerializeToString()) if stub is not None else buffer[at:value_end]
    return out


def _stub(buffer, start: int, end: int) -> onnx.TensorProto | None:
    """The tensor at buffer[start:end] without its raw_data, or None if it is small or not raw."""
    header = bytearray()
    data = None
    for field, wire, value_start, value_end, at in fields(buffer, start, end):
        if field == RAW_DATA and wire == LENGTH_DELIMITED:
            data = (value_start, value_end)
        elif field == DATA_LOCATION and buffer[value_start] != 0:
            return None  # already external
        else:
            header += buffer[at:value_end]
    if data is None or data[1] - data[0] < _STUB_MIN_BYTES:
        return None
    stub = onnx.TensorProto()
    stub.ParseFromString(bytes(header))
    if stub.data_type not in _STUB_TYPES:
        return None
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", MARK), ("record_start", start), ("record_end", end),
                       ("data_start", data[0]), ("data_end", data[1])):
        entry = stub.external_data.add()
        entry.key, entry.value = key, str(value)
    return stub
