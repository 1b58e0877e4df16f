"""Regenerate benchmarks/REPARAM.md: train-form exports merged by bnfold and its peers vs deploy-form exports.

    python benchmarks/reparam.py            # samples and 224x224 variants (~9 min on 2 cores; needs torch)
    python benchmarks/reparam.py --quick    # the committed samples only (~1 min)

RepVGG, MobileOne, RepGhost, ACNet and RepViT train with parallel branches and ship as one Conv per
block once their own Python code has merged them; a model exported before that merge ships every
branch. Each architecture comes in two sizes: its committed sample (sample_models/X.onnx, 1x3x32x32,
with its deploy twin X_deploy.onnx), and a variant at a realistic width and a 1x3x224x224 input, built
here from bnfold.zoo's blocks and exported by bnfold.export into a temporary folder (the train form, see
train_form; the deploy form from the same weights and statistics, merged in torch by
bnfold.zoo.deploy). Rows: the train-form export, bnfold's fold of it, each peer's fold (the tools of
tools.py, each run once over every model in a fresh process by patterns.py's runner), and the
deploy-form export. Latencies come from bnfold.bench_models: each row against the deploy form, A/B
interleaved, with a paired-bootstrap interval.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED = 0
LARGE_SHAPE = (1, 3, 224, 224)
GOAL = 1.05  # bnfold's latency at ORT_ENABLE_ALL may exceed the deploy form's by at most 5%
# Seconds per timed level: (the goal's two pairs at `all`: bnfold vs the deploy form and vs the train
# form; every other pair and level). A sample runs in ~0.1 ms and reaches bench's 5000 pairs in about a
# second; a 224x224 variant runs in 5-100 ms, where the goal's intervals need the time.
SAMPLE_SECONDS = (2.0, 0.5)
LARGE_SECONDS = (12.0, 1.5)
TRAIN, BNFOLD, DEPLOY = "train-form export", "bnfold", "deploy-form export"
COUNTED = ("BatchNormalization", "Conv", "Add")
STARTED = time.perf_counter()  # the run's start, for the log and the run time


# ------------------------------------------------------------------------------- the 224x224 variants
def _classifier(layers: list, channels: int):
    """The layers, then global average pooling and a 1000-class Linear."""
    from torch import nn
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1000))


def repvgg_a0():
    """RepVGG-A0: depths 1, 2, 4, 14, 1; widths 48, 48, 96, 192, 1280."""
    from bnfold.zoo import repvgg_small
    return repvgg_small((1, 2, 4, 14, 1), (48, 48, 96, 192, 1280), classes=1000)


def mobileone_s0():
    """MobileOne-S0's layout: a 3x3/2 stem to 48, then 2, 8, 10, 1 units (depthwise 3x3 + pointwise
    1x1 block) of widths 48, 128, 256, 1024, 4 kxk branches per block, no squeeze-excitation."""
    from torch import nn
    from bnfold.zoo import MobileOneBlock
    layers, cin = [MobileOneBlock(3, 48, 3, 2, 1, 4), nn.ReLU()], 48
    for width, units in ((48, 2), (128, 8), (256, 10), (1024, 1)):
        for i in range(units):
            layers += [MobileOneBlock(cin, cin, 3, 2 if i == 0 else 1, cin, 4), nn.ReLU(),
                       MobileOneBlock(cin, width, 1, 1, 1, 4), nn.ReLU()]
            cin = width
    return _classifier(layers, cin)


def repghostnet_1x():
    """RepGhostNet-1.0x's 16 bottlenecks (expansion and output widths, strides), all 3x3, no
    squeeze-excitation; 3x3/2 stem to 16, 1x1 Conv+BN to 960."""
    from torch import nn
    from bnfold.zoo import ConvBN, RepGhostBottleneck
    layers, cin = [ConvBN(3, 16, 3, 2), nn.ReLU()], 16
    for mid, cout, stride in ((8, 16, 1), (24, 24, 2), (36, 24, 1), (36, 40, 2), (60, 40, 1), (120, 80, 2),
                              (100, 80, 1), (120, 80, 1), (120, 80, 1), (240, 112, 1), (336, 112, 1),
                              (336, 160, 2), (480, 160, 1), (480, 160, 1), (480, 160, 1), (480, 160, 1)):
        layers.append(RepGhostBottleneck(cin, mid, cout, stride))
        cin = cout
    return _classifier([*layers, ConvBN(cin, 960, 1), nn.ReLU()], 960)


def acnet_mobilenet():
    """MobileNetV1-0.5 with an ACNet block (3x3 + 1x3 + 3x1 Conv+BN) for every 3x3 Conv."""
    from torch import nn
    from bnfold.zoo import ACBlock, ConvBN
    layers, cin = [ACBlock(3, 16, 2), nn.ReLU()], 16
    for cout, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), *[(256, 1)] * 5,
                         (512, 2), (512, 1)):
        layers += [ACBlock(cin, cin, stride, cin), nn.ReLU(), ConvBN(cin, cout, 1), nn.ReLU()]
        cin = cout
    return _classifier(layers, cin)


def repvit_m09():
    """RepViT-M0.9's widths 48, 96, 192, 384 with 2, 2, 6, 2 blocks; 3x3/2 Conv+BN twice as stem,
    depthwise 3x3/2 + pointwise Conv+BN between stages."""
    from torch import nn
    from bnfold.zoo import ConvBN, RepViTBlock
    layers, cin = [ConvBN(3, 24, 3, 2), nn.GELU(), ConvBN(24, 48, 3, 2)], 48
    for width, blocks in ((48, 2), (96, 2), (192, 6), (384, 2)):
        if width != cin:
            layers += [ConvBN(cin, cin, 3, 2, groups=cin), ConvBN(cin, width, 1)]
            cin = width
        layers += [RepViTBlock(cin) for _ in range(blocks)]
    return _classifier(layers, cin)


@dataclass(frozen=True)
class Arch:
    name: str
    sample: str  # the committed sample's stem in sample_models/
    large: Callable  # the 224x224 variant's train form (an nn.Module factory)
    layout: str  # what that variant is


ARCHS = (Arch("RepVGG", "repvgg_small", repvgg_a0, "RepVGG-A0"),
         Arch("MobileOne", "mobileone_small", mobileone_s0, "MobileOne-S0 layout"),
         Arch("RepGhost", "repghost_small", repghostnet_1x, "RepGhostNet-1.0x layout"),
         Arch("ACNet", "acnet_small", acnet_mobilenet, "MobileNetV1-0.5 with ACNet blocks"),
         Arch("RepViT", "repvit_block", repvit_m09, "RepViT-M0.9 widths"))


@dataclass(frozen=True)
class Case:
    """One model in both forms, in the work folder: KEY.onnx (train form), KEY_deploy.onnx, KEY.npz."""

    arch: str
    key: str
    layout: str
    seconds: tuple[float, float]  # per timed level: the goal's pairs, the others

    def train(self, work: Path) -> Path:
        return work / f"{self.key}.onnx"

    def deploy(self, work: Path) -> Path:
        return work / f"{self.key}_deploy.onnx"

    def reference(self, work: Path) -> Path:
        return work / f"{self.key}.npz"


def sample_case(arch: Arch, samples: Path, work: Path) -> Case:
    """The committed sample and its deploy twin, copied into the work folder."""
    for suffix in (".onnx", "_deploy.onnx", ".npz"):
        shutil.copyfile(samples / f"{arch.sample}{suffix}", work / f"{arch.sample}{suffix}")
    return Case(arch.name, arch.sample, f"`sample_models/{arch.sample}.onnx`, 1x3x32x32", SAMPLE_SECONDS)


def train_form(arch: Arch, size: int = LARGE_SHAPE[-1]):
    """The variant as a trained network holds it: BN scales and shifts randomized
    (bnfold.export.randomize_batchnorm), BN statistics measured on a seeded batch of 8 size x size
    inputs in training mode. Randomized statistics alone would make a wrong fold show just as well,
    but through 20 to 60 layers they grow the activations by orders of magnitude, and the errors
    against the reference would then measure that growth, not the fold."""
    import torch
    from bnfold.export import randomize_batchnorm
    module = arch.large()  # export_model seeds torch before calling: every call, the same weights
    randomize_batchnorm(module, SEED)
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # the statistics of the whole batch
    module.train()
    with torch.no_grad():
        module(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(SEED)))
    return module.eval()


def large_case(arch: Arch, work: Path) -> Case:
    """Export the 224x224 variant twice, from the same weights and BNs: as it trains, and merged in
    torch (bnfold.zoo.deploy) as its authors deploy it."""
    from bnfold.export import export_model
    from bnfold.zoo import deploy
    case = Case(arch.name, f"{arch.sample}_224", f"{arch.layout}, 1x3x224x224", LARGE_SECONDS)
    export_model(lambda: train_form(arch), case.train(work), input_shapes=[LARGE_SHAPE], seed=SEED,
                 reference=case.reference(work))
    export_model(lambda: deploy(train_form(arch)), case.deploy(work), input_shapes=[LARGE_SHAPE], seed=SEED)
    return case


# -------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One model of a case: what it holds, how exact it is, and how fast against the deploy form."""

    label: str
    path: Path | None
    counts: Counter = field(default_factory=Counter)  # nodes by op type
    max_abs: float | None = None
    status: str = "ok"
    note: str = ""  # what the tool says it left
    vs_deploy: dict = field(default_factory=dict)  # level -> bnfold.bench.LevelResult, deploy as baseline

    @property
    def sound(self) -> bool:
        return self.status == "ok"


