"""Regenerate benchmarks/LOWER_STANDALONE.md: is a BatchNormalization that no rule folds faster in
onnxruntime as it is (`--lower-standalone keep`), as Mul then Add (`mul-add`), or as a 1x1 depthwise
Conv?

    python benchmarks/lower_standalone.py                                   # the committed run
    python benchmarks/lower_standalone.py --seconds 0.5 --output /tmp/LS.md  # a smoke run

For each sample model that keeps BNs after folding, `bnfold fold` writes the `keep` and the `mul-add`
outputs; the depthwise variant is made here from the `mul-add` output (each Mul + Add pair that bnfold
wrote becomes Conv(x, W [C, 1, 1, 1], B [C], group=C) with the same constants: bnfold has no such
option). `bnfold verify` checks each candidate against the `keep` output, then
`bnfold bench KEEP CANDIDATE --level disabled,all --json` measures it, A/B interleaved, each command in
a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import onnx
from machine import cpu_name
from onnx import helper, numpy_helper

from bnfold.io import write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ("densenet_small", "preact_block")  # the samples whose BNs are not all folded
LEVELS = "disabled,all"
CANDIDATES = ("mul-add", "depthwise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="bench time budget per level")
    parser.add_argument("--output", default=str(HERE / "LOWER_STANDALONE.md"))
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-lower-") as work:
        for name in MODELS:
            files = variants(ROOT / "sample_models" / f"{name}.onnx", Path(work))
            results[name] = {"bn": bn_count(files["keep"]),
                             **{c: measure(files["keep"], files[c], args.seconds) for c in CANDIDATES}}
    load = (load, os.getloadavg()[0])
    write_text_atomic(args.output, render(results, args, time.perf_counter() - started, load))
    print(Path(args.output).read_text())


def bnfold(*arguments: str) -> str:
    """One bnfold command in a fresh process, as a user runs it; its stdout."""
    command = [sys.executable, "-m", "bnfold", *arguments]
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def variants(source: Path, work: Path) -> dict[str, Path]:
    """The keep, mul-add and depthwise forms of `source`'s folded model."""
    files = {form: work / f"{source.stem}.{form}.onnx" for form in ("keep", "mul-add", "depthwise")}
    for form in ("keep", "mul-add"):
        bnfold("fold", str(source), "-o", str(files[form]), "--lower-standalone", form)
    onnx.save(depthwise(onnx.load(files["mul-add"])), files["depthwise"])
    return files


def depthwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Mul + Add pair of --lower-standalone mul-add (nodes `<bn>_mul`, `<bn>_add`, constants of
    shape [C, 1, ..., 1]) as one 1x1 depthwise Conv with the same constants."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    readers = {name: node for node in graph.node for name in node.input}
    for position, mul in reversed(list(enumerate(graph.node))):
        add = readers.get(mul.output[0])
        if mul.op_type != "Mul" or not mul.name.endswith("_mul") or add is None \
                or add.name != f"{mul.name[:-len('_mul')]}_add":
            continue
        scale = numpy_helper.to_array(constants[mul.input[1]])
        shift = numpy_helper.to_array(constants[add.input[1]])
        constants[mul.input[1]].CopyFrom(numpy_helper.from_array(scale.reshape(len(scale), 1, *scale.shape[1:]),
                                                                 mul.input[1]))
        constants[add.input[1]].CopyFrom(numpy_helper.from_array(shift.reshape(-1), add.input[1]))
        conv = helper.make_node("Conv", [mul.input[0], mul.input[1], add.input[1]], [add.output[0]],
                                name=mul.name.replace("_mul", "_conv"), group=len(scale),
                                kernel_shape=[1] * (scale.ndim - 1))
        graph.node.remove(add)
        graph.node.insert(position, conv)
        graph.node.remove(mul)
    onnx.checker.check_model(model, full_check=True)
    return model


def bn_count(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(path).graph.node)


