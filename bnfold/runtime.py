"""onnxruntime sessions for verify, bench and export: created one way, run one way.

A session is made from a model file's path, a ModelProto (serialized, or saved with external data to a
temporary folder when it is 2 GiB or more, which protobuf cannot serialize) or serialized bytes; at an
optimization level named by one of :data:`LEVELS`; on a provider, with the CPU provider as fallback for
the nodes the provider cannot run. Runs take and give numpy arrays of every element type, bfloat16 and
the other ml_dtypes included (onnxruntime's numpy bridge knows none of them).

onnxruntime is imported inside the functions only: modules that merely name levels (the command-line
parser) stay light.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx

from .dtypes import numpy_dtype, onnx_type
from .errors import BnfoldError, first_line

LEVELS = ("disabled", "basic", "extended", "all")  # onnxruntime's graph optimization levels, in order
CPU = "CPUExecutionProvider"
FATAL_ONLY = 4  # onnxruntime's log severity levels: 0 verbose ... 3 error, 4 fatal
_ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

ModelSource = onnx.ModelProto | str | Path | bytes


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def resolve_provider(name: str | None) -> str:
    """The provider called `name` ('cuda' or 'CUDAExecutionProvider'; None is the CPU); raise if absent."""
    if name is None:
        return CPU
    available = available_providers()
    wanted = name.lower()
    for provider in available:
        if provider.lower() in (wanted, wanted + "executionprovider"):
            return provider
    raise BnfoldError(f"execution provider {name} is not available: onnxruntime has no such provider here",
                      note=f"available: {', '.join(available)}", option="provider")


def session_options(level: str = "disabled", *, threads: int | None = None, log_severity: int = FATAL_ONLY):
    """SessionOptions at `level`, sequential, with `threads` intra-op threads (None: onnxruntime's choice).

    The log severity defaults to fatal only: warnings about unused initializers would drown reports,
    and onnxruntime's errors reach the user once, as the one-line error bnfold makes of them.
    """
    import onnxruntime as ort

    if level not in _ORT_LEVELS:
        raise BnfoldError(f"unknown optimization level {level}", note=f"choose from {', '.join(LEVELS)}",
                          option="levels")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[level])
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = log_severity
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def create_session(model: ModelSource, *, level: str = "disabled", provider: str = CPU,
                   threads: int | None = None, label: str = "model", log_severity: int = FATAL_ONLY) -> "Session":
    """A :class:`Session` of `model`; a BnfoldError naming `label` if onnxruntime refuses the model."""
    import onnxruntime as ort

    options = session_options(level, threads=threads, log_severity=log_severity)
    providers = [provider] if provider == CPU else [provider, CPU]
    try:
        with serialized(model) as source:
            session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated types for bad models
        said = first_line(exc)
        if isinstance(model, (str, os.PathLike)):  # onnxruntime quotes the file it was given: say `label`
            said = said.replace(str(model), label)
        raise BnfoldError(f"{label}: onnxruntime cannot create a session ({said})") from exc
    return Session(session, label)


class Session:
    """One model in onnxruntime: feeds and results are numpy arrays of any element type."""

    def __init__(self, session, label: str):
        self.session = session
        self.label = label
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, object], names: list[str] | None = None, *,
            inputs_label: str = "its inputs", note: str | None = None) -> dict[str, np.ndarray]:
        """Outputs `names` (default: all) by name. Feeds are numpy arrays, or OrtValues from
        :func:`ort_values` (to keep the conversion out of a timed run)."""
        names = names or self.output_names
        try:
            values = self.session.run_with_ort_values(names, ort_values(feeds))
        except Exception as exc:  # onnxruntime raises several unrelated types for run failures
            raise BnfoldError(f"{self.label}: onnxruntime failed on {inputs_label} ({first_line(exc)})",
                              note=note) from exc
        inputs = {i.name for i in self.session.get_inputs()}
        # an output that is also an input is a view of the feed's memory, which the caller may free
        return {name: np.array(to_numpy(value, name, self.label), copy=True) if name in inputs
                else to_numpy(value, name, self.label) for name, value in zip(names, values)}


def file_or_proto(given: ModelSource, loaded: onnx.ModelProto) -> onnx.ModelProto | str:
    """What to give onnxruntime for a model the caller `given` and loaded: the file when there is one
    (onnxruntime reads it itself; serializing a large proto again is slow), else the proto."""
    return str(given) if isinstance(given, (str, Path)) else loaded


@contextlib.contextmanager
def serialized(model: ModelSource) -> Iterator[str | bytes]:
    """What onnxruntime loads: a path or bytes as they are; a proto as bytes, or when it is 2 GiB or
    more, as a temporary file with external data that lives as long as the block."""
    if isinstance(model, (str, Path)):
        yield str(model)
        return
    if isinstance(model, bytes):
        yield model
        return
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses messages of 2 GiB or more
        data = None
    if data is not None:
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="bnfold-ort-") as folder:
        path = Path(folder) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data rewrites the tensors it saves
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        yield str(path)


def ort_values(feeds: Mapping[str, object]) -> dict[str, object]:
    """Each numpy array as an OrtValue; OrtValues pass through."""
    return {name: to_ort_value(value) if isinstance(value, np.ndarray) else value
            for name, value in feeds.items()}


def to_ort_value(array: np.ndarray):
    """numpy -> OrtValue; bfloat16 and the other ml_dtypes go as raw bytes with their ONNX type."""
    import onnxruntime as ort

    array = np.ascontiguousarray(array)
    if array.dtype.kind != "V":
        return ort.OrtValue.ortvalue_from_numpy(array)
    raw = array.view(np.dtype(f"u{array.dtype.itemsize}"))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_type(array.dtype))


def to_numpy(value, name: str, label: str) -> np.ndarray:
    """OrtValue -> numpy. onnxruntime cannot give bfloat16 (or float8) to numpy: copy their bytes."""
    if not value.is_tensor():
        raise BnfoldError(f"{label}: output {name!r} is not a tensor; only tensors can be compared")
    dtype = numpy_dtype(value.element_type())
    if dtype.kind != "V":
        return value.numpy()
    shape = tuple(value.shape())
    size = value.tensor_size_in_bytes()
    if size != dtype.itemsize * math.prod(shape) or "cpu" not in value.device_name().lower():
        raise BnfoldError(f"{label}: output {name!r} is {dtype} and cannot be read back",
                          note="packed types are read from CPU memory only")
    if size == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_uint8 * size).from_address(value.data_ptr())
    return np.frombuffer(raw, np.uint8).copy().view(dtype).reshape(shape)
