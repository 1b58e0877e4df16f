"""What the benchmark measures on a folded model: what is left, how exact it is, how fast it runs.

Accuracy: every model runs in onnxruntime with graph optimizations disabled (so onnxruntime changes
nothing) on the input stored in the model's float64 PyTorch reference (.npz with `input:NAME` and
`output:NAME`). Per output, `max_abs` is max |result - reference| and `max_rel` is that divided by
max |reference| (an error relative to the output's range: an element-wise relative error explodes
near zeros and says nothing about the fold).

One input's max error is a noisy figure: on the same model a correct fold comes out 2x better or 2x
worse than the original depending on the input. So the reference is extended with seeded inputs whose
float64 outputs come from evaluating the original graph in double precision (onnx.reference, every
float32 tensor and type turned into float64), used only where that evaluation reproduces the stored
PyTorch output (to 1e-7 of its range); `errors` holds the max error on each input.

A tool "changed the function" when its outputs on the stored input differ from the original model's
by more than ten times the original's own error against the reference (plus 1e-5 of the output's
range): float32 rounding moves results by about the original's error, a wrong fold by far more.
Changed names, shapes or output counts count as changed too.

Speed: every variant is timed at each level in one round-robin (each round runs every session once,
starting one further along each round), so drift on a shared machine spreads evenly over all of them
and any two variants' per-round samples are paired (see bnfold.bench.bootstrap_speedup_ci).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from bnfold.graph import all_graphs
from bnfold.runtime import session_options

CHANGE_FACTOR = 10.0  # outputs further from the original's than this many times its own error: changed
RANGE_FLOOR = 1e-5  # ... plus this share of the output's range, for outputs the original gets exact


@dataclass
class Quality:
    """The static and numeric check of one model file."""

    bn_left: int
    nodes: int
    max_abs: float | None  # on the stored input, vs the float64 reference; None without a reference
    max_rel: float | None
    errors: list[float] = field(default_factory=list)  # max abs error on each reference input
    outputs: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # on the stored input

    @property
    def mean_max_abs(self) -> float | None:
        return float(np.mean(self.errors)) if self.errors else None


@dataclass
class Reference:
    """Inputs with their float64 outputs: the stored PyTorch one first, then any seeded extras."""

    samples: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)
    note: str = "no float64 reference"

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return self.samples[0][0] if self.samples else {}


def count_ops(model: onnx.ModelProto) -> tuple[int, int]:
    """(BatchNormalization nodes, all nodes), subgraphs included."""
    ops = [node.op_type for graph in all_graphs(model.graph) for node in graph.node]
    return ops.count("BatchNormalization"), len(ops)


def session(path: Path, level: str) -> ort.InferenceSession:
    """One intra-op thread, sequential: the most stable figures on a shared machine."""
    options = session_options(level, threads=1)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_reference(path: Path | None) -> Reference:
    """The stored input and float64 outputs of a reference .npz (`input:NAME` / `output:NAME` keys)."""
    if path is None:
        return Reference()
    with np.load(path) as data:
        inputs = {k[len("input:"):]: data[k] for k in data.files if k.startswith("input:")}
        outputs = {k[len("output:"):]: data[k].astype(np.float64) for k in data.files
                   if k.startswith("output:")}
    return Reference([(inputs, outputs)], "the stored PyTorch input only")


def extend_reference(reference: Reference, model_path: Path, count: int, seed: int = 0) -> Reference:
    """Add `count` seeded inputs with float64 outputs from a double-precision evaluation of the model,
    if that evaluation reproduces the stored PyTorch output; otherwise return `reference` unchanged."""
    if not reference.samples or count < 1:
        return reference
    from onnx.reference import ReferenceEvaluator
    try:
        evaluator = ReferenceEvaluator(to_double(onnx.load(str(model_path))))
        stored_in, stored_out = reference.samples[0]
        check = _evaluate(evaluator, stored_in)
        if not _close(check, stored_out):
            return Reference(reference.samples, "the stored PyTorch input only (the float64 evaluation "
                                                "of the graph does not reproduce it)")
        rng = np.random.default_rng(seed)
        extra = []
        for _ in range(count):
            feeds = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in stored_in.items()}
            extra.append((feeds, _evaluate(evaluator, feeds)))
    except Exception as exc:  # noqa: BLE001 - onnx.reference lacks or fails an op: keep the stored input
        return Reference(reference.samples, f"the stored PyTorch input only ({type(exc).__name__} in the "
                                            "float64 evaluation)")
    return Reference(reference.samples + extra, f"the stored PyTorch input and {count} seeded inputs "
                                                "evaluated in float64")


def _evaluate(evaluator, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outputs = evaluator.run(None, {k: v.astype(np.float64) for k, v in feeds.items()})
    return dict(zip(evaluator.output_names, outputs))


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].shape == want[k].shape
        and np.max(np.abs(got[k] - want[k]), initial=0) <= 1e-7 * np.max(np.abs(want[k]), initial=0)
        for k in want)


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64: float32 initializers, constants, types and Casts."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graphs = [result.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            _tensor_to_double(tensor)
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.tensor_type.elem_type == TensorProto.FLOAT:
                info.type.tensor_type.elem_type = TensorProto.DOUBLE
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    _tensor_to_double(attr.t)
                elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.DOUBLE
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return result


def _tensor_to_double(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == TensorProto.FLOAT:
        values = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def assess(path: Path, reference: Reference) -> Quality:
    """Count what is left in the file and run it (optimizations disabled) against the reference."""
    bn_left, nodes = count_ops(onnx.load(str(path), load_external_data=False))
    sess = session(path, "disabled")
    names = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(names, sess.run(None, feeds))) for feeds, _ in reference.samples]
    if not runs:
        return Quality(bn_left, nodes, None, None, [], {})
    errors = [_errors(got, want) for got, (_, want) in zip(runs, reference.samples)]
    max_abs, max_rel = errors[0]
    return Quality(bn_left, nodes, max_abs, max_rel, [e[0] for e in errors], runs[0])


def _errors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|) over every output; inf when shapes differ."""
    max_abs = max_rel = 0.0
    for name, expected in want.items():
        actual = got.get(name)
        if actual is None or actual.shape != expected.shape:
            return float("inf"), float("inf")
        error = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0))
        max_abs = max(max_abs, error)
        max_rel = max(max_rel, error / max(float(np.max(np.abs(expected), initial=0)), 1e-30))
    return max_abs, max_rel