def op_counts(path: Path) -> Counter:
    """The model's nodes by op type, subgraphs included."""
    import onnx
    from bnfold.graph import all_graphs
    return Counter(node.op_type for graph in all_graphs(onnx.load(str(path)).graph) for node in graph.node)


def assess_case(case: Case, work: Path, folds: dict[str, dict]) -> list[Row]:
    """The rows of one case: train form, each tool's fold (`folds`: column -> the tool's result, a
    dict with "error" or "note", its file at work/COLUMN/KEY.onnx), deploy form. Errors are against the
    train form's float64 reference on its stored input; a fold whose outputs moved from the train
    form's by more than its own error allows (measure.changed_function) is marked, not timed."""
    import measure
    reference = measure.load_reference(case.reference(work))
    original = measure.assess(case.train(work), reference)
    rows = [_row(TRAIN, case.train(work), original, None)]
    for column, result in folds.items():
        if "error" in result:
            rows.append(Row(column, None, status=f"crashed: {result['error']}"))
            continue
        path = work / column / f"{case.key}.onnx"
        try:
            quality = measure.assess(path, reference)
        except Exception as exc:  # noqa: BLE001 - an output onnxruntime cannot run is a finding
            rows.append(Row(column, None, status=f"does not run: {' '.join(str(exc).split())[:120]}"))
            continue
        rows.append(_row(column, path, quality, original, result.get("note")))
    rows.append(_row(DEPLOY, case.deploy(work), measure.assess(case.deploy(work), reference), original))
    return rows


