"""Regenerate benchmarks/GRAPHSURGEON.md: what `bnfold.fold_graph` costs on a ResNet-50-sized
onnx-graphsurgeon graph, next to graphsurgeon's own export/import round trip and to `bnfold.fold_file`.

    python benchmarks/graphsurgeon.py                            # the committed run: 5 rounds, ~1.5 min on 2 cores
    python benchmarks/graphsurgeon.py --quick --output /tmp/G.md  # a smoke run on sample_models/resnet_small.onnx

Model: the full-width ResNet-50 of benchmarks/run.py (benchmarks/models/resnet50.onnx, ignored by git,
exported once with torch's default exporter and randomized BN statistics; needs torch), or --model.

Every step runs in a fresh child process (this file, --child STEP SRC DST) that imports onnx,
onnx-graphsurgeon and bnfold, does the step's setup (for most: the graph, `gs.import_onnx(onnx.load(SRC))`,
as a graphsurgeon pipeline holds it), then times the step alone. It prints one JSON line: the step's wall
time, the process's peak resident memory (VmHWM) after the imports and after the setup, what it holds
(VmRSS) when the step starts, and the step's own peak (VmHWM restarted just before the step). Read in
the process itself, not as wait4's ru_maxrss, which on Linux starts from the parent's peak at the fork.
Linux only. Steps run interleaved: each round runs every step once, in an order rotated from round to
round; ratios are taken step against step within a round, so that drift on a shared machine hits both
sides alike. The first round's outputs are checked: they pass onnx's full checker, and no BN is left.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

import bnfold
import bnfold.graphsurgeon
from bnfold.io import check_model, check_weightless, write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LARGE = HERE / "models" / "resnet50.onnx"  # shared with benchmarks/run.py
QUICK = ROOT / "sample_models" / "resnet_small.onnx"


@dataclass(frozen=True)
class Step:
    name: str
    setup: str  # "imports": nothing more; "graph": the imported graph; "export": also its gs.export_onnx
    timed: str  # what the clock covers, for the table


STEPS = (
    Step("onnx.load", "imports", "`onnx.load(SRC)`"),
    Step("gs.export_onnx", "graph", "`gs.export_onnx(graph)`"),
    Step("gs round trip", "graph", "`gs.import_onnx(gs.export_onnx(graph))`"),
    Step("gs round trip + save", "graph", "the round trip, then `onnx.save(gs.export_onnx(...), DST)`"),
    Step("fold_graph", "graph", "`bnfold.fold_graph(graph)`"),
    Step("fold_graph + save", "graph", "`bnfold.fold_graph(graph)`, then `onnx.save(gs.export_onnx(graph), DST)`"),
    Step("fold_file", "imports", "`bnfold.fold_file(SRC, DST)`: load, check, fold, save"),
    Step("fold_graph, full checker", "graph", "`bnfold.fold_graph(graph)` checking with `onnx.checker.check_model("
                                              "model, full_check=True)` (the version before check_weightless)"),
    Step("check: full checker", "export", "`onnx.checker.check_model(model, full_check=True)` of the export"),
    Step("check: check_weightless", "export", "`bnfold.io.check_weightless(model)` of the export (what "
                                              "fold_graph runs)"),
)
BY_NAME = {step.name: step for step in STEPS}
# (numerator, denominator, what the ratio answers), each taken within one round.
RATIOS = (
    ("fold_graph", "gs round trip", "fold_graph against graphsurgeon's own round trip"),
    ("fold_graph + save", "gs round trip + save", "the same, each then saved"),
    ("fold_graph", "fold_file", "fold_graph against folding the file"),
    ("fold_file", "onnx.load", "fold_file against onnx.load alone"),
    ("fold_graph, full checker", "fold_graph", "fold_graph before against now"),
    ("check: full checker", "check: check_weightless", "onnx's full checker against check_weightless"),
)


# ------------------------------------------------------------------------------------------ the child
def run_step(name: str, src: str, dst: str) -> dict:
    """Set up, then time one step in this process; memory figures in MiB."""
    from tools import peak_rss_mb

    imports = peak_rss_mb()
    step, graph, model = BY_NAME[name], None, None
    if step.setup in ("graph", "export"):
        graph = gs.import_onnx(onnx.load(src))
    if step.setup == "export":
        model = gs.export_onnx(graph)
    if name == "fold_graph, full checker":
        bnfold.graphsurgeon.check_weightless = check_model
    setup, held = peak_rss_mb(), resident_mib()
    reset_peak()
    clock = time.perf_counter()
    folded = None
    if name == "onnx.load":
        onnx.load(src)
    elif name == "gs.export_onnx":
        gs.export_onnx(graph)
    elif name.startswith("gs round trip"):
        again = gs.import_onnx(gs.export_onnx(graph))
        if name.endswith("save"):
            onnx.save(gs.export_onnx(again), dst)
    elif name.startswith("fold_graph"):
        folded = bnfold.fold_graph(graph).folded
        if name.endswith("save"):
            onnx.save(gs.export_onnx(graph), dst)
    elif name == "fold_file":
        folded = bnfold.fold_file(src, dst).folded
    else:
        (check_model if name == "check: full checker" else check_weightless)(model)
    seconds = time.perf_counter() - clock
    step_peak = peak_rss_mb()
    return {"s": seconds, "rss_imports_mib": imports, "rss_setup_mib": setup, "held_mib": held,
            "step_peak_mib": step_peak, "rss_mib": max(setup, step_peak), "folded": folded}


def resident_mib() -> float:
    """What this process holds now (VmRSS, Linux), in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def reset_peak() -> None:
    """Restart the peak (VmHWM) from what the process holds now (Linux 4.0+), so that the setup's own
    peak (onnx.load holds the file's bytes and the parsed model at once) does not hide the step's."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


# ----------------------------------------------------------------------------------------- the parent
def child(name: str, src: Path, dst: Path) -> dict:
    """One step in a fresh process; its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(src), str(dst)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"step {name!r} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(model: Path, rounds: int, work: Path) -> dict[str, list[dict]]:
    """Every step once per round, rotated; the outputs are checked after the first round."""
    runs: dict[str, list[dict]] = {step.name: [] for step in STEPS}
    names = list(runs)
    for round_ in range(rounds):
        shift = round_ * 2 % len(names)
        for name in names[shift:] + names[:shift]:
            dst = work / f"step{names.index(name)}.onnx"
            runs[name].append(child(name, model, dst))
            _log(f"  round {round_ + 1}: {name}: {runs[name][-1]['s']:.3f} s, {runs[name][-1]['rss_mib']:.0f} MiB")
            if round_ == 0 and dst.exists():
                _check_output(dst, folded=name.startswith("fold"))
            dst.unlink(missing_ok=True)
    folded = {run["folded"] for step_runs in runs.values() for run in step_runs if run["folded"] is not None}
    if len(folded) != 1:
        raise SystemExit(f"the fold steps folded different numbers of BNs: {sorted(folded)}")
    return runs


