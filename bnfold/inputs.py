"""The inputs `verify` feeds to both models: declared, checked, then generated or loaded.

Both models must declare the same inputs (names, element types, ranks); a difference is a user error,
because no single feed could then be valid for both. Feeds are either generated from a seed (floats from
a standard normal, integers uniform in [0, INT_HIGH), bools fair coins) or loaded from .npz files.

Symbolic dimensions get their values from `--shape`, else by a documented default: a symbolic dim 0 is
the batch and is tried at every value of BATCHES (a correct fold is batch-independent; a fold that baked
in batch statistics only shows at a batch other than 1); any other symbolic dim is OTHER_DIM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from .errors import BnfoldError

BATCHES = (1, 2)  # values tried for a free symbolic dim 0
OTHER_DIM = 32  # value of any other free symbolic dim
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
    expected: Mapping[str, np.ndarray] | None = None  # saved outputs, for --against-reference


def dtype_name(elem_type: int) -> str:
    """`float32`, `bfloat16`, `int64`...: the name users know, for messages and reports."""
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers, in declaration order."""
    initializers = {t.name for t in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in initializers]


def _spec(value_info: onnx.ValueInfoProto) -> InputSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise BnfoldError(f"input {value_info.name!r} is a {kind or 'untyped value'}, not a tensor",
                          note="verify feeds tensors only")
    tensor = value_info.type.tensor_type
    dims = None
    if tensor.HasField("shape"):
        dims = tuple(_dim(d) for d in tensor.shape.dim)
    return InputSpec(value_info.name, tensor.elem_type, dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None


def merge_specs(reference: list[InputSpec], candidate: list[InputSpec]) -> list[InputSpec]:
    """The inputs both models accept, in the reference's order; raise if they declare them differently.

    Where one model fixes a dim that the other leaves symbolic, the fixed size wins.
    """
    ref_names, cand_names = [s.name for s in reference], {s.name for s in candidate}
    if set(ref_names) != cand_names:
        raise BnfoldError(
            f"the models declare different inputs: reference {_names(ref_names)}, "
            f"candidate {_names(s.name for s in candidate)}",
            note="verify compares two models that take the same inputs")
    by_name = {s.name: s for s in candidate}
    return [_merge_one(spec, by_name[spec.name]) for spec in reference]


def _merge_one(ref: InputSpec, cand: InputSpec) -> InputSpec:
    if ref.elem_type != cand.elem_type:
        raise BnfoldError(f"input {ref.name!r} is {ref.dtype_name} in the reference but "
                          f"{cand.dtype_name} in the candidate")
    if ref.dims is None or cand.dims is None:
        return ref if cand.dims is None else cand
    if len(ref.dims) != len(cand.dims):
        raise BnfoldError(f"input {ref.name!r} has rank {len(ref.dims)} in the reference but "
                          f"rank {len(cand.dims)} in the candidate")
    merged = []
    for axis, (a, b) in enumerate(zip(ref.dims, cand.dims)):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise BnfoldError(f"input {ref.name!r} dim {axis} is {a} in the reference but {b} in "
                              "the candidate")
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
def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=1x3x224x224` -> ("NAME", (1, 3, 224, 224)); `NAME=` is a scalar. Names may contain '='."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise BnfoldError(f"--shape {text!r}: expected NAME=DIMS",
                          note="for example --shape input=1x3x224x224")
    if dims == "":
        return name, ()
    if not re.fullmatch(r"\d+(x\d+)*", dims):
        raise BnfoldError(f"--shape {text!r}: dims must be positive integers joined by 'x'",
                          note="for example --shape input=1x3x224x224")
    shape = tuple(int(d) for d in dims.split("x"))
    if 0 in shape:
        raise BnfoldError(f"--shape {text!r}: a dim of 0 makes an empty tensor, nothing to compare")
    return name, shape


def _check_shape(spec: InputSpec, shape: tuple[int, ...], source: str) -> None:
    """Raise unless `shape` is one the model declares valid for `spec` (same rank, same fixed dims)."""
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise BnfoldError(f"{source}: input {spec.name!r} has rank {len(spec.dims)} "
                          f"({_show_dims(spec.dims)}), got shape {_show(shape)}")
    for axis, (want, got) in enumerate(zip(spec.dims, shape)):
        if isinstance(want, int) and want != got:
            raise BnfoldError(f"{source}: input {spec.name!r} dim {axis} is fixed at {want}, "
                              f"got shape {_show(shape)}")


def _show(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _show_dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


@dataclass(frozen=True)
class ShapePlan:
    """Concrete shapes for every input: one mapping per batch value tried, and what was chosen."""

    shapes: list[dict[str, tuple[int, ...]]]
    batches: tuple[int | None, ...]  # the batch of each entry of `shapes`; (None,) when not free
    note: str | None  # one line saying which defaults were chosen, or None if none were


def plan_shapes(specs: list[InputSpec], user: Mapping[str, tuple[int, ...]]) -> ShapePlan:
    """Resolve every dim: `--shape` first (it also binds named dims elsewhere), then the defaults."""
    known = {s.name for s in specs}
    for name in user:
        if name not in known:
            raise BnfoldError(f"--shape {name}=...: the models have no input {name!r}",
                              note=f"inputs: {', '.join(sorted(known))}")
    bound: dict[str, int] = {}
    for spec in specs:
        if spec.name in user:
            _check_shape(spec, user[spec.name], "--shape")
            for want, got in zip(spec.dims or (), user[spec.name]):
                if isinstance(want, str):
                    bound.setdefault(want, got)
    free = [s.dims[0] for s in specs if s.name not in user and s.dims and _is_free(s.dims[0], bound)]
    batch_names = {dim for dim in free if dim is not None}  # such a dim is the batch wherever it is
    batches = BATCHES if free else (None,)
    chosen: dict[str, str] = {}
    shapes = [{s.name: _resolve(s, user, bound, batch_names, batch, chosen) for s in specs}
              for batch in batches]
    note = None
    if chosen:
        note = ("symbolic dims set to defaults: " + ", ".join(f"{k} = {v}" for k, v in chosen.items())
                + "; set them with --shape NAME=DxDx...")
    return ShapePlan(shapes, batches, note)


def _is_free(dim: Dim, bound) -> bool:
    return dim is None or (isinstance(dim, str) and dim not in bound)


def _resolve(spec: InputSpec, user, bound, batch_names, batch, chosen) -> tuple[int, ...]:
    if spec.name in user:
        return user[spec.name]
    if spec.dims is None:
        raise BnfoldError(f"input {spec.name!r} declares no shape",
                          note=f"give it one with --shape {spec.name}=DxDx... or use --inputs")
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str) and dim in bound:
            shape.append(bound[dim])
        elif dim in batch_names or (axis == 0 and dim is None):
            shape.append(batch)
            chosen[f"{dim or spec.name + '[0]'} (batch)"] = " and ".join(map(str, BATCHES))
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
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type))
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if _is_float(dtype):
        return rng.standard_normal(size=shape).astype(dtype)
    raise BnfoldError(f"input {spec.name!r} is {dtype}: verify cannot generate values of that type",
                      note="give the values with --inputs FILE.npz")


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
                          note="write references with bnfold export --reference")
    return Sample(file.name, feeds, expected if with_outputs else None)


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BnfoldError(f"{file}: not a readable .npz file ({exc})") from exc


def _conform(array: np.ndarray, spec: InputSpec, file: Path) -> np.ndarray:
    """The array in the input's dtype, if that loses nothing; raise if its shape or values do not fit."""
    _check_shape(spec, array.shape, str(file))
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type))
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
