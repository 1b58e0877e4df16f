"""The inputs verify and bench feed to two models: declared, checked, then generated or loaded.

Both models must declare the same inputs (names, element types, ranks); a difference is a user error,
because no single feed could then be valid for both. Feeds are either generated from a seed (floats,
bfloat16 included, from a standard normal; integers uniform in [0, INT_HIGH); bools fair coins) or
loaded from .npz files.

Shape text (one grammar for verify's and bench's shapes and export's input shapes): DIMS is positive
integers joined by ``x`` or ``X`` (``1x3x224x224``), surrounding spaces ignored; a shape is
``NAME=DIMS``, where NAME may itself contain ``=`` and ``NAME=`` (empty DIMS) is a scalar.

Symbolic dimensions get their values from the given shapes, else by a documented default: a symbolic
dim 0 is the batch and is tried at every value of ``batches`` (verify: BATCHES, since a correct fold is
batch-independent and a fold that baked in batch statistics only shows at a batch other than 1; bench:
its one `batch`); any other symbolic dim is OTHER_DIM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from .dtypes import numpy_dtype
from .errors import BnfoldError

BATCHES = (1, 2)  # values tried for a free symbolic dim 0
OTHER_DIM = 32  # value of any other free symbolic dim: enough for the pooling of image models, quick
DEFAULTS_NOTE = "symbolic dims set to defaults: "  # how ShapePlan.note begins
INT_HIGH = 8  # generated integers are uniform in [0, INT_HIGH): small, non-negative, valid as indices
INPUT_KEY = "input:"  # .npz key prefixes written by `bnfold export --reference`
OUTPUT_KEY = "output:"

Dim = int | str | None  # fixed size, named symbolic dim, or unnamed symbolic dim


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, ONNX element type and dims (None when the rank is not declared)."""

    name: str
    elem_type: int
    dims: tuple[Dim, ...] | None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.elem_type)


@dataclass(frozen=True)
class Sample:
    """One feed for the models: a label for the report, and an array per input name."""

    label: str
    feeds: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray] | None = None  # saved outputs, for verify_against_reference


