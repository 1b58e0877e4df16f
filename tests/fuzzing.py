"""Seeded mutations of the committed sample models, for the fuzz test (tests/test_fuzz.py).

``mutate(seed, index)`` always gives the same bytes: the case's random generator is seeded with both
numbers, draws a sample model, then one of two layers of mutation:

- bytes: bit flips, byte overwrites, truncation, random insertions, a duplicated range. Positions
  favour the file's structure over the weight payloads, where a flipped bit only changes a weight.
- structure, through onnx's protobuf classes: attribute values (epsilon NaN or negative, auto_pad
  strings, group, pads...), op types, input and output names, node and initializer deletion or
  duplication, initializer dims, dtype, values and raw_data length, BN parameters or the whole model
  in another float type, a BN fed by another linear op, opset and IR versions, declared graph input,
  output and value_info types. Nodes are drawn near a BatchNormalization more often.

Write one case to a file (to reproduce a failure): ``python -m tests.fuzzing SEED INDEX OUT.onnx``.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
BYTES_SHARE = 0.3  # share of cases mutated at the byte level; most of them fail to parse
STRUCTURE_SHARE = 0.8  # share of byte positions drawn outside weight payloads
PAYLOAD_MIN = 64  # raw_data payloads at least this long count as weights, not structure


@dataclass(frozen=True)
class Case:
    """One mutated model: where it came from and what was done to it."""

    seed: int
    index: int
    model: str
    mutation: str
    data: bytes

    def describe(self) -> str:
        return f"seed {self.seed} case {self.index}: {self.model} {self.mutation}"


@lru_cache(maxsize=None)
def sample_bytes() -> dict[str, bytes]:
    """The committed sample models by name, in name order."""
    return {p.stem: p.read_bytes() for p in sorted(SAMPLES.glob("*.onnx"))}


def mutate(seed: int, index: int) -> Case:
    """Case `index` of the run seeded with `seed`: always the same model, mutation and bytes."""
    rng = random.Random(f"bnfold-fuzz:{seed}:{index}")
    name = rng.choice(sorted(sample_bytes()))
    data = sample_bytes()[name]
    if rng.random() < BYTES_SHARE:
        mutation, data = _mutate_bytes(rng, data)
    else:
        mutation, data = _mutate_structure(rng, data)
    return Case(seed, index, name, mutation, data)


# ---------------------------------------------------------------------------------------------- bytes
def _mutate_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(("bit-flip", "bit-flip", "overwrite", "overwrite", "truncate", "insert", "duplicate"))
    at = _position(rng, data)
    if kind == "bit-flip":
        flipped = bytearray(data)
        spots = [at] + [_position(rng, data) for _ in range(rng.choice((0, 0, 1, 3, 7)))]
        for spot in spots:
            flipped[spot] ^= 1 << rng.randrange(8)
        return f"bytes: bit-flip at {spots}", bytes(flipped)
    if kind == "overwrite":
        run = _junk(rng)
        return f"bytes: overwrite {len(run)} at {at}", data[:at] + run + data[at + len(run):]
    if kind == "truncate":
        return f"bytes: truncate to {at}", data[:at]
    if kind == "insert":
        run = _junk(rng)
        return f"bytes: insert {len(run)} at {at}", data[:at] + run + data[at:]
    start, length = _position(rng, data), rng.choice((1, 2, 8, 64, 512))
    piece = data[start:start + length]
    return f"bytes: duplicate [{start}:{start + len(piece)}] at {at}", data[:at] + piece + data[at:]


def _junk(rng: random.Random) -> bytes:
    """A short run of bytes: random, or the values that matter in protobuf (0, 0xff, varint continuation)."""
    length = rng.choice((1, 1, 2, 4, 16))
    fill = rng.choice((None, 0x00, 0xFF, 0x80))
    return bytes(rng.randrange(256) if fill is None else fill for _ in range(length))


def _position(rng: random.Random, data: bytes) -> int:
    if rng.random() < STRUCTURE_SHARE:
        structure = _structure_ranges(data)
        start, end = rng.choice(structure)
        return rng.randrange(start, end)
    return rng.randrange(len(data))


@lru_cache(maxsize=32)
def _structure_ranges(data: bytes) -> list[tuple[int, int]]:
    """The byte ranges of `data` outside the initializers' raw_data payloads."""
    model = onnx.load_from_string(data)
    payloads = sorted(span for span in (_find(data, t.raw_data) for t in model.graph.initializer
                                        if len(t.raw_data) >= PAYLOAD_MIN) if span)
    ranges, pos = [], 0
    for start, end in payloads:
        if start > pos:
            ranges.append((pos, start))
        pos = max(pos, end)
    if pos < len(data):
        ranges.append((pos, len(data)))
    return ranges


