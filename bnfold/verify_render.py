"""A verify report as a table and the reasons for failures, for people (JSON is VerifyReport.to_dict)."""

from __future__ import annotations

import io
import sys

from .compare import Comparison
from .inputs import show_shape
from .verify import VerifyReport


def render_report(report: VerifyReport, *, width: int = 120) -> str:
    """The report as plain text (a table and the reasons for failures), for any stream."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    _print(console, report)
    return console.file.getvalue()


def print_report(report: VerifyReport, file=None) -> None:
    """Print the report with rich (colours only on a terminal)."""
    from rich.console import Console

    console = Console(file=file or sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    _print(console, report)


def _print(console, report: VerifyReport) -> None:
    from rich.table import Table

    verdict = "[green]PASS[/green]" if report else "[bold red]FAIL[/bold red]"
    what = "saved outputs" if report.against_saved_outputs else "reference"
    labels = [s.label for s in report.samples]
    shown = ", ".join(labels[:3]) + (f", ... ({len(labels)} in all)" if len(labels) > 3 else "")
    console.print(f"{verdict} {report.candidate} vs {what} {report.reference}", soft_wrap=True)
    console.print(f"  {len(labels)} sample(s): {shown}; {report.provider}, graph optimizations "
                  "disabled", markup=False, soft_wrap=True)
    table = Table(caption="result: FAIL n/m = failed on n of m samples" if not report else None)
    for column in ("output", "dtype", "shape", "max abs", "max rel", "mean abs", "cosine", "top-1",
                   "atol / rtol", "result"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left",
                         no_wrap=column != "output")
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    for sample in report.samples:
        for comparison in sample.outputs:
            if not comparison:
                console.print(f"  {comparison.name} on {sample.label}: {comparison.reason()}",
                              markup=False, soft_wrap=True)
    if report.bisect is not None:
        console.print(f"bisect: {report.bisect.summary()}", markup=False, soft_wrap=True)


_NUMERIC = {"max abs", "max rel", "mean abs", "cosine", "top-1", "atol / rtol"}


def _rows(report: VerifyReport) -> list[tuple[str, ...]]:
    """One row per output: the worst figures over all samples."""
    by_name: dict[str, list[Comparison]] = {}
    for sample in report.samples:
        for comparison in sample.outputs:
            by_name.setdefault(comparison.name, []).append(comparison)
    rows = []
    for name, comparisons in by_name.items():
        shapes = dict.fromkeys(show_shape(c.shape) for c in comparisons if c.shape is not None)
        failed = sum(not c for c in comparisons)
        result = "ok" if not failed else f"FAIL {failed}/{len(comparisons)}"
        tol = comparisons[0].tolerance
        rows.append((name, comparisons[0].dtype, ", ".join(shapes) or "-",
                     _worst_of(comparisons, "max_abs", max), _worst_of(comparisons, "max_rel", max),
                     _worst_of(comparisons, "mean_abs", max),
                     _worst_of(comparisons, "cosine", min, "{:.6f}"),
                     _worst_of(comparisons, "top1", min, "{:.1%}"),
                     f"{tol.atol:.0e} / {tol.rtol:.0e}", result))
    return rows


def _worst_of(comparisons: list[Comparison], attr: str, pick, fmt: str = "{:.2e}") -> str:
    values = [getattr(c, attr) for c in comparisons if getattr(c, attr) is not None]
    return fmt.format(pick(values)) if values else "-"
