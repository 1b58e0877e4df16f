"""Regenerate benchmarks/RESULTS.md: bnfold and the other folding tools, on the same models, in one run.

    python benchmarks/run.py              # the full run (a few minutes on 2 cores)
    python benchmarks/run.py --quick      # a smoke run: sample models only, short timings

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
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

import measure
import report
from tools import PACKAGES, TOOLS

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
    reference: Path | None
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
    timings: measure.Timings


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
    profiles = {c.name: profile_bnfold(c, work) for c in cases if c.large and args.profile}
    text = report.render(results, base_rss=base_rss, environment=environment(tools),
                         command=_command(argv), minutes=(time.perf_counter() - started) / 60,
                         profiles=profiles)
    _write_atomically(Path(args.output), text)
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
                        help="skip the cProfile of bnfold on the large models")
    return parser


# ----------------------------------------------------------------------------------------------- models
def discover(args) -> list[Case]:
    """The committed sample models with their references, then (unless --quick) the large model."""
    keep = set(args.models.split(",")) if args.models else None
    cases = []
    for path in sorted(Path(args.samples).glob("*.onnx")):
        reference = path.with_suffix(".npz")
        cases.append(Case(path.stem, path, reference if reference.exists() else None))
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
    feeds, reference = measure.load_reference(case.reference)
    original = measure.assess(case.path, feeds, reference)
    for result in results.values():
        _check_output(result, feeds, reference, original)
    variants = {"original": case.path}
    variants.update({t: r.output for t, r in results.items()
                     if t != "load+save" and r.error is None and r.changed is None})
    seconds = (5.0 if case.large else 0.5) if args.quick else (20.0 if case.large else 1.0)
    _log(f"  timing {len(variants)} variants for {seconds:g} s")
    timings = measure.time_variants(variants, feeds, creations=3 if case.large else 2, seconds=seconds)
    return CaseResult(case, results, original, timings)


def _fold_once(case: Case, result: ToolResult) -> None:
    """One fresh process: import the tool, load + fold + save, report time and memory."""
    command = [sys.executable, str(HERE / "tools.py"), result.tool, str(case.path), str(result.output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
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


def _check_output(result: ToolResult, feeds, reference, original: measure.Quality) -> None:
    if result.error is not None:
        return
    try:
        result.quality = measure.assess(result.output, feeds, reference)
    except Exception as exc:  # a peer's output that onnxruntime cannot run is a finding
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


def profile_bnfold(case: Case, work: Path) -> list[tuple[str, float, float, int]]:
    """Where bnfold's time goes on a large model: cProfile's top functions by own time."""
    import pstats
    prof = work / f"{case.name}.prof"
    subprocess.run([sys.executable, str(HERE / "tools.py"), "bnfold", str(case.path),
                    str(work / "profiled.onnx"), "--profile", str(prof)], check=True, cwd=ROOT,
                   capture_output=True)
    stats = pstats.Stats(str(prof))
    rows = []
    for (file, line, func), (_, calls, own, cumulative, _) in stats.stats.items():
        rows.append((f"{Path(file).name}:{line}({func})", own, cumulative, calls))
    return sorted(rows, key=lambda r: r[1], reverse=True)[:12]


# ------------------------------------------------------------------------------------------- helpers
def environment(tools: list[str]) -> dict[str, str]:
    versions = {}
    for name in ["onnx", "onnxruntime", "numpy", "torch", *(PACKAGES[t] for t in tools)]:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return {"python": platform.python_version(), "cpu": _cpu_name(), "cores": str(os.cpu_count()),
            **versions}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command(argv) -> str:
    return " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])


def _write_atomically(path: Path, text: str) -> None:
    handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
