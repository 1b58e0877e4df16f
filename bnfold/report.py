"""What a fold run did: every pass's decisions with reason codes, op counts, JSON and tables."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import onnx

from .graph import all_graphs
from .passes.base import Decision, PassResult
from .reasons import LOWERED, MEANINGS
from .schema import SCHEMA_VERSION

if TYPE_CHECKING:  # verify and bench pull in onnxruntime: a fold imports them only when it uses them
    from .bench import BenchReport
    from .verify import VerifyReport

__all__ = ["Decision", "FoldReport", "decisions_table", "models_table", "op_counts", "passes_table",
           "summary_table"]

BN_FOLD_PASS = "fold-batchnorm"
LOWER_PASS = "lower-standalone"


@dataclass
class FoldReport:
    """The passes' results for one model, and its op counts before and after.

    What :func:`bnfold.fold_model`, :func:`bnfold.fold_file` and :func:`bnfold.fold_graph` return;
    ``to_dict()`` is the JSON document of ``bnfold fold --json``.

    Attributes:
        passes: One PassResult per pass of the pipeline, in order: its ``name``, one Decision per
            node it decided on (``decisions``), and whether it changed the model (``modified``).
        counts_before: Op type -> node count before the fold, subgraphs included.
        counts_after: Op type -> node count after the fold.
        model: The input file's path (fold_file), or None (fold_model, fold_graph).
        verification: The VerifyReport when the fold was verified (``fold_file(verify=...)``), else None.
        bench: The BenchReport when ``bnfold fold --bench`` measured the result, else None.
        decisions: (property) One Decision per BatchNormalization node: the fold pass's.
        total: (property) How many BatchNormalization nodes the model had.
        folded: (property) How many of them were folded.
        lowered: (property) How many of those left were rewritten as Mul + Add (``lower_standalone``).
        left_by_reason: (property) Reason code -> how many BatchNormalization nodes were left for it.
    """
    passes: list[PassResult] = field(default_factory=list)
    counts_before: dict[str, int] = field(default_factory=dict)
    counts_after: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    verification: VerifyReport | None = None  # when `--verify` ran
    bench: BenchReport | None = None  # when `--bench` ran

    @property
    def decisions(self) -> list[Decision]:
        """One decision per BatchNormalization node: the BN fold pass's."""
        return next((p.decisions for p in self.passes if p.name == BN_FOLD_PASS), [])

    @property
    def total(self) -> int:
        return len(self.decisions)

    @property
    def folded(self) -> int:
        return sum(d.folded for d in self.decisions)

    @property
    def lowered(self) -> int:
        """BNs left by the fold that `--lower-standalone mul-add` rewrote as Mul + Add."""
        return sum(d.reason == LOWERED for p in self.passes if p.name == LOWER_PASS for d in p.decisions)

    @property
    def left_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(d.reason for d in self.decisions if not d.folded).items()))

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "batchnorm_total": self.total,
            "folded": self.folded,
            "left": self.total - self.folded,
            "left_by_reason": self.left_by_reason,
            "lowered": self.lowered,
            "op_counts": {"before": self.counts_before, "after": self.counts_after},
            "decisions": [asdict(d) for d in self.decisions],
            "passes": [p.to_dict() for p in self.passes],
            **({"verification": self.verification.to_dict()} if self.verification is not None else {}),
            **({"bench": self.bench.to_dict()} if self.bench is not None else {}),
        }


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op types counted over the main graph and every subgraph."""
    counts = Counter(node.op_type for graph in all_graphs(model.graph) for node in graph.node)
    return dict(sorted(counts.items()))


def _table(*columns: str):
    from rich.table import Table
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


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
    if report.lowered:
        table.add_row("of those, lowered to Mul + Add", str(report.lowered))
    changed = sorted(op for op in set(report.counts_before) | set(report.counts_after)
                     if report.counts_before.get(op, 0) != report.counts_after.get(op, 0))
    if changed:
        table.add_section()
        for op in changed:
            table.add_row(f"{op} nodes", f"{report.counts_before.get(op, 0)} -> {report.counts_after.get(op, 0)}")
    return table


def decisions_table(report: FoldReport):
    """A rich table with one row per BatchNormalization: neighbour, decision, why, and the initializers
    the fold rewrote (same name) or created (`+name`)."""
    table = _table("BatchNormalization", "neighbour", "decision", "detail", "initializers")
    for d in report.decisions:
        neighbour = f"{d.neighbour_op} {d.neighbour}" if d.neighbour_op else "-"
        name = f"{d.graph}/{d.node}" if d.graph else d.node
        written = d.changes.initializers_rewritten + [f"+{n}" for n in d.changes.initializers_created]
        table.add_row(name, neighbour, d.reason, d.detail or MEANINGS.get(d.reason, ""), ", ".join(written) or "-")
    return table


def passes_table(report: FoldReport):
    """A rich table with one row per pass and decision: how many nodes, of which op types."""
    table = _table("pass", "decision", "nodes", "op types")
    for result in report.passes:
        by_reason: dict[str, Counter] = {}
        for d in result.decisions:
            by_reason.setdefault(d.reason, Counter())[d.op_type] += 1
        if not by_reason:
            table.add_row(result.name, "-", "0", "")
        for reason, ops in sorted(by_reason.items()):
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
            table.add_row(result.name, reason, str(sum(ops.values())), listed)
    return table


def models_table(entries: list[dict]):
    """A rich table with one row per model of a run over several (the entries of its JSON document):
    status, BNs, folded, left by reason, verify result, time."""
    table = _table("model", "status", "BN", "folded", "left", "verify", "seconds")
    for column in table.columns[2:4] + table.columns[6:]:
        column.justify = "right"
    for entry in entries:
        verification = entry.get("verification")
        verdict = "-" if verification is None else ("pass" if verification["passed"] else "FAIL")
        left = ", ".join(f"{reason}: {count}" for reason, count in entry.get("left_by_reason", {}).items())
        counts = [str(entry[key]) if key in entry else "-" for key in ("batchnorm_total", "folded")]
        table.add_row(entry["model"], entry["status"], *counts, left or "-", verdict, f"{entry['seconds']:.2f}")
    return table
