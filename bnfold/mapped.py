"""Models whose large initializers stay in files until a fold changes them.

Folding touches the BN parameters and the weights next to them; everything else only needs to be
copied to the output. So the model file is mapped, its protobuf wire format is walked just deep enough
to find each initializer of the main graph, and every initializer with a large ``raw_data`` payload is
parsed as a *stub*: its name, dtype, dims and other fields, without the payload, marked with a
``data_location = EXTERNAL`` entry that points back into the mapped file. An initializer whose values
sit in an external data file becomes a stub of that file, mapped as well (bnfold.external checks where
it points first). Values are read as zero-copy numpy views; on save, the kernel copies an unchanged
stub's bytes from file to file (copy_range), so they never pass through this process.

Folded weights are new values in memory; past a budget (IN_MEMORY_BUDGET) they go to an unnamed
scratch file instead, as stubs of it. The loaded ModelProto therefore costs a fraction of the model's
size however many of its weights a fold rewrites.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import tempfile

import numpy as np
import onnx

from .dtypes import numpy_dtype, onnx_type
from .errors import BnfoldError, signals_deferred
from .wire import (DATA_LOCATION, GRAPH, INITIALIZER, LENGTH_DELIMITED, RAW_DATA, copy_field, fields, record,
                   tensor_payload_bytes)

# The external_data location of a stub: never written to a file, and never read from one (a model
# that names this location is only naming a file), as no file can know this process's token.
MARK = f"bnfold:mapped:{secrets.token_hex(8)}"
MODEL_FILE = ""  # the key of the model file among a MappedFile's files
SCRATCH = "bnfold:scratch"  # the key of the scratch file
# Fixed-width types whose raw_data is a plain little-endian array (packed 4-bit types are excluded).
STUB_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
              onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
              onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
              onnx.TensorProto.BOOL}
STUB_MIN_BYTES = 1024  # smaller payloads are parsed (or read) normally
IN_MEMORY_BUDGET = 64 << 20  # bytes of folded weights kept in memory before the scratch file is used
_COPY_CHUNK = 16 << 20  # the buffer of the read/write fallback of copy_range


class MappedFile:
    """The open input of a mapped model: its model file and external data files, mapped read-only,
    and the scratch file of its folded weights. Stubs refer to byte spans inside them."""

    def __init__(self, path: str | os.PathLike, scratch_dir: str | os.PathLike | None = None):
        self.path = os.fspath(path)
        self.scratch_dir = scratch_dir
        self.had_external_data = False  # set by bnfold.external when the model keeps values outside it
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._held = 0
        self._scratch_file = None
        self.add_file(MODEL_FILE, os.open(path, os.O_RDONLY))
        self.buffer = self._maps.get(MODEL_FILE, b"")  # an empty file is not a model: parsing says so

    def add_file(self, key: str, fd: int) -> None:
        """Take over `fd`, an open regular file, and map it (an empty file is not mapped)."""
        self._fds[key] = fd
        _sequential(fd)
        if os.fstat(fd).st_size:
            self._maps[key] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    def identities(self) -> set[tuple[int, int]]:
        """(device, inode) of the model file and of every external data file."""
        return {_identity(os.fstat(fd)) for key, fd in self._fds.items() if key != SCRATCH}

    def model_identity(self) -> tuple[int, int]:
        return _identity(os.fstat(self._fds[MODEL_FILE]))

    def close(self) -> None:
        for buffer in self._maps.values():
            try:
                buffer.close()
            except BufferError:  # a numpy view is still alive; the mapping closes when it is collected
                pass
        for fd in self._fds.values():
            os.close(fd)
        self._maps.clear()
        self._fds.clear()
        if self._scratch_file is not None:
            self._scratch_file.close()
            self._scratch_file = None

    # ------------------------------------------------------------------------------ reading stubs
    def span(self, stub: onnx.TensorProto) -> tuple[str, int, int]:
        """Where a stub's values are: (file key, start, end)."""
        start, end = _span(stub, "data")
        return _file(stub), start, end

    def release(self, span: tuple[str, int, int]) -> None:
        """Drop a span's pages from this process's memory (they are re-read from the page cache if
        used again): after a weight is folded or written, its old bytes need not stay resident."""
        key, start, end = span
        buffer = self._maps.get(key)
        if buffer is None:
            return
        first = start - start % mmap.PAGESIZE
        try:
            buffer.madvise(mmap.MADV_DONTNEED, first, end - first)
        except (AttributeError, OSError, ValueError):  # not on every platform; only a memory saving
            pass

    def size(self, stub: onnx.TensorProto) -> int:
        """The bytes a stub adds to a model file that holds it: its record, or (a stub of another
        file) its values."""
        start, end = _span(stub, "record" if has_record(stub) else "data")
        return end - start

    def array(self, stub: onnx.TensorProto) -> np.ndarray:
        """The stub's values, read-only: a view of the mapped file (a copy, from the scratch file)."""
        key, start, end = self.span(stub)
        dtype = numpy_dtype(stub.data_type).newbyteorder("<")
        if key in self._maps:
            flat = np.frombuffer(self._maps[key], dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)
        else:
            flat = np.frombuffer(_pread(self._fds[key], end - start, start), dtype=dtype)
        return flat.reshape(tuple(stub.dims))

    # ------------------------------------------------------------------------------ writing stubs
    def write_record(self, stub: onnx.TensorProto, handle) -> None:
        """Write a model-file stub's serialized TensorProto, as it is in the file."""
        start, end = _span(stub, "record")
        copy_range(self._fds[MODEL_FILE], start, end - start, handle)

    def write_data(self, stub: onnx.TensorProto, handle) -> None:
        """Write a stub's values (the bytes of its raw_data)."""
        key, start, end = self.span(stub)
        self._flush_scratch(key)
        copy_range(self._fds[key], start, end - start, handle)

    # ---------------------------------------------------------------------------- folded weights
    def store(self, tensor: onnx.TensorProto, values: np.ndarray, name: str) -> bool:
        """Make `tensor` the initializer `name` holding `values` (a weight a fold wrote) as a stub of
        the scratch file, once such weights pass IN_MEMORY_BUDGET; False (nothing done): the caller
        keeps it in memory. Straight from the array: no bytes object, no protobuf copy."""
        self._held += values.nbytes
        data_type = onnx_type(values.dtype)
        if self._held <= IN_MEMORY_BUDGET or values.nbytes < STUB_MIN_BYTES or data_type not in STUB_TYPES:
            return False
        try:
            scratch = self._scratch()
            start = scratch.seek(0, os.SEEK_END)
            start += scratch.write(bytes(-start % mmap.PAGESIZE))  # page-aligned: a filesystem may share its blocks
            scratch.write(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
        except OSError as exc:
            folder = self.scratch_dir or tempfile.gettempdir()
            chosen = "; TMPDIR chooses the folder" if self.scratch_dir is None else ""
            raise BnfoldError(f"{folder}: cannot write the scratch file of folded weights ({exc.strerror or exc})",
                              note=f"bnfold keeps the weights it folds there once they pass "
                                   f"{IN_MEMORY_BUDGET >> 20} MiB{chosen}") from exc
        tensor.Clear()
        tensor.name = name
        tensor.data_type = data_type
        tensor.dims.extend(values.shape)
        make_stub(tensor, SCRATCH, start, start + values.nbytes)
        return True

    def _scratch(self):
        if self._scratch_file is None:
            # Unlinked at once (not O_TMPFILE, which writes several times slower on ext4): nothing to
            # clean up, whatever happens next.
            with signals_deferred():  # no interrupt between creating the file and unlinking it
                fd, name = tempfile.mkstemp(prefix=".bnfold-", suffix=".scratch", dir=self.scratch_dir)
                os.unlink(name)
                self._scratch_file = os.fdopen(fd, "w+b")
            self._fds[SCRATCH] = os.dup(fd)
            _sequential(fd)
        return self._scratch_file

    def _flush_scratch(self, key: str) -> None:
        if key == SCRATCH:
            self._scratch_file.flush()


def copy_range(fd: int, offset: int, length: int, handle) -> None:
    """Append `length` bytes of file `fd` from `offset` to the binary file `handle`, in the kernel
    (copy_file_range: no copy in this process; some filesystems share the blocks) where it can."""
    handle.flush()
    out = handle.fileno()
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    while length and kernel_copy is not None:
        try:
            done = kernel_copy(fd, out, length, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = 0
        if not done:  # not supported here (or the source ended): copy through a buffer
            break
        offset, length = offset + done, length - done
    while length:
        chunk = _pread(fd, min(length, _COPY_CHUNK), offset)
        handle.write(chunk)
        offset, length = offset + len(chunk), length - len(chunk)
    handle.seek(0, os.SEEK_END)


def _sequential(fd: int) -> None:
    """Tell the kernel a file is read in order (as cp does): a larger readahead window, which
    nearly halves the time of copying unchanged weights. Only a hint, not on every platform."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"file ended {length - len(data)} bytes early")
    return data


def payload_mismatch(tensor: onnx.TensorProto) -> str | None:
    """What onnx's checker says of a stub's or raw tensor's raw_data size that does not match its dims
    and type, or None if it matches. (The checker only refuses one too short; bnfold also refuses one
    too long or not whole elements, which would fail later.)"""
    if is_stub(tensor):
        start, end = _span(tensor, "data")
        size = end - start
    else:
        size = len(tensor.raw_data)
    expected = expected_bytes(tensor)
    if expected is None:
        return f"TensorProto (tensor name: {tensor.name}) has a negative dimension"
    if size != expected:
        return (f"TensorProto (tensor name: {tensor.name}) raw_data size ({size} bytes) does not match "
                f"the declared shape and type ({expected} bytes)")
    return None


def declared_mismatch(stub: onnx.TensorProto, info: onnx.ValueInfoProto) -> str | None:
    """What onnx's shape inference says when a value_info or graph output contradicts a stub's type
    (the checker's weightless copy declares the stub as an input, where it would not look), or None."""
    if not info.type.HasField("tensor_type"):
        return None if info.type.WhichOneof("value") is None else \
            f"[TypeInferenceError] {stub.name} is an initializer (a tensor) declared as {info.type.WhichOneof('value')}"
    declared = info.type.tensor_type
    if declared.elem_type and declared.elem_type != stub.data_type:
        return (f"[TypeInferenceError] Inferred elem type differs from existing elem type: "
                f"({stub.data_type}) vs ({declared.elem_type}) for {stub.name}")
    if not declared.HasField("shape"):
        return None
    if len(declared.shape.dim) != len(stub.dims):
        return (f"[ShapeInferenceError] Inferred shape and existing shape differ in rank: "
                f"({len(stub.dims)}) vs ({len(declared.shape.dim)}) for {stub.name}")
    for axis, (dim, size) in enumerate(zip(declared.shape.dim, stub.dims)):
        if dim.HasField("dim_value") and dim.dim_value != size:
            return (f"[ShapeInferenceError] Inferred shape and existing shape differ in dimension {axis}: "
                    f"({size}) vs ({dim.dim_value}) for {stub.name}")
    return None


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """The raw_data size of a fixed-width tensor from its dims and type; None if a dim is negative."""
    if any(d < 0 for d in tensor.dims):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * numpy_dtype(tensor.data_type).itemsize


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


def has_record(stub: onnx.TensorProto) -> bool:
    """True for a stub of the model file, whose whole serialized TensorProto can be copied."""
    return any(e.key == "record_start" for e in stub.external_data)


def make_stub(tensor: onnx.TensorProto, key: str, start: int, end: int, record_span=None) -> None:
    """Mark `tensor` (without its values) as a stub whose values are bytes [start, end) of file `key`."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", MARK), ("file", key), ("data_start", start), ("data_end", end)]
    if record_span is not None:
        entries += [("record_start", record_span[0]), ("record_end", record_span[1])]
    for name, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = name, str(value)


def _file(stub: onnx.TensorProto) -> str:
    return next(e.value for e in stub.external_data if e.key == "file")


def _span(stub: onnx.TensorProto, kind: str) -> tuple[int, int]:
    entries = {e.key: e.value for e in stub.external_data}
    return int(entries[f"{kind}_start"]), int(entries[f"{kind}_end"])


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def load_mapped(path: str | os.PathLike, scratch_dir: str | os.PathLike | None = None
                ) -> tuple[onnx.ModelProto, MappedFile]:
    """Parse `path` with the main graph's large initializers left in the file as stubs."""
    source = MappedFile(path, scratch_dir)
    try:
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
    except BaseException:
        source.close()
        raise
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
            return None  # external: bnfold.external makes it a stub of its own file
        else:
            header += buffer[at:value_end]
    if data is None or data[1] - data[0] < STUB_MIN_BYTES:
        return None
    stub = onnx.TensorProto()
    stub.ParseFromString(bytes(header))
    if stub.data_type not in STUB_TYPES:
        return None
    make_stub(stub, MODEL_FILE, data[0], data[1], record_span=(start, end))
    return stub
