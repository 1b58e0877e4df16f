"""Loading and saving models safely.

Loading turns every way a file can fail to be a model (missing, empty, not protobuf, rejected by the
checker, external data that is unreadable or outside the model's folder) into one :class:`BnfoldError`.
Saving is atomic: the model (and its external data, if any) is written into a private temporary folder
next to the target and renamed into place, so a failure never leaves a partial or temporary file behind
and never touches the input. A new file gets the mode a normal write gives it (0666 & ~umask); a
regular file that is replaced keeps its mode; a symlink at the target is replaced, never followed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .dtypes import to_array
from .errors import BnfoldError, first_line, signals_deferred
from .graph import all_graphs
from .external import DataFile, attach, bare, data_file_name
from .mapped import (STUB_TYPES, MappedFile, declared_mismatch, has_record, is_stub, load_mapped, payload_mismatch,
                     weightless)
from .wire import (GRAPH, INITIALIZER, RAW_DATA, VALUE_FIELDS, copy_field, record, record_prefix,
                   tensor_payload_bytes)

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GiB or more
OWN_CHECK = "bnfold's check of the mapped weights"  # the checker's rules on what its weightless copy lacks
WEIGHTS_CHECK = "bnfold's check of the weights"  # the same, of a model in memory
WEIGHTLESS_BYTES = 4096  # initializers of the main graph up to this size stay in the checker's weightless copy


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data; raise BnfoldError if it is not a valid model.

    The checker runs on the file before Python parses it, so the two copies never coexist in memory.
    """
    path = Path(path)
    _validate_file(path, check)
    model = _parse(path)
    _check_names(model, path)
    return model


def open_model(path: str | os.PathLike, scratch_dir: str | os.PathLike | None = None
               ) -> tuple[onnx.ModelProto, MappedFile | None]:
    """Like load_model, but large initializers stay in their files (the model file or its external
    data files), mapped: see bnfold.mapped. Close the returned MappedFile after saving. Folded
    weights past a memory budget wait in an unnamed scratch file in `scratch_dir` (default: the
    system's temporary folder).

    The model is checked by check_weightless: the same verdict as checking the file, without a
    second copy of the weights in memory."""
    path = Path(path)
    _validate_file(path, check=False)
    try:
        model, source = load_mapped(path, scratch_dir)
    except (OSError, ValueError, IndexError, DecodeError):
        return load_model(path), None  # let the file checker say what is wrong with it
    if not model.HasField("graph") or model.ir_version <= 0:
        source.close()
        return load_model(path), None
    try:
        attach(model, path, source)
        check_weightless(model, path, by=OWN_CHECK)
    except BaseException:
        source.close()
        raise
    return model, source


def check_weightless(model: onnx.ModelProto, path: Path | None = None, by: str = WEIGHTS_CHECK) -> None:
    """onnx's full checker's verdict on `model` (mapped or in memory) without a second copy of its
    weights: onnx's checker on its weightless copy (bnfold.mapped.weightless), and bnfold's own check,
    by the checker's rules, of what that copy lacks (`by` names it in the error): the main graph's
    large initializers, declared there as inputs; then bnfold's refusal of names that are not UTF-8
    text. Raise BnfoldError, prefixed with `path` if given. onnx's checker on the whole model would
    serialize it and parse that again: two more copies."""
    problem = _unseen_problem(model)
    if problem is not None:
        raise _rejected(path, problem, by=by)
    try:
        onnx.checker.check_model(weightless(model, WEIGHTLESS_BYTES), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise _rejected(path, first_line(exc)) from exc  # ValueError: an unknown data type, a name not UTF-8...
    problem = next(filter(None, map(_count_problem, _unsized_tensors(model))), None)
    if problem is not None:
        raise _rejected(path, problem, by=by)
    _check_names(model, path)


def _unseen_problem(model: onnx.ModelProto) -> str | None:
    """What onnx's checker would say of the tensors its weightless copy declares as inputs (`unseen`):
    each one's values, its listing among the graph inputs before IR 4, and the types declared for
    it; also of every raw_data size, which the checker refuses only if too short. None if all is well."""
    graph = model.graph
    unseen = {t.name: t for t in graph.initializer if is_stub(t) or tensor_payload_bytes(t) > WEIGHTLESS_BYTES}
    inputs = {v.name for v in graph.input}
    problems = itertools.chain(
        (payload_mismatch(t) for t in graph.initializer if is_stub(t) or _raw(t)),
        map(_values_problem, unseen.values()),
        (f"{name} in initializer but not in graph input" for name in unseen
         if model.ir_version < 4 and name not in inputs),
        (declared_mismatch(unseen[v.name], v) for v in (*graph.input, *graph.value_info, *graph.output)
         if v.name in unseen))
    return next(filter(None, problems), None)


def _unsized_tensors(model: onnx.ModelProto):
    """The tensors of every graph (initializers, node attributes) whose size payload_mismatch does not
    check: values in a typed field (float_data, int32_data, ...), or raw_data of a type it does not
    size (float8, int4, ...); not external data or a mapped file."""
    for graph in all_graphs(model.graph):
        tensors = [*graph.initializer, *(t for node in graph.node for attr in node.attribute
                                         for t in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors))]
        yield from (t for t in tensors if not is_stub(t) and not _raw(t) and t.data_location != onnx.TensorProto.EXTERNAL)


