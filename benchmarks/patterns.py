"""Regenerate benchmarks/PATTERNS.md: which tool folds each BatchNormalization pattern, measured.

    python benchmarks/patterns.py --out benchmarks/PATTERNS.md     # about 20 s on 2 cores

One small hand-built float32 model per pattern (random weights, randomized BN statistics, fixed
seed): a BN one or two harmless ops away from its linear op, a chain of per-channel affine ops, a BN
across shape ops, and the refusals whose BN must stay. Every tool of tools.py folds every model in
one fresh process per tool (a tool that crashes loses only the model it crashed on); bnfold runs
through `fold_model` to report why it left a BN, and onnxruntime runs a second time at ORT_ENABLE_ALL.
Each result is then run by onnxruntime with optimizations disabled on seeded random inputs against
the original: one whose outputs moved is "wrong", whatever it removed.

The pattern builders need only numpy and onnx: the tests import this file by path, without the
benchmark's other scripts, which are imported where the tools run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OPSET = 18
SEED = 0
SAMPLES = 3  # seeded random inputs per check
TOLERANCE = 1e-4  # max |result - original| over max |original|, per output
ARITHMETIC = ("BatchNormalization", "Add", "Sub", "Mul", "Div")  # what a complete fold leaves none of


# -------------------------------------------------------------------------------------------- models
class Chain:
    """A single-input model built op after op: each op reads the previous op's output."""

    def __init__(self, rng: np.random.Generator, x_shape: list[int]):
        self.rng = rng
        self.x_shape = x_shape
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.last = "x"

    def const(self, array: np.ndarray) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def then(self, op_type: str, *operands: str, **attrs) -> Chain:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, [self.last, *operands], [out],
                                           name=f"{op_type.lower()}{len(self.nodes)}", **attrs))
        self.last = out
        return self

    def weight(self, *shape: int, fan_in: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    def conv(self, c_in: int, c_out: int, kernel: int = 3, *, bias: bool = True) -> Chain:
        """A stride-1 Conv, padded to keep the spatial size."""
        operands = [self.weight(c_out, c_in, kernel, kernel, fan_in=c_in * kernel * kernel)]
        if bias:
            operands.append(self.const(self.rng.normal(0, 0.2, c_out).astype(np.float32)))
        return self.then("Conv", *operands, kernel_shape=[kernel] * 2, pads=[kernel // 2] * 4)

    def bn(self, channels: int) -> Chain:
        """Randomized statistics: a fresh BN (1, 0, 0, 1) would hide a wrong fold."""
        rng = self.rng
        stats = [rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels), rng.normal(0, 1, channels),
                 rng.normal(0, 0.5, channels), rng.uniform(0.1, 2.0, channels)]
        return self.then("BatchNormalization", *(self.const(s.astype(np.float32)) for s in stats), epsilon=1e-5)

    def affine(self, op_type: str, shape: tuple[int, ...]) -> Chain:
        """Add/Sub with a centred constant, Mul/Div with one of magnitude 0.5-2 (no division blow-up)."""
        if op_type in ("Add", "Sub"):
            value = self.rng.normal(0, 1, shape)
        else:
            value = self.rng.uniform(0.5, 2.0, shape) * self.rng.choice([-1, 1], shape)
        return self.then(op_type, self.const(value.astype(np.float32)))

    def reshape(self, *shape: int) -> Chain:
        return self.then("Reshape", self.const(np.array(shape, np.int64)))

    def model(self) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        graph = helper.make_graph(self.nodes, "pattern",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10  # loaded by every onnxruntime bnfold supports
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_then(*ops: str, bias: bool = True) -> Callable[[np.random.Generator], onnx.ModelProto]:
    """x [2, 16, 16, 16] -> Conv(16 -> 32, 3x3) -> each of `ops` in turn (BN, Identity, Dropout, or a
    per-channel Add/Sub/Mul/Div with a [1, 32, 1, 1] constant)."""
    def build(rng: np.random.Generator) -> onnx.ModelProto:
        chain = Chain(rng, [2, 16, 16, 16]).conv(16, 32, bias=bias)
        for op in ops:
            if op == "BN":
                chain.bn(32)
            elif op in ("Identity", "Dropout"):
                chain.then(op)  # Dropout without training_mode: inference, and no mask output
            else:
                chain.affine(op, (1, 32, 1, 1))
        return chain.model()
    return build


def bn_identity_conv1x1(rng):
    """x [2, 32, 16, 16] -> BN -> Identity -> Conv(32 -> 64, 1x1): folds forward into the Conv."""
    return Chain(rng, [2, 32, 16, 16]).bn(32).then("Identity").conv(32, 64, kernel=1).model()


def levit_token_mlp(rng):
    """LeViT's Linear + BatchNorm1d on tokens: x [2, 49, 64] -> MatMul(64 -> 128, no bias) -> Reshape
    [98, 128] -> BN(128) -> Reshape [2, 49, 128]."""
    chain = Chain(rng, [2, 49, 64])
    chain.then("MatMul", chain.weight(64, 128, fan_in=64))
    return chain.reshape(-1, 128).bn(128).reshape(-1, 49, 128).model()


def iresnet_head(rng):
    """A face-recognition head: x [2, 32, 7, 7] -> Relu -> BN2d(32) -> Flatten -> Gemm(1568 -> 128,
    transB=1, bias): BN channel c feeds Gemm inputs c*49 .. c*49+48."""
    chain = Chain(rng, [2, 32, 7, 7]).then("Relu").bn(32).then("Flatten", axis=1)
    weight = chain.weight(128, 32 * 49, fan_in=32 * 49)
    bias = chain.const(rng.normal(0, 0.2, 128).astype(np.float32))
    return chain.then("Gemm", weight, bias, transB=1).model()


def channels_last_mlp(rng):
    """x [2, 32, 8, 8] -> BN(32) -> Transpose to NHWC -> MatMul(32 -> 64): folds into the weight's rows."""
    chain = Chain(rng, [2, 32, 8, 8]).bn(32).then("Transpose", perm=[0, 2, 3, 1])
    return chain.then("MatMul", chain.weight(32, 64, fan_in=32)).model()


def matmul_bn1d_transposed(rng):
    """x [2, 49, 64] -> MatMul(64 -> 128) -> Transpose [2, 128, 49] -> BN1d(128) -> Transpose back."""
    chain = Chain(rng, [2, 49, 64])
    chain.then("MatMul", chain.weight(64, 128, fan_in=64)).then("Transpose", perm=[0, 2, 1])
    return chain.bn(128).then("Transpose", perm=[0, 2, 1]).model()


def conv_add_spatial_bn(rng):
    """x [2, 16, 8, 8] -> Conv(16 -> 32) -> Add(constant [1, 32, 8, 8], varies over space) -> BN."""
    return Chain(rng, [2, 16, 8, 8]).conv(16, 32).affine("Add", (1, 32, 8, 8)).bn(32).model()


def conv_reshape_bn1d(groups: int, length: int):
    """x [1, 16, 6, 6] -> Conv(16 -> 8) -> Reshape [1, groups, length] -> BN1d(groups)."""
    def build(rng: np.random.Generator) -> onnx.ModelProto:
        return Chain(rng, [1, 16, 6, 6]).conv(16, 8).reshape(1, groups, length).bn(groups).model()
    return build


def bn_padded_conv(rng):
    """x [2, 16, 16, 16] -> BN(16) -> Conv(16 -> 32, 3x3, pads 1): the padding sees zeros, not BN(0)."""
    return Chain(rng, [2, 16, 16, 16]).bn(16).conv(16, 32).model()


@dataclass(frozen=True)
class Pattern:
    """One row: the model, how many BNs it holds, the per-channel ops a complete fold also removes,
    and bnfold's goal: "folds", or "stays" for a refusal."""

    key: str
    label: str
    build: Callable[[np.random.Generator], onnx.ModelProto]
    bn: int = 1
    chain: tuple[str, ...] = ()
    expected: str = "folds"


PATTERNS = (
    Pattern("conv-identity-bn", "Conv → Identity → BN", conv_then("Identity", "BN")),
    Pattern("conv-dropout-bn", "Conv → Dropout (inference) → BN", conv_then("Dropout", "BN")),
    Pattern("bn-identity-conv1x1", "BN → Identity → Conv 1x1", bn_identity_conv1x1),
    Pattern("conv-add-bn", "Conv (no bias) → Add [1,C,1,1] → BN (TF bias)", conv_then("Add", "BN", bias=False),
            chain=("Add",)),
    Pattern("conv-mul-bn", "Conv → Mul [1,C,1,1] → BN", conv_then("Mul", "BN"), chain=("Mul",)),
    Pattern("conv-sub-bn", "Conv → Sub [1,C,1,1] → BN", conv_then("Sub", "BN"), chain=("Sub",)),
    Pattern("conv-div-bn", "Conv → Div [1,C,1,1] → BN", conv_then("Div", "BN"), chain=("Div",)),
    Pattern("conv-bn-bn", "Conv → BN → BN", conv_then("BN", "BN"), bn=2),
    Pattern("conv-bn-mul", "Conv → BN → Mul [1,C,1,1] (layer scale)", conv_then("BN", "Mul"), chain=("Mul",)),
    Pattern("levit-token-mlp", "LeViT: MatMul [B,T,K]x[K,C] → Reshape [B·T,C] → BN1d → Reshape [B,T,C]",
            levit_token_mlp),
    Pattern("iresnet-head", "IResNet head: Relu → BN2d → Flatten → Gemm", iresnet_head),
    Pattern("channels-last-mlp", "channels-last: BN (NCHW) → Transpose(0,2,3,1) → MatMul over C",
            channels_last_mlp),
    Pattern("matmul-transpose-bn1d", "MatMul rank 3 → Transpose(0,2,1) → BN1d → Transpose(0,2,1)",
            matmul_bn1d_transposed),
    Pattern("conv-add-spatial-bn", "refusal: Conv → Add [1,C,H,W] (varies over space) → BN",
            conv_add_spatial_bn, chain=("Add",), expected="stays"),
    Pattern("conv-reshape-regroup-bn1d",
            "Conv → Reshape [1,8,6,6] → [1,4,72] → BN1d(4) (2 whole Conv channels per BN channel)",
            conv_reshape_bn1d(4, 72)),
    Pattern("conv-reshape-split-bn1d",
            "refusal: Conv → Reshape [1,8,6,6] → [1,6,48] → BN1d(6) (Conv channels split)",
            conv_reshape_bn1d(6, 48), expected="stays"),
    Pattern("bn-padded-conv", "refusal: BN → Conv 3x3, pads 1", bn_padded_conv, expected="stays"),
)


def build(pattern: Pattern) -> onnx.ModelProto:
    return pattern.build(np.random.default_rng(SEED))


# --------------------------------------------------------------------------------------------- tools
Fold = Callable[[str, str], "str | None"]


def bnfold_model() -> Fold:
    """bnfold's Python API, which also says why it left each BN it left."""
    from bnfold import fold_model

    def fold(src: str, dst: str) -> str:
        folded, report = fold_model(onnx.load(src))
        onnx.save(folded, dst)
        return ", ".join(report.left_by_reason)
    return fold


def onnxruntime_all() -> Fold:
    """onnxruntime's optimizer at ORT_ENABLE_ALL, what a session runs by default, saved offline."""
    from tools import onnxruntime
    return onnxruntime("all")


def columns() -> dict[str, Callable[[], Fold]]:
    """The table's columns: bnfold, every peer of tools.py (onnxruntime at its basic level), then
    onnxruntime at ORT_ENABLE_ALL."""
    from tools import TOOLS
    peers = {f"{name} (basic)" if name == "onnxruntime" else name: tool
             for name, tool in TOOLS.items() if name not in ("load+save", "bnfold")}
    return {"bnfold": bnfold_model, **peers, "onnxruntime (all)": onnxruntime_all}


def fold_child(column: str, work: Path, keys: list[str]) -> None:
    """In a fresh process: fold each model with one tool, printing a JSON line once the tool is
    imported and one per model as it ends."""
    fold = columns()[column]()
    print(json.dumps({"ready": True}), flush=True)
    out = work / column
    out.mkdir(exist_ok=True)
    for key in keys:
        try:
            result = {"note": fold(str(work / f"{key}.onnx"), str(out / f"{key}.onnx")) or ""}
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a result to report
            result = {"error": f"{type(exc).__name__}: {_one_line(str(exc))}"}
        print(json.dumps({"model": key, **result}), flush=True)


def fold_all(column: str, work: Path, keys: list[str]) -> dict[str, dict]:
    """Run the tool's process until every model has a result. If it dies, the model it was folding
    gets the error and the next process starts after it; if it cannot even import, every model does."""
    results: dict[str, dict] = {}
    remaining = keys
    while remaining:
        done = subprocess.run([sys.executable, __file__, "--child", column, str(work), *remaining],
                              capture_output=True, text=True, timeout=600, check=False)
        lines = [_json(line) for line in done.stdout.splitlines()]
        results.update({v.pop("model"): v for v in lines if v.get("model") in remaining})
        remaining = [k for k in remaining if k not in results]
        if remaining:
            tail = _one_line((done.stderr.strip().splitlines() or ["no output"])[-1])
            error = {"error": f"the process died (exit status {done.returncode}: {tail})"}
            dead = remaining[:1] if {"ready": True} in lines else remaining
            results.update({k: error for k in dead})
            remaining = remaining[len(dead):]
    return results


def _json(line: str) -> dict:
    """A line the child printed as a JSON object, or {} for the tool's own printing."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _one_line(text: str) -> str:
    return " ".join(text.split())[:120]


# -------------------------------------------------------------------------------------------- checks
def outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The model's outputs by name, run by onnxruntime with graph optimizations disabled."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, f))) for f in feeds]


def seeded_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(SEED + 1)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
            for _ in range(SAMPLES)]


def moved(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> str | None:
    """Why the result computes something else than the original, or None."""
    worst = 0.0
    for g, w in zip(got, want):
        if g.keys() != w.keys() or any(g[k].shape != w[k].shape for k in w):
            return "outputs renamed or reshaped"
        worst = max([worst, *(np.max(np.abs(g[k] - w[k])) / np.max(np.abs(w[k])) for k in w)])
    return f"outputs moved by {worst:.1e} of their range" if not worst <= TOLERANCE else None


def verdict(pattern: Pattern, result: dict, path: Path, feeds, want) -> str:
    """One cell: error / wrong / folds / what the tool left."""
    if "error" in result:
        return f"error: {result['error']}"
    try:
        why = moved(outputs(path, feeds), want)
    except Exception as exc:  # noqa: BLE001 - an output onnxruntime cannot run is a finding
        return f"error: output does not run: {_one_line(str(exc))}"
    if why:
        return f"wrong ({why})"
    return removed(pattern, onnx.load(str(path))) + (f" ({result['note']})" if result.get("note") else "")


def removed(pattern: Pattern, folded: onnx.ModelProto) -> str:
    """What a correct result left on the data path: "folds" when no BN and none of the chain's affine
    ops remain there. Nodes that compute only constants are counted apart: onnxoptimizer leaves the
    arithmetic of its new weights in the graph as such nodes."""
    counts, constant = data_path_ops(folded)
    left = {op: counts[op] for op in ARITHMETIC if counts[op]}
    bn = left.pop("BatchNormalization", 0)
    kept = ", ".join(f"{n} {op}" if n > 1 else op for op, n in left.items())
    if bn == pattern.bn:
        cell = "leaves BN"
    elif bn:
        cell = f"folds {pattern.bn - bn} of {pattern.bn} BN" + (f", keeps {kept}" if kept else "")
    elif not kept:
        cell = "folds"
    else:
        cell = f"folds BN, keeps {kept}" if set(left) <= set(pattern.chain) else f"BN → {kept}"
    return cell + (f" (+{constant} nodes computing constants)" if constant else "")


def data_path_ops(model: onnx.ModelProto) -> tuple[Counter, int]:
    """Op counts of the nodes that read a graph input, directly or not, and the number of the other
    nodes (Constant nodes aside). An Add of a constant to a MatMul's output counts as "MatMul bias":
    MatMul has no bias input, so folding a BN into one leaves that Add. The models have no subgraphs;
    graph nodes are in topological order."""
    live = {i.name for i in model.graph.input}
    matmul_outputs: set[str] = set()
    counts: Counter = Counter()
    constant = 0
    for node in model.graph.node:
        data = [name for name in node.input if name in live]
        if not data:
            constant += node.op_type != "Constant"
            continue
        bias = node.op_type == "Add" and len(data) == 1 and data[0] in matmul_outputs
        counts["MatMul bias" if bias else node.op_type] += 1
        live.update(node.output)
        if node.op_type == "MatMul":
            matmul_outputs.update(node.output)
    return counts, constant


# -------------------------------------------------------------------------------------------- report
def environment() -> dict[str, str]:
    """The machine and the versions of python, the libraries and every tool, as run.py records them."""
    from run import environment as versions
    from tools import PACKAGES
    return versions([name for name in PACKAGES if name != "load+save"])


def render(rows: dict[str, dict[str, str]], env: dict[str, str], seconds: float) -> str:
    names = list(next(iter(rows.values())))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Which tool folds which BatchNormalization pattern",
        "",
        f"Regenerate with `python benchmarks/patterns.py --out benchmarks/PATTERNS.md` (this run took "
        f"{seconds:.0f} s). Generated {when} on {env.pop('cpu')}, {env.pop('cores')} cores, python "
        f"{env.pop('python')}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "## How it is measured",
        "",
        f"- One hand-built float32 model per row (opset {OPSET}, random weights, randomized BN statistics, "
        f"seed {SEED}, static shapes, up to 128 channels): each row's builder in `benchmarks/patterns.py` "
        "gives its shapes.",
        "- Each tool folds every model in one fresh process: bnfold by `bnfold.fold_model`, the peers as "
        "`benchmarks/tools.py` runs them (onnxoptimizer `fuse_bn_into_conv`, onnx-simplifier, onnxslim, "
        "onnxscript's default optimizer, onnxruntime's offline optimizer at ORT_ENABLE_BASIC), and "
        "onnxruntime once more at ORT_ENABLE_ALL with the optimized model saved "
        "(`SessionOptions.optimized_model_filepath`).",
        f"- Every result runs in onnxruntime with optimizations disabled on {SAMPLES} seeded random inputs "
        f"next to the original: **wrong** when an output moved by more than {TOLERANCE:g} of its range "
        "(max |result - original| / max |original|) or was renamed or reshaped, whatever the tool removed.",
        "- **folds**: no BatchNormalization and none of the row's Add/Sub/Mul/Div left on the data path "
        "(the nodes that read the input; no model holds other elementwise arithmetic), an Add of a constant "
        "right after a MatMul aside: that is the MatMul's bias, which a fold into a MatMul must add; "
        "**folds BN, keeps "
        "Mul**: the BN went, the per-channel op stayed; **BN → Mul, Add**: the BN became elementwise ops; "
        "**leaves BN**: every BN is still there; **+N nodes computing constants**: the result also holds "
        "N nodes that read no input (onnxoptimizer computes its folded weights that way, at run time "
        "unless the runtime folds constants). bnfold's cells add its reason for each BN it left.",
        "- **goal**: what bnfold is to do: fold, or leave the BN with a reason (the refusals; see the "
        "notes below the table).",
        "",
        "| pattern | BN | goal | " + " | ".join(names) + " |",
        "|---|---:|---|" + "---|" * len(names),
    ]
    for pattern in PATTERNS:
        cells = rows[pattern.key]
        lines.append(f"| {pattern.label} | {pattern.bn} | {pattern.expected} | "
                     + " | ".join(cells[n].replace("|", "/") for n in names) + " |")
    return "\n".join(lines + ["", NOTES])


NOTES = """Notes:

- Conv → Add [1,C,H,W] → BN: the Add's constant A cannot go into the Conv's bias, but the BN itself
  can be removed exactly: its factor s = scale / √(var + ε) into the Conv, and A rewritten as
  s·(A − mean) + B. A tool that does so is counted as folding.
- Reshape [1,8,6,6] → [1,4,72] regroups channels, yet each Conv channel k lies wholly in BN channel
  k // 2 (72 = 2 x 36), so an exact fold exists: Conv channel k takes BN channel k // 2's factor and
  shift. The [1,6,48] row is the refusal: Conv channel 1 (flat elements 36-71) straddles BN
  channels 0 and 1.
- BN → padded Conv: the Conv pads BN(x) with zeros, not with BN's image of zero, so the BN's shift
  cannot move into the Conv's bias near the border.
"""


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sys.path.insert(1, str(ROOT))  # bnfold from this checkout (after benchmarks/, whose scripts import by name)
    if args.child:
        column, work, *keys = args.child
        fold_child(column, Path(work), keys)
        return 0
    from bnfold.io import write_text_atomic
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-patterns-") as folder:
        rows = measure_all(Path(folder))
    text = render(rows, environment(), time.perf_counter() - started)
    write_text_atomic(Path(args.out), text)
    print(text)
    return 0


def measure_all(work: Path) -> dict[str, dict[str, str]]:
    """Build and save every model, fold them with every tool, and judge each result."""
    models = {p.key: build(p) for p in PATTERNS}
    for key, model in models.items():
        onnx.save(model, work / f"{key}.onnx")
    results = {}
    for column in columns():
        _log(f"folding with {column}")
        results[column] = fold_all(column, work, list(models))
    rows = {}
    for pattern in PATTERNS:
        feeds = seeded_feeds(models[pattern.key])
        want = outputs(work / f"{pattern.key}.onnx", feeds)
        rows[pattern.key] = {column: verdict(pattern, found[pattern.key], work / column / f"{pattern.key}.onnx",
                                             feeds, want)
                             for column, found in results.items()}
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "PATTERNS.md"), help="where to write the table")
    parser.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
