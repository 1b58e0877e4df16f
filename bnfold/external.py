"""External data: tensor values kept in files beside the model file, checked before any byte is read,
and the one data file bnfold writes beside its output.

Reading: a tensor names its file by ``location``, relative to the model's folder, and its bytes by
``offset`` and ``length``. Every location is checked before any file is opened: one whose path, every
symlink resolved, is not inside the folder (an absolute path elsewhere, ``..`` out of it, a symlink
out of it) is refused. Then each file must be a
regular file, each span must lie inside it, and a fixed-width tensor's length must be its dims times
its element size. A large main-graph initializer then becomes a stub of its mapped file (see
bnfold.mapped); any other tensor gets its values read in.

Writing: a model saved with external data keeps its values in ``<output file name>.data`` next to it
(OUT.onnx -> OUT.onnx.data), the only data file it refers to. Every initializer whose values take at
least STUB_MIN_BYTES goes there (values held in float_data, int32_data... are converted to raw bytes
first), in the order the model lists them, subgraphs' first; a payload of at least ALIGNMENT bytes
starts at a multiple of ALIGNMENT, so it can be mapped in place (and, on filesystems that support it,
its blocks shared with the input's).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .dtypes import numpy_dtype, to_array
from .errors import BnfoldError
from .graph import all_graphs, nested_graphs
from .mapped import STUB_MIN_BYTES, STUB_TYPES, MappedFile, expected_bytes, is_stub, make_stub
from .wire import VALUE_FIELDS, copy_field

DATA_SUFFIX = ".data"
ALIGNMENT = 4096
NOTE = "external data files must sit next to the model, inside its folder"
_INTEGER = frozenset("0123456789")


def data_file_name(path: str | os.PathLike) -> str:
    """The name of the external data file of a model saved at `path`: its file name plus .data."""
    return Path(path).name + DATA_SUFFIX


# ---------------------------------------------------------------------------------------- reading
@dataclass
class _Placement:
    """Where one tensor's values are, once its location is known to stay inside the model's folder."""

    tensor: onnx.TensorProto
    main: bool  # a main-graph initializer: may stay in its file as a stub
    where: str  # "<model>: external data of <tensor>", the start of every error about it
    location: str
    target: str  # the file, every symlink resolved
    offset: int
    length: int | None


def attach(model: onnx.ModelProto, path: str | os.PathLike, source: MappedFile | None = None) -> None:
    """Resolve every tensor of `model` (loaded from `path`) whose values are in an external file: a
    large main-graph initializer of a fixed-width type becomes a stub of its file in `source`; any
    other tensor (or every one, without a source) gets its values as raw_data. Raise BnfoldError for
    a location outside the model's folder before opening any file, and for a file or span that is
    not what the tensor says."""
    folder = os.path.realpath(Path(path).parent)
    placements = [_place(tensor, main, folder, path) for tensor, main in _tensors(model)
                  if tensor.data_location == onnx.TensorProto.EXTERNAL and not is_stub(tensor)]
    if not placements:
        return
    if source is not None:
        source.had_external_data = True
    files = {}
    try:
        for placement in placements:
            if placement.target not in files:
                files[placement.target] = _open(placement)
            _check_span(placement, os.fstat(files[placement.target]).st_size)
        mapped = {p.target for p in placements if source is not None and _stays_mapped(p)}
        for placement in placements:
            _resolve(placement, files[placement.target], placement.target in mapped)
        for target in mapped:
            source.add_file(target, files.pop(target))
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot read external data ({exc.strerror or exc})", note=NOTE) from exc
    finally:
        for fd in files.values():
            os.close(fd)


def _tensors(model: onnx.ModelProto):
    """(tensor, is a main-graph initializer) for every tensor of the model that may hold values:
    initializers (sparse ones too) of every graph and the tensors of node attributes, in functions too."""
    yield from ((t, True) for t in model.graph.initializer)
    for graph in all_graphs(model.graph):
        if graph is not model.graph:
            yield from ((t, False) for t in graph.initializer)
        for sparse in graph.sparse_initializer:
            yield from ((t, False) for t in (sparse.values, sparse.indices))
        yield from ((t, False) for t in _attribute_tensors(graph.node))
    for function in model.functions:
        for graph in nested_graphs(function.node):
            yield from ((t, False) for t in graph.initializer)
            yield from ((t, False) for t in _attribute_tensors(graph.node))
        yield from ((t, False) for t in _attribute_tensors(function.node))


def _attribute_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)


def _place(tensor: onnx.TensorProto, main: bool, folder: str, path) -> _Placement:
    """Read a tensor's external_data entries; refuse a location that leaves `folder` (no file is opened)."""
    entries = {e.key: e.value for e in tensor.external_data}
    where = f"{path}: external data of {tensor.name or 'an unnamed tensor'}"
    location = entries.get("location", "")
    if not location or "\0" in location:
        raise BnfoldError(f"{where} has {'an invalid' if location else 'no'} location", note=NOTE)
    target = os.path.realpath(os.path.join(folder, location))  # an absolute location stays absolute
    if os.path.commonpath([folder, target]) != folder or target == folder:
        raise BnfoldError(f"{where} is at {location!r}, outside the model's folder", note=NOTE)
    if _holds_values(tensor):
        raise BnfoldError(f"{where}: the tensor also holds values in the model file (the ONNX checker "
                          "rejects a tensor stored externally with a data field)")
    return _Placement(tensor, main, where, location, target, _integer(entries, "offset", where) or 0,
                      _integer(entries, "length", where))