def _row(label: str, path: Path, quality, original, note: str | None = None) -> Row:
    import measure
    changed = measure.changed_function(quality, original) if original is not None else None
    return Row(label, path, op_counts(path), quality.max_abs, f"changed function: {changed}" if changed else "ok",
               note or "")


# ------------------------------------------------------------------------------------------ timing
def time_case(case: Case, work: Path, rows: list[Row], scale: float) -> object | None:
    """Time every sound row against the deploy form at levels disabled and all, then bnfold against the
    train form at all, which is returned (a bnfold.bench.LevelResult, or None when bnfold has no sound
    row); budgets are the case's seconds times `scale`."""
    deploy = case.deploy(work)
    goal, other = (scale * s for s in case.seconds)
    for row in rows:
        if row.sound and row.label != DEPLOY:
            budgets = {"disabled": other, "all": goal if row.label == BNFOLD else other}
            _log(f"  {row.label} vs deploy form, {' and '.join(f'{b:g} s at {lvl}' for lvl, b in budgets.items())}")
            row.vs_deploy = {level: _bench(deploy, row.path, level, budget) for level, budget in budgets.items()}
    bnfold = next((r for r in rows if r.label == BNFOLD and r.sound), None)
    if bnfold is None:
        return None
    _log(f"  bnfold vs train form, {goal:g} s at all")
    return _bench(case.train(work), bnfold.path, "all", goal)


def _bench(baseline: Path, candidate: Path, level: str, seconds: float):
    """bnfold.bench_models at one level: 1 thread, interleaved pairs for `seconds`."""
    from bnfold import BenchOptions, bench_models
    options = BenchOptions(levels=(level,), threads=1, seconds=seconds, creations=1, warmup=3, seed=SEED)
    return bench_models(str(baseline), str(candidate), options, progress=False).levels[0]


def latency_ratio(level) -> tuple[float, float, float]:
    """Candidate latency / deploy latency with its 95% interval, from a bench result whose baseline was
    the deploy form (bench's speedup is baseline / candidate)."""
    return 1 / level.speedup, 1 / level.ci[1], 1 / level.ci[0]


def goal_verdict(level) -> str:
    """Within 5% of the deploy form's latency: 'yes' when the whole 95% interval is, 'not shown' when
    only the median ratio is, 'no' otherwise."""
    ratio, _, high = latency_ratio(level)
    return "yes" if high <= GOAL else "not shown" if ratio <= GOAL else "no"


