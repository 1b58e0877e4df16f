"""A small mutable index over an ONNX graph: producers, consumers, types, fresh names, and edits.

bnfold edits the ModelProto in place instead of converting it to another representation: that keeps
everything it does not touch (node names and order, doc strings, metadata, value_info, functions)
exactly as it was, and costs no copy of the weights.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from .changes import CREATED, NODE_ADDED, NODE_REMOVED, REWRITTEN, ChangeLog
from .constants import ConstantEvaluator, reads_type_only
from .dtypes import onnx_type, to_array
from .mapped import MappedFile, is_stub, weightless


@dataclass
class TensorType:
    elem_type: int
    shape: tuple | None  # dims as int or str (symbolic) or None (unknown); None when rank unknown


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of a node's graph attributes (If branches, Loop and Scan bodies)."""
    return [body for attr in node.attribute for body in _bodies(attr)]


def _bodies(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The graphs an attribute holds, whatever its declared type says: external data is checked in
    every graph before the checker could refuse a mistyped attribute."""
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def walk_graphs(graph: onnx.GraphProto, path: str = "", parent: onnx.GraphProto | None = None):
    """Yield (path, graph, parent graph) for `graph` and every graph nested in it, outermost first.

    A subgraph's path names the node and attribute that hold it (``loop:body``, ``if:then_branch``,
    nested with ``/``). A graph's nodes are listed after the caller is done with it, so a caller may
    edit each graph before its subgraphs are visited."""
    yield path, graph, parent
    for node in list(graph.node):
        for attr in node.attribute:
            bodies = _bodies(attr)
            for i, sub in enumerate(bodies):
                where = f"{path}/{node.name or node.op_type}:{attr.name}" + (f"[{i}]" if len(bodies) > 1 else "")
                yield from walk_graphs(sub, where.lstrip("/"), graph)


def all_graphs(graph: onnx.GraphProto):
    """`graph` and every graph nested in it, outermost first."""
    for _, sub, _ in walk_graphs(graph):
        yield sub


def nested_graphs(nodes):
    """Every graph nested in `nodes`' attributes (a graph's or a function's nodes), outermost first."""
    for node in nodes:
        for body in subgraphs(node):
            yield from all_graphs(body)


def subgraph_names_used(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from enclosing scopes (implicit inputs)."""
    used: set[str] = set()
    for sub in subgraphs(node):
        used |= _outer_names(sub)
    return used


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name and name not in defined)
        used |= subgraph_names_used(node) - defined
        defined.update(node.output)
    used.update(o.name for o in graph.output if o.name not in defined)
    return used


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads: explicit inputs and those its subgraphs read from outside."""
    return {name for name in node.input if name} | subgraph_names_used(node)


class ModelContext:
    """What all graphs of one model share: opsets, IR version, fresh-name source, inferred types."""

    def __init__(self, model: onnx.ModelProto, source: MappedFile | None = None):
        self.model = model
        self.source = source
        self._read_spans: list[tuple[int, int]] = []
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.ir_version = model.ir_version
        self._names: set[str] | None = None
        self._inferred: dict[str, TensorType] | None = None
        self.changes = ChangeLog()  # every GraphIndex edit of this model, for the decisions' reports

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """An initializer's values; stubs of a mapped file are read as zero-copy views."""
        if is_stub(tensor):
            self._read_spans.append(self.source.span(tensor))
            return self.source.array(tensor)
        return to_array(tensor)

    def release_reads(self) -> None:
        """Let the pages of the stubs read so far leave memory (see MappedFile.release)."""
        for span in self._read_spans:
            self.source.release(span)
        self._read_spans.clear()

    @property
    def bn_opset(self) -> int:
        return self.opsets.get("", self.opsets.get("ai.onnx", 1))

    def fresh_name(self, base: str) -> str:
        """A name used nowhere in the model (nodes, tensors, initializers, in any graph)."""
        if self._names is None:
            self._names = set()
            _collect_names(self.model.graph, self._names)
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def inferred_type(self, name: str) -> TensorType | None:
        """Type of a tensor from onnx shape inference over a weight-free skeleton of the model."""
        if self._inferred is None:
            self._inferred = _infer_types(self.model)
        return self._inferred.get(name)


def _collect_names(graph: onnx.GraphProto, names: set[str]) -> None:
    for g in all_graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in g.input)
        names.update(v.name for v in g.output)
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)


