"""Measure, honestly, how much faster one ONNX model runs than another under onnxruntime.

Why it is done this way:

* Latency on a real machine drifts (frequency scaling, other processes, cache state). The two models
  are therefore timed in alternation, in pairs: pair 0 runs A then B, pair 1 runs B then A, and so on,
  so slow drift and any "who runs second" effect hit both models alike.
* The speedup is the ratio of the median latencies, baseline / candidate (above 1: the candidate is
  faster). Its spread is a seeded *paired* bootstrap: the pairs are resampled with replacement and the
  ratio of medians is recomputed on each resample; the interval is the central `confidence` share of
  those ratios. Resampling pairs rather than each model's runs apart keeps the drift that both models
  saw together inside every resample, so it cancels instead of widening the interval.
* The verdict follows the interval only: faster when it lies wholly above 1, slower when wholly below,
  otherwise no significant difference. Below MIN_VERDICT_PAIRS pairs a bootstrap says nothing, so
  there is no verdict.
* onnxruntime does its graph optimizations (its own Conv+BN fusion among them, at `basic` and above)
  while it creates a session, so session creation is timed too: several creations per model and level,
  alternating, and the median is reported.

Inputs are seeded random tensors built from the models' declared inputs; both models get the very same
arrays. A symbolic first dimension is the batch (`batch`, default 1); any other symbolic dimension is
:data:`OTHER_SYMBOLIC_DIM` unless `shapes` gives the input's full shape.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BnfoldError, first_line
from .io import atomic_output, load_model

LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
OTHER_SYMBOLIC_DIM = 32  # large enough for the pooling of image models, small enough to stay quick
DEFAULT_SECONDS = 3.0  # time budget per level when neither runs nor seconds is given
MIN_PAIRS = 10  # a time budget never yields fewer pairs than this ...
MAX_PAIRS = 5000  # ... nor more than this (tiny models would otherwise produce huge sample lists)
BOOTSTRAP_RESAMPLES = 2000
MIN_VERDICT_PAIRS = 5  # fewer pairs give an interval that means nothing: no verdict
PLOT_HINT = "pip install 'bnfold[plot]'"

_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


@dataclass
class BenchOptions:
    """How to measure. `runs` (exact pair count) and `seconds` (time budget per level) exclude each other;
    with neither, each level gets :data:`DEFAULT_SECONDS`. `plot` is where :func:`run_bench` writes the
    latency plot; :func:`bench_models` itself writes nothing."""

    levels: tuple[str, ...] = ("disabled", "all")
    threads: int = 1
    batch: int = 1
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"
    warmup: int = 5
    runs: int | None = None
    seconds: float | None = None
    creations: int = 3
    seed: int = 0
    confidence: float = 0.95
    plot: str | None = None

    def validate(self) -> None:
        """Raise BnfoldError for settings that cannot give a measurement."""
        unknown = [lvl for lvl in self.levels if lvl not in LEVELS]
        if not self.levels or unknown:
            raise BnfoldError(f"unknown optimization level {', '.join(unknown) or '(none)'}",
                              note=f"choose from {', '.join(LEVELS)}, comma-separated")
        if self.runs is not None and self.seconds is not None:
            raise BnfoldError("give either --runs or --seconds, not both")
        for name in ("threads", "batch", "creations"):
            if getattr(self, name) < 1:
                raise BnfoldError(f"--{name} must be at least 1")
        if self.warmup < 0:
            raise BnfoldError("--warmup must be 0 or more")
        if self.runs is not None and self.runs < 1:
            raise BnfoldError("--runs must be at least 1")
        if self.seconds is not None and not self.seconds > 0:
            raise BnfoldError("--seconds must be more than 0")
        if not 0 < self.confidence < 1:
            raise BnfoldError("the confidence level must lie between 0 and 1")
        if self.provider not in ort.get_available_providers():
            raise BnfoldError(f"execution provider {self.provider} is not available",
                              note=f"available: {', '.join(ort.get_available_providers())}")


@dataclass
class ModelTiming:
    """One model at one level: session creation times and per-run latencies, in seconds."""

    creation_s: list[float]
    latency_s: list[float]

    def summary(self) -> dict:
        """Milliseconds: median creation; median, p10 and p90 latency; the raw samples for plots."""
        p10, median, p90 = np.percentile(self.latency_s, [10, 50, 90]) * 1e3
        return {
            "session_creation_ms": {"median": _ms(np.median(self.creation_s)),
                                    "samples": [_ms(t) for t in self.creation_s]},
            "latency_ms": {"median": float(median), "p10": float(p10), "p90": float(p90),
                           "runs": len(self.latency_s),
                           "samples": [_ms(t) for t in self.latency_s]},
        }


@dataclass
class LevelResult:
    """Both models at one optimization level, and what the comparison says."""

    level: str
    baseline: ModelTiming
    candidate: ModelTiming
    speedup: float  # median baseline latency / median candidate latency
    ci: tuple[float, float]  # paired-bootstrap interval of `speedup`
    creation_speedup: float  # median baseline creation / median candidate creation
    verdict: str  # "faster", "slower", "no-significant-difference" or "too-few-runs" (candidate vs baseline)

    def verdict_line(self, confidence: float) -> str:
        """One sentence for humans, e.g. `all: candidate 1.23x faster (95% CI 1.20-1.26x)`."""
        interval = f"{confidence:.0%} CI {self.ci[0]:.3f}-{self.ci[1]:.3f}x"
        if self.verdict == "faster":
            text = f"candidate {self.speedup:.3f}x faster ({interval})"
        elif self.verdict == "slower":
            text = f"candidate {1 / self.speedup:.3f}x slower (speedup {self.speedup:.3f}x, {interval})"
        elif self.verdict == "too-few-runs":
            text = (f"speedup {self.speedup:.3f}x; too few runs for a verdict "
                    f"(use --runs {MIN_VERDICT_PAIRS} or more)")
        else:
            text = f"no significant difference (speedup {self.speedup:.3f}x, {interval})"
        return f"{self.level}: {text}; session creation {_relative(self.creation_speedup)}"

    def to_dict(self, confidence: float) -> dict:
        return {"level": self.level, "baseline": self.baseline.summary(),
                "candidate": self.candidate.summary(), "speedup": self.speedup,
                "ci": list(self.ci), "session_creation_speedup": self.creation_speedup,
                "verdict": self.verdict, "verdict_line": self.verdict_line(confidence)}


@dataclass
class BenchReport:
    """Everything measured by :func:`bench_models`; `to_dict()` is the JSON document of `bench --json`."""

    baseline: str
    candidate: str
    options: BenchOptions
    inputs: dict[str, dict]  # name -> {"shape": [...], "dtype": "float32"}
    levels: list[LevelResult]

    def to_dict(self) -> dict:
        opts = self.options
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "settings": {"levels": list(opts.levels), "threads": opts.threads, "provider": opts.provider,
                         "warmup": opts.warmup, "runs": opts.runs,
                         "seconds": opts.seconds if opts.runs or opts.seconds else DEFAULT_SECONDS,
                         "creations": opts.creations, "seed": opts.seed, "confidence": opts.confidence,
                         "bootstrap": f"paired, {BOOTSTRAP_RESAMPLES} resamples of the run pairs",
                         "inputs": self.inputs},
            "environment": {"onnxruntime": ort.__version__, "python": platform.python_version(),
                            "machine": platform.machine(), "cpu_count": os.cpu_count()},
            "levels": [level.to_dict(opts.confidence) for level in self.levels],
        }


# ------------------------------------------------------------------------------------ measurement
SessionFactory = Callable[[object, str, BenchOptions], object]


def bench_models(baseline, candidate, options: BenchOptions | None = None, *,
                 session_factory: SessionFactory | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 progress: bool | None = None) -> BenchReport:
    """Time `baseline` and `candidate` (paths or ModelProtos) at each level, interleaved.

    `session_factory(source, level, options)` returns an object with `get_inputs()` and
    `run(None, feeds)` like an onnxruntime InferenceSession; tests inject one to check the order of runs.
    `progress=None` shows a progress bar on stderr only when it is a terminal and the run is long.
    """
    options = options or BenchOptions()
    options.validate()
    sources = (_model_source(baseline), _model_source(candidate))
    factory = session_factory or _ort_session
    ticker = _Ticker(len(options.levels), sys.stderr.isatty() if progress is None else progress)
    feeds, inputs, results = None, {}, []
    with ticker:
        for index, level in enumerate(options.levels):
            sessions, creation = _create_sessions(factory, sources, level, options, clock)
            if feeds is None:
                feeds, inputs = make_feeds(sessions[0].get_inputs(), sessions[1].get_inputs(), options)
            latency = _time_pairs(sessions, feeds, options, clock, ticker.at_level(index, level))
            results.append(_compare(level, creation, latency, options))
    return BenchReport(_display_name(baseline, "baseline"), _display_name(candidate, "candidate"),
                       options, inputs, results)


def _model_source(model) -> str | bytes:
    """A path for onnxruntime (checked first for a clear error), or a ModelProto's serialized bytes."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    load_model(model, check=False)  # one-line errors for missing, empty or non-model files
    return str(model)


