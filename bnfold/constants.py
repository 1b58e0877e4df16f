"""Compile-time values of a graph's tensors: initializers, Constant nodes and constant expressions.

Weights are not always plain initializers: exporters write Constant nodes, Identity chains, Casts and
expressions such as torch's ``Shape -> Expand -> CastLike`` zero bias. A value is a constant when every
input of its producing node is one, the node is deterministic and in the default domain, and it is not
an initializer a caller may override. The ops exporters put around weights are evaluated in numpy
(building onnx's ReferenceEvaluator per node costs ~0.5 ms); any other op goes through onnx's reference
implementation. Shape and Size of a tensor with a static shape, and CastLike's dtype-only input, need
the tensor's type only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .dtypes import numpy_dtype, onnx_type, to_array
from .reasons import QUANTIZED_WEIGHTS, WEIGHTS_NOT_CONSTANT, WEIGHTS_OVERRIDABLE

if TYPE_CHECKING:
    from .graph import GraphIndex

# Ops whose output is not a pure function of constant inputs, or that bnfold must not see through.
_NOT_EVALUATED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                  "Bernoulli", "If", "Loop", "Scan", "SequenceMap", "DequantizeLinear",
                  "DynamicQuantizeLinear", "QuantizeLinear"}
_QUANTIZED = {"DequantizeLinear", "DynamicQuantizeLinear"}
_LARGE_CONSTANT = 1 << 26  # do not materialize constant expressions beyond 64 MiB
_MAX_DEPTH = 64
_FLOAT_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


class NotConstant(Exception):
    """Raised while resolving a value that is not a compile-time constant; `reason` is a reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ConstantEvaluator:
    """The constant values of one graph (outer scopes through the parent graph's evaluator).

    Computed values are cached; initializers are not (they are views of the mapped file, and caching
    them would keep every weight in memory)."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self._values: dict[str, np.ndarray] = {}

    def value(self, name: str) -> np.ndarray:
        """The value of `name` if it is a compile-time constant, else raise NotConstant with a reason."""
        return self._resolve(name, depth=0)

    def forget(self, name: str) -> None:
        """Drop a cached value whose initializer a fold rewrote."""
        self._values.pop(name, None)

    def _resolve(self, name: str, depth: int) -> np.ndarray:
        index = self.index
        if depth > _MAX_DEPTH:
            raise NotConstant(WEIGHTS_NOT_CONSTANT, f"{name} is computed by a constant chain too deep to evaluate")
        if name in self._values:
            return self._values[name]
        if name in index.initializers:
            if index.is_overridable(name):
                raise NotConstant(WEIGHTS_OVERRIDABLE, f"initializer {name} is also a graph input")
            return index.context.array(index.initializers[name])
        if name in index.producer:
            value = self._evaluate(index.producer[name], name, depth)
        elif name in index.inputs:
            raise NotConstant(WEIGHTS_NOT_CONSTANT, f"{name} is a graph input")
        elif index.parent is not None:
            value = index.parent.constants._resolve(name, depth)
        else:
            raise NotConstant(WEIGHTS_NOT_CONSTANT, f"{name} has no producer")
        self._values[name] = value
        return value

    def _evaluate(self, node: onnx.NodeProto, name: str, depth: int) -> np.ndarray:
        if node.op_type in _QUANTIZED:
            raise NotConstant(QUANTIZED_WEIGHTS, f"{name} comes from {node.op_type} {node.name!r}")
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_EVALUATED:
            raise NotConstant(WEIGHTS_NOT_CONSTANT, f"{name} is computed by {node.op_type} {node.name!r}")
        if node.op_type in ("Shape", "Size"):
            return self._shape_or_size(node, name)
        feeds = {}
        for position, source in enumerate(node.input):
            if source:
                feeds[source] = self._dtype_only(node, source) if reads_type_only(node, position) \
                    else self._resolve(source, depth + 1)
        try:
            quick = _evaluate_in_numpy(node, [feeds.get(source) for source in node.input])
        except NotConstant:
            raise
        except Exception as exc:  # a malformed constant (shape, dtype, attribute): numpy raises many types
            raise NotConstant(WEIGHTS_NOT_CONSTANT, _cannot_evaluate(node, exc)) from None
        if quick is not None:
            return quick
        return self._run_reference(node, feeds)[name]

    def _shape_or_size(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        """Shape and Size need only the static shape of their input (or its value when it is constant)."""
        tt = self.index.tensor_type(node.input[0])
        if tt is None or tt.shape is None or not all(isinstance(d, int) and d > 0 for d in tt.shape):
            try:
                shape = self._resolve(node.input[0], 1).shape
            except NotConstant:
                raise NotConstant(WEIGHTS_NOT_CONSTANT,
                                  f"{name} is the shape of {node.input[0]}, which is not static") from None
        else:
            shape = tt.shape
        if node.op_type == "Size":
            return np.array(int(np.prod(shape)), dtype=np.int64)
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return np.array(shape[slice(start, end)], dtype=np.int64)

    def _dtype_only(self, node: onnx.NodeProto, source: str) -> np.ndarray:
        """An empty array of `source`'s dtype, for an input read only for its dtype."""
        tt = self.index.tensor_type(source)
        if tt is None or not tt.elem_type:
            raise NotConstant(WEIGHTS_NOT_CONSTANT, f"the dtype of {source} (read by {node.op_type}) is unknown")
        return np.zeros((0,), dtype=numpy_dtype(tt.elem_type))

    def _run_reference(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from onnx.reference import ReferenceEvaluator
        # A bare node would run at the newest opset: wrap it in a graph, which runs at the model's.
        names = [name for name in node.output if name]
        graph = onnx.helper.make_graph(
            [node], "constant", [onnx.helper.make_tensor_value_info(name, 0, None) for name in feeds],
            [onnx.helper.make_tensor_value_info(name, 0, None) for name in names])
        try:
            outputs = ReferenceEvaluator(graph, opsets=dict(self.index.context.opsets)).run(None, feeds)
        except Exception as exc:  # the reference implementation raises many types for bad inputs
            raise NotConstant(WEIGHTS_NOT_CONSTANT, _cannot_evaluate(node, exc)) from None
        for output in outputs:
            _require_small(node, np.asarray(output).nbytes)
        return {name: np.asarray(output) for name, output in zip(names, outputs)}


def _cannot_evaluate(node: onnx.NodeProto, exc: Exception) -> str:
    return f"cannot evaluate {node.op_type} {node.name!r}: {exc}".splitlines()[0]


def _require_small(node: onnx.NodeProto, nbytes: int) -> None:
    if nbytes > _LARGE_CONSTANT:
        raise NotConstant(WEIGHTS_NOT_CONSTANT, f"{node.op_type} {node.name!r} yields a huge constant")


def reads_type_only(node: onnx.NodeProto, position: int) -> bool:
    """CastLike reads only the dtype of its second input."""
    return node.op_type == "CastLike" and position == 1


def _evaluate_in_numpy(node: onnx.NodeProto, inputs: list) -> np.ndarray | None:
    """Constant, Identity, Expand, Cast and CastLike (the ops around exported weights) in numpy;
    None for anything else."""
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    if op == "Constant" and len(attrs) == 1:
        (key, attr), = attrs.items()
        if key == "value":
            return to_array(attr.t)
        if key in ("value_int", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attr), dtype=np.int64)
        if key in ("value_float", "value_floats"):
            return np.array(onnx.helper.get_attribute_value(attr), dtype=np.float32)
    if op == "Identity" and inputs and inputs[0] is not None:
        return inputs[0]
    if op == "Expand" and len(inputs) == 2:
        value, shape = inputs
        target = np.broadcast_shapes(value.shape, tuple(int(d) for d in shape))
        _require_small(node, math.prod(target) * value.itemsize)  # before allocating it
        return np.array(np.broadcast_to(value, target))
    if op in ("Cast", "CastLike") and inputs and inputs[0].dtype.kind in "fiu":
        target = attrs["to"].i if op == "Cast" else onnx_type(inputs[1].dtype)
        if target in _FLOAT_TYPES:
            return inputs[0].astype(numpy_dtype(target))
    return None
