"""What the benchmark measures on a folded model: what is left, how exact it is, how fast it runs.

Accuracy: every model runs in onnxruntime with graph optimizations disabled (so onnxruntime changes
nothing) on the input stored in the model's float64 PyTorch reference (.npz with `input:NAME` and
`output:NAME`). Per output, `max_abs` is max |result - reference| and `max_rel` is that divided by
max |reference| (an error relative to the output's range: an element-wise relative error explodes
near zeros and says nothing about the fold). A tool "changed the function" when its outputs differ
from the original model's by more than ten times the original's own error against the reference
(plus 1e-5 of the output's range): float32 rounding moves results by about the original's error, a
wrong fold by far more. Changed names, shapes or output counts count as changed too.

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

from bnfold.bench import LEVELS

CHANGE_FACTOR = 10.0  # outputs further from the original's than this many times its own error: changed
RANGE_FLOOR = 1e-5  # ... plus this share of the output's range, for outputs the original gets exact


@dataclass
class Quality:
    """The static and numeric check of one model file."""

    bn_left: int
    nodes: int
    max_abs: float | None  # vs the float64 reference; None without a reference
    max_rel: float | None
    outputs: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


def count_ops(model: onnx.ModelProto) -> tuple[int, int]:
    """(BatchNormalization nodes, all nodes), subgraphs included."""
    bn = nodes = 0
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            nodes += 1
            bn += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                stack.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return bn, nodes


def session(path: Path, level: str) -> ort.InferenceSession:
    """One intra-op thread, sequential: the most stable figures on a shared machine."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_reference(path: Path | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, float64 outputs) from a reference .npz with `input:NAME` / `output:NAME` keys."""
    if path is None:
        return {}, {}
    with np.load(path) as data:
        inputs = {k[len("input:"):]: data[k] for k in data.files if k.startswith("input:")}
        outputs = {k[len("output:"):]: data[k].astype(np.float64) for k in data.files
                   if k.startswith("output:")}
    return inputs, outputs


def assess(path: Path, feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> Quality:
    """Count what is left in the file and run it (optimizations disabled) against the reference."""
    bn_left, nodes = count_ops(onnx.load(str(path), load_external_data=False))
    sess = session(path, "disabled")
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(None, feeds)))
    if not reference:
        return Quality(bn_left, nodes, None, None, outputs)
    max_abs = max_rel = 0.0
    for name, want in reference.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            return Quality(bn_left, nodes, float("inf"), float("inf"), outputs)
        error = float(np.max(np.abs(got.astype(np.float64) - want)))
        max_abs = max(max_abs, error)
        max_rel = max(max_rel, error / max(float(np.max(np.abs(want))), 1e-30))
    return Quality(bn_left, nodes, max_abs, max_rel, outputs)


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
