"""Regenerate benchmarks/QDQ.md: a quantization-aware-training (Q/DQ) ResNet-18 with its BatchNorms, folded
by bnfold, and folded by hand before quantizing: which int8 kernels onnxruntime builds, and how fast each runs.

    python benchmarks/qdq.py                                  # the committed run (~3 min on 2 shared cores; torch)
    python benchmarks/qdq.py --seconds 0.5 --out /tmp/QDQ.md  # a smoke run

Two sizes, both built by sample_models/make_qat.py from a float export (TorchScript, opset 17, every BN
kept, randomized BN statistics, seed 0) and one calibration: `resnet_qat`, the committed sample
(ResNet-18 layout at width 1/8, 1x3x64x64), and `resnet18_qat`, ResNet-18 at full width with a
1x3x224x224 input (11.7M parameters), built here into a temporary folder and never committed. Rows:

- original: the Q/DQ model, each BN after its Conv (for resnet_qat, the committed file);
- bnfold: `bnfold.fold_model` of the original;
- hand-folded reference: the same float model and calibration, each BN folded into the float weights
  before quantizing (`make_qat.quantize(..., fold_bn=True)`): what a correct fold reaches.

For each: the ops of the graph onnxruntime runs at ORT_ENABLE_ALL on CPU (saved with
`SessionOptions.optimized_model_filepath`); the output and the code at every QuantizeLinear next to
the original's (onnxruntime, optimizations off, the export's reference input); and the latency against
the original with `bnfold.bench_models` at `disabled` and `all`, 1 thread, A/B interleaved pairs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402

from bnfold import BenchOptions, VerifyOptions, bench_models, fold_model, verify_models  # noqa: E402
from bnfold.io import save_model, write_text_atomic  # noqa: E402
from bnfold.runtime import create_session, session_options  # noqa: E402
from sample_models.make_qat import build  # noqa: E402

LEVELS = ("disabled", "all")
ORIGINAL, BNFOLD, HAND = "original", "bnfold", "hand-folded reference"
FLOAT_CONV = ("Conv", "FusedConv")  # any domain: onnxruntime's NCHWc Conv too
OTHER_INT8 = ("QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
ISSUE_SPEEDUP = 4.6  # issue 12: QAT ResNet-18, ~18 ms -> ~3.7 ms at ORT_ENABLE_ALL, 1 thread
GOAL = 0.9  # bnfold's speedup at `all` at least 90% of the hand-folded reference's
PAIRS = ((ORIGINAL, BNFOLD), (ORIGINAL, HAND), (HAND, BNFOLD))  # (baseline, candidate) benched


@dataclass
class Variant:
    """One model of a size: its file, what onnxruntime builds of it, how it compares with the original."""

    path: Path
    fold: str = ""  # bnfold's decisions (bnfold row only)
    kernels: Counter = field(default_factory=Counter)
    output_error: float = 0.0  # max |y - y_original| / max |y_original|
    flipped: tuple[int, int] = (0, 0)  # (codes that differ from the original's, codes) over all QuantizeLinear
    flipped_vs_hand: int = 0  # codes that differ from the hand-folded reference's (bnfold row only)
    layer_by_layer: str = ""  # `bnfold verify --quantized` against the original: verdict and summary
    bench: dict = field(default_factory=dict)  # baseline row -> level -> LevelResult, this row the candidate


def int8_isa() -> str:
    """The CPU's vector extensions that onnxruntime's int8 kernels use (VNNI speeds them up most)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(flag for flag in wanted if flag in flags.split()) or "none of AVX2, AVX-512, VNNI, AMX"


def resnet18():
    """ResNet-18 at full width, 1000 classes (bnfold.zoo's ResNet with ResNet-18's widths)."""
    from bnfold.zoo import BasicBlock, ResNet
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 1000)


SIZES = {"resnet_qat": ("resnet_small", None),
         "resnet18_qat": (resnet18, ((1, 3, 224, 224),))}


def variants(name: str, work: Path) -> tuple[dict[str, Variant], dict[str, np.ndarray], bool]:
    """The three models of one size saved into `work`, the reference input, and for resnet_qat whether
    the rebuilt original is the committed file."""
    sample, shapes = SIZES[name]
    built = build(sample, work, input_shapes=shapes)
    committed = ROOT / "sample_models" / "resnet_qat.onnx"
    same = name == "resnet_qat" and onnx.load(str(committed)).SerializeToString() == built.qdq.SerializeToString()
    folded, report = fold_model(built.qdq)
    models = {ORIGINAL: built.qdq, BNFOLD: folded, HAND: built.folded}
    result = {}
    for label, model in models.items():
        path = work / f"{name}_{label.split()[0]}.onnx"
        save_model(model, path)
        result[label] = Variant(path)
    left = Counter(d.reason for d in report.decisions if not d.folded)
    result[BNFOLD].fold = f"{report.folded} of {report.total} folded" + "".join(
        f", {count} left ({reason})" for reason, count in sorted(left.items()))
    return result, built.inputs, same


