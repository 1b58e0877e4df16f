"""Regenerate benchmarks/LARGE_MODEL.md: `bnfold fold` of a ~3 GB external-data model against `cp -r`.

    python benchmarks/large_model.py                       # two ~3 GB models, 3 rounds (~3 min, 12 GB of disk)
    python benchmarks/large_model.py --size-gb 0.2 --rounds 1 --output /tmp/LARGE.md   # a smoke run

The models are generated on demand into a temporary folder (--work; removed afterwards, never
committed), each as model.onnx plus one external data file, weights.bin:

- all-folded: a stack of 3x3 Conv(1024 -> 1024) + BatchNormalization + Relu layers. Every weight
  tensor is rewritten by the fold: nearly all bytes change.
- classifier: a VGG-like shape, a Conv+BN stack (~12% of the bytes) before a large Gemm classifier
  without BN (~88%): most bytes are copied unchanged, as in VGG-16-BN (89% of its weights are in its
  fully connected layers).

For each model, `cp -r` of its folder and `python -m bnfold fold model.onnx -o OUT/model.onnx` run
alternately (--rounds times each, a fresh empty destination each time, `sync` before each run so
that neither pays for the other's writeback); each runs in a fresh child process whose wall time
and peak RSS (wait4's ru_maxrss) are recorded. The page cache cannot be dropped here, so both read
a model the generator (and the previous rounds) left in memory: what is compared is copying versus
folding the same cached bytes. The goals: fold time within 1.5x of cp, peak RSS under 25% of the
model's size.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bnfold.io import write_text_atomic  # noqa: E402

CHANNELS = 1024  # Conv layers: 1024 x 1024 x 3 x 3 float32 = 37.7 MB of weights each
GEMM_LAYERS = 8  # the classifier's Gemm layers (at 3 GB: 8960 x 8960 float32, 321 MB each)
TIME_GOAL, RSS_GOAL = 1.5, 0.25


@dataclass
class Case:
    name: str
    description: str
    folder: Path
    bytes: int = 0
    folded_bytes: int = 0  # bytes of the tensors the fold rewrites
    runs: dict[str, list[dict]] = field(default_factory=lambda: {"cp": [], "fold": []})

    def median(self, tool: str, key: str) -> float:
        return statistics.median(r[key] for r in self.runs[tool])


class Writer:
    """Builds a model whose initializers all live in weights.bin, one tensor in memory at a time."""

    def __init__(self, folder: Path, seed: int = 0):
        self.folder = folder
        self.data = open(folder / "weights.bin", "wb")
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def add(self, name: str, values: np.ndarray) -> str:
        proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=values.shape,
                            data_location=TensorProto.EXTERNAL)
        offset = self.data.tell()
        self.data.write(np.ascontiguousarray(values, dtype="<f4").tobytes())
        for key, value in (("location", "weights.bin"), ("offset", offset), ("length", values.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(proto)
        return name

    def normal(self, shape, scale: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    def conv_bn(self, x: str, i: int) -> str:
        w = self.add(f"conv{i}.weight", self.normal((CHANNELS, CHANNELS, 3, 3), (2 / (9 * CHANNELS)) ** 0.5))
        bn = [self.add(f"bn{i}.{p}", v) for p, v in (
            ("scale", self.rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)),
            ("bias", self.normal(CHANNELS, 0.1)), ("mean", self.normal(CHANNELS, 0.1)),
            ("var", self.rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)))]
        self.nodes += [helper.make_node("Conv", [x, w], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                       helper.make_node("BatchNormalization", [f"c{i}", *bn], [f"b{i}"], name=f"bn{i}"),
                       helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        return f"r{i}"

    def gemm(self, x: str, i: int, k: int, n: int) -> str:
        w = self.add(f"fc{i}.weight", self.normal((n, k), (2 / k) ** 0.5))
        b = self.add(f"fc{i}.bias", self.normal(n, 0.01))
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [f"f{i}"], name=f"fc{i}", transB=1))
        return f"f{i}"

    def finish(self, output: str, output_shape) -> None:
        self.data.close()
        graph = helper.make_graph(self.nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      [1, CHANNELS, 4, 4])],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (self.folder / "model.onnx").write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(self.folder / "model.onnx"), full_check=True)


def all_folded(folder: Path, size: int) -> int:
    """Conv+BN layers until `size` bytes; returns the bytes the fold rewrites (every conv weight)."""
    writer, x = Writer(folder), "x"
    layers = max(1, round(size / (CHANNELS * CHANNELS * 9 * 4)))
    for i in range(layers):
        x = writer.conv_bn(x, i)
    writer.finish(x, [1, CHANNELS, 4, 4])
    return layers * CHANNELS * CHANNELS * 9 * 4


def classifier(folder: Path, size: int) -> int:
    """A Conv+BN stack of ~12% of `size`, then GlobalAveragePool and GEMM_LAYERS square Gemm layers (no
    BN) wide enough for the rest; returns the bytes the fold rewrites (the conv weights)."""
    writer, x = Writer(folder, seed=1), "x"
    conv_bytes = CHANNELS * CHANNELS * 9 * 4
    layers = max(1, round(0.12 * size / conv_bytes))
    for i in range(layers):
        x = writer.conv_bn(x, i)
    writer.nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
                     helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten")]
    width = max(256, int((max(size - layers * conv_bytes, 0) / GEMM_LAYERS / 4) ** 0.5) // 256 * 256)
    x = writer.gemm("flat", 0, CHANNELS, width)
    for i in range(1, GEMM_LAYERS):
        x = writer.gemm(x, i, width, width)
    x = writer.gemm(x, GEMM_LAYERS, width, 1000)
    writer.finish(x, [1, 1000])
    return layers * conv_bytes


# A child's ru_maxrss starts at its parent's resident size when it forks, so the measured command is
# forked by this small launcher (python -S, a few MiB), not by the benchmark process; it reports the
# command's wall time and peak RSS (wait4) as one line on stdout.
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def timed(command: list[str]) -> dict:
    """Run `command` in a fresh child process: its wall time and peak resident memory."""
    os.sync()
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *command], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    seconds, maxrss, code = done.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return {"s": float(seconds), "rss_mib": int(maxrss) / 1024}  # Linux: KiB


def measure(case: Case, rounds: int, work: Path) -> None:
    model = case.folder / "model.onnx"
    for round_ in range(rounds):
        for tool in ("cp", "fold"):
            out = work / f"out-{tool}"
            if tool == "cp":
                command = ["cp", "-r", str(case.folder), str(out)]
            else:
                out.mkdir()
                command = [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(out / "model.onnx")]
            run = timed(command)
            case.runs[tool].append(run)
            _log(f"  {case.name} round {round_ + 1}: {tool} {run['s']:.2f} s, {run['rss_mib']:.0f} MiB")
            if tool == "fold" and round_ == 0:
                _check_output(out)
            shutil.rmtree(out)


def _check_output(out: Path) -> None:
    """The folded model has no BN left and its data in model.onnx.data, and passes the checker."""
    folded = onnx.load(out / "model.onnx", load_external_data=False)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


# ----------------------------------------------------------------------------------------- report
def render(cases: list[Case], rounds: int, command: str, minutes: float, interpreter: dict) -> str:
    lines = ["# Large models: folding a ~3 GB external-data model", "",
             f"Regenerate with `{command}` (this run took {minutes:.1f} min). {_environment()}", "",
             "How it is measured: see the docstring of benchmarks/large_model.py. Each tool runs in a fresh "
             "child process, alternately, a fresh destination each time, `sync` before each run; wall time and "
             f"peak RSS (wait4's ru_maxrss) of that process; medians of {rounds} rounds. The page cache "
             "holds the model for both (it cannot be dropped here).", "",
             f"Python start-up and bnfold's imports alone (`python -c \"import bnfold.cli, bnfold.fold\"`): "
             f"{interpreter['s']:.2f} s, {interpreter['rss_mib']:.0f} MiB.", "",
             "## Goals", "",
             "| goal | model | measured | met |", "|---|---|---|---|"]
    for case in cases:
        cp, fold = case.median("cp", "s"), case.median("fold", "s")
        rss = case.median("fold", "rss_mib") * 2**20
        rounds = ", ".join(f"{f['s'] / c['s']:.2f}x" for f, c in zip(case.runs["fold"], case.runs["cp"]))
        lines.append(f"| fold time <= {TIME_GOAL}x `cp -r` | {case.name} | {fold:.2f} s / {cp:.2f} s = "
                     f"{fold / cp:.2f}x (round by round: {rounds}) | {_met(fold <= TIME_GOAL * cp)} |")
        lines.append(f"| peak RSS < {RSS_GOAL:.0%} of model size | {case.name} | {rss / 2**20:.0f} MiB / "
                     f"{case.bytes / 2**20:.0f} MiB = {rss / case.bytes:.1%} | {_met(rss < RSS_GOAL * case.bytes)} |")
    lines += ["", "## Models", "", "| model | size | rewritten by the fold | shape |", "|---|---|---|---|"]
    for case in cases:
        lines.append(f"| {case.name} | {case.bytes / 1e9:.2f} GB | {case.folded_bytes / 1e9:.2f} GB "
                     f"({case.folded_bytes / case.bytes:.0%}) | {case.description} |")
    lines += ["", "## Runs", "", "| model | tool | median s | median peak RSS MiB | every run (s) |",
              "|---|---|---|---|---|"]
    for case in cases:
        for tool in ("cp", "fold"):
            every = ", ".join(f"{r['s']:.2f}" for r in case.runs[tool])
            lines.append(f"| {case.name} | {'cp -r' if tool == 'cp' else 'bnfold fold'} | "
                         f"{case.median(tool, 's'):.2f} | {case.median(tool, 'rss_mib'):.0f} | {every} |")
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _environment() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = f"python {platform.python_version()}, onnx {onnx.__version__}, numpy {np.__version__}"
    return (f"Machine: {os.cpu_count()} cores, {memory:.0f} GiB memory, {platform.system()} "
            f"{platform.release()}; {versions}. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of each model (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool per model (default: %(default)s)")
    parser.add_argument("--models", default="all-folded,classifier", help="comma-separated (default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder for the generated models (default: a temporary one)")
    parser.add_argument("--output", default=str(HERE / "LARGE_MODEL.md"), help="where to write the results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    builders = {"all-folded": (all_folded, f"{CHANNELS}-channel 3x3 Conv + BN + Relu layers"),
                "classifier": (classifier, f"{CHANNELS}-channel 3x3 Conv + BN + Relu layers, GlobalAveragePool, "
                                           f"{GEMM_LAYERS + 1} Gemm layers (no BN)")}
    size = int(args.size_gb * 1e9)
    cases = []
    with tempfile.TemporaryDirectory(prefix="bnfold-large-", dir=args.work) as work:
        interpreter = timed([sys.executable, "-c", "import bnfold.cli, bnfold.fold"])
        for name in args.models.split(","):
            build, description = builders[name]
            folder = Path(work) / name
            folder.mkdir()
            _log(f"generating {name} ({args.size_gb} GB)")
            case = Case(name, description, folder, folded_bytes=build(folder, size))
            case.bytes = sum(p.stat().st_size for p in folder.iterdir())
            measure(case, args.rounds, Path(work))
            shutil.rmtree(folder)
            cases.append(case)
    command = "python benchmarks/large_model.py" + (" " + " ".join(argv) if argv else "")
    write_text_atomic(args.output, render(cases, args.rounds, command, (time.perf_counter() - started) / 60,
                                          interpreter))
    _log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
