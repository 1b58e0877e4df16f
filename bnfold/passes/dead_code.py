"""Remove what the earlier passes disconnected, and nothing else.

Starting from the names earlier passes stopped reading or producing (``state.released``), a node or
initializer is removed when nothing reads it any more: no node (subgraphs' implicit reads included) and
no graph output. Removal cascades backwards through the nodes that only fed removed ones (the BN
parameters, old weights, the Constant/Identity/Shape/Expand/CastLike expressions of exported biases).
Exact because a value nobody reads cannot change any output. Nodes and initializers that were already
unused in the input model stay: the pass only cleans up after bnfold.
"""

from __future__ import annotations

from collections import Counter

from ..changes import Changes
from ..graph import node_inputs, walk_graphs
from ..reasons import REMOVED
from .base import Decision, Pass, PassResult, PipelineState


class RemoveDeadCode(Pass):
    """Dead nodes and initializers left by the other passes."""
    name = "remove-dead-code"

    def run(self, state: PipelineState) -> PassResult:
        model = state.model
        walked = [(path, graph) for path, graph, _ in walk_graphs(model.graph)]
        uses = _count_uses(graph for _, graph in walked)
        producers = {out: (path, graph, node) for path, graph in walked for node in graph.node
                     for out in node.output if out}
        dead, removed_nodes = _cascade(state.released, uses, producers)
        result = PassResult(self.name)
        for path, name, op_type in removed_nodes:
            result.decisions.append(Decision(node=name, reason=REMOVED, op_type=op_type,
                                             detail=f"{op_type} only fed what other passes disconnected",
                                             graph=path, changes=Changes(nodes_removed=[{"name": name, "op_type": op_type}])))
        removed_initializers = 0
        for path, graph in walked:
            removed = {t.name for t in graph.initializer if t.name in dead}
            removed_initializers += len(removed)
            _drop(graph.initializer, lambda t: t.name in removed)
            _drop(graph.value_info, lambda v: v.name in dead and v.name not in producers)
            if model.ir_version < 4 and graph is model.graph:  # IR 3 lists every initializer as an input
                _drop(graph.input, lambda v: v.name in removed)
        result.modified = bool(removed_nodes or removed_initializers)
        return result


def _count_uses(graphs) -> Counter:
    uses: Counter = Counter()
    for graph in graphs:
        for node in graph.node:
            uses.update(node_inputs(node))
        uses.update(o.name for o in graph.output)
    return uses


def _cascade(released: set[str], uses: Counter, producers: dict) -> tuple[set[str], list]:
    """Names that became dead, and (path, name, op type) of each node removed, walking back from
    `released`."""
    pending = [name for name in sorted(released) if uses[name] == 0]
    dead: set[str] = set()
    removed = []
    while pending:
        name = pending.pop()
        if name in dead:  # another output of a node removed before
            continue
        dead.add(name)
        path, graph, node = producers.get(name, (None, None, None))
        if node is None or any(uses[out] > 0 for out in node.output if out):
            continue
        for out in node.output:
            producers.pop(out, None)
            dead.add(out)
        for source in node_inputs(node):
            uses[source] -= 1
            if uses[source] == 0:
                pending.append(source)
        removed.append((path, node.name, node.op_type))
        _delete(graph.node, node)
    return dead, removed


def _delete(repeated, item) -> None:
    for i, candidate in enumerate(repeated):
        if candidate is item:
            del repeated[i]
            return


def _drop(repeated, predicate) -> None:
    for i in reversed(range(len(repeated))):
        if predicate(repeated[i]):
            del repeated[i]