def _find(data: bytes, payload: bytes) -> tuple[int, int] | None:
    start = data.find(payload)
    return (start, start + len(payload)) if start >= 0 else None


# ------------------------------------------------------------------------------------------ structure
def _mutate_structure(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    model = onnx.load_from_string(data)
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        while True:
            edit = rng.choice(EDITS)
            attempt = onnx.ModelProto()
            attempt.CopyFrom(model)
            try:
                with np.errstate(all="ignore"):  # casts that overflow or meet NaN: cases like any other
                    what = edit(rng, attempt)
            except (ValueError, TypeError, KeyError, IndexError):  # an earlier edit made it inapplicable
                what = None
            if what is not None:
                done.append(what)
                model = attempt
                break
    return "structure: " + "; ".join(done), model.SerializeToString()


def _pick_node(rng: random.Random, graph: onnx.GraphProto) -> onnx.NodeProto:
    """A node; more often a BatchNormalization, the node that feeds it, or one that reads it."""
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    if not bns or rng.random() < 0.4:
        return rng.choice(graph.node)
    bn = rng.choice(bns)
    near = [bn] + [n for n in graph.node if n.output and bn.input[0] in n.output]
    near += [n for n in graph.node if bn.output[0] in n.input]
    return rng.choice(near)


def _pick_initializer(rng: random.Random, graph: onnx.GraphProto) -> onnx.TensorProto | None:
    """An initializer; more often a BatchNormalization parameter or a weight next to one."""
    if not graph.initializer:
        return None
    if rng.random() < 0.6:
        node = _pick_node(rng, graph)
        named = {t.name: t for t in graph.initializer}
        mine = [named[name] for name in node.input if name in named]
        if mine:
            return rng.choice(mine)
    return rng.choice(graph.initializer)


def _tensor_names(graph: onnx.GraphProto) -> list[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(n for n in node.output if n)
    return sorted(names)


# Attributes a node may be given that it does not have, and the type each takes.
NEW_ATTRIBUTES = {
    "BatchNormalization": ("epsilon", "momentum", "spatial", "is_test", "training_mode", "consumed_inputs"),
    "Conv": ("group", "auto_pad", "pads", "strides", "dilations", "kernel_shape"),
    "ConvTranspose": ("group", "auto_pad", "pads", "strides", "output_padding", "output_shape"),
    "Gemm": ("transA", "transB", "alpha", "beta"),
}
_FLOAT_ATTRIBUTES = {"epsilon", "momentum", "alpha", "beta"}
_LIST_ATTRIBUTES = {"pads", "strides", "dilations", "kernel_shape", "output_padding", "output_shape",
                    "consumed_inputs"}
FLOATS = (math.nan, math.inf, -math.inf, -1.0, -1e-5, 0.0, -0.0, 1e-45, 1e-12, 1e30, 1.0, 2.0)
INTS = (0, 1, -1, 2, 3, 7, 64, 2**31, -(2**40))
AUTO_PADS = (b"SAME_UPPER", b"SAME_LOWER", b"VALID", b"NOTSET", b"", b"bogus")


def edit_attribute(rng, model):
    node = _pick_node(rng, model.graph)
    if node.attribute and rng.random() < 0.75:
        attr = rng.choice(node.attribute)
    else:
        choices = NEW_ATTRIBUTES.get(node.op_type, ("epsilon", "group", "axis"))
        attr = _new_attribute(node, rng.choice(choices))
    if rng.random() < 0.1:
        return f"{node.name}.{attr.name}: retyped to {_retype(rng, attr)}"
    return f"{node.name}.{attr.name} = {_new_value(rng, attr)}"


def _new_attribute(node, name: str) -> AttributeProto:
    for attr in node.attribute:
        if attr.name == name:
            return attr
    kind = (AttributeProto.FLOAT if name in _FLOAT_ATTRIBUTES else AttributeProto.INTS if name in _LIST_ATTRIBUTES
            else AttributeProto.STRING if name == "auto_pad" else AttributeProto.INT)
    attr = node.attribute.add()
    attr.name, attr.type = name, kind
    return attr


def _new_value(rng, attr: AttributeProto):
    if attr.type == AttributeProto.FLOAT:
        attr.f = rng.choice(FLOATS)
        return attr.f
    if attr.type == AttributeProto.INT:
        attr.i = rng.choice(INTS + (attr.i + 1, attr.i - 1))
        return attr.i
    if attr.type == AttributeProto.STRING:
        attr.s = rng.choice(AUTO_PADS)
        return attr.s
    if attr.type == AttributeProto.INTS:
        values = list(attr.ints) or [1]
        how = rng.choice(("element", "drop", "append", "empty", "double"))
        if how == "element":
            values[rng.randrange(len(values))] = rng.choice(INTS)
        elif how == "drop":
            values.pop()
        elif how == "append":
            values.append(rng.choice(INTS))
        elif how == "double":
            values += values
        else:
            values = []
        del attr.ints[:]
        attr.ints.extend(values)
        return values
    if attr.type == AttributeProto.TENSOR:
        return _edit_tensor(rng, attr.t)
    return _retype(rng, attr)


def _retype(rng, attr: AttributeProto) -> str:
    """Give the attribute another type (and a value of it): an epsilon that is an int, a group that is
    a list..."""
    name = attr.name
    attr.Clear()
    attr.name = name
    attr.type = rng.choice((AttributeProto.FLOAT, AttributeProto.INT, AttributeProto.STRING,
                            AttributeProto.INTS, AttributeProto.FLOATS))
    if attr.type == AttributeProto.FLOAT:
        attr.f = 1.0
    elif attr.type == AttributeProto.INT:
        attr.i = 1
    elif attr.type == AttributeProto.STRING:
        attr.s = b"1"
    elif attr.type == AttributeProto.INTS:
        attr.ints.append(1)
    else:
        attr.floats.append(1.0)
    return AttributeProto.AttributeType.Name(attr.type)


def delete_attribute(rng, model):
    node = _pick_node(rng, model.graph)
    if not node.attribute:
        return None
    attr = rng.choice(node.attribute)
    node.attribute.remove(attr)
    return f"{node.name}: deleted attribute {attr.name}"


OP_TYPES = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Identity", "Add",
            "Mul", "InstanceNormalization", "Constant", "Shape", "CastLike", "DequantizeLinear", "Loop",
            "NoSuchOp")


def edit_op_type(rng, model):
    node = _pick_node(rng, model.graph)
    if rng.random() < 0.15:
        node.domain = rng.choice(("com.microsoft", "custom.domain", "ai.onnx.ml"))
        return f"{node.name}: domain {node.domain}"
    old, node.op_type = node.op_type, rng.choice(OP_TYPES)
    return f"{node.name}: op {old} -> {node.op_type}"


def rewire_input(rng, model):
    node = _pick_node(rng, model.graph)
    if not node.input:
        return None
    position = rng.randrange(len(node.input))
    names = _tensor_names(model.graph)
    new = rng.choice(("", "no_such_tensor", node.output[0] if node.output else "", rng.choice(names),
                      rng.choice(names)))
    node.input[position] = new
    return f"{node.name}: input {position} -> {new!r}"


def swap_inputs(rng, model):
    node = _pick_node(rng, model.graph)
    if len(node.input) < 2:
        return None
    a, b = rng.sample(range(len(node.input)), 2)
    node.input[a], node.input[b] = node.input[b], node.input[a]
    return f"{node.name}: swapped inputs {a} and {b}"


def resize_inputs(rng, model):
    node = _pick_node(rng, model.graph)
    if node.input and rng.random() < 0.5:
        del node.input[-1]
        return f"{node.name}: dropped its last input"
    node.input.append(rng.choice(("", rng.choice(_tensor_names(model.graph)))))
    return f"{node.name}: extra input {node.input[-1]!r}"


def rename_output(rng, model):
    node = _pick_node(rng, model.graph)
    if not node.output:
        return None
    position = rng.randrange(len(node.output))
    node.output[position] = rng.choice(("renamed_output", "", rng.choice(_tensor_names(model.graph))))
    return f"{node.name}: output {position} -> {node.output[position]!r}"


def edit_node_list(rng, model):
    nodes = model.graph.node
    node = _pick_node(rng, model.graph)
    position = next(i for i, n in enumerate(nodes) if n is node)
    how = rng.choice(("delete", "duplicate", "duplicate-renamed", "move"))
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del nodes[position]
    if how == "delete":
        return f"deleted node {copy.name}"
    nodes.insert(rng.randrange(len(nodes) + 1) if how == "move" else position, copy)
    if how != "move":
        twin = nodes.add()
        twin.CopyFrom(copy)
        if how == "duplicate-renamed":
            twin.name += "_twin"
            twin.output[:] = [f"{name}_twin" if name else name for name in twin.output]
    return f"{how} node {copy.name}"


def edit_initializer_dims(rng, model):
    tensor = _pick_initializer(rng, model.graph)
    if tensor is None:
        return None
    dims = list(tensor.dims)
    how = rng.choice(("value", "drop", "add", "reshape", "reverse"))
    if how == "value" and dims:
        dims[rng.randrange(len(dims))] = rng.choice((0, -1, 1, 2, 2**31, dims[0] + 1))
    elif how == "drop" and dims:
        dims.pop(rng.randrange(len(dims)))
    elif how == "add":
        dims.insert(rng.randrange(len(dims) + 1), rng.choice((1, 1, 2)))
    elif how == "reshape":
        dims = [int(np.prod(dims))] if len(dims) != 1 else [1, *dims]
    else:
        dims.reverse()
    del tensor.dims[:]
    tensor.dims.extend(dims)
    return f"initializer {tensor.name} dims -> {dims}"


DATA_TYPES = (TensorProto.UNDEFINED, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64,
              TensorProto.INT32, TensorProto.INT8, TensorProto.UINT32, TensorProto.BOOL, TensorProto.STRING,
              TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.COMPLEX64, 99)
CASTS = (np.float16, np.float64, np.int64, np.int32, np.bool_)


def edit_initializer_dtype(rng, model):
    """Relabel the bytes as another element type, or convert the values to it."""
    tensor = _pick_initializer(rng, model.graph)
    if tensor is None:
        return None
    if rng.random() < 0.5:
        tensor.data_type = rng.choice(DATA_TYPES)
        return f"initializer {tensor.name} data_type -> {tensor.data_type}"
    target = rng.choice(CASTS)
    values = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(target), tensor.name))
    return f"initializer {tensor.name} cast to {np.dtype(target)}"


