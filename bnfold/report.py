"""What a fold did, node by node: decisions with reason codes, op counts, JSON and table rendering."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx

from .graph import all_graphs

FOLDED = "folded"
# Every reason code bnfold can give, with its meaning; stable strings, never reused.
REASONS = {
    FOLDED: "folded into its neighbour",
    "no-foldable-neighbour": "no Conv/ConvTranspose/Gemm/MatMul feeds it or is fed only by it",
    "neighbour-has-other-consumers": "the neighbour's output is also read elsewhere",
    "neighbour-output-is-graph-output": "the tensor the fold would change is a graph output",
    "weights-not-constant": "weights or BN parameters are not compile-time constants",
    "weights-overridable": "an initializer is also a graph input (IR >= 4): callers may override it",
    "quantized-weights": "weights come from DequantizeLinear",
    "training-mode": "the BN normalizes with batch statistics",
    "bn-extra-outputs-used": "the BN's running/saved statistics outputs are read",
    "non-spatial-bn": "spatial=0 with parameters that vary inside a channel",
    "channel-axis-mismatch": "the BN's channel axis is not the neighbour's output (or input) channel axis",
    "rank-unknown": "a rank needed to prove the fold is unknown",
    "padding-prevents-fold": "a padded Conv after the BN would see zeros instead of the BN's shift",
    "invalid-statistics": "var + epsilon <= 0, or a statistic is not finite",
    "dtype-unsupported": "the weight dtype is not float16/bfloat16/float32/float64",
    "dtype-overflow": "the folded weights would overflow the weight dtype",
    "excluded-by-user": "excluded with --exclude-node",
}


@dataclass
class Decision:
    """The outcome for one BatchNormalization node."""
    node: str
    reason: str
    detail: str = ""
    rule: str | None = None
    neighbour: str | None = None
    neighbour_op: str | None = None
    graph: str = ""

    @property
    def folded(self) -> bool:
        return self.reason == FOLDED


@dataclass
class FoldReport:
    """Decisions for every BatchNormalization of a model, and op counts before and after."""
    decisions: list[Decision] = field(default_factory=list)
    counts_before: dict[str, int] = field(default_factory=dict)
    counts_after: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    verification: object | None = None  # a bnfold.verify.VerifyReport when `--verify` ran
    bench: object | None = None  # a bnfold.bench.BenchReport when `--bench` ran

    @property
    def total(self) -> int:
        return len(self.decisions)

    @property
    def folded(self) -> int:
        return sum(d.folded for d in self.decisions)

    @property
    def left_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(d.reason for d in self.decisions if not d.folded).items()))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "batchnorm_total": self.total,
            "folded": self.folded,
            "left": self.total - self.folded,
            "left_by_reason": self.left_by_reason,
            "op_counts": {"before": self.counts_before, "after": self.counts_after},
            "decisions": [asdict(d) for d in self.decisions],
            **({"verification": self.verification.to_dict()} if self.verification is not None else {}),
            **({"bench": self.bench.to_dict()} if self.bench is not None else {}),
        }


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op types counted over the main graph and every subgraph."""
    counts = Counter(node.op_type for graph in all_graphs(model.graph) for node in graph.node)
    return dict(sorted(counts.items()))


def summary_table(report: FoldReport):
    """A rich table: BN total, folded, left by reason, then the op counts that changed."""
    from rich.table import Table
    table = Table()
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("BatchNormalization", str(report.total))
    table.add_row("folded", str(report.folded))
    for reason, count in report.left_by_reason.items():
        table.add_row(f"left: {reason}", str(count))
    changed = sorted(op for op in set(report.counts_before) | set(report.counts_after)
                     if report.counts_before.get(op, 0) != report.counts_after.get(op, 0))
    if changed:
        table.add_section()
        for op in changed:
            table.add_row(f"{op} nodes", f"{report.counts_before.get(op, 0)} -> {report.counts_after.get(op, 0)}")
    return table


def decisions_table(report: FoldReport):
    """A rich table with one row per BatchNormalization: neighbour, decision, why."""
    from rich.table import Table
    table = Table()
    for column in ("BatchNormalization", "neighbour", "decision", "detail"):
        table.add_column(column, overflow="fold")
    for d in report.decisions:
        neighbour = f"{d.neighbour_op} {d.neighbour}" if d.neighbour_op else "-"
        name = f"{d.graph}/{d.node}" if d.graph else d.node
        table.add_row(name, neighbour, d.reason, d.detail or REASONS.get(d.reason, ""))
    return table
