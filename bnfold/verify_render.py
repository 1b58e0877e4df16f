"""A verify report as a table and the reasons for failures, for people (JSON is VerifyReport.to_dict)."""

from __future__ import annotations

import io
import sys

from .compare import Comparison
from .inputs import show_shape
from .verify import VerifyReport
from .verify_quantized import QuantizedResult, QuantizerComparison


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
    verdict = "[green]PASS[/green]" if report else "[bold red]FAIL[/bold red]"
    what = "saved outputs" if report.against_saved_outputs else "reference"
    labels = [s.label for s in report.samples]
    shown = ", ".join(labels[:3]) + (f", ... ({len(labels)} in all)" if len(labels) > 3 else "")
    console.print(f"{verdict} {report.candidate} vs {what} {report.reference}", soft_wrap=True)
    console.print(f"  {len(labels)} sample(s): {shown}; {report.provider}, graph optimizations "
                  "disabled", markup=False, soft_wrap=True)
    if report.quantized is not None:
        console.print("final outputs end to end, for information (one flipped code moves everything after "
                      "it; the verdict is layer by layer, below):", markup=False, soft_wrap=True)
    console.print(_outputs_table(report.samples, failed=report.quantized is None and not report))
    _print_reasons(console, report.samples)
    if report.bisect is not None:
        console.print(f"bisect: {report.bisect.summary()}", markup=False, soft_wrap=True)
    if report.quantized is not None:
        _print_quantized(console, report.quantized)


def _outputs_table(samples, failed: bool):
    from rich.table import Table

    table = Table(caption="result: FAIL n/m = failed on n of m samples" if failed else None)
    for column in ("output", "dtype", "shape", "max abs", "max rel", "mean abs", "cosine", "top-1",
                   "atol / rtol", "result"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left",
                         no_wrap=column != "output")
    for row in _rows(samples):
        table.add_row(*row)
    return table


def _print_reasons(console, samples) -> None:
    for sample in samples:
        for comparison in sample.outputs:
            if not comparison:
                console.print(f"  {comparison.name} on {sample.label}: {comparison.reason()}",
                              markup=False, soft_wrap=True)


def _print_quantized(console, result: QuantizedResult) -> None:
    """The quantizer table, the outputs computed from the original's codes, every failure, the summary."""
    from rich.table import Table

    limits = result.limits
    console.print(f"layer by layer: each QuantizeLinear fed the original's codes upstream; pass: input moved "
                  f"by at most {limits.max_steps:g} steps and at most {limits.max_flipped:.2%} of codes "
                  "flipped (one at least)", markup=False, soft_wrap=True)
    table = Table(caption="result: FAIL n/m = failed on n of m samples" if not result else None)
    table.add_column("quantizer (codes)", overflow="fold")
    for column in ("dtype", "scale per", "max steps", "flipped codes", "max code change", "result"):
        table.add_column(column, justify="right" if column in _QUANTIZER_NUMERIC else "left", no_wrap=True)
    for row in _quantizer_rows(result):
        table.add_row(*row)
    console.print(table)
    if any(s.outputs for s in result.samples):
        console.print("graph outputs computed from the original's codes:", markup=False)
        console.print(_outputs_table(result.samples, failed=not all(c for s in result.samples
                                                                    for c in s.outputs)))
    for sample in result.samples:
        for quantizer in sample.quantizers:
            if not quantizer:
                console.print(f"  {quantizer.codes} on {sample.label}: {quantizer.reason()}",
                              markup=False, soft_wrap=True)
    _print_reasons(console, result.samples)
    console.print(result.summary(), markup=False, soft_wrap=True)


_QUANTIZER_NUMERIC = {"max steps", "flipped codes", "max code change"}


def _quantizer_rows(result: QuantizedResult) -> list[tuple[str, ...]]:
    """One row per quantizer: the worst figures over all samples, the flipped codes summed."""
    by_name: dict[str, list[QuantizerComparison]] = {}
    for sample in result.samples:
        for quantizer in sample.quantizers:
            by_name.setdefault(quantizer.codes, []).append(quantizer)
    rows = []
    for name, rows_of in by_name.items():
        first = rows_of[0]
        failed = sum(not q for q in rows_of)
        steps = [q.max_steps for q in rows_of if q.max_steps is not None]
        flipped, elements = sum(q.flipped for q in rows_of), sum(q.elements for q in rows_of)
        rows.append((name, first.dtype or "-", first.granularity or "-",
                     f"{max(steps):.2e}" if steps else "-",
                     f"{flipped}/{elements} ({flipped / elements:.2%})" if elements else "-",
                     str(max(q.max_code_change for q in rows_of)),
                     "ok" if not failed else f"FAIL {failed}/{len(rows_of)}"))
    return rows


_NUMERIC = {"max abs", "max rel", "mean abs", "cosine", "top-1", "atol / rtol"}


def _rows(samples) -> list[tuple[str, ...]]:
    """One row per output: the worst figures over all samples."""
    by_name: dict[str, list[Comparison]] = {}
    for sample in samples:
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