def cast_bn_parameters(rng, model):
    """Convert a BatchNormalization's scale and bias, or its mean and variance, or all four, to another
    float type (from opset 15 they may differ from the input's), declarations included."""
    graph = model.graph
    named = {t.name: t for t in graph.initializer}
    bns = [n for n in graph.node if n.op_type == "BatchNormalization" and all(i in named for i in n.input[1:5])]
    if not bns:
        return None
    bn = rng.choice(bns)
    target = np.dtype(rng.choice((np.float16, np.float64)))
    names = [bn.input[i] for i in rng.choice(((1, 2), (3, 4), (1, 2, 3, 4)))]
    for name in names:
        named[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(named[name]).astype(target), name))
        for info in list(graph.input) + list(graph.value_info):
            if info.name == name:
                info.type.tensor_type.elem_type = named[name].data_type
    return f"{bn.name}: {', '.join(names)} cast to {target}"


def cast_model(rng, model):
    """Make every float32 tensor float16 or float64: initializers, Constant values, declared types and
    Cast targets (a valid model with other weights, other tolerances, other overflows)."""
    target = np.dtype(rng.choice((np.float16, np.float64)))
    code = onnx.helper.np_dtype_to_tensor_dtype(target)
    graph = model.graph
    tensors = [t for t in graph.initializer] + [a.t for n in graph.node for a in n.attribute
                                                 if a.type == AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(target), tensor.name))
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = code
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = code
    return f"float32 -> {target}"