def _display_name(model, fallback: str) -> str:
    return fallback if isinstance(model, onnx.ModelProto) else str(model)


def _ort_session(source, level: str, options: BenchOptions):
    """An onnxruntime session at `level` with the requested threads and provider, sequential execution."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(source, so, providers=[options.provider])
    except Exception as exc:  # onnxruntime raises its own exception types, all with a message
        where = source if isinstance(source, str) else "model"
        raise BnfoldError(f"{where}: onnxruntime cannot create a session ({first_line(exc)})") from exc


def _create_sessions(factory, sources, level, options, clock):
    """Create each model's session `options.creations` times, alternating; keep the last ones."""
    times: tuple[list[float], list[float]] = ([], [])
    sessions = [None, None]
    for i in range(options.creations):
        for side in _order(i):
            sessions[side] = None  # free the previous session before timing the next creation
            start = clock()
            sessions[side] = factory(sources[side], level, options)
            times[side].append(clock() - start)
    return sessions, times


def _order(pair: int) -> tuple[int, int]:
    """Which model goes first in a pair: A B, then B A, then A B, ..."""
    return (0, 1) if pair % 2 == 0 else (1, 0)


def _time_pairs(sessions, feeds, options: BenchOptions, clock, tick) -> tuple[list[float], list[float]]:
    """Warm up, then time interleaved pairs until the run count or the time budget is reached."""
    for i in range(options.warmup):
        for side in _order(i):
            sessions[side].run(None, feeds)
    latency: tuple[list[float], list[float]] = ([], [])
    budget = None if options.runs is not None else (options.seconds or DEFAULT_SECONDS)
    start = clock()
    pair = 0
    while True:
        for side in _order(pair):
            t0 = clock()
            sessions[side].run(None, feeds)
            latency[side].append(clock() - t0)
        pair += 1
        elapsed = clock() - start
        if budget is None:
            tick(pair / options.runs)
            if pair >= options.runs:
                return latency
        else:
            tick(min(elapsed / budget, 1.0))
            if (elapsed >= budget and pair >= MIN_PAIRS) or pair >= MAX_PAIRS:
                return latency


