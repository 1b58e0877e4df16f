"""Loading and saving models safely.

Loading turns every way a file can fail to be a model (missing, empty, not protobuf, rejected by the
checker, unreadable external data) into one :class:`BnfoldError`. Saving is atomic: the model (and its
external data, if any) is written into a temporary folder next to the target and renamed into place,
so a failure never leaves a partial or temporary file behind and never touches the input.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import BnfoldError, first_line
from .mapped import MappedFile, is_stub, load_mapped, payload_mismatch, weightless
from .wire import GRAPH, INITIALIZER, copy_field, record, record_prefix, tensor_payload_bytes

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GiB or more


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data; raise BnfoldError if it is not a valid model.

    The checker runs on the file before Python parses it, so the two copies never coexist in memory.
    """
    path = Path(path)
    _validate_file(path, check)
    return _parse(path)


def open_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, MappedFile | None]:
    """Like load_model, but large initializers stay in the mapped file (see bnfold.mapped) unless
    the model uses external data. Close the returned MappedFile after saving.

    The checker then runs on a weightless copy (bnfold.mapped.weightless) and bnfold checks each
    stub's payload size itself: the same verdict as checking the file, without a second copy of the
    weights in memory."""
    path = Path(path)
    _validate_file(path, check=False)
    try:
        model, source = load_mapped(path)
    except (OSError, ValueError, IndexError, DecodeError):
        return load_model(path), None  # let the file checker say what is wrong with it
    if _has_external_data(model, ignore_stubs=True) or not model.HasField("graph") or model.ir_version <= 0:
        source.close()
        return load_model(path), None
    try:
        _check_mapped(model, path)
    except BnfoldError:
        source.close()
        raise
    return model, source