def dtype_name(elem_type: int) -> str:
    """`float32`, `bfloat16`, `int64`...: the name users know, for messages and reports."""
    return str(numpy_dtype(elem_type))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers, in declaration order."""
    initializers = {t.name for t in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in initializers]


def _spec(value_info: onnx.ValueInfoProto) -> InputSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise BnfoldError(f"input {value_info.name!r} is a {kind or 'untyped value'}, not a tensor",
                          note="only tensors can be fed")
    tensor = value_info.type.tensor_type
    dims = None
    if tensor.HasField("shape"):
        dims = tuple(_dim(d) for d in tensor.shape.dim)
    negative = [d for d in dims or () if isinstance(d, int) and d < 0]
    if negative:  # onnx's checker lets them through; no tensor has such a shape
        raise BnfoldError(f"input {value_info.name!r} declares a negative dim ({negative[0]})",
                          note="a dim is a size, 0 or more, or symbolic")
    return InputSpec(value_info.name, tensor.elem_type, dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None


def merge_specs(reference: list[InputSpec], candidate: list[InputSpec],
                roles: tuple[str, str] = ("reference", "candidate")) -> list[InputSpec]:
    """The inputs both models accept, in the first one's order; raise if they declare them differently.

    Where one model fixes a dim that the other leaves symbolic, the fixed size wins. `roles` name the
    two models in messages.
    """
    ref_names, cand_names = [s.name for s in reference], {s.name for s in candidate}
    if set(ref_names) != cand_names:
        raise BnfoldError(
            f"the models declare different inputs: {roles[0]} {_names(ref_names)}, "
            f"{roles[1]} {_names(s.name for s in candidate)}",
            note="two models that take the same inputs can be compared")
    by_name = {s.name: s for s in candidate}
    return [_merge_one(spec, by_name[spec.name], roles) for spec in reference]


def _merge_one(ref: InputSpec, cand: InputSpec, roles: tuple[str, str]) -> InputSpec:
    first, second = roles
    if ref.elem_type != cand.elem_type:
        raise BnfoldError(f"input {ref.name!r} is {ref.dtype_name} in the {first} but "
                          f"{cand.dtype_name} in the {second}")
    if ref.dims is None or cand.dims is None:
        return ref if cand.dims is None else cand
    if len(ref.dims) != len(cand.dims):
        raise BnfoldError(f"input {ref.name!r} has rank {len(ref.dims)} in the {first} but "
                          f"rank {len(cand.dims)} in the {second}")
    merged = []
    for axis, (a, b) in enumerate(zip(ref.dims, cand.dims)):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise BnfoldError(f"input {ref.name!r} dim {axis} is {a} in the {first} but {b} in "
                              f"the {second}")
        merged.append(_merge_dim(a, b))
    return InputSpec(ref.name, ref.elem_type, tuple(merged))


def _merge_dim(a: Dim, b: Dim) -> Dim:
    """A fixed size over a named symbolic dim over an unnamed one."""
    if isinstance(a, int):
        return a
    if isinstance(b, int):
        return b
    return a if a is not None else b


def _names(names) -> str:
    return "(" + ", ".join(repr(n) for n in names) + ")"


# ------------------------------------------------------------------------------------------- shapes
_DIMS = re.compile(r"[0-9]+(?:[xX][0-9]+)*")
SHAPE_EXAMPLE = "input=1x3x224x224"


def parse_dims(text: str, option: str | None = None) -> tuple[int, ...]:
    """``1x3x224x224`` (or ``1X3X224X224``) -> (1, 3, 224, 224); every dim a positive integer.

    `option` is the parameter the text came from, for the error.
    """
    compact = text.strip()
    if not _DIMS.fullmatch(compact):
        raise BnfoldError(f"bad shape {text!r}: dims must be positive integers joined by 'x'",
                          note="for example 1x3x224x224", option=option)
    shape = tuple(int(d) for d in compact.lower().split("x"))
    if 0 in shape:
        raise BnfoldError(f"bad shape {text!r}: a dim of 0 makes an empty tensor", option=option)
    return shape


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=1x3x224x224`` -> ("NAME", (1, 3, 224, 224)); ``NAME=`` is a scalar. Names may contain '='."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise BnfoldError(f"expected NAME=DIMS, got {text!r}", note=f"for example {SHAPE_EXAMPLE}",
                          option="shapes")
    if not dims.strip():
        return name, ()
    try:
        return name, parse_dims(dims)
    except BnfoldError as exc:
        raise BnfoldError(f"{name}={dims}: {exc.message}", note=f"for example {SHAPE_EXAMPLE}",
                          option="shapes") from None


def _check_shape(spec: InputSpec, shape: tuple[int, ...], source: str, option: str | None = None) -> None:
    """Raise unless `shape` is one the model declares valid for `spec` (same rank, same fixed dims)."""
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise BnfoldError(f"{source}input {spec.name!r} has rank {len(spec.dims)} "
                          f"({_show_dims(spec.dims)}), got shape {show_shape(shape)}", option=option)
    for axis, (want, got) in enumerate(zip(spec.dims, shape)):
        if isinstance(want, int) and want != got:
            raise BnfoldError(f"{source}input {spec.name!r} dim {axis} is fixed at {want}, "
                              f"got shape {show_shape(shape)}", option=option)


def show_shape(shape) -> str:
    """(1, 3, 8) -> ``1x3x8``; () -> ``scalar``."""
    return "x".join(str(d) for d in shape) or "scalar"


def _show_dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


@dataclass(frozen=True)
class ShapePlan:
    """Concrete shapes for every input: one mapping per batch value tried, and what was chosen."""

    shapes: list[dict[str, tuple[int, ...]]]
    batches: tuple[int | None, ...]  # the batch of each entry of `shapes`; (None,) when not free
    note: str | None  # one line saying which defaults were chosen, or None if none were


def plan_shapes(specs: list[InputSpec], user: Mapping[str, tuple[int, ...]],
                batches: tuple[int, ...] = BATCHES) -> ShapePlan:
    """Resolve every dim: the given shapes first (they also bind named dims elsewhere), then the
    defaults; a free symbolic dim 0 takes each value of `batches` in turn."""
    known = {s.name for s in specs}
    for name in user:
        if name not in known:
            raise BnfoldError(f"{name}=...: the models have no input {name!r}",
                              note=f"inputs: {', '.join(sorted(known))}", option="shapes")
    bound: dict[str, int] = {}
    for spec in specs:
        if spec.name in user:
            _check_shape(spec, user[spec.name], "", option="shapes")
            for want, got in zip(spec.dims or (), user[spec.name]):
                if isinstance(want, str):
                    bound.setdefault(want, got)
    free = [s.dims[0] for s in specs if s.name not in user and s.dims and _is_free(s.dims[0], bound)]
    batch_names = {dim for dim in free if dim is not None}  # such a dim is the batch wherever it is
    tried = tuple(batches) if free else (None,)
    chosen: dict[str, str] = {}
    shapes = [{s.name: _resolve(s, user, bound, batch_names, batch, batches, chosen) for s in specs}
              for batch in tried]
    note = None
    if chosen:
        note = DEFAULTS_NOTE + ", ".join(f"{k} = {v}" for k, v in chosen.items())
    return ShapePlan(shapes, tried, note)


def _is_free(dim: Dim, bound) -> bool:
    return dim is None or (isinstance(dim, str) and dim not in bound)


def _resolve(spec: InputSpec, user, bound, batch_names, batch, batches, chosen) -> tuple[int, ...]:
    if spec.name in user:
        return user[spec.name]
    if spec.dims is None:
        raise BnfoldError(f"input {spec.name!r} declares no shape",
                          note=f"give its shape as {spec.name}=DxDx..., or its values in .npz files",
                          option="shapes")
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str) and dim in bound:
            shape.append(bound[dim])
        elif dim in batch_names or (axis == 0 and dim is None):
            shape.append(batch)
            chosen[f"{dim or spec.name + '[0]'} (batch)"] = " and ".join(map(str, batches))
        else:
            shape.append(OTHER_DIM)
            chosen[dim or f"{spec.name}[{axis}]"] = str(OTHER_DIM)
    return tuple(shape)


# --------------------------------------------------------------------------------------- generation
def generate_samples(specs: list[InputSpec], plan: ShapePlan, samples: int, seed: int) -> list[Sample]:
    """`samples` seeded feeds per batch value; the same seed always gives the same arrays."""
    result = []
    for shapes, batch in zip(plan.shapes, plan.batches):
        for index in range(samples):
            rng = np.random.default_rng([seed, index, batch or 0])
            feeds = {s.name: _random(s, shapes[s.name], rng) for s in specs}
            label = f"seed {seed} sample {index}" + (f" batch {batch}" if batch is not None else "")
            result.append(Sample(label, feeds))
    return result


def _random(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(spec.elem_type)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if _is_float(dtype):
        return rng.standard_normal(size=shape).astype(dtype)
    raise BnfoldError(f"input {spec.name!r} is {dtype}: values of that type cannot be generated",
                      note="give the values in .npz files", option="inputs")


def _is_float(dtype: np.dtype) -> bool:
    """True for numpy floats and for the ml_dtypes floats (bfloat16, float8...) numpy does not know."""
    return np.issubdtype(dtype, np.floating) or dtype.kind == "V" and "float" in dtype.name


# ------------------------------------------------------------------------------------------ loading
def npz_files(path: str | Path) -> list[Path]:
    """The .npz files that `path` names: itself, or every .npz in the folder, sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise BnfoldError(f"{path}: folder holds no .npz files")
        return files
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    return [path]


