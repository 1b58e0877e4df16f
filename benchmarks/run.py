"""Regenerate benchmarks/RESULTS.md: bnfold and the other folding tools, on the same models, in one run.

    python benchmarks/run.py              # the full run: about 5 minutes on 2 cores
    python benchmarks/run.py --quick      # a smoke run: sample models only, short timings (~2 min)

Models: every committed sample model (sample_models/*.onnx, each with its float64 PyTorch reference
.npz) and a full-width ResNet-50 (~100 MB) from each of torch's two exporters, exported once into
benchmarks/models/ (ignored by git; it needs torch; the same model as
`sample_models/make_models.py --large`, plus its reference). Tools: see tools.py; a peer that is not
installed or that fails is reported as such.

Per (tool, model), each run in a fresh process (tools.py): the fold time (load + fold + save, median of
the repetitions) and the peak resident memory. The floor, onnx.load + onnx.save of the same model, runs
the same way in the same run. Then, in this process: BatchNormalization nodes left, error against the
float64 reference, whether the function changed (measure.py), session creation and latency with
onnxruntime at `disabled` and `all` for the original and every result, all interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import measure
from machine import cpu_name
import numpy as np
import report
from tools import PACKAGES, TOOLS

from bnfold.io import write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The full-width ResNet-50 as torch's two exporters write it: dynamo (torch's default) gives every
# bias-free Conv a zero bias computed at run time (Shape/Expand), which keeps onnxruntime and several
# peers from folding; TorchScript writes the classic form that every tool can fold.
LARGE = {"resnet50": "dynamo", "resnet50_torchscript": "torchscript"}


@dataclass
class Case:
    """One model to fold: its file, its float64 reference, and how hard to measure it."""

    name: str
    path: Path
    reference: Path
    large: bool = False

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


@dataclass
class ToolResult:
    """One tool on one model: the child processes' figures, then the checks of its output."""

    tool: str
    output: Path
    runs: list[dict] = field(default_factory=list)
    error: str | None = None
    quality: measure.Quality | None = None
    changed: str | None = None

    def median(self, key: str) -> float | None:
        return statistics.median(r[key] for r in self.runs) if self.runs else None


@dataclass
class CaseResult:
    case: Case
    tools: dict[str, ToolResult]
    original: measure.Quality
    reference_note: str  # which inputs the errors were measured on
    timings: measure.Timings  # every sound result at disabled and all
    focus: measure.Timings | None  # large models: original and bnfold alone, longer, three levels


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = [t for t in TOOLS if t in args.tools.split(",")]
    cases = discover(args)
    base_rss = baseline_rss()
    results = []
    for case in cases:
        _log(f"{case.name} ({case.size_mb:.1f} MB)")
        results.append(run_case(case, tools, work, args))
    profiles = {r.case.name: profile_bnfold(r.case, work) for r in results
                if args.profile and r.case.large and "bnfold" in r.tools and r.tools["bnfold"].runs}
    text = report.render(results, base_rss=base_rss, environment=environment(tools),
                         command=_command(argv), minutes=(time.perf_counter() - started) / 60,
                         profiles=profiles)
    write_text_atomic(Path(args.output), text)
    _log(f"wrote {args.output} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="sample models only, one repetition, short latency budgets")
    parser.add_argument("--models", help="comma-separated model names to keep (default: all)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools (default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fold runs per tool on the large model (default: %(default)s; 1 on small ones)")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="where to write the results")
    parser.add_argument("--work", default=str(HERE / ".work"), help="folder for the folded models")
    parser.add_argument("--samples", default=str(ROOT / "sample_models"), help="folder of sample models")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the time and memory profiles of bnfold on the large models")
    return parser


# ----------------------------------------------------------------------------------------------- models
def discover(args) -> list[Case]:
    """The committed sample models with their references, then (unless --quick) the large model."""
    keep = set(args.models.split(",")) if args.models else None
    cases = []
    for path in sorted(Path(args.samples).glob("*.onnx")):
        if path.with_suffix(".npz").exists():
            cases.append(Case(path.stem, path, path.with_suffix(".npz")))
        else:
            _log(f"skipping {path}: no float64 reference {path.with_suffix('.npz').name} next to it")
    if not args.quick:
        cases += [large_model(name, exporter) for name, exporter in LARGE.items()
                  if keep is None or name in keep]
    return [c for c in cases if keep is None or c.name in keep]


def large_model(name: str, exporter: str) -> Case:
    """A full-width ResNet-50 with randomized BatchNorm statistics, exported once and then reused."""
    folder = HERE / "models"
    path, reference = folder / f"{name}.onnx", folder / f"{name}.npz"
    if not (path.exists() and reference.exists()):
        from bnfold.export import export_model
        folder.mkdir(exist_ok=True)
        _log(f"exporting {name} to {path} with the {exporter} exporter (once)")
        export_model("resnet50", path, exporter=exporter, randomize_bn=True, seed=0, reference=reference)
    return Case(name, path, reference, large=True)


