"""Rewrite each BatchNormalization exported in training mode to use its running statistics
(``assume_inference``, off by default).

A model exported without ``model.eval()`` keeps BNs that normalize with the statistics of each batch
(per opset: ``is_test=0`` before opset 7, declared training outputs in opsets 7-13,
``training_mode=1`` from 14); runtimes then refuse the model or compute something other than the
trained network. This pass rewrites each such BN into its opset's inference form, which normalizes
with ``input_mean`` / ``input_var``: ``is_test=1`` before opset 7, no ``training_mode`` from 14, and
no training outputs in any opset (they are invalid in inference mode). The fold pass, which runs
next, then folds it like any other BN.

Not exact, on purpose: running statistics replace batch statistics, so the model computes something
else. That is why the caller must ask for it, and why every rewrite is recorded
(``inference-assumed``; the CLI prints a note per node). A BN whose training outputs are read (by a
node, a subgraph or as a graph output) stays as it is (``bn-extra-outputs-used``): its readers would
lose them. A BN excluded by name stays too. ``fold --verify`` compares the fold with the input after
these rewrites only (:func:`assumed_reference`): it checks the fold, not the assumption.
"""

from __future__ import annotations

import onnx

from ..batchnorm import declared_extra_outputs, training_mode_refusal
from ..graph import GraphIndex, ModelContext, walk_graphs
from ..reasons import BN_EXTRA_OUTPUTS_USED, EXCLUDED_BY_USER, INFERENCE_ASSUMED
from .base import Decision, FoldOptions, Pass, PassResult, PipelineState
from .fold_batchnorm import is_batchnorm


class AssumeInference(Pass):
    """Training-mode BN -> the same BN in inference mode, on request."""
    name = "assume-inference"

    def run(self, state: PipelineState) -> PassResult:
        result = PassResult(self.name)
        if not state.options.assume_inference:
            return result
        opset = state.context.bn_opset
        for path, graph, _ in walk_graphs(state.model.graph):
            index = GraphIndex(graph, state.context)
            for node in graph.node:
                training = training_mode_refusal(node, opset) if is_batchnorm(node) else None
                if training is not None:
                    result.decisions.append(_rewrite(node, index, state, training[1], path))
        result.modified = any(d.reason == INFERENCE_ASSUMED for d in result.decisions)
        return result


def _rewrite(bn: onnx.NodeProto, index: GraphIndex, state: PipelineState, why: str, path: str) -> Decision:
    """Put `bn` in inference mode, or say why it stays; `why` says how it is in training mode."""
    decision = Decision(node=bn.name, reason=INFERENCE_ASSUMED, graph=path)
    if bn.name and bn.name in state.options.exclude_nodes:
        decision.reason, decision.detail = EXCLUDED_BY_USER, "named by --exclude-node: left in training mode"
        return decision
    extra = declared_extra_outputs(bn)
    read = [name for name in extra if index.users(name) or index.is_output(name)]
    if read:
        decision.reason = BN_EXTRA_OUTPUTS_USED
        decision.detail = f"{why}; its output(s) {', '.join(read)} are read, so it stays in training mode"
        return decision
    del bn.output[1:]
    state.released.update(extra)  # their declared types go with them (remove-dead-code)
    _set_inference_mode(bn, state.context.bn_opset)
    decision.detail = f"{why}; now normalizes with its running statistics {bn.input[3]}, {bn.input[4]}"
    return decision


def _set_inference_mode(bn: onnx.NodeProto, opset: int) -> None:
    """The mode attribute of inference at `opset` (opsets 7-13 have none: no training outputs is it)."""
    if opset < 7:
        _remove_attribute(bn, "is_test")
        bn.attribute.append(onnx.helper.make_attribute("is_test", 1))
    if opset >= 14:
        _remove_attribute(bn, "training_mode")


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    for i in reversed(range(len(node.attribute))):
        if node.attribute[i].name == name:
            del node.attribute[i]


def assumed_reference(model: onnx.ModelProto, options: FoldOptions) -> onnx.ModelProto:
    """`model` (edited in place) with only this pass's rewrites, under `options`: what
    `--verify` compares a fold with when BNs were rewritten, so that it checks the fold and not the
    assumption, which changed the outputs on purpose."""
    AssumeInference().run(PipelineState(model, ModelContext(model), options))
    return model