def retarget_bn(rng, model):
    """Feed a BatchNormalization from another Conv, ConvTranspose, Gemm or MatMul of the model."""
    graph = model.graph
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    linear = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    if not bns or not linear:
        return None
    bn, source = rng.choice(bns), rng.choice(linear)
    bn.input[0] = source.output[0]
    return f"{bn.name} reads {source.name}"


def _edit_tensor(rng, tensor: TensorProto) -> str:
    return rng.choice((_edit_values, _edit_raw_data))(rng, tensor)


def edit_initializer_data(rng, model):
    tensor = _pick_initializer(rng, model.graph)
    if tensor is None:
        return None
    return f"initializer {tensor.name}: {_edit_tensor(rng, tensor)}"


SPECIAL_VALUES = (math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, 1e-45, 1e-30, 1e30, 3e38, 65504.0)


def _edit_values(rng, tensor: TensorProto) -> str:
    """Set a few elements (or all) to a value that matters: NaN, inf, negative, zero, huge, tiny."""
    values = numpy_helper.to_array(tensor).copy()
    if values.dtype.kind != "f" or not values.size:
        return _edit_raw_data(rng, tensor)
    value = rng.choice(SPECIAL_VALUES)
    flat = values.reshape(-1)
    count = rng.choice((1, 1, 2, flat.size))
    flat[[rng.randrange(flat.size) for _ in range(count)]] = value
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return f"{count} value(s) -> {value}"