def _compare(level, creation, latency, options: BenchOptions) -> LevelResult:
    a, b = np.asarray(latency[0]), np.asarray(latency[1])
    speedup = float(np.median(a) / np.median(b))
    ci = bootstrap_speedup_ci(a, b, confidence=options.confidence, seed=options.seed)
    if a.size < MIN_VERDICT_PAIRS:
        verdict = "too-few-runs"
    else:
        verdict = "faster" if ci[0] > 1 else "slower" if ci[1] < 1 else "no-significant-difference"
    return LevelResult(level, ModelTiming(creation[0], latency[0]), ModelTiming(creation[1], latency[1]),
                       speedup, ci, float(np.median(creation[0]) / np.median(creation[1])), verdict)


def bootstrap_speedup_ci(baseline, candidate, *, confidence: float = 0.95, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile interval of median(baseline) / median(candidate) over resampled *pairs* of runs.

    `baseline[i]` and `candidate[i]` were measured side by side, so the same index `i` is drawn for both.
    """
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("the bootstrap needs two equally long, non-empty lists of paired timings")
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, 2_000_000 // a.size)  # bound the index matrix to ~16 MB
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, a.size, size=(min(chunk, resamples - start), a.size))
        ratios[start:start + len(idx)] = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)


# ------------------------------------------------------------------------------------------- inputs
def make_feeds(baseline_inputs, candidate_inputs, options: BenchOptions):
    """Seeded arrays for the inputs both models declare; BnfoldError if the declarations disagree.

    Returns (feeds, description) where description maps each name to its shape and dtype.
    """
    base = {i.name: i for i in baseline_inputs}
    cand = {i.name: i for i in candidate_inputs}
    if set(base) != set(cand):
        raise BnfoldError(f"the models' inputs differ: baseline has {sorted(base)}, "
                          f"candidate has {sorted(cand)}", note="bench compares two versions of one model")
    unknown = sorted(set(options.shapes) - set(base))
    if unknown:
        raise BnfoldError(f"--shape names no input of the models: {', '.join(unknown)}",
                          note=f"inputs: {', '.join(base)}")
    rng = np.random.default_rng(options.seed)
    feeds, description = {}, {}
    for name, arg in base.items():
        other = cand[name]
        if arg.type != other.type:
            raise BnfoldError(f"input {name}: baseline takes {arg.type}, candidate takes {other.type}")
        dtype = _NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise BnfoldError(f"input {name}: type {arg.type} is not supported by bench",
                              note="bench feeds numeric and boolean tensors")
        shape = resolve_shape(name, arg.shape, other.shape, options)
        feeds[name] = _random_array(rng, shape, dtype)
        description[name] = {"shape": list(shape), "dtype": np.dtype(dtype).name}
    return feeds, description


def resolve_shape(name: str, dims_a, dims_b, options: BenchOptions) -> tuple[int, ...]:
    """One concrete shape agreeing with both declarations, `--shape` and the symbolic-dim defaults."""
    dims_a, dims_b = list(dims_a or []), list(dims_b or [])
    if len(dims_a) != len(dims_b):
        raise BnfoldError(f"input {name}: baseline has rank {len(dims_a)}, candidate rank {len(dims_b)}")
    given = options.shapes.get(name)
    if given is not None and len(given) != len(dims_a):
        raise BnfoldError(f"--shape {name}: {len(given)} dimensions given, the input has {len(dims_a)}")
    shape = []
    for axis, (a, b) in enumerate(zip(dims_a, dims_b)):
        fixed = {d for d in (a, b) if isinstance(d, int) and d > 0}
        if len(fixed) > 1:
            raise BnfoldError(f"input {name}: dimension {axis} is {a} in the baseline, {b} in the candidate")
        if given is not None:
            if fixed and given[axis] not in fixed:
                raise BnfoldError(f"--shape {name}: dimension {axis} must be {fixed.pop()}")
            shape.append(given[axis])
        elif fixed:
            shape.append(fixed.pop())
        else:
            shape.append(options.batch if axis == 0 else OTHER_SYMBOLIC_DIM)
    return tuple(shape)


def _random_array(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Standard-normal floats, small non-negative integers (safe as indices), random booleans."""
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=1x3x224x224` -> ("NAME", (1, 3, 224, 224)); BnfoldError otherwise."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise BnfoldError(f"--shape {text}: expected NAME=1x3x224x224 with positive dimensions")
    return name, shape


# ------------------------------------------------------------------------------------------ progress
class _Ticker:
    """A progress bar on stderr that appears only if enabled and the run has lasted over a second."""

    DELAY_S = 1.0

    def __init__(self, levels: int, enabled: bool):
        self.levels, self.enabled = levels, enabled
        self.start = time.monotonic()
        self.bar = self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def at_level(self, index: int, level: str) -> Callable[[float], None]:
        """A callback taking the fraction of this level done."""
        def tick(fraction: float) -> None:
            if not self.enabled:
                return
            if self.bar is None and time.monotonic() - self.start > self.DELAY_S:
                self._start()
            if self.bar is not None:
                self.bar.update(self.task, completed=index + fraction, description=f"bench {level}")
        return tick

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            console=Console(file=sys.stderr), transient=True)
        self.task = self.bar.add_task("bench", total=self.levels)
        self.bar.start()


# ------------------------------------------------------------------------------------------- output
def render_table(report: BenchReport, file=None) -> None:
    """Print the per-level table and one verdict line per level (stdout unless `file` is given)."""
    from rich.console import Console
    from rich.table import Table
    console = Console(file=file or sys.stdout)
    table = Table(title=f"bench: baseline {report.baseline} vs candidate {report.candidate}",
                  title_justify="left")
    for column in ("level", "model", "session ms", "median ms", "p10 ms", "p90 ms", "runs"):
        table.add_column(column, justify="left" if column in ("level", "model") else "right")
    for level in report.levels:
        for label, timing in (("baseline", level.baseline), ("candidate", level.candidate)):
            s = timing.summary()
            lat = s["latency_ms"]
            table.add_row(level.level, label, f"{s['session_creation_ms']['median']:.1f}",
                          f"{lat['median']:.3f}", f"{lat['p10']:.3f}", f"{lat['p90']:.3f}",
                          str(lat["runs"]))
    console.print(table)
    opts = report.options
    console.print(f"{opts.threads} intra-op thread(s), {opts.provider}, inputs "
                  + ", ".join(f"{n} {'x'.join(map(str, d['shape']))} {d['dtype']}"
                              for n, d in report.inputs.items()), highlight=False, soft_wrap=True)
    for level in report.levels:
        console.print(level.verdict_line(opts.confidence), highlight=False, soft_wrap=True)


def require_matplotlib() -> None:
    """Fail early, before minutes of measuring, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise BnfoldError("--plot needs matplotlib, which is not installed", note=PLOT_HINT) from exc


def write_plot(report: BenchReport, path: str | os.PathLike) -> None:
    """Latency histograms of both models, one panel per level, written atomically to a PNG file."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(report.levels), figsize=(5 * len(report.levels), 3.6), squeeze=False)
    for ax, level in zip(axes[0], report.levels):
        _plot_level(ax, level, report.options.confidence)
    fig.tight_layout()
    try:
        with atomic_output(path) as staged:
            fig.savefig(staged, format="png", dpi=110)
    finally:
        plt.close(fig)


def _plot_level(ax, level: LevelResult, confidence: float) -> None:
    samples = [np.asarray(t.latency_s) * 1e3 for t in (level.baseline, level.candidate)]
    both = np.concatenate(samples)
    # Up to the 99th percentile: one stray slow run would otherwise squeeze every other bar together.
    bins = np.histogram_bin_edges(both, bins=40, range=(both.min(), np.percentile(both, 99)))
    for data, label, colour in zip(samples, ("baseline", "candidate"), ("tab:blue", "tab:orange")):
        ax.hist(data, bins=bins, alpha=0.55, label=label, color=colour)
        ax.axvline(float(np.median(data)), color=colour, linestyle="--", linewidth=1)
    ax.set_title(f"{level.level}: speedup {level.speedup:.3f}x "
                 f"[{level.ci[0]:.3f}, {level.ci[1]:.3f}] ({confidence:.0%})", fontsize=9)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("runs")
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------------------------- CLI
def add_bench_arguments(parser, prefix: str = "") -> None:
    """Add the measurement options to an argparse parser.

    `prefix="bench-"` names them `--bench-runs`, `--bench-level`, ... so a command with options of its
    own (`fold --bench`) can take them without clashes; :func:`options_from_args` reads them back.
    """
    d = BenchOptions()
    opt = f"--{prefix}"
    parser.add_argument(f"{opt}level", default=",".join(d.levels), metavar="LEVELS",
                        help=f"comma-separated onnxruntime optimization levels out of "
                             f"{', '.join(LEVELS)} (default: %(default)s)")
    parser.add_argument(f"{opt}threads", type=int, default=d.threads, metavar="N",
                        help="intra-op threads per session (default: %(default)s, for stable figures)")
    parser.add_argument(f"{opt}batch", type=int, default=d.batch, metavar="N",
                        help="size of a symbolic first dimension (default: %(default)s); other "
                             f"symbolic dimensions are {OTHER_SYMBOLIC_DIM} unless --{prefix}shape says")
    parser.add_argument(f"{opt}shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="the full shape of one input (repeatable)")
    parser.add_argument(f"{opt}provider", default=d.provider, metavar="P",
                        help="onnxruntime execution provider (default: %(default)s)")
    parser.add_argument(f"{opt}warmup", type=int, default=d.warmup, metavar="N",
                        help="untimed pairs of runs first (default: %(default)s)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(f"{opt}runs", type=int, metavar="N", help="timed pairs of runs per level")
    amount.add_argument(f"{opt}seconds", type=float, metavar="S",
                        help=f"time budget per level (default: {DEFAULT_SECONDS:g} s, at least "
                             f"{MIN_PAIRS} and at most {MAX_PAIRS} pairs)")
    parser.add_argument(f"{opt}creations", type=int, default=d.creations, metavar="N",
                        help="session creations timed per model and level (default: %(default)s)")
    parser.add_argument(f"{opt}seed", type=int, default=d.seed, metavar="S",
                        help="seed of the inputs and of the bootstrap (default: %(default)s)")
    parser.add_argument(f"{opt}plot", metavar="FILE.png",
                        help=f"write latency histograms per level (needs matplotlib: {PLOT_HINT})")


def options_from_args(args, prefix: str = "") -> BenchOptions:
    """The BenchOptions that :func:`add_bench_arguments` (same prefix) parsed; validated."""
    key = prefix.replace("-", "_")

    def get(name):
        return getattr(args, key + name)

    options = BenchOptions(
        levels=tuple(part.strip() for part in get("level").split(",") if part.strip()),
        threads=get("threads"), batch=get("batch"),
        shapes=dict(parse_shape(text) for text in get("shape")),
        provider=get("provider"), warmup=get("warmup"), runs=get("runs"), seconds=get("seconds"),
        creations=get("creations"), seed=get("seed"), plot=get("plot"))
    options.validate()
    return options


def run_bench(baseline, candidate, options: BenchOptions, *, as_json: bool = False, file=None) -> BenchReport:
    """What `bnfold bench` does: measure, write the plot if asked, print the table or one JSON document."""
    if options.plot:
        require_matplotlib()
    report = bench_models(baseline, candidate, options)
    if options.plot:
        write_plot(report, options.plot)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2), file=file or sys.stdout)
    else:
        render_table(report, file=file)
    return report


def _relative(ratio: float) -> str:
    """A ratio old/new as words: 1.25 -> "1.25x faster", 0.8 -> "1.25x slower"."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _ms(seconds: float) -> float:
    return float(seconds) * 1e3