def kernels(path: Path, work: Path) -> Counter:
    """Op types of the graph onnxruntime runs at ORT_ENABLE_ALL (one thread, CPU), any domain."""
    import onnxruntime as ort

    options = session_options("all", threads=1)
    options.optimized_model_filepath = str(work / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def outputs_and_codes(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph outputs and every QuantizeLinear's codes, optimizations off."""
    model = onnx.load(str(path))
    codes = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in codes)
    return create_session(model, label=path.name).run(inputs)


def compare(original: dict[str, np.ndarray], other: dict[str, np.ndarray], output_names) -> tuple[float, tuple]:
    """(max relative output difference, (codes that differ, codes)) of two runs of outputs_and_codes."""
    error = max(float(np.abs(other[n] - original[n]).max() / np.abs(original[n]).max()) for n in output_names)
    codes = [n for n in original if n not in output_names]
    flipped = sum(int(np.count_nonzero(original[n] != other[n])) for n in codes)
    return error, (flipped, sum(original[n].size for n in codes))


def measure(name: str, work: Path, seconds: float) -> tuple[dict[str, Variant], bool]:
    models, inputs, same = variants(name, work)
    output_names = [o.name for o in onnx.load(str(models[ORIGINAL].path)).graph.output]
    runs = {label: outputs_and_codes(variant.path, inputs) for label, variant in models.items()}
    models[BNFOLD].flipped_vs_hand = compare(runs[HAND], runs[BNFOLD], output_names)[1][0]
    for label, variant in models.items():
        variant.kernels = kernels(variant.path, work)
        variant.output_error, variant.flipped = compare(runs[ORIGINAL], runs[label], output_names)
        if label != ORIGINAL:
            verified = verify_models(str(models[ORIGINAL].path), str(variant.path), VerifyOptions(quantized=True))
            summary = verified.quantized.summary().removeprefix("layer by layer: ")
            variant.layer_by_layer = f"{'passed' if verified else 'FAILED'}: {summary}"
    options = BenchOptions(levels=LEVELS, threads=1, seconds=seconds)
    for baseline, candidate in PAIRS:
        report = bench_models(str(models[baseline].path), str(models[candidate].path), options, progress=False)
        models[candidate].bench[baseline] = {level.level: level for level in report.levels}
        print(f"{name} {candidate} vs {baseline}: " + "; ".join(level.verdict_line(0.95) for level in report.levels),
              flush=True)
    return models, same


# ------------------------------------------------------------------------------------------- report
def kernel_row(name: str, label: str, variant: Variant) -> str:
    k = variant.kernels
    int8 = sorted(op for op in k if op.startswith("QLinear") and op != "QLinearConv" or op in OTHER_INT8)
    other = ", ".join(f"{op} {k[op]}" for op in int8) or "-"
    return (f"| {name} | {label} | {variant.fold or '-'} | {k['QLinearConv']} | {other} "
            f"| {sum(k[op] for op in FLOAT_CONV)} | {k['BatchNormalization']} | {k['DequantizeLinear']} "
            f"| {k['QuantizeLinear']} |")


def latency_rows(name: str, models: dict[str, Variant]) -> list[str]:
    rows = []
    for baseline, candidate in PAIRS:
        for level, result in models[candidate].bench[baseline].items():
            base, cand = (t.summary()["latency_ms"]["median"] for t in (result.baseline, result.candidate))
            rows.append(f"| {name} | {baseline} | {candidate} | {level} | {base:.3f} | {cand:.3f} "
                        f"| {result.speedup:.2f}x ({result.ci[0]:.2f}-{result.ci[1]:.2f}) | {result.verdict} |")
    return rows


def equivalence_rows(name: str, models: dict[str, Variant]) -> list[str]:
    return [f"| {name} | {label} | {models[label].output_error:.2e} | {models[label].flipped[0]} of "
            f"{models[label].flipped[1]} | {models[label].flipped_vs_hand if label == BNFOLD else '-'} "
            f"| {models[label].layer_by_layer} |"
            for label in (BNFOLD, HAND)]


def goal_line(models: dict[str, Variant]) -> str:
    ours, hand = (models[label].bench[ORIGINAL]["all"].speedup for label in (BNFOLD, HAND))
    direct = models[BNFOLD].bench[HAND]["all"]
    return (f"**Goal** (resnet18_qat at `all`): bnfold {ours:.2f}x faster than the original, the hand-folded "
            f"reference {hand:.2f}x: {ours / hand:.0%} of its speedup (goal {GOAL:.0%}): "
            f"**{'met' if ours >= GOAL * hand else 'NOT met'}**. Benched directly, bnfold against the reference: "
            f"{direct.speedup:.2f}x ({direct.ci[0]:.2f}-{direct.ci[1]:.2f}), {direct.verdict}. The issue measured "
            f"{ISSUE_SPEEDUP}x on its machine.")


def render(results: dict, same: bool, args, seconds: float, load: tuple[float, float]) -> str:
    kernel_rows = [kernel_row(name, label, v) for name, models in results.items() for label, v in models.items()]
    latency = [row for name, models in results.items() for row in latency_rows(name, models)]
    equal = [row for name, models in results.items() for row in equivalence_rows(name, models)]
    return "\n".join([
        "# BatchNorm in quantized (Q/DQ) graphs: onnxruntime's int8 kernels before and after the fold",
        "",
        f"Regenerate with `python benchmarks/qdq.py` (this run took {seconds:.0f} s). Generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} cores, shared with "
        f"other work (1-minute load average {load[0]:.1f} before the run, {load[1]:.1f} after); int8 vector "
        f"extensions: {int8_isa()}.",
        "",
        f"Versions: python {platform.python_version()}, onnx {version('onnx')}, onnxruntime "
        f"{version('onnxruntime')}, numpy {version('numpy')}, torch {version('torch')}, bnfold {version('bnfold')}.",
        "",
        "## How it is measured",
        "",
        "- Models (`sample_models/make_qat.py`): a float export of bnfold.zoo's ResNet (TorchScript, opset 17, "
        "every BN kept, randomized BN statistics, seed 0) rewritten into the QAT layout: uint8 per-tensor "
        "QuantizeLinear -> DequantizeLinear pairs with their own constants on every input of a Conv, Gemm, "
        "Add and MaxPool, calibrated (min/max) on 256 seeded N(0, 1) inputs of the float model; int8 weights "
        "per output channel (symmetric, max |W| / 127) behind DequantizeLinear; each BN after its Conv. "
        "**resnet_qat** is the committed sample (ResNet-18 layout, width 1/8, 1x3x64x64; rebuilt here "
        f"identical to the committed file: **{'yes' if same else 'NO'}**); **resnet18_qat** is ResNet-18 at "
        "full width, 1x3x224x224, built for this run only.",
        f"- Rows: **{ORIGINAL}** that model; **{BNFOLD}** `bnfold.fold_model` of it; **{HAND}** the same "
        "float model and calibration with each BN folded into the float weights before quantizing (what a "
        "correct fold of the BN into the quantized weights reaches).",
        "- Kernels: the graph onnxruntime runs at ORT_ENABLE_ALL (CPU, 1 thread), saved with "
        "`SessionOptions.optimized_model_filepath`. **other int8** counts QLinear* ops but QLinearConv, "
        "QGemm, ConvInteger and MatMulInteger(ToFloat); **float Conv** counts Conv and FusedConv of any "
        "domain; DequantizeLinear and QuantizeLinear are those left to run on every inference.",
        "- Equivalence: onnxruntime with optimizations off on the export's reference input; **output** is "
        "max |y - y_original| / max |y_original|; **codes flipped** counts the elements of every "
        "QuantizeLinear output that differ from the original's (one code flipped early moves the ones after "
        "it: compared end to end, the flips add up layer after layer), and for bnfold those that differ "
        "from the hand-folded reference's. **layer by layer** is `bnfold verify --quantized` (its seeded "
        "input): each QuantizeLinear of the candidate fed the original's codes, so only the layer in between "
        "can flip a code.",
        f"- Latency: `bnfold.bench_models(baseline, candidate)` at {' and '.join(LEVELS)}, 1 intra-op thread, "
        f"batch 1, {args.seconds:g} s per level, A/B interleaved pairs; **speedup** is median baseline / "
        "median candidate with its 95% paired-bootstrap interval, **verdict** bench's from that interval.",
        "",
        "## Kernels onnxruntime builds (ORT_ENABLE_ALL)",
        "",
        "| model | row | bnfold's fold | QLinearConv | other int8 | float Conv | BatchNormalization "
        "| DequantizeLinear | QuantizeLinear |",
        "|---|---|---|--:|---|--:|--:|--:|--:|",
        *kernel_rows,
        "",
        "## Latency (1 thread)",
        "",
        "| model | baseline | candidate | level | baseline ms | candidate ms | speedup (95% CI) | verdict |",
        "|---|---|---|---|--:|--:|---|---|",
        *latency,
        "",
        goal_line(results["resnet18_qat"]),
        "",
        "## Equivalence with the original",
        "",
        "| model | candidate | output | codes flipped | codes flipped vs the hand-folded reference "
        "| layer by layer (`bnfold verify --quantized`) |",
        "|---|---|--:|--:|--:|---|",
        *equal,
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="bench time budget per level (default 10)")
    parser.add_argument("--out", default=str(HERE / "QDQ.md"), help="the markdown file to write")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    results, same = {}, False
    with tempfile.TemporaryDirectory(prefix="bnfold-qdq-") as work:
        for name in SIZES:
            folder = Path(work) / name
            folder.mkdir()
            results[name], same_here = measure(name, folder, args.seconds)
            same = same or same_here
    text = render(results, same, args, time.perf_counter() - started, (load, os.getloadavg()[0]))
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
