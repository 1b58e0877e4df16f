"""Fold each BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul next to it, or a few steps away.

For every BN (subgraphs too, outer graphs first, so a subgraph sees its outer scope already folded)
the rules of :data:`bnfold.rules.RULES` are tried in order; the first whose check passes rewrites the
graph. A BN that no rule folds stays, with the first refusal's reason, or ``no-foldable-neighbour``.
Another BN on the folded path (``Conv -> BN -> BN``) folds with it and is reported folded too.
Exact because each rule folds only under the conditions its module states and checks: an
inference-mode BN is an affine map per channel, and composing it with a linear op is again linear.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import BnfoldError
from ..graph import GraphIndex, all_graphs, walk_graphs
from ..reasons import EXCLUDED_BY_USER, FOLDED, NO_FOLDABLE_NEIGHBOUR
from ..rules import RULES
from ..rules.base import Refusal, bn_mode_refusal
from ..rules.path import removed_steps
from .base import Decision, Pass, PassResult, PipelineState


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


class FoldBatchNorm(Pass):
    """BN -> its neighbouring linear op, by the first rule that applies."""
    name = "fold-batchnorm"

    def run(self, state: PipelineState) -> PassResult:
        excluded = state.options.exclude_nodes
        _check_excluded_exist(state.model, excluded)
        result = PassResult(self.name)
        indexes: dict[int, GraphIndex] = {}
        for path, graph, parent in walk_graphs(state.model.graph):
            index = GraphIndex(graph, state.context, indexes.get(id(parent)) if parent is not None else None)
            indexes[id(graph)] = index
            index.excluded = excluded
            # BN id -> decision: those an earlier pass folded (reparameterize), then the rest in graph order
            decided = {k: v for k, v in state.batchnorm_decisions.items() if v[1].graph == path}
            progress = True
            while progress:  # a fold can open another: Relu -> BN2d -> Flatten -> BN1d -> Gemm
                progress = False
                for node in list(graph.node):
                    if not is_batchnorm(node) or (id(node) in decided and decided[id(node)][1].folded):
                        continue
                    # a BN another fold takes along may have been refused on its own: the fold wins
                    with state.context.changes.capture() as changes:
                        decisions = fold_one(node, index, excluded, path)
                    decisions[0][1].changes = changes
                    decided.update((id(n), (n, d)) for n, d in decisions)
                    progress = progress or decisions[0][1].folded
                    state.context.release_reads()
            result.decisions.extend(d for _, d in decided.values())
            state.batchnorm_decisions.update(decided)
            state.released |= index.released
        result.modified = any(d.folded for d in result.decisions)
        return result


def batchnorm_names(model: onnx.ModelProto) -> set[str]:
    """The names of the BatchNormalization nodes of every graph: what --exclude-node can name. Needs
    no weights, so the CLI checks its names against a model's skeleton before folding anything."""
    return {n.name for g in all_graphs(model.graph) for n in g.node if is_batchnorm(n)}


def _check_excluded_exist(model: onnx.ModelProto, excluded: frozenset[str]) -> None:
    unknown = sorted(excluded - batchnorm_names(model))
    if unknown:
        raise BnfoldError(f"{unknown[0]}: no BatchNormalization node has that name",
                          note="`bnfold inspect MODEL` lists their names", option="exclude_nodes")


def fold_one(bn: onnx.NodeProto, index: GraphIndex, excluded: frozenset[str],
              path: str) -> list[tuple[onnx.NodeProto, Decision]]:
    """The decision for `bn`, then one for each other BN its fold took along."""
    decision = Decision(node=bn.name, reason="", graph=path)
    if bn.name and bn.name in excluded:
        decision.reason, decision.detail = EXCLUDED_BY_USER, "named by --exclude-node"
        return [(bn, decision)]
    refusal = bn_mode_refusal(bn, index)
    if refusal is not None:
        decision.reason, decision.detail = refusal.reason, refusal.detail
        return [(bn, decision)]
    first_refusal = None
    for rule in RULES:
        match = rule.match(bn, index)
        if match is None:
            continue
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are refused
                plan = rule.check(match, index)
        except Refusal as refusal:
            first_refusal = first_refusal or (rule, match, refusal)
            continue
        _describe(decision, rule, match)
        steps = removed_steps(match, plan.beyond)
        rule.rewrite(match, plan, index)
        decision.reason, decision.detail = FOLDED, rule.summary + plan.note + _through(steps)
        return [(bn, decision)] + [(n, _folded_along(n, bn, decision, path)) for n in steps if is_batchnorm(n)]
    if first_refusal is not None:
        rule, match, refusal = first_refusal
        _describe(decision, rule, match)
        decision.reason, decision.detail = refusal.reason, refusal.detail
        return [(bn, decision)]
    decision.reason, decision.detail = NO_FOLDABLE_NEIGHBOUR, _neighbourhood(bn, index)
    return [(bn, decision)]


def _folded_along(node: onnx.NodeProto, bn: onnx.NodeProto, decision: Decision, path: str) -> Decision:
    return Decision(node=node.name, reason=FOLDED, detail=f"folded with BatchNormalization {bn.name!r}",
                    rule=decision.rule, neighbour=decision.neighbour, neighbour_op=decision.neighbour_op, graph=path)


def _describe(decision: Decision, rule, match) -> None:
    decision.rule = rule.name
    decision.neighbour = match.neighbour.name
    decision.neighbour_op = match.neighbour.op_type


def _through(steps) -> str:
    """The nodes a fold removed with the BN, in words ("" when none)."""
    if not steps:
        return ""
    return "; removed " + ", ".join(f"{n.op_type} {n.name!r}" for n in steps) + " with it"


def _neighbourhood(bn: onnx.NodeProto, index: GraphIndex) -> str:
    producer = index.producer.get(bn.input[0])
    before = f"{producer.op_type} {producer.name!r}" if producer is not None else f"input {bn.input[0]!r}"
    after = sorted({n.op_type for n in index.users(bn.output[0])}) or ["graph output"]
    return f"fed by {before}, read by {', '.join(after)}"
