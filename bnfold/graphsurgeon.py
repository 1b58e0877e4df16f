"""Folding an onnx-graphsurgeon Graph in place, for TensorRT-style pipelines that edit graphs with it.

bnfold's passes edit a ModelProto, so the Graph goes through one: exported (``gs.export_onnx``),
checked and folded like a loaded file, imported back (``gs.import_onnx``), and the imported graph's
state moved into the caller's Graph object, which then is the folded graph, as after graphsurgeon's
own ``cleanup()`` or ``fold_constants()``. The caller's graph is changed only once all that has
succeeded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .errors import BnfoldError, first_line
from .fold import fold_in_place, fold_options
from .io import check_weightless
from .report import FoldReport

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon

# The fields of the caller's graph an import would not give back as they were, though a fold does not
# change them (docs/design.md, Invariants 2): an unset import list or IR version would come back set,
# and the counter of the names graph.layer() generates (name_idx) restarted. The caller's stay.
KEPT_FIELDS = ("import_domains", "ir_version", "name_idx")
CHECK_NOTE = ("bnfold only folds graphs that onnx.checker.check_model accepts; graph.cleanup().toposort() "
              "puts nodes in the order it requires")


def fold_graph(graph: onnx_graphsurgeon.Graph, *, exclude_nodes: Iterable[str] = (), assume_inference: bool = False,
               lower_standalone: str = "keep", reparameterize: bool = True) -> FoldReport:
    """Fold every BatchNormalization of an onnx-graphsurgeon graph that folds exactly, in place.

    For pipelines that build or edit graphs with onnx-graphsurgeon (TensorRT's): the graph is exported
    with ``gs.export_onnx``, checked as :func:`fold_file` checks a file (onnx's full checker, run on a
    copy without the large weights, which bnfold checks itself), folded exactly as :func:`fold_file`
    folds that model, and imported back into the caller's Graph object, which is then the folded
    graph, as after graphsurgeon's own ``cleanup()``. Its name, doc string, opset, import list, IR
    version and producer stay as they were; its nodes and tensors are new objects, so look up again
    any Node or Tensor taken from it before the call. Needs onnx-graphsurgeon
    (``pip install 'bnfold[graphsurgeon]'``).

    Args:
        graph: The ``onnx_graphsurgeon.Graph`` to fold. As ``gs.export_onnx`` and onnx's checker
            require: nodes in topological order (``graph.toposort()``), a dtype and a shape on every
            graph input and output (the shape a list, None for a size not known).
        exclude_nodes: Names of BatchNormalization nodes to leave as they are (reason
            ``excluded-by-user``); a list or set of names, not one bare string. Default: none.
        assume_inference: If True, rewrite each BN exported in training mode to normalize with its
            running statistics (reason ``inference-assumed``), so it can fold. This changes what the
            graph computes, so it is off by default.
        lower_standalone: What becomes of a BN left unfolded: ``"keep"`` (the default) leaves it,
            ``"mul-add"`` rewrites it as ``Mul(x, scale)`` then ``Add(., shift)`` (reason ``lowered``).
        reparameterize: If True (the default), first merge parallel Conv / identity branches that sum
            into one output (RepVGG, MobileOne, ACNet...) into one Conv.

    Returns:
        A :class:`bnfold.FoldReport` with one decision per BN and per pass (``report.folded``,
        ``report.total``, ``report.left_by_reason``); ``report.model`` is None. The folded graph is
        `graph` itself.

    Raises:
        BnfoldError: onnx-graphsurgeon is not installed; `graph` is not an onnx_graphsurgeon Graph
            (for a ModelProto, use :func:`fold_model`); a graph input or output has no shape;
            graphsurgeon cannot export the graph; onnx's full checker would reject the export (nodes
            out of order, an op onnx does not know in its own domain, a weight whose values do not
            match its shape or whose type disagrees with one declared for it...); `lower_standalone`
            is not ``"keep"`` or ``"mul-add"``, or `exclude_nodes` names a node that is not a
            BatchNormalization of the graph (``error.option`` names the parameter). The graph is then unchanged.
    """
    gs = _graphsurgeon()
    _require_graph(graph, gs)
    options = fold_options(exclude_nodes, assume_inference, lower_standalone, reparameterize)
    _require_shapes(graph)
    model = _export(graph, gs)
    report = fold_in_place(model, options)
    _become(graph, gs.import_onnx(model))
    return report


def _graphsurgeon():
    try:
        import onnx_graphsurgeon
    except ImportError as exc:
        raise BnfoldError(f"fold_graph needs onnx-graphsurgeon, which is not installed ({first_line(exc)})",
                          note="pip install 'bnfold[graphsurgeon]'") from exc
    return onnx_graphsurgeon


def _require_graph(graph, gs) -> None:
    """A Function is a Graph to graphsurgeon, but not a model: only a Graph is exported and folded."""
    if not isinstance(graph, gs.Graph) or isinstance(graph, gs.Function):
        kind = type(graph).__name__
        raise BnfoldError(f"fold_graph takes an onnx_graphsurgeon Graph, not {kind}", option="graph",
                          note="bnfold.fold_model folds a ModelProto" if kind == "ModelProto" else None)


def _require_shapes(graph) -> None:
    """onnx's checker requires a shape on each graph input and output, and its error names none. A
    graphsurgeon tensor's shape may be unset (None), often on an output chosen in an edit."""
    for kind, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        shapeless = next((t.name for t in tensors if t.shape is None), None)
        if shapeless is not None:
            raise BnfoldError(f"graph {graph.name!r}: {kind} {shapeless!r} has no shape, which onnx's checker "
                              "requires", note="set its shape, a list with None for each size not known")


def _export(graph, gs) -> onnx.ModelProto:
    """The graph as a ModelProto the pipeline can fold: exported, then checked as a file would be."""
    domains = graph.import_domains
    count = None if domains is None else len(domains)
    try:
        model = gs.export_onnx(graph)
    except Exception as exc:  # graphsurgeon raises what it meets: its own exception, TypeError, ...
        raise BnfoldError(f"graph {graph.name!r}: onnx_graphsurgeon cannot export it: {first_line(exc)}") from exc
    finally:  # the export sets an unset import list, or appends the domains nodes use: both undone
        graph.import_domains = domains
        if domains is not None:
            del domains[count:]
    try:
        check_weightless(model)
    except BnfoldError as exc:
        raise BnfoldError(f"graph {graph.name!r}: {exc.message}", note=CHECK_NOTE) from exc
    return model


def _become(graph, folded) -> None:
    """Give `graph` the folded graph's state: every attribute graphsurgeon's import set (nodes, inputs,
    outputs, functions, ...), but the caller's own KEPT_FIELDS."""
    kept = {key: value for key, value in vars(graph).items() if key in KEPT_FIELDS}
    vars(graph).update(vars(folded))
    vars(graph).update(kept)