def _edit_raw_data(rng, tensor: TensorProto) -> str:
    """Shorten, lengthen or empty the payload, or move it to the typed field (float_data...)."""
    raw = tensor.raw_data
    how = rng.choice(("shorten", "lengthen", "empty", "typed-field"))
    if how == "typed-field":
        values = numpy_helper.to_array(tensor)
        name = tensor.name
        tensor.CopyFrom(onnx.helper.make_tensor(name, tensor.data_type, values.shape, values.reshape(-1)))
        return "values in the typed field"
    cut = rng.choice((1, 2, 4, len(raw) // 2 or 1))
    tensor.raw_data = {"shorten": raw[:-cut], "lengthen": raw + bytes(cut), "empty": b""}[how]
    return f"raw_data {how} to {len(tensor.raw_data)} bytes"


def edit_initializer_list(rng, model):
    graph = model.graph
    tensor = _pick_initializer(rng, graph)
    if tensor is None:
        return None
    how = rng.choice(("delete", "duplicate", "rename", "declare-as-input"))
    if how == "delete":
        graph.initializer.remove(tensor)
    elif how == "duplicate":
        graph.initializer.add().CopyFrom(tensor)
    elif how == "rename":
        tensor.name += "_renamed"
    else:
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return f"{how} initializer {tensor.name}"


OPSETS = (-1, 0, 1, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 21, 22, 23, 24, 25, 26, 30, 99)


def edit_opset(rng, model):
    how = rng.choice(("version", "version", "delete", "add-domain"))
    if how == "version":
        model.opset_import[0].version = rng.choice(OPSETS)
        return f"opset -> {model.opset_import[0].version}"
    if how == "delete":
        del model.opset_import[:]
        return "no opset_import"
    model.opset_import.add(domain=rng.choice(("com.microsoft", "", "custom.domain")), version=1)
    return f"extra opset_import {model.opset_import[-1].domain!r}"


IR_VERSIONS = (-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99)


def edit_ir_version(rng, model):
    model.ir_version = rng.choice(IR_VERSIONS)
    return f"ir_version -> {model.ir_version}"


def edit_declared_type(rng, model):
    """Change the type a graph input, output or value_info declares, or drop the declaration."""
    graph = model.graph
    pools = [pool for pool in (graph.input, graph.output, graph.value_info) if len(pool)]
    pool = rng.choice(pools)
    info = rng.choice(pool)
    tensor_type = info.type.tensor_type
    how = rng.choice(("elem_type", "dim", "symbolic", "rank", "no-shape", "delete"))
    if how == "elem_type":
        tensor_type.elem_type = rng.choice(DATA_TYPES)
    elif how in ("dim", "symbolic") and tensor_type.shape.dim:
        dim = rng.choice(tensor_type.shape.dim)
        if how == "dim":
            dim.dim_value = rng.choice((0, 1, 2, 3, 1000, -1))
        else:
            dim.dim_param = rng.choice(("N", "batch", ""))
    elif how == "rank":
        tensor_type.shape.dim.add().dim_value = 1
    elif how == "no-shape":
        tensor_type.ClearField("shape")
    else:
        pool.remove(info)
    return f"declared {info.name}: {how}"


EDITS = (edit_attribute, edit_attribute, edit_attribute, delete_attribute, edit_op_type, rewire_input,
         swap_inputs, resize_inputs, rename_output, edit_node_list, edit_initializer_dims,
         edit_initializer_dtype, edit_initializer_data, edit_initializer_data, edit_initializer_list,
         cast_bn_parameters, cast_bn_parameters, cast_model, cast_model, retarget_bn,
         edit_opset, edit_ir_version, edit_declared_type, edit_declared_type)


def main(argv: list[str]) -> int:
    """`python -m tests.fuzzing SEED INDEX OUT.onnx`: write one case's bytes, print what it is."""
    seed, index, out = int(argv[0]), int(argv[1]), Path(argv[2])
    case = mutate(seed, index)
    out.write_bytes(case.data)
    print(case.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