def _holds_values(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("raw_data") or any(len(getattr(tensor, name)) for name in VALUE_FIELDS[1:])


def _integer(entries: dict[str, str], key: str, where: str) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if not value or not set(value) <= _INTEGER:
        raise BnfoldError(f"{where} has an invalid {key} {value!r} (not a non-negative integer)", note=NOTE)
    return int(value)


def _open(placement: _Placement) -> int:
    """Open a file already known to be inside the folder, as a regular file. O_NOFOLLOW: no symlink
    slipped in since; O_NONBLOCK: a FIFO put there cannot hang the open."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(placement.target, flags)
    except OSError as exc:
        raise BnfoldError(f"{placement.where}: cannot open {placement.location} ({exc.strerror or exc})",
                          note=NOTE) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BnfoldError(f"{placement.where}: {placement.location} is not a regular file", note=NOTE)
    os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from blocking the open
    return fd


def _check_span(placement: _Placement, size: int) -> None:
    tensor, offset = placement.tensor, placement.offset
    if placement.length is None:
        placement.length = max(size - offset, 0)
    end = offset + placement.length
    if end > size:
        raise BnfoldError(f"{placement.where}: bytes {offset} to {end} lie past the end of {placement.location} "
                          f"({size} bytes)", note=NOTE)
    if tensor.data_type in STUB_TYPES:
        expected = expected_bytes(tensor)
        if expected != placement.length:
            need = "a negative dimension" if expected is None else f"{expected} bytes"
            raise BnfoldError(f"{placement.where}: {placement.length} bytes in {placement.location}, but its "
                              f"shape and type need {need}")


def _stays_mapped(placement: _Placement) -> bool:
    return placement.main and placement.tensor.data_type in STUB_TYPES and placement.length >= STUB_MIN_BYTES


def _resolve(placement: _Placement, fd: int, mapped: bool) -> None:
    tensor, start = placement.tensor, placement.offset
    if mapped and _stays_mapped(placement):
        make_stub(tensor, placement.target, start, start + placement.length)
        return
    data = os.pread(fd, placement.length, start)
    if len(data) != placement.length:
        raise BnfoldError(f"{placement.where}: {placement.location} ended while being read", note=NOTE)
    tensor.raw_data = data
    tensor.ClearField("data_location")
    del tensor.external_data[:]


# ---------------------------------------------------------------------------------------- writing
class DataFile:
    """The external data file being written: where each payload goes, and its header in the model."""

    def __init__(self, handle, location: str):
        self.handle = handle
        self.location = location
        self.size = 0

    def add(self, tensor: onnx.TensorProto, source: MappedFile | None) -> onnx.TensorProto | None:
        """Append `tensor`'s values and return the tensor as the model file holds it (its fields,
        pointing into this file), or None if it is too small (or of a type) to leave the model file."""
        if is_stub(tensor):
            _, begin, end = source.span(tensor)
            length = end - begin
            start = self._start(length)
            source.write_data(tensor, self.handle)
        else:
            data = raw_bytes(tensor)
            if data is None or len(data) < STUB_MIN_BYTES:
                return None
            length = len(data)
            start = self._start(length)
            self.handle.write(data)
        self.size = start + length
        return self._header(tensor, start, length)

    def add_nested(self, graph: onnx.GraphProto) -> None:
        """Move the values of the initializers of every subgraph of `graph` (a copy bnfold owns) here."""
        for sub in nested_graphs(graph.node):
            for tensor in sub.initializer:
                header = self.add(tensor, None)
                if header is not None:
                    tensor.CopyFrom(header)

    def _start(self, length: int) -> int:
        padding = -self.size % ALIGNMENT if length >= ALIGNMENT else 0
        self.handle.write(bytes(padding))
        return self.size + padding

    def _header(self, tensor: onnx.TensorProto, start: int, length: int) -> onnx.TensorProto:
        header = bare(tensor)
        header.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", start), ("length", length)):
            entry = header.external_data.add()
            entry.key, entry.value = key, str(value)
        return header


def bare(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` without its values and without any external data entries (a stub's own fields)."""
    copy = onnx.TensorProto()
    for field, value in tensor.ListFields():
        if field.name not in VALUE_FIELDS and field.name not in ("external_data", "data_location"):
            copy_field(copy, field, value)
    return copy


def raw_bytes(tensor: onnx.TensorProto) -> bytes | None:
    """A tensor's values as raw_data bytes (converted from float_data, int32_data... for fixed-width
    types); None for a tensor that cannot hold raw_data this way (strings, packed 4-bit types)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type not in STUB_TYPES or (expected_bytes(tensor) or 0) < STUB_MIN_BYTES:
        return None
    values = to_array(tensor)
    return np.ascontiguousarray(values, dtype=numpy_dtype(tensor.data_type).newbyteorder("<")).tobytes()