def measure(keep: Path, candidate: Path, seconds: float) -> dict:
    """The candidate verified against `keep`, then benched against it."""
    verified = json.loads(bnfold("verify", str(keep), str(candidate), "--json"))["passed"]
    bench = json.loads(bnfold("bench", str(keep), str(candidate), "--level", LEVELS, "--seconds", str(seconds),
                              "--json"))
    return {"verified": verified, "levels": {level["level"]: level for level in bench["levels"]}}


def render(results: dict, args, seconds: float, load: tuple[float, float]) -> str:
    rows = []
    for name, result in results.items():
        for level in LEVELS.split(","):
            cells = []
            for candidate in CANDIDATES:
                measured = result[candidate]["levels"][level]
                cells += [f"{measured['baseline']['latency_ms']['median']:.3f}",
                          f"{measured['candidate']['latency_ms']['median']:.3f}",
                          f"{measured['speedup']:.3f}x ({measured['ci'][0]:.3f}-{measured['ci'][1]:.3f})",
                          measured["verdict"]]
            rows.append(f"| {name} | {result['bn']} | {level} | " + " | ".join(cells) + " |")
    verified = all(result[c]["verified"] for result in results.values() for c in CANDIDATES)
    verdicts = {c: [result[c]["levels"][level]["verdict"] for result in results.values()
                    for level in LEVELS.split(",")] for c in CANDIDATES}
    tally = "; ".join(f"{c}: faster in {v.count('faster')}, slower in {v.count('slower')}, no significant "
                      f"difference in {v.count('no-significant-difference')} of {len(v)}" for c, v in verdicts.items())
    return "\n".join([
        "# BatchNormalizations left after folding: keep, Mul + Add, or a depthwise Conv?",
        "",
        f"Regenerate with `python benchmarks/lower_standalone.py` (this run took {seconds:.0f} s). Generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} cores, shared with "
        f"other work (1-minute load average {load[0]:.1f} before the run, {load[1]:.1f} after).",
        "",
        f"Versions: python {platform.python_version()}, onnx {version('onnx')}, onnxruntime "
        f"{version('onnxruntime')}, numpy {version('numpy')}, bnfold {version('bnfold')}.",
        "",
        "Models: the committed samples whose BNs are not all folded. **keep** is `bnfold fold M -o KEEP` "
        "(`--lower-standalone keep`, the default), **mul-add** `bnfold fold M -o MULADD --lower-standalone "
        "mul-add`, **depthwise** the mul-add output with each Mul + Add pair replaced by one 1x1 depthwise "
        "Conv holding the same constants (made by the script). Each candidate is checked with `bnfold verify "
        f"KEEP CANDIDATE` (all passed: **{'yes' if verified else 'NO'}**) and measured with `bnfold bench KEEP "
        f"CANDIDATE --level {LEVELS} --seconds {args.seconds:g} --json` (1 intra-op thread, A/B interleaved "
        "pairs, batch 1); each command runs in a fresh process.",
        "",
        "- **BN left**: BatchNormalization nodes in the keep output (the candidates have none).",
        "- **ms**: median latency; keep is measured again in each candidate's bench (same model, other run).",
        "- **speedup**: median keep / median candidate, with its 95% paired-bootstrap interval; above 1 the "
        "candidate is faster. **verdict**: bench's, from that interval.",
        "",
        "| model | BN left | level | keep ms | mul-add ms | speedup (95% CI) | verdict | keep ms | depthwise ms "
        "| speedup (95% CI) | verdict |",
        "|---|--:|---|--:|--:|---|---|--:|--:|---|---|",
        *rows,
        "",
        f"**Result** (model x level): {tally}. {_default(verdicts['mul-add'])}",
        "",
    ])


def _default(verdicts: list[str]) -> str:
    """What the measurement says about the default (`keep` unless mul-add is faster everywhere)."""
    if all(v == "faster" for v in verdicts):
        return "mul-add is faster everywhere: it should be the default."
    return ("The default stays `keep`: mul-add is not faster everywhere in onnxruntime; it is for runtimes "
            "without a BatchNormalization kernel.")


if __name__ == "__main__":
    main()
