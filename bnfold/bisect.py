"""Where two models that disagree start to differ: the first shared tensor that diverges.

Tensors both models compute under the same name (and the same element type) are compared in the
reference's topological order, on one input sample. A folded BatchNormalization's output keeps its
name, so a wrong fold is named by the node that now produces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx

from .compare import Comparison, Tolerance, compare_arrays
from .dtypes import numpy_dtype
from .inputs import Sample
from .runtime import create_session

_BISECT_CHUNK_BYTES = 1 << 30  # estimated bytes of intermediate tensors exposed per bisect session


@dataclass(frozen=True)
class NodeRef:
    name: str
    op_type: str

    def __str__(self) -> str:
        return f"{self.name or '(unnamed)'} ({self.op_type})"


@dataclass(frozen=True)
class BisectResult:
    """The first shared tensor that diverges, on `sample`; `tensor` is None if none does."""

    sample: str
    compared: int  # shared tensors compared, the diverging one included
    not_comparable: int  # shared names left out: no type information, or different types
    tensor: str | None = None
    comparison: Comparison | None = None
    reference_node: NodeRef | None = None
    candidate_node: NodeRef | None = None

    def summary(self) -> str:
        if self.tensor is None:
            return (f"none of the {self.compared} tensors both models compute under the same name "
                    f"diverges on {self.sample}; the difference arises in tensors only one model has")
        return (f"{self.tensor!r} is the first tensor that diverges ({self.compared - 1} shared "
                f"tensor(s) before it match), produced by {self.reference_node} in the reference and "
                f"{self.candidate_node} in the candidate; on {self.sample}: {self.comparison.reason()}")

    def to_dict(self) -> dict:
        return {"sample": self.sample, "tensor": self.tensor, "compared": self.compared,
                "not_comparable": self.not_comparable,
                "reference_node": node_dict(self.reference_node),
                "candidate_node": node_dict(self.candidate_node),
                "comparison": self.comparison.to_dict() if self.comparison is not None else None}


def node_dict(node: NodeRef | None) -> dict | None:
    return None if node is None else {"name": node.name, "op_type": node.op_type}


def bisect_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, sample: Sample,
                  provider: str, tolerance: Callable[[str], Tolerance],
                  labels: tuple[str, str] = ("reference", "candidate")) -> BisectResult:
    """Find the first tensor, in the reference's node order, that both compute and that differs.

    Shared tensors (same name, same element type in both after shape inference) are exposed as extra
    outputs of copies of both models, a chunk of about _BISECT_CHUNK_BYTES at a time, so that a large
    model never holds all its intermediate tensors at once.
    """
    ref_types, cand_types = _tensor_types(reference, sample), _tensor_types(candidate, sample)
    ref_nodes, cand_nodes = _producers(reference), _producers(candidate)
    shared = [n for n in ref_nodes if n in cand_nodes]
    comparable = [n for n in shared if n in ref_types and n in cand_types
                  and ref_types[n].elem_type == cand_types[n].elem_type]
    not_comparable = len(shared) - len(comparable)
    compared = 0
    for chunk in _chunks(comparable, ref_types, sample):
        ref_out = _run_exposing(reference, chunk, ref_types, provider, labels[0], sample)
        cand_out = _run_exposing(candidate, chunk, cand_types, provider, labels[1], sample)
        for name in chunk:
            compared += 1
            result = compare_arrays(name, ref_out[name], cand_out[name],
                                    tolerance(str(cand_out[name].dtype)))
            if not result:
                return BisectResult(sample.label, compared, not_comparable, name, result,
                                    ref_nodes[name], cand_nodes[name])
    return BisectResult(sample.label, compared, not_comparable)


def _producers(model: onnx.ModelProto) -> dict[str, NodeRef]:
    """Each tensor computed by a node of the main graph -> that node, in node (topological) order."""
    return {out: NodeRef(node.name, node.op_type)
            for node in model.graph.node for out in node.output if out}


def _tensor_types(model: onnx.ModelProto, sample: Sample) -> dict[str, onnx.TypeProto.Tensor]:
    """Tensor types of the main graph's values, inferred with the sample's input shapes.

    Inferring from concrete input shapes gives concrete intermediate shapes, which size the chunks.
    """
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for value_info in concrete.graph.input:
        if value_info.name in sample.feeds and value_info.type.HasField("tensor_type"):
            shape = value_info.type.tensor_type.shape
            shape.Clear()
            for size in sample.feeds[value_info.name].shape:
                shape.dim.add().dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, strict_mode=False)
    except Exception:  # custom domains, models over 2 GB...: fall back on the declared value_info
        inferred = model
    graph = inferred.graph
    return {vi.name: vi.type.tensor_type
            for vi in list(graph.value_info) + list(graph.output)
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type}


def _run_exposing(model, names, types, provider, label, sample: Sample) -> dict[str, np.ndarray]:
    session = create_session(_exposing(model, names, types), provider=provider, label=label)
    return session.run(sample.feeds, names, inputs_label=sample.label)


def _exposing(model: onnx.ModelProto, names: list[str], types: dict) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (typed, shapes left to onnxruntime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n].elem_type, None)
                             for n in names if n not in present)
    return copy


def _chunks(names: list[str], types: dict, sample: Sample) -> Iterator[list[str]]:
    """Consecutive runs of `names` whose estimated size stays under _BISECT_CHUNK_BYTES."""
    chunk, size = [], 0
    for name in names:
        estimate = _estimated_bytes(types[name], sample)
        if chunk and size + estimate > _BISECT_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(name)
        size += estimate
    if chunk:
        yield chunk


def _estimated_bytes(tensor_type: onnx.TypeProto.Tensor, sample: Sample) -> int:
    """Inferred dims; a dim still unknown counts as the largest input dim of the sample."""
    itemsize = numpy_dtype(tensor_type.elem_type).itemsize
    largest = max((d for a in sample.feeds.values() for d in a.shape), default=1)
    dims = [d.dim_value if d.HasField("dim_value") else largest for d in tensor_type.shape.dim]
    return itemsize * math.prod(dims)