def counts_reached(rows: list[Row]) -> bool:
    """bnfold's fold holds as few BatchNormalization and Conv nodes as the deploy-form export."""
    by_label = {r.label: r for r in rows}
    fold, deploy = by_label.get(BNFOLD), by_label[DEPLOY]
    return fold is not None and fold.sound and all(
        fold.counts[op] <= deploy.counts[op] for op in ("BatchNormalization", "Conv"))


def same_ops(rows: list[Row]) -> bool:
    """bnfold's fold holds exactly the deploy-form export's nodes by op type: the two can differ in
    speed only by noise (or by the values of the weights)."""
    by_label = {r.label: r for r in rows}
    fold = by_label.get(BNFOLD)
    return fold is not None and fold.sound and +fold.counts == +by_label[DEPLOY].counts


# -------------------------------------------------------------------------------------------- report
@dataclass
class CaseResult:
    case: Case
    rows: list[Row]
    speedup: object | None  # bnfold vs the train form at all (bnfold.bench.LevelResult)


def render(results: list[CaseResult], env: dict[str, str], command: str, seconds: float,
           scale: float) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Re-parameterizable models: bnfold and its peers vs the deploy-form export",
        "",
        f"Regenerate with `{command}` (this run took {seconds / 60:.1f} min). Generated {when} on "
        f"{env.pop('cpu')}, {env.pop('cores')} cores shared with other work, python {env.pop('python')}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        *_method(scale),
        *_summary(results),
    ]
    for result in results:
        lines += _case_table(result)
    return "\n".join(lines) + "\n"


def _method(scale: float) -> list[str]:
    (sample_goal, sample_other), (large_goal, large_other) = ([scale * s for s in pair]
                                                              for pair in (SAMPLE_SECONDS, LARGE_SECONDS))
    return [
        "## How it is measured",
        "",
        "- Models: per architecture, the committed 32x32 sample and a variant at a realistic width and a "
        "1x3x224x224 input built from `bnfold.zoo`'s blocks (the layouts are in `benchmarks/reparam.py`), "
        "each exported by `bnfold.export` (torch's dynamo exporter, opset 18, seed 0) twice from the same "
        "weights and BN statistics: in **train form** (every branch and BN) and in **deploy form** "
        "(merged in torch by `bnfold.zoo.deploy`, as the papers' code does before export). The samples' "
        "BNs are randomized (`--randomize-bn`); the 224x224 variants' BN scales and shifts are randomized "
        "and their statistics measured on a seeded batch in training mode, as a trained network's are "
        "(randomized statistics through 20-60 layers grow the outputs past 1e8). The 224x224 files are "
        "exported into a temporary folder by each run.",
        "- Each tool folds the train form in a fresh process: bnfold by `bnfold.fold_model` (default "
        "passes, `reparameterize` included), the peers as `benchmarks/tools.py` runs them (onnxoptimizer "
        "`fuse_bn_into_conv`, onnx-simplifier, onnxslim, onnxscript's default optimizer, onnxruntime's "
        "offline optimizer at ORT_ENABLE_BASIC).",
        "- **BN / Conv / Add**: nodes in the file. **max abs err**: the model run by onnxruntime with "
        "optimizations disabled on the stored input of the train form's float64 PyTorch reference, max "
        "|output - reference|; the deploy form is measured against the same reference (its merged "
        "weights are rounded to float32 once, in torch). A fold whose outputs moved from the train "
        "form's by more than 10x the train form's own error (+1e-5 of the range) is marked **changed "
        "function** and not timed.",
        "- **latency / deploy**: `bnfold.bench_models` (the machinery of `bnfold bench`) with the deploy "
        "form as baseline and the row as candidate: 1 intra-op thread, sequential, levels `disabled` and "
        "`all`, runs in interleaved pairs (A B, B A, ...) for a time budget per level: on the 224x224 variants "
        f"{large_goal:g} s for the goal's pairs (bnfold vs the deploy form and vs the train form at `all`), "
        f"{large_other:g} s for every other pair and level; on the samples {sample_goal:g} s and {sample_other:g} s "
        "(thousands of pairs; bench stops at 5000). The cell is median(row) / "
        "median(deploy) with its 95% paired-bootstrap interval: above 1 the row is slower than the "
        "deploy form. The deploy row gives the deploy form's median latency from bnfold's pair. An interval "
        "covers the noise within its pair's run only: on a shared machine the load changes between runs, "
        "and the same ratio can move by more than its interval from one pair, or one run, to the next.",
        "- **goal**: bnfold's fold reaches the deploy form's BN and Conv counts, and runs within 5% of its "
        "latency at `all`: **yes** when the whole 95% interval of the ratio is at most 1.05, **not shown** "
        "when only the median ratio is, **no** otherwise. **speedup over train form**: a separate "
        "`bench_models` pair, train form as baseline, bnfold's fold as candidate, at `all`.",
        "",
    ]