def _infer_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    """Run shape inference on a copy without large weight payloads (same types, a fraction of the bytes)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True)
    except Exception:  # inference is a best effort: unknown types only mean fewer folds
        return {}
    types: dict[str, TensorType] = {}
    _harvest_types(inferred.graph, types)
    return types


def _harvest_types(graph: onnx.GraphProto, types: dict[str, TensorType]) -> None:
    for g in all_graphs(graph):
        for info in list(g.input) + list(g.output) + list(g.value_info):
            tt = _value_info_type(info)
            if tt is not None:
                types.setdefault(info.name, tt)


def _value_info_type(info: onnx.ValueInfoProto) -> TensorType | None:
    if not info.type.HasField("tensor_type"):
        return None
    tensor_type = info.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tensor_type.shape.dim)
    return TensorType(tensor_type.elem_type, shape)


class GraphIndex:
    """Producers and consumers of one graph, kept current as the graph is edited; `constants`
    evaluates its compile-time values (see bnfold.constants)."""

    def __init__(self, graph: onnx.GraphProto, context: ModelContext, parent: GraphIndex | None = None):
        self.graph = graph
        self.context = context
        self.parent = parent
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            self._link(node)
        self.constants = ConstantEvaluator(self)
        self.released: set[str] = set()  # names some node stopped reading or producing
        self.excluded: frozenset[str] = parent.excluded if parent is not None else frozenset()  # nodes no fold changes
        self._declared = {v.name: v for v in list(graph.input) + list(graph.output) + list(graph.value_info)}

    def _link(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name:
                self.producer[name] = node
        for name in node_inputs(node):
            self.consumers[name].append(node)

    def _unlink(self, node: onnx.NodeProto) -> None:
        self.released.update(node_inputs(node))
        self.released.update(name for name in node.output if name)
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]
        for name in node_inputs(node):
            users = self.consumers.get(name, [])
            for i, user in enumerate(users):
                if user is node:
                    del users[i]
                    break

    # ---------------------------------------------------------------------------------- structure
    def users(self, name: str) -> list[onnx.NodeProto]:
        return list(self.consumers.get(name, []))

    def is_output(self, name: str) -> bool:
        return name in self.outputs

    def metadata_readers(self, name: str) -> list[onnx.NodeProto]:
        """Users that read only the dtype or shape of `name` (CastLike's target, Shape, Size): a BN's
        input and output share both, so these readers never block a fold."""
        return [node for node in self.consumers.get(name, [])
                if all(reads_type_only(node, i) or node.op_type in ("Shape", "Size")
                       for i, source in enumerate(node.input) if source == name)
                and name not in subgraph_names_used(node)]

    def value_readers(self, name: str) -> list[onnx.NodeProto]:
        """Users that read the values of `name`."""
        metadata = self.metadata_readers(name)
        return [node for node in self.consumers.get(name, []) if not any(node is m for m in metadata)]

    def redirect_metadata_readers(self, old: str, new: str) -> None:
        """Point readers of `old`'s dtype/shape at `new`, which has the same dtype and shape."""
        for node in self.metadata_readers(old):
            for i, source in enumerate(node.input):
                if source == old:
                    self.set_input(node, i, new)

    def only_consumer_is(self, name: str, node: onnx.NodeProto) -> bool:
        users = self.consumers.get(name, [])
        return len(users) == 1 and users[0] is node and not self.is_output(name)

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        self._unlink(node)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        self._link(node)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        self._unlink(node)
        node.output[index] = name
        self._link(node)

    def position(self, node: onnx.NodeProto) -> int:
        for i, candidate in enumerate(self.graph.node):
            if candidate is node:
                return i
        raise ValueError(f"node {node.name!r} is not in the graph")

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._unlink(node)
        del self.graph.node[self.position(node)]
        self.context.changes.record(NODE_REMOVED, node.name, node.op_type)

    def insert_node(self, position: int, node: onnx.NodeProto) -> onnx.NodeProto:
        """Insert a copy of `node` (protobuf copies on insert) and return the copy in the graph."""
        self.graph.node.insert(position, node)
        self._link(self.graph.node[position])
        self.context.changes.record(NODE_ADDED, node.name, node.op_type)
        return self.graph.node[position]

    def add_initializer(self, values: np.ndarray, base: str) -> str:
        """Store `values` as a new initializer under a fresh name (IR < 4 also lists it as an input)."""
        name = self.context.fresh_name(base)
        tensor = self.graph.initializer.add()  # filled in place: appending a tensor would copy it
        self._fill(tensor, values, name)
        self.initializers[name] = tensor
        if self.context.ir_version < 4 and self.parent is None:
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
            self.inputs.add(name)
        self.context.changes.record(CREATED, name, "")
        return name

    def replace_initializer(self, name: str, values: np.ndarray) -> None:
        """Overwrite an initializer that only the folded node uses (caller checks exclusivity); it
        keeps its name, so it still maps to the weight it came from."""
        self._fill(self.initializers[name], values, name)
        self.constants.forget(name)
        self.context.changes.record(REWRITTEN, name, "")

    def _fill(self, tensor: onnx.TensorProto, values: np.ndarray, name: str) -> None:
        """fill_tensor, but a main-graph weight of a mapped model past its memory budget goes to its
        scratch file instead (MappedFile.store); stubs live only in the main graph."""
        source = self.context.source
        if self.parent is not None or source is None or not source.store(tensor, values, name):
            fill_tensor(tensor, values, name)

    # ----------------------------------------------------------------------------------- typing
    def tensor_type(self, name: str) -> TensorType | None:
        if name in self.initializers:
            tensor = self.initializers[name]
            return TensorType(tensor.data_type, tuple(tensor.dims))
        if name in self._declared:
            tt = _value_info_type(self._declared[name])
            if tt is not None and tt.shape is not None:
                return tt
        if self.parent is not None and name not in self.producer and name not in self.inputs:
            outer = self.parent.tensor_type(name)
            if outer is not None:
                return outer
        return self.context.inferred_type(name)

    # ---------------------------------------------------------------------------- initializers
    def is_overridable(self, name: str) -> bool:
        """An initializer also listed as a graph input (IR >= 4): a caller may feed another value."""
        if name in self.initializers:
            return name in self.inputs and self.context.ir_version >= 4
        if self.parent is not None and name not in self.producer and name not in self.inputs:
            return self.parent.is_overridable(name)
        return False

    def owns_initializer(self, name: str, node: onnx.NodeProto, values: np.ndarray) -> bool:
        """True if `name` is an initializer of this graph that `node` alone reads, so that overwriting
        it with `values` changes nothing else: other readers may read only its dtype and shape (the
        `Shape -> Expand -> CastLike` zero bias torch's dynamo exporter writes reads the weight so),
        and only when `values` keeps both."""
        if name not in self.initializers or name in self.inputs or name in self.outputs:
            return False
        tensor = self.initializers[name]
        same_type = tuple(tensor.dims) == values.shape and tensor.data_type == onnx_type(values.dtype)
        readers = self.value_readers(name) if same_type else self.users(name)
        return len(readers) == 1 and readers[0] is node


def fill_tensor(tensor: onnx.TensorProto, values: np.ndarray, name: str) -> None:
    """Make `tensor` a raw-data tensor holding `values` (the fast path of numpy_helper.from_array)."""
    tensor.Clear()
    tensor.name = name
    tensor.data_type = onnx_type(values.dtype)
    tensor.dims.extend(values.shape)
    tensor.raw_data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