# ------------------------------------------------------------------------------------------ fold runs
def run_case(case: Case, tools: list[str], work: Path, args) -> CaseResult:
    folder = work / case.name
    folder.mkdir(parents=True, exist_ok=True)
    results = {tool: ToolResult(tool, folder / f"{tool}.onnx") for tool in tools}
    repeats = 1 if args.quick or not case.large else args.repeats
    for rep in range(repeats):
        for tool in tools[rep % len(tools):] + tools[:rep % len(tools)]:  # rotate: no tool always first
            if results[tool].error is None:
                _fold_once(case, results[tool])
    extra = (2 if case.large else 4) if args.quick else (7 if case.large else 31)
    reference = measure.extend_reference(measure.load_reference(case.reference), case.path, extra)
    original = measure.assess(case.path, reference)
    for result in results.values():
        _check_output(result, reference, original)
    _log(f"  errors measured on {reference.note}")
    return CaseResult(case, results, original, reference.note, *_time(case, results, reference.feeds, args))


def _time(case: Case, results: dict[str, ToolResult], feeds, args) -> tuple:
    """Latency of every sound result; on a large model first a longer run of original vs bnfold alone
    (three levels), from which the goals are computed."""
    sound = {t: r.output for t, r in results.items()
             if t != "load+save" and r.error is None and r.changed is None}
    focus = None
    if case.large and "bnfold" in sound:
        seconds = 4.0 if args.quick else 20.0
        _log(f"  timing original and bnfold at three levels for {seconds:g} s")
        focus = measure.time_variants({"original": case.path, "bnfold": sound["bnfold"]}, feeds,
                                      levels=("disabled", "basic", "all"), creations=3, seconds=seconds)
    seconds = (3.0 if case.large else 0.5) if args.quick else (12.0 if case.large else 1.0)
    _log(f"  timing {len(sound) + 1} variants for {seconds:g} s")
    timings = measure.time_variants({"original": case.path, **sound}, feeds,
                                    creations=3 if case.large else 2, seconds=seconds)
    return timings, focus


def _fold_once(case: Case, result: ToolResult) -> None:
    """One fresh process: import the tool, load + fold + save, report time and memory. The previous
    output goes first, so that no tool's time includes the file system freeing an old file."""
    result.output.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / "tools.py"), result.tool, str(case.path), str(result.output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
        figures = _last_json(done.stdout)
    except subprocess.TimeoutExpired:
        figures = {"error": "timed out after 900 s"}
    if figures is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        figures = {"error": f"exit status {done.returncode}: {tail[:200]}"}
    if "error" in figures:
        result.error = figures["error"]
        _log(f"  {result.tool}: FAILED {result.error}")
        return
    result.runs.append(figures)
    _log(f"  {result.tool}: {figures['fold_s']:.3f} s, peak {figures['peak_rss_mb']:.0f} MB")


def _check_output(result: ToolResult, reference: measure.Reference, original: measure.Quality) -> None:
    if result.error is not None:
        return
    try:
        result.quality = measure.assess(result.output, reference)
    except Exception as exc:  # noqa: BLE001 - a peer's output that onnxruntime cannot run is a finding
        result.error = f"output does not run: {' '.join(str(exc).split())[:200]}"
        return
    result.changed = measure.changed_function(result.quality, original)


def _last_json(stdout: str) -> dict | None:
    """The child's report: its last stdout line that parses as JSON (peers print their own lines)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def baseline_rss() -> float:
    """Median peak memory of a bare interpreter that imported onnx: what every tool starts from."""
    values = []
    for _ in range(3):
        done = subprocess.run([sys.executable, str(HERE / "tools.py"), "--baseline"], capture_output=True,
                              text=True, check=True, cwd=ROOT)
        values.append(_last_json(done.stdout)["peak_rss_mb"])
    return statistics.median(values)


def profile_bnfold(case: Case, work: Path) -> dict:
    """Where bnfold's time and memory go on a large model, from two more runs in fresh processes.

    `phases`: memory and time per phase (tools.MemorySampler); `cumulative`: cProfile's bnfold
    functions by cumulative time; `own`: every function by its own time.
    """
    import pstats
    output, prof = work / "profiled.onnx", work / f"{case.name}.prof"

    def run(*flags: str) -> str:
        output.unlink(missing_ok=True)
        return subprocess.run([sys.executable, str(HERE / "tools.py"), "bnfold", str(case.path), str(output),
                               *flags], capture_output=True, text=True, check=True, cwd=ROOT).stdout

    phases = _last_json(run("--memory"))["memory_phases"]
    run("--profile", str(prof))
    rows = []
    for (file, line, func), (_, calls, own, cumulative, _) in pstats.Stats(str(prof)).stats.items():
        rows.append((f"{_short_path(file)}:{line}({func})", own, cumulative, calls))
    ours = [r for r in rows if r[0].startswith("bnfold/")]
    return {"phases": phases,
            "cumulative": sorted(ours, key=lambda r: r[2], reverse=True)[:15],
            "own": sorted(rows, key=lambda r: r[1], reverse=True)[:12]}


def _short_path(file: str) -> str:
    """`.../site-packages/onnx/checker.py` -> `onnx/checker.py`; builtins stay as cProfile names them."""
    parts = Path(file).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    if "bnfold" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("bnfold"):])
    return Path(file).name


# ------------------------------------------------------------------------------------------- helpers
def environment(tools: list[str]) -> dict[str, str]:
    versions = {}
    for name in ["onnx", "onnxruntime", "numpy", "torch", *(PACKAGES[t] for t in tools)]:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return {"python": platform.python_version(), "cpu": cpu_name(), "cores": str(os.cpu_count()),
            **versions}



def _command(argv) -> str:
    return " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