def _check_mapped(model: onnx.ModelProto, path: Path) -> None:
    stubs = [t for t in model.graph.initializer if is_stub(t)]
    for stub in stubs:
        problem = payload_mismatch(stub)
        if problem:
            raise _rejected(path, problem)
    if model.ir_version < 4:
        inputs = {v.name for v in model.graph.input}
        missing = next((t.name for t in stubs if t.name not in inputs), None)
        if missing:
            raise _rejected(path, f"{missing} in initializer but not in graph input")
    try:
        onnx.checker.check_model(weightless(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise _rejected(path, first_line(exc)) from exc


def _rejected(path: Path, reason: str) -> BnfoldError:
    return BnfoldError(f"{path}: the ONNX checker rejects this model: {reason}",
                       note="bnfold only rewrites models that onnx.checker.check_model accepts")


def _validate_file(path: Path, check: bool) -> None:
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise BnfoldError(f"{path}: file is empty")
    if check:
        _check_file(path)


def _parse(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise BnfoldError(f"{path}: not an ONNX model ({first_line(exc)})") from exc
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not model.HasField("graph") or model.ir_version <= 0:
        raise BnfoldError(f"{path}: not an ONNX model (no graph or no IR version)")
    if _has_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # onnx raises several types for bad or unsafe locations
            raise BnfoldError(
                f"{path}: cannot load external data ({first_line(exc)})",
                note="external data files must sit next to the model, inside its folder",
            ) from exc
    return model


def _check_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if "Unable to parse proto" in str(exc):
            raise BnfoldError(f"{path}: not an ONNX model (not a protobuf ModelProto)") from exc
        if "does not have an ir_version" in str(exc):
            raise BnfoldError(f"{path}: not an ONNX model (no IR version)") from exc
        raise _rejected(path, first_line(exc)) from exc


def check_model(model: onnx.ModelProto) -> None:
    """Run onnx's full checker on an in-memory model; raise BnfoldError with its first line."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BnfoldError(
            f"the ONNX checker rejects this model: {first_line(exc)}",
            note="bnfold only rewrites models that onnx.checker.check_model accepts",
        ) from exc


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               source: MappedFile | None = None, accept=None) -> None:
    """Write `model` to `path` atomically; use external data if asked or if it is too large.
    `source` is the mapped input file that the model's stubs (see bnfold.mapped) point into.
    `accept(staged_path)` runs on the complete file before it is renamed into place; if it raises,
    nothing is written. Saving with external data moves `model`'s weights out of it (onnx does so in
    place; a copy would double the memory of a model too large for one file)."""
    path = Path(path)
    folder = check_output_path(path)
    external_data = external_data or _initializer_bytes(model, source) >= PROTOBUF_LIMIT - (64 << 20)
    try:
        if external_data:
            _save_with_external_data(model, path, folder, source, accept)
        else:
            _save_streamed(model, path, source, accept)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def _save_streamed(model, path: Path, source, accept) -> None:
    with atomic_output(path) as staged:
        with open(staged, "wb") as out:
            write_model(model, out, source)
        if accept is not None:
            accept(staged)


def _save_with_external_data(model, path: Path, folder: Path, source, accept) -> None:
    """The model and OUT.data are staged together in a temporary folder, then both renamed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        staged, data_name = staging / path.name, f"{path.name}.data"
        _materialize_stubs(model, source)
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if accept is not None:
            accept(staged)
        if (staging / data_name).exists():
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_path(path: str | os.PathLike) -> Path:
    """The existing folder `path` will be written into; refuse a missing folder or a directory."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BnfoldError(f"{path}: output folder {folder} does not exist")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory")
    return folder


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary file in `path`'s folder to write; rename it to `path` only if the block
    succeeds. Whatever happens, no temporary file is left, and an OSError becomes a BnfoldError."""
    path = Path(path)
    folder = check_output_path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a report) atomically."""
    with atomic_output(path) as staged:
        staged.write_text(text)


def write_model(model: onnx.ModelProto, handle, source: MappedFile | None = None) -> None:
    """Serialize `model` one initializer at a time instead of as one giant bytes object.

    Protobuf merges repeated occurrences of an embedded message field, so the graph is written as
    several `graph` records: first the graph without its initializers, then one record per
    initializer. Any protobuf parser reads back exactly the same model; peak memory grows by the
    largest tensor instead of by the whole model. Unchanged stubs are copied from `source` as bytes.
    """
    graph = model.graph
    head = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            copy_field(head, field, value)
    handle.write(head.SerializeToString())
    skeleton = onnx.GraphProto()
    for field, value in graph.ListFields():
        if field.name != "initializer":
            copy_field(skeleton, field, value)
    handle.write(record(GRAPH, skeleton.SerializeToString()))
    for tensor in graph.initializer:
        if is_stub(tensor):
            if source is None:
                raise ValueError(f"initializer {tensor.name} is a stub of a mapped file that is not given")
            body = source.body(tensor)
        else:
            body = tensor.SerializeToString()
        inner = record_prefix(INITIALIZER, len(body))
        handle.write(record_prefix(GRAPH, len(inner) + len(body)) + inner)
        handle.write(body)  # large: written as is, never concatenated
        if is_stub(tensor):
            del body
            source.release(source.span(tensor))


def _materialize_stubs(model: onnx.ModelProto, source: MappedFile | None) -> None:
    for tensor in model.graph.initializer:
        if is_stub(tensor):
            tensor.CopyFrom(source.tensor(tensor))


def _initializer_bytes(model: onnx.ModelProto, source: MappedFile | None) -> int:
    """The serialized size of the main graph's initializer values (a stub: its record in `source`),
    which is most of a large model; the margin under PROTOBUF_LIMIT covers the rest. Cheaper than
    model.ByteSize(), which encodes the whole model."""
    return sum((source.size(t) if source is not None else 0) if is_stub(t) else tensor_payload_bytes(t)
               for t in model.graph.initializer)


def _has_external_data(model: onnx.ModelProto, ignore_stubs: bool = False) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) and not (ignore_stubs and is_stub(t))
               for t in onnx.external_data_helper._get_all_tensors(model))