def _check_output(path: Path, folded: bool) -> None:
    """A saved step's output passes onnx's full checker; a fold's has no BatchNormalization left."""
    onnx.checker.check_model(str(path), full_check=True)
    if folded and any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node):
        raise SystemExit(f"{path}: a BatchNormalization is left after the fold")


# ----------------------------------------------------------------------------------------- the report
def render(model: Path, runs: dict[str, list[dict]], command: str, seconds: float, load: tuple) -> str:
    rounds = len(runs["onnx.load"])
    lines = [
        "# `bnfold.fold_graph`: folding an onnx-graphsurgeon graph, measured", "",
        f"Regenerate with `{command}` (this run took {seconds:.0f} s). Generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_cpu()}, {os.cpu_count()} cores, "
        f"{_memory_gib():.0f} GiB memory, shared with other work (1-minute load average {load[0]:.1f} before "
        f"the run, {load[1]:.1f} after): absolute times are noisy, ratios within a round are what to read.", "",
        f"Versions: python {platform.python_version()}, onnx {version('onnx')}, onnx-graphsurgeon "
        f"{version('onnx-graphsurgeon')}, numpy {version('numpy')}, bnfold {version('bnfold')}.", "",
        f"Model: `{_shown(model)}`, {model.stat().st_size / 2**20:.1f} MiB, {_describe(model)}.", "",
        "How it is measured: see the docstring of `benchmarks/graphsurgeon.py`. Each step runs in a fresh "
        "process that imports onnx, onnx-graphsurgeon and bnfold, sets up (**graph**: "
        "`graph = gs.import_onnx(onnx.load(SRC))`, as a graphsurgeon pipeline holds it; **export**: also "
        "`model = gs.export_onnx(graph)`), then times the step alone. **s**: the step's wall time. **peak "
        "MiB**: the process's peak resident memory (VmHWM), imports and setup included. **held MiB**: what "
        "the process held (VmRSS) when the step started; **step needs MiB**: the step's own peak above that "
        "(the peak is restarted from VmRSS just before the step: `/proc/self/clear_refs`). "
        f"Medians of {rounds} interleaved rounds, (min-max) over the rounds.", "",
        "| step | setup | timed | s | peak MiB | held MiB | step needs MiB |", "|---|---|---|---|---|---|---|"]
    for step in STEPS:
        step_runs = runs[step.name]
        held = statistics.median(r["held_mib"] for r in step_runs)
        rise = statistics.median(r["step_peak_mib"] - r["held_mib"] for r in step_runs)
        lines.append(f"| {step.name} | {step.setup} | {step.timed} | {_spread([r['s'] for r in step_runs], 3)} | "
                     f"{_spread([r['rss_mib'] for r in step_runs], 0)} | {held:.0f} | {rise:.0f} |")
    imports = statistics.median(r["rss_imports_mib"] for r in runs["onnx.load"])
    setup = statistics.median(r["rss_setup_mib"] for r in runs["fold_graph"])
    lines += ["", f"The imports alone peak at {imports:.0f} MiB. Setting up the graph peaks at {setup:.0f} MiB "
              "(`onnx.load` holds the file's bytes and the parsed model at once), before any step runs.", "",
              "## Side by side", "",
              "Each ratio is taken within a round (the two steps ran next to each other), then the median "
              "(min-max) over the rounds.", "",
              "| ratio | question | time | peak memory |", "|---|---|---|---|"]
    for top, bottom, question in RATIOS:
        times = [a["s"] / b["s"] for a, b in zip(runs[top], runs[bottom])]
        peaks = [a["rss_mib"] / b["rss_mib"] for a, b in zip(runs[top], runs[bottom])]
        lines.append(f"| {top} / {bottom} | {question} | {_spread(times, 2, 'x')} | {_spread(peaks, 2, 'x')} |")
    lines += ["", "## What it shows", "", *_findings(runs, model.stat().st_size / 2**20)]
    return "\n".join(lines) + "\n"


