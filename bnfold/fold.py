"""The fold driver: visit every BatchNormalization (subgraphs too), try the rules in order, report.

For each BN the first rule whose check passes rewrites the graph; if every matching rule refuses, the
BN stays with the first refusal's reason. Leftovers of the folds (the BN parameters, the old weights,
Identity/Constant nodes and constant expressions that only fed them) are removed afterwards; nothing
else in the model changes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Iterable

import onnx

from .errors import EXIT_CHECK_FAILED, BnfoldError
from .graph import GraphIndex, ModelContext, all_graphs, node_inputs
from .io import open_model, save_model
from .mapped import MappedFile
from .report import FOLDED, Decision, FoldReport, op_counts
from .rules import RULES
from .rules.base import Refusal, bn_mode_refusal


def fold_model(model: onnx.ModelProto, *, exclude_nodes: Iterable[str] = ()) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold a copy of `model`; the caller's model is never changed."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, fold_in_place(work, exclude_nodes=exclude_nodes)


class VerificationFailed(BnfoldError):
    """`fold --verify` found the folded model computes something else; nothing was written."""

    def __init__(self, report: FoldReport):
        super().__init__(f"{report.model}: the folded model's outputs differ from the original's; "
                         "nothing was written", note="see the verify report above; --exclude-node NAME "
                         "leaves a BatchNormalization out", exit_code=EXIT_CHECK_FAILED)
        self.report = report

    def __reduce__(self):
        return type(self), (self.report,)


def fold_file(input_path: str | os.PathLike, output_path: str | os.PathLike | None, *,
              exclude_nodes: Iterable[str] = (), dry_run: bool = False, external_data: bool = False,
              verify=None) -> FoldReport:
    """Load, fold and atomically save a model. With dry_run nothing is written.

    `verify` (bnfold.verify.VerifyOptions) compares the folded model with the original before the
    output is renamed into place; on a mismatch it raises VerificationFailed and writes nothing.
    """
    model, source = open_model(input_path)
    try:
        report = fold_in_place(model, exclude_nodes=exclude_nodes, source=source)
        report.model = str(input_path)
        accept = None
        if verify is not None:
            accept = partial(_verify_staged, input_path, output_path, verify, report)
        if not dry_run and output_path is not None:
            save_model(model, output_path, external_data=external_data, source=source, accept=accept)
        elif accept is not None:
            with tempfile.TemporaryDirectory(prefix="bnfold-") as folder:
                save_model(model, Path(folder) / "folded.onnx", external_data=external_data, source=source,
                           accept=accept)
    finally:
        del model
        if source is not None:
            source.close()
    return report


def _verify_staged(original, output_path, options, report: FoldReport, staged: Path) -> None:
    from .verify import verify_models
    verification = verify_models(original, staged, options)
    report.verification = dataclasses.replace(verification, candidate=str(output_path or "(not written)"))
    if not verification:
        raise VerificationFailed(report)


def fold_in_place(model: onnx.ModelProto, *, exclude_nodes: Iterable[str] = (),
                  source: MappedFile | None = None) -> FoldReport:
    """Fold `model` itself (no copy): the fast path for files, where bnfold owns the loaded model.
    `source` is the mapped file that stub initializers point into (see bnfold.mapped)."""
    excluded = set(exclude_nodes)
    unknown = excluded - {n.name for g in all_graphs(model.graph) for n in g.node if n.op_type == "BatchNormalization"}
    if unknown:
        raise BnfoldError(f"--exclude-node {sorted(unknown)[0]}: no BatchNormalization node has that name",
                          note="`bnfold inspect MODEL` lists their names")
    report = FoldReport(counts_before=op_counts(model))
    context = ModelContext(model, source)
    released: set[str] = set()
    _fold_graph(model.graph, context, None, "", excluded, report.decisions, released)
    _remove_leftovers(model, released)
    report.counts_after = op_counts(model)
    return report


def _fold_graph(graph: onnx.GraphProto, context: ModelContext, parent: GraphIndex | None, path: str,
                excluded: set[str], decisions: list[Decision], released: set[str]) -> None:
    index = GraphIndex(graph, context, parent)
    for node in list(graph.node):
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            decisions.append(_fold_one(node, index, excluded, path))
            context.release_reads()
    released |= index.released
    for node in list(graph.node):  # subgraphs see this graph's (already folded) tensors as outer scope
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for i, sub in enumerate(subgraphs):
                where = f"{path}/{node.name or node.op_type}:{attr.name}" + (f"[{i}]" if len(subgraphs) > 1 else "")
                _fold_graph(sub, context, index, where.lstrip("/"), excluded, decisions, released)


def _fold_one(bn: onnx.NodeProto, index: GraphIndex, excluded: set[str], path: str) -> Decision:
    decision = Decision(node=bn.name, reason="", graph=path)
    if bn.name and bn.name in excluded:
        decision.reason, decision.detail = "excluded-by-user", "named by --exclude-node"
        return decision
    refusal = bn_mode_refusal(bn, index)
    if refusal is not None:
        decision.reason, decision.detail = refusal.reason, refusal.detail
        return decision
    first_refusal = None
    for rule in RULES:
        match = rule.match(bn, index)
        if match is None:
            continue
        try:
            plan = rule.check(match, index)
        except Refusal as refusal:
            first_refusal = first_refusal or (rule, match, refusal)
            continue
        _describe(decision, rule, match)
        rule.rewrite(match, plan, index)
        decision.reason, decision.detail = FOLDED, rule.summary
        return decision
    if first_refusal is not None:
        rule, match, refusal = first_refusal
        _describe(decision, rule, match)
        decision.reason, decision.detail = refusal.reason, refusal.detail
        return decision
    decision.reason, decision.detail = "no-foldable-neighbour", _neighbourhood(bn, index)
    return decision


def _describe(decision: Decision, rule, match) -> None:
    decision.rule = rule.name
    decision.neighbour = match.neighbour.name
    decision.neighbour_op = match.neighbour.op_type


def _neighbourhood(bn: onnx.NodeProto, index: GraphIndex) -> str:
    producer = index.producer.get(bn.input[0])
    before = f"{producer.op_type} {producer.name!r}" if producer is not None else f"input {bn.input[0]!r}"
    after = sorted({n.op_type for n in index.users(bn.output[0])}) or ["graph output"]
    return f"fed by {before}, read by {', '.join(after)}"


# ------------------------------------------------------------------------------------- cleanup
def _remove_leftovers(model: onnx.ModelProto, released: set[str]) -> None:
    """Remove nodes and initializers that only fed what a fold disconnected; keep everything else."""
    graphs = list(all_graphs(model.graph))
    uses: Counter = Counter()
    for graph in graphs:
        for node in graph.node:
            uses.update(node_inputs(node))
        uses.update(o.name for o in graph.output)
    pending = [name for name in sorted(released) if uses[name] == 0]
    dead: set[str] = set()
    producers = {out: (graph, node) for graph in graphs for node in graph.node for out in node.output if out}
    while pending:
        name = pending.pop()
        if name in dead or uses[name] > 0:
            continue
        dead.add(name)
        graph, node = producers.get(name, (None, None))
        if node is None or any(uses[out] > 0 for out in node.output if out):
            continue
        for out in node.output:
            producers.pop(out, None)
            dead.add(out)
        for source in node_inputs(node):
            uses[source] -= 1
            if uses[source] == 0:
                pending.append(source)
        _delete(graph.node, node)
    for graph in graphs:
        removed = {t.name for t in graph.initializer if t.name in dead and uses[t.name] <= 0}
        _drop(graph.initializer, lambda t: t.name in removed)
        _drop(graph.value_info, lambda v: v.name in dead and v.name not in producers)
        if model.ir_version < 4 and graph is model.graph:  # IR 3 lists every initializer as an input
            _drop(graph.input, lambda v: v.name in removed)


def _delete(repeated, item) -> None:
    for i, candidate in enumerate(repeated):
        if candidate is item:
            del repeated[i]
            return


def _drop(repeated, predicate) -> None:
    for i in reversed(range(len(repeated))):
        if predicate(repeated[i]):
            del repeated[i]