def _count_problem(tensor: onnx.TensorProto) -> str | None:
    """Values that are not one per element of the tensor's shape (onnx's checker counts them only
    since onnx 1.23; reading the tensor would fail), or None."""
    try:
        to_array(tensor)
    except ValueError as exc:  # numpy: cannot reshape an array of the field's size into the shape
        return (f"TensorProto (tensor name: {tensor.name}) does not hold one value per element of its shape "
                f"{list(tensor.dims)} ({first_line(exc)})")
    return None


def _raw(tensor: onnx.TensorProto) -> bool:
    """A tensor whose values are a plain array in raw_data, sized by payload_mismatch."""
    return (tensor.data_type in STUB_TYPES and tensor.HasField("raw_data")
            and tensor.data_location != onnx.TensorProto.EXTERNAL)


def _values_problem(tensor: onnx.TensorProto) -> str | None:
    """The checker's verdict on one tensor it does not see. A raw or mapped array, whose size
    payload_mismatch checked, must hold no other value field; any other tensor goes to the checker
    itself (one tensor copied at a time)."""
    if is_stub(tensor) or _raw(tensor):
        others = any(len(getattr(tensor, name)) for name in VALUE_FIELDS[1:])
        return f"TensorProto (tensor name: {tensor.name}) should contain one and only one value field." \
            if others else None
    try:
        onnx.checker.check_tensor(tensor)
    except (onnx.checker.ValidationError, ValueError) as exc:
        return first_line(exc)
    return None


def _check_names(model: onnx.ModelProto, path: Path | None) -> None:
    """Refuse a name that is not UTF-8 text: protobuf hands it over as bytes, which no report, table or
    JSON can show, and onnx's checker does not look at node and value names."""
    for graph in all_graphs(model.graph):
        values = [graph.input, graph.output, graph.value_info, graph.initializer]
        names = [graph.name] + [v.name for group in values for v in group]
        for node in graph.node:
            names += [node.name, node.op_type, node.domain, *node.input, *node.output]
        bad = next((name for name in names if not isinstance(name, str)), None)
        if bad is not None:
            raise _rejected(path, f"the name {bad!r} is not UTF-8 text", by="bnfold")


