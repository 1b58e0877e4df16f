"""Regenerate benchmarks/FOLDER.md: `bnfold fold DIR --out-dir OUT` over a folder of many models, with
--jobs 1 and --jobs 2 side by side.

    python benchmarks/folder.py                  # the committed run: 8 copies of sample_models/
    python benchmarks/folder.py --copies 2 --rounds 1 --output /tmp/FOLDER.md   # a smoke run

The folder holds `--copies` copies of every committed sample model (copy K in subfolder K/). Each
command runs in a fresh process, as a user runs it; the rounds alternate the job counts (1, 2, 2, 1,
...) so that drift on a shared machine hits both alike. Per job count: the median wall time of the
command (interpreter start included) and of the folding itself (the JSON summary's `seconds`). The
outputs of the two job counts are compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from machine import cpu_name

from bnfold.io import write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JOBS = (1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of sample_models/ in the folder")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each job count")
    parser.add_argument("--output", default=str(HERE / "FOLDER.md"))
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bnfold-folder-") as work:
        models = make_folder(Path(work) / "models", args.copies)
        runs = {jobs: [] for jobs in JOBS}
        for round_ in range(args.rounds):
            for jobs in JOBS if round_ % 2 == 0 else reversed(JOBS):
                runs[jobs].append(fold(models, Path(work) / f"out{jobs}", jobs))
        identical = outputs(Path(work) / "out1") == outputs(Path(work) / "out2")
        files = sorted(models.rglob("*.onnx"))
        size = sum(p.stat().st_size for p in files)
    load = (load, os.getloadavg()[0])
    write_text_atomic(args.output, render(len(files), size, runs, identical, args, time.perf_counter() - started,
                                          load))
    print(Path(args.output).read_text())


def make_folder(folder: Path, copies: int) -> Path:
    samples = sorted((ROOT / "sample_models").glob("*.onnx"))
    for copy in range(copies):
        (folder / str(copy)).mkdir(parents=True)
        for sample in samples:
            shutil.copyfile(sample, folder / str(copy) / sample.name)
    return folder


def fold(models: Path, out: Path, jobs: int) -> dict:
    """One `bnfold fold` in a fresh process into an emptied `out`: wall time and the JSON summary."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    command = [sys.executable, "-m", "bnfold", "fold", str(models), "--out-dir", str(out), "--jobs", str(jobs),
               "--json"]
    cpu, start = _children_cpu(), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    return {"wall": wall, "cpu": _children_cpu() - cpu, **json.loads(result.stdout)["summary"]}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (the workers of --jobs included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def render(count: int, size: int, runs: dict[int, list[dict]], identical: bool, args, seconds: float,
           load: tuple[float, float]) -> str:
    def median(key):
        return {jobs: statistics.median(r[key] for r in runs[jobs]) for jobs in JOBS}
    wall, folding, cpu = median("wall"), median("seconds"), median("cpu")
    failed = {r["failed"] for rs in runs.values() for r in rs}
    rows = [f"| --jobs {jobs} | {wall[jobs]:.2f} | {folding[jobs]:.2f} | {count / folding[jobs]:.1f} | "
            f"{folding[JOBS[0]] / folding[jobs]:.2f}x | {cpu[jobs]:.2f} |" for jobs in JOBS]
    return "\n".join([
        "# Folding a folder: --jobs 1 and --jobs 2",
        "",
        f"Regenerate with `python benchmarks/folder.py` (this run took {seconds:.0f} s). Generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} cores, shared "
        f"with other work (1-minute load average {load[0]:.1f} before the run, {load[1]:.1f} after): absolute "
        "times are noisy, and --jobs 2 can only be faster when a second core is free; the two job counts "
        "ran alternately in one run.",
        "",
        f"Versions: python {platform.python_version()}, onnx {version('onnx')}, onnxruntime "
        f"{version('onnxruntime')}, numpy {version('numpy')}, bnfold {version('bnfold')}.",
        "",
        f"Folder: {args.copies} copies of `sample_models/` in subfolders: **{count} models, "
        f"{size / 2**20:.1f} MiB**. Command: `bnfold fold DIR --out-dir OUT --jobs N --json`, each in a "
        f"fresh process, median of {args.rounds} runs per job count; failed models: "
        f"{', '.join(map(str, sorted(failed)))}.",
        "",
        "- **command s**: wall time of the whole command, interpreter start and imports included.",
        "- **folding s**: the JSON summary's `seconds`, from the first fold to the last outcome (the "
        "worker processes' start included).",
        "- **CPU s**: user + system CPU time of the command and its worker processes: the work done, "
        "whatever the cores free for it.",
        "",
        "| jobs | command s | folding s | models/s | speedup (folding) | CPU s |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Outputs of --jobs 1 and --jobs 2 byte-identical: **{'yes' if identical else 'NO'}**.",
        "",
    ])



if __name__ == "__main__":
    main()