def load_samples(path: str | Path, specs: list[InputSpec], *, with_outputs: bool = False) -> list[Sample]:
    """Read one sample per .npz file; keys are input names (or `input:NAME`), `output:NAME` saved outputs."""
    return [_load_one(file, specs, with_outputs) for file in npz_files(path)]


def _load_one(file: Path, specs: list[InputSpec], with_outputs: bool) -> Sample:
    arrays = _read_npz(file)
    by_name = {s.name: s for s in specs}
    feeds, expected = {}, {}
    for key, array in arrays.items():
        if key.startswith(OUTPUT_KEY):
            expected[key[len(OUTPUT_KEY):]] = array
            continue
        name = key[len(INPUT_KEY):] if key.startswith(INPUT_KEY) else key
        if name not in by_name:
            raise BnfoldError(f"{file}: key {key!r} is not an input of the models",
                              note=f"inputs: {', '.join(by_name)}")
        feeds[name] = _conform(array, by_name[name], file)
    missing = [name for name in by_name if name not in feeds]
    if missing:
        raise BnfoldError(f"{file}: no value for input(s) {', '.join(map(repr, missing))}",
                          note="keys are input names, or input:NAME")
    if with_outputs and not expected:
        raise BnfoldError(f"{file}: holds no saved outputs (keys output:NAME)",
                          note="bnfold export writes them with its reference file")
    return Sample(file.name, feeds, expected if with_outputs else None)


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BnfoldError(f"{file}: not a readable .npz file ({exc})") from exc


def _conform(array: np.ndarray, spec: InputSpec, file: Path) -> np.ndarray:
    """The array in the input's dtype, if that loses nothing; raise if its shape or values do not fit."""
    _check_shape(spec, array.shape, f"{file}: ")
    dtype = numpy_dtype(spec.elem_type)
    if array.dtype == dtype:
        return array
    if array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
        return array.view(dtype)  # .npz stores bfloat16 and the other ml_dtypes as raw bytes
    try:
        converted = array.astype(dtype)
        exact = np.array_equal(converted.astype(array.dtype), array, equal_nan=_is_float(array.dtype))
    except (TypeError, ValueError):
        exact = False
    if not exact:
        raise BnfoldError(f"{file}: input {spec.name!r} is {array.dtype}, the models take {dtype}, and "
                          "its values do not convert exactly", note=f"save it as {dtype}")
    return converted