def _rejected(path: Path | None, reason: str, by: str = "the ONNX checker") -> BnfoldError:
    """A model (at `path`, or in memory) refused by `by`: onnx's checker, or bnfold's own check of
    the weights the checker does not see, which applies the checker's rules."""
    return BnfoldError(f"{path}: {by} rejects this model: {reason}" if path is not None else
                       f"{by} rejects this model: {reason}",
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
    attach(model, path)
    return model


def _check_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
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
    """Write `model` to `path` atomically, streamed, without changing `model`.

    The values of its large initializers go to ``<path>.data`` (bnfold.external) if `external_data`
    is asked for, if the input (`source`) kept them in external data files, or if the model would
    pass protobuf's 2 GiB limit. `source` is the mapped input that the model's stubs (see
    bnfold.mapped) point into; no file of the input is overwritten unless `path` is the input
    itself (in place). `accept(staged_path)` runs on the complete staged model (its data beside it)
    before anything is renamed into place; if it raises, nothing is written."""
    path = Path(path)
    check_output_path(path)
    external_data = external_data or (source is not None and source.had_external_data) \
        or _initializer_bytes(model, source) >= PROTOBUF_LIMIT - (64 << 20)
    data_path = path.with_name(data_file_name(path)) if external_data else None
    _refuse_overwriting_inputs(path, data_path, source)
    try:
        with _staging(path) as staging:
            staged = staging / path.name
            staged_data = staging / data_path.name if data_path is not None else None
            _write_staged(model, staged, staged_data, source)
            if accept is not None:
                accept(staged)
            outputs = [(staged, path)]
            if staged_data is not None and staged_data.stat().st_size:  # no large initializer: no data file
                outputs.insert(0, (staged_data, data_path))
            _publish(outputs)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def _write_staged(model: onnx.ModelProto, staged: Path, staged_data: Path | None, source) -> None:
    with open(staged, "wb") as out:
        if staged_data is None:
            write_model(model, out, source)
            return
        with open(staged_data, "wb") as data:
            write_model(model, out, source, DataFile(data, staged_data.name))


def _refuse_overwriting_inputs(path: Path, data_path: Path | None, source: MappedFile | None) -> None:
    """Writing over a file of the input (its external data, say) would change the input; only
    replacing the input model itself (in place) may replace its files. A symlink at the target is
    replaced, not followed, so it is no input's file."""
    if data_path is not None and data_path.is_dir():
        raise BnfoldError(f"{data_path}: is a directory", note="the external data of OUT is written to OUT.data")
    if source is None or _identity(path, follow=False) == source.model_identity():
        return
    inputs = source.identities()
    for target in (path, data_path):
        if target is not None and _identity(target, follow=False) in inputs:
            raise BnfoldError(f"{target}: is a file of the input model {source.path}; writing it would change "
                              "the input", note="write the output to another folder or name, or replace the input with --in-place")


def _identity(path: Path, follow: bool) -> tuple[int, int] | None:
    try:
        found = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return found.st_dev, found.st_ino


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
    """Yield a temporary file (named like `path`, in a private folder next to it) to write; rename it
    to `path` only if the block succeeds, with the mode of the regular file it replaces, or else the
    mode a new file gets (0666 & ~umask). Whatever happens, no temporary file is left, and an OSError
    becomes a BnfoldError."""
    path = Path(path)
    try:
        with _staging(path) as staging:
            staged = staging / path.name
            staged.touch()
            yield staged
            _publish([(staged, path)])
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write ({exc.strerror or exc})") from exc


@contextmanager
def _staging(path: Path):
    """A private folder (mode 0700) next to `path` for its staged files; removed whatever happens."""
    folder = check_output_path(path)
    staging = None
    try:
        with signals_deferred():  # an interrupt lands after `staging` is set, inside the try
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
        yield staging
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _publish(outputs: list[tuple[Path, Path]]) -> None:
    """Rename staged files to their targets, the model (last) after its data file. All get the mode
    of the regular file the model replaces, as a normal write keeps it (--in-place keeps the input's
    mode), or the mode the staged model was created with (0666 & ~umask)."""
    staged_model, target = outputs[-1]
    mode = _kept_mode(target)
    if mode is None:
        mode = stat.S_IMODE(os.stat(staged_model).st_mode)
    for staged, _ in outputs:
        os.chmod(staged, mode)
    for staged, destination in outputs:
        os.replace(staged, destination)


def _kept_mode(target: Path) -> int | None:
    try:
        found = os.lstat(target)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(found.st_mode) & 0o777 if stat.S_ISREG(found.st_mode) else None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a report) atomically."""
    with atomic_output(path) as staged:
        staged.write_text(text)


def write_model(model: onnx.ModelProto, handle, source: MappedFile | None = None, data: DataFile | None = None) -> None:
    """Serialize `model` one initializer at a time instead of as one giant bytes object.

    Protobuf merges repeated occurrences of an embedded message field, so the graph is written as
    several `graph` records: first the graph without its initializers, then one record per
    initializer. Any protobuf parser reads back exactly the same model; peak memory grows by the
    largest tensor instead of by the whole model. An unchanged stub's bytes are copied from its file
    (`source`) by the kernel. With `data`, the external data file, every large initializer's values
    go there and the model file keeps its fields (bnfold.external).
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
    if data is not None:
        data.add_nested(skeleton)
    handle.write(record(GRAPH, skeleton.SerializeToString()))
    for tensor in graph.initializer:
        _write_initializer(tensor, handle, source, data)


def _write_initializer(tensor: onnx.TensorProto, handle, source: MappedFile | None, data: DataFile | None) -> None:
    stub = is_stub(tensor)
    if stub and source is None:
        raise ValueError(f"initializer {tensor.name} is a stub of a mapped file that is not given")
    header = data.add(tensor, source) if data is not None else None
    if header is not None:
        body = header.SerializeToString()
        _write_prefix(handle, len(body))
        handle.write(body)
    elif stub and has_record(tensor):
        _write_prefix(handle, source.size(tensor))
        source.write_record(tensor, handle)
    elif stub:
        _write_inline(tensor, handle, source)
    else:
        body = tensor.SerializeToString()
        _write_prefix(handle, len(body))
        handle.write(body)  # large: written as is, never concatenated


def _write_prefix(handle, length: int) -> None:
    """The keys and lengths of one initializer record of `length` bytes, inside its own graph record."""
    inner = record_prefix(INITIALIZER, length)
    handle.write(record_prefix(GRAPH, len(inner) + length) + inner)


def _write_inline(stub: onnx.TensorProto, handle, source: MappedFile) -> None:
    """A stub of a file other than the model file (a folded weight in the scratch file, which has
    only a name, type and dims) as a complete TensorProto, its values in raw_data: the bytes protobuf
    would write, since raw_data's field number is above the others'."""
    header = bare(stub).SerializeToString()
    _, start, end = source.span(stub)
    raw = record_prefix(RAW_DATA, end - start)
    _write_prefix(handle, len(header) + len(raw) + end - start)
    handle.write(header + raw)
    source.write_data(stub, handle)


def _initializer_bytes(model: onnx.ModelProto, source: MappedFile | None) -> int:
    """The serialized size of the main graph's initializer values (a stub: what it adds to the
    file), which is most of a large model; the margin under PROTOBUF_LIMIT covers the rest. Cheaper
    than model.ByteSize(), which encodes the whole model."""
    return sum((source.size(t) if source is not None else 0) if is_stub(t) else tensor_payload_bytes(t)
               for t in model.graph.initializer)