def _findings(runs: dict[str, list[dict]], model_mib: float) -> list[str]:
    s = {name: statistics.median(r["s"] for r in step_runs) for name, step_runs in runs.items()}
    peak = {name: statistics.median(r["rss_mib"] for r in step_runs) for name, step_runs in runs.items()}
    held = {name: statistics.median(r["held_mib"] for r in step_runs) for name, step_runs in runs.items()}
    needs = {name: statistics.median(r["step_peak_mib"] - r["held_mib"] for r in step_runs)
             for name, step_runs in runs.items()}
    leaner = "is leaner" if peak["fold_file"] < peak["fold_graph"] else "is not leaner"
    return [
        f"- `fold_graph` (export, check, fold, import back) takes {s['fold_graph']:.2f} s and its process peaks "
        f"at {peak['fold_graph']:.0f} MiB: it holds {held['fold_graph']:.0f} MiB with the graph, and the call "
        f"needs {needs['fold_graph']:.0f} MiB more. graphsurgeon's own export-and-import round trip of the same "
        f"graph takes {s['gs round trip']:.2f} s and needs {needs['gs round trip']:.0f} MiB more (peak "
        f"{peak['gs round trip']:.0f} MiB); `gs.export_onnx` alone needs {needs['gs.export_onnx']:.0f} MiB, "
        f"{needs['gs.export_onnx'] / model_mib:.1f}x the model file's size. Saved afterwards: "
        f"{peak['fold_graph + save']:.0f} MiB against {peak['gs round trip + save']:.0f} MiB.",
        f"- For a model on disk, `fold_file` {leaner}: {s['fold_file']:.2f} s and a peak of "
        f"{peak['fold_file']:.0f} MiB for the whole load, check, fold and save, where `onnx.load` alone takes "
        f"{s['onnx.load']:.2f} s and peaks at {peak['onnx.load']:.0f} MiB.",
        f"- The check of the exported model: onnx's full checker (it serializes the model and parses it "
        f"again) needs {needs['check: full checker']:.0f} MiB and {s['check: full checker']:.2f} s; "
        f"`check_weightless`, which gives the verdict `fold_file` gives a file (the checker on a copy without "
        f"the large weights, bnfold's own check of those), {needs['check: check_weightless']:.0f} MiB and "
        f"{s['check: check_weightless']:.2f} s. `fold_graph` with the full checker (before) peaks at "
        f"{peak['fold_graph, full checker']:.0f} MiB in {s['fold_graph, full checker']:.2f} s; with "
        f"`check_weightless` (shipped) at {peak['fold_graph']:.0f} MiB in {s['fold_graph']:.2f} s.",
    ]


