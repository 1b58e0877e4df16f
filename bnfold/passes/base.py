"""The pass contract: what a pass gets, what it may change, and what it returns.

A pass is a small class with a stable ``name`` and one method, ``run(state) -> PassResult``. It edits
``state.model`` in place (the caller owns that model: bnfold never edits a model it was handed), and
returns one :class:`Decision` per node it acted on or considered, each with a stable reason code from
:mod:`bnfold.reasons`. A pass that disconnects tensors records their names in ``state.released`` so that
the dead-code pass, which runs last, removes what only fed them and nothing else. Passes never write
files and never raise for a node they cannot handle: they leave it with a reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import onnx

from ..changes import Changes
from ..graph import ModelContext


@dataclass(frozen=True)
class FoldOptions:
    """What the caller asks of the pipeline."""
    exclude_nodes: frozenset[str] = frozenset()  # BatchNormalization nodes to leave as they are
    assume_inference: bool = False  # rewrite training-mode BNs to use their running statistics
    lower_standalone: str = "keep"  # what becomes of a BN no rule folds: "keep" or "mul-add"
    reparameterize: bool = True  # merge parallel Conv / identity branches into one Conv


@dataclass
class Decision:
    """What a pass decided for one node: `reason` is a stable code (bnfold.reasons), `detail` words.

    Attributes:
        node: The node's name.
        reason: A stable reason code (bnfold.reasons): ``"folded"``, or why the node was left (the
            README's "What it leaves, and why").
        detail: The decision in words, e.g. which condition failed; may be empty.
        rule: The rule or pass that decided (``"conv-bn"``, ``"gemm-bn"``, ``"matmul-bn"``,
            ``"bn-conv"``, ``"reparameterize"``, ...), or None.
        neighbour: The name of the node the BN folded into (or would have), or None.
        neighbour_op: That node's op type, or None.
        graph: The path of the subgraph holding the node; ``""`` for the main graph.
        op_type: The decided node's op type (default ``"BatchNormalization"``).
        changes: What carrying the decision out changed, by name: initializers rewritten or
            created, nodes removed or added.
        folded: (property) True when `reason` is ``"folded"``.
    """
    node: str
    reason: str
    detail: str = ""
    rule: str | None = None
    neighbour: str | None = None
    neighbour_op: str | None = None
    graph: str = ""  # path of the subgraph holding the node; "" for the main graph
    op_type: str = "BatchNormalization"  # the decided node's op type
    changes: Changes = field(default_factory=Changes)  # what carrying it out changed, by name

    @property
    def folded(self) -> bool:
        from ..reasons import FOLDED
        return self.reason == FOLDED


@dataclass
class PassResult:
    """One pass's outcome: its decisions, and whether it changed the model."""
    name: str
    decisions: list[Decision] = field(default_factory=list)
    modified: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "modified": self.modified, "decisions": [asdict(d) for d in self.decisions]}


@dataclass
class PipelineState:
    """What the passes of one run share: the model being edited and what earlier passes released."""
    model: onnx.ModelProto
    context: ModelContext
    options: FoldOptions = FoldOptions()
    released: set[str] = field(default_factory=set)  # names some node stopped reading or producing
    # id(BN node) -> (node, the fold pass's decision): a later pass that folds the BN updates it
    batchnorm_decisions: dict[int, tuple[onnx.NodeProto, Decision]] = field(default_factory=dict)


def recorded(state: PipelineState, decide: Callable[[], Decision | None]) -> Decision | None:
    """`decide()`'s decision (None: nothing to decide), holding the edits it made to the model."""
    with state.context.changes.capture() as changes:
        decision = decide()
    if decision is not None:
        decision.changes = changes
    return decision


class Pass:
    """Base of every pass; subclasses set `name` and implement `run`."""
    name = "pass"

    def run(self, state: PipelineState) -> PassResult:
        raise NotImplementedError