def _summary(results: list[CaseResult]) -> list[str]:
    lines = ["## Goal", "",
             "| architecture | model | BN train → bnfold (deploy) | Conv train → bnfold (deploy) | counts "
             "reached | same op types as deploy | bnfold latency / deploy at all (95% CI) | within 5% | "
             "bnfold speedup over train form at all (95% CI) |",
             "|---|---|---|---|---|---|---:|---|---:|"]
    for result in results:
        rows = {r.label: r for r in result.rows}
        train, fold, deploy = rows[TRAIN], rows.get(BNFOLD), rows[DEPLOY]
        counts = [f"{train.counts[op]} → {fold.counts[op] if fold and fold.sound else '-'} ({deploy.counts[op]})"
                  for op in ("BatchNormalization", "Conv")]
        level = fold.vs_deploy.get("all") if fold else None
        speedup = result.speedup
        lines.append(" | ".join([
            f"| {result.case.arch}", result.case.layout, *counts, "yes" if counts_reached(result.rows) else "no",
            "yes" if same_ops(result.rows) else "no",
            _ratio(level) if level else "", goal_verdict(level) if level else "",
            f"{speedup.speedup:.2f}x ({speedup.ci[0]:.2f}–{speedup.ci[1]:.2f})" if speedup else ""]) + " |")
    return lines + [""]


def _case_table(result: CaseResult) -> list[str]:
    lines = [f"## {result.case.arch}: {result.case.layout}", "",
             "| model | BN | Conv | Add | max abs err | latency / deploy, disabled | latency / deploy, all | status |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    fold = next((r for r in result.rows if r.label == BNFOLD), None)
    for row in result.rows:
        if row.label == DEPLOY:
            timed = fold.vs_deploy if fold else {}
            cells = [f"{_median_ms(timed[level].baseline)} ms" if level in timed else ""
                     for level in ("disabled", "all")]
            status = "baseline" if row.sound else row.status
        else:
            cells = [_ratio(row.vs_deploy[level]) if level in row.vs_deploy else ""
                     for level in ("disabled", "all")]
            status = row.status + (f" ({row.note})" if row.note else "")
        label = f"**{row.label}**" if row.label == BNFOLD else row.label
        counts = [str(row.counts[op]) if row.counts else "" for op in COUNTED]
        error = f"{row.max_abs:.2e}" if row.max_abs is not None else ""
        lines.append("| " + " | ".join([label, *counts, error, *cells, status.replace("|", "/")]) + " |")
    return lines + [""]


def _ratio(level) -> str:
    ratio, low, high = latency_ratio(level)
    return f"{ratio:.3f} ({low:.3f}–{high:.3f})"


def _median_ms(timing) -> str:
    import numpy as np
    return f"{np.median(timing.latency_s) * 1e3:.3f}"


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.scale > 0:
        _parser().error(f"--scale must be more than 0, got {args.scale:g}")
    sys.path.insert(1, str(ROOT))  # bnfold from this checkout (after benchmarks/, whose scripts import by name)
    import patterns
    from run import environment
    from tools import PACKAGES

    from bnfold.io import write_text_atomic
    columns = [c for c in patterns.columns() if c != "onnxruntime (all)"]
    with tempfile.TemporaryDirectory(prefix="bnfold-reparam-") as folder:
        work = Path(folder)
        cases = [sample_case(arch, Path(args.samples), work) for arch in ARCHS]
        for arch in ARCHS if not args.quick else ():
            _log(f"exporting {arch.name} at 224x224 (train and deploy form)")
            cases.append(large_case(arch, work))
        folds = {}
        for column in columns:
            _log(f"folding with {column}")
            folds[column] = patterns.fold_all(column, work, [case.key for case in cases])
        results = []
        for case in cases:
            _log(f"{case.arch}: {case.layout}")
            rows = assess_case(case, work, {column: folds[column][case.key] for column in columns})
            results.append(CaseResult(case, rows, time_case(case, work, rows, args.scale)))
    env = environment([name for name in PACKAGES if name != "load+save"])
    command = " ".join(["python benchmarks/reparam.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(results, env, command, time.perf_counter() - STARTED, args.scale)
    write_text_atomic(Path(args.out), text)
    print(text)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the committed samples only")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every timing budget by this (default: %(default)s)")
    parser.add_argument("--samples", default=str(ROOT / "sample_models"), help="folder of sample models")
    parser.add_argument("--out", default=str(HERE / "REPARAM.md"), help="where to write the tables")
    return parser


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