def _spread(values: list[float], digits: int, unit: str = "") -> str:
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _describe(model: Path) -> str:
    proto = onnx.load(model, load_external_data=False)
    nodes = proto.graph.node
    bn = sum(n.op_type == "BatchNormalization" for n in nodes)
    return f"{len(nodes)} nodes, {bn} BatchNormalization, {len(proto.graph.initializer)} initializers"


def _shown(model: Path) -> str:
    return str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else model.name


def _cpu() -> str:
    from machine import cpu_name
    return cpu_name()


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def large_model() -> Path:
    """benchmarks/run.py's full-width ResNet-50, exported once (needs torch) and then reused."""
    if not LARGE.exists():
        from bnfold.export import export_model
        LARGE.parent.mkdir(exist_ok=True)
        _log(f"exporting resnet50 to {LARGE} (once)")
        export_model("resnet50", LARGE, randomize_bn=True, seed=0, reference=LARGE.with_suffix(".npz"))
    return LARGE


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(run_step(*argv[1:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round on sample_models/resnet_small.onnx")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="the model to measure (default: the full ResNet-50)")
    parser.add_argument("--output", type=Path, help="where to write the results (default: GRAPHSURGEON.md next "
                                                    "to this script; --quick: standard output)")
    args = parser.parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()[0]
    model = args.model or (QUICK if args.quick else large_model())
    with tempfile.TemporaryDirectory(prefix="bnfold-gs-") as work:
        runs = measure(model, 1 if args.quick else args.rounds, Path(work))
    command = "python benchmarks/graphsurgeon.py" + (" " + " ".join(argv) if argv else "")
    text = render(model, runs, command, time.perf_counter() - started, (load, os.getloadavg()[0]))
    output = args.output or (None if args.quick else HERE / "GRAPHSURGEON.md")
    if output is None:
        print(text, end="")
    else:
        write_text_atomic(output, text)
        _log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
