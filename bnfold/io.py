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
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import BnfoldError

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GiB or more
# Above this size a model is checked from its file: check_model() on a proto of that size fails.
_CHECK_FROM_FILE = PROTOBUF_LIMIT // 2


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data; raise BnfoldError if it is not a valid model."""
    path = Path(path)
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise BnfoldError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise BnfoldError(f"{path}: not an ONNX model ({_short(exc)})") from exc
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not model.HasField("graph") or model.ir_version <= 0:
        raise BnfoldError(f"{path}: not an ONNX model (no graph or no IR version)")
    if _has_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # onnx raises several types for bad or unsafe locations
            raise BnfoldError(
                f"{path}: cannot load external data ({_short(exc)})",
                note="external data files must sit next to the model, inside its folder",
            ) from exc
    if check:
        check_model(model, path)
    return model


def check_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    """Run onnx's full checker; raise BnfoldError with its first line if the model is invalid."""
    where = f"{path}: " if path else ""
    try:
        if path is not None and model.ByteSize() > _CHECK_FROM_FILE:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BnfoldError(
            f"{where}the ONNX checker rejects this model: {_short(exc)}",
            note="bnfold only rewrites models that onnx.checker.check_model accepts",
        ) from exc


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> None:
    """Write `model` to `path` atomically; use external data if asked or if it is too large."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BnfoldError(f"{path}: output folder {folder} does not exist")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory")
    external_data = external_data or model.ByteSize() >= PROTOBUF_LIMIT
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        staged = staging / path.name
        if external_data:
            data_name = f"{path.name}.data"
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            if (staging / data_name).exists():
                os.replace(staging / data_name, folder / data_name)
        else:
            with open(staged, "wb") as handle:
                handle.write(model.SerializeToString())
        os.replace(staged, path)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.external_data_helper._get_all_tensors(model))


def _short(exc: BaseException) -> str:
    """First non-empty line of an exception message, for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