def changed_function(result: Quality, original: Quality) -> str | None:
    """Why `result` computes another function than `original`, or None when it does not."""
    if result.outputs.keys() != original.outputs.keys():
        return f"outputs renamed: {sorted(result.outputs)} vs {sorted(original.outputs)}"
    own_error = original.max_abs or 0.0
    for name, want in original.outputs.items():
        got = result.outputs[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"output {name}: {got.dtype}{list(got.shape)} instead of {want.dtype}{list(want.shape)}"
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
        if diff > CHANGE_FACTOR * own_error + RANGE_FLOOR * scale:
            return f"output {name} moved by {diff:.3g} (original's own error {own_error:.3g})"
    return None


@dataclass
class Timings:
    """Per variant and level: session creation times and per-round latencies, in seconds."""

    creation: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    latency: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def median_ms(self, key, kind: str = "latency") -> float | None:
        samples = getattr(self, kind).get(key)
        return float(np.median(samples)) * 1e3 if samples else None


def time_variants(paths: dict[str, Path], feeds: dict[str, np.ndarray], *, levels=("disabled", "all"),
                  creations: int = 3, seconds: float = 2.0, min_rounds: int = 5,
                  max_rounds: int = 2000) -> Timings:
    """Create and time every (variant, level) session, interleaved, with one shared time budget."""
    keys = [(name, level) for name in paths for level in levels]
    timings = Timings({k: [] for k in keys}, {k: [] for k in keys})
    sessions = {}
    for round_ in range(creations):
        for key in _rotated(keys, round_):
            sessions.pop(key, None)
            start = time.perf_counter()
            sessions[key] = session(paths[key[0]], key[1])
            timings.creation[key].append(time.perf_counter() - start)
    for key in keys:  # one untimed run each: first-run allocations are not latency
        sessions[key].run(None, feeds)
    start, round_ = time.perf_counter(), 0
    while round_ < max_rounds and (round_ < min_rounds or time.perf_counter() - start < seconds):
        for key in _rotated(keys, round_):
            t0 = time.perf_counter()
            sessions[key].run(None, feeds)
            timings.latency[key].append(time.perf_counter() - t0)
        round_ += 1
    return timings


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]
