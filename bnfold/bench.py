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

Inputs are seeded random tensors built from the models' declared inputs by :mod:`bnfold.inputs`, as
verify builds them; both models get the very same arrays. A free symbolic first dimension is the batch
(`batch`, default 1); any other symbolic dimension is :data:`bnfold.inputs.OTHER_DIM` unless `shapes`
gives the input's shape. Sessions come from :mod:`bnfold.runtime`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .errors import BnfoldError
from .inputs import generate_samples, input_specs, merge_specs, plan_shapes
from .io import atomic_output, load_model
from .runtime import (LEVELS, create_session, file_or_proto, ort_values, resolve_provider,
                      serialized)
from .schema import SCHEMA_VERSION

DEFAULT_SECONDS = 3.0  # time budget per level when neither runs nor seconds is given
MIN_PAIRS = 10  # a time budget never yields fewer pairs than this ...
MAX_PAIRS = 5000  # ... nor more than this (tiny models would otherwise produce huge sample lists)
BOOTSTRAP_RESAMPLES = 2000
MIN_VERDICT_PAIRS = 5  # fewer pairs give an interval that means nothing: no verdict
PLOT_HINT = "pip install 'bnfold[plot]'"

@dataclass
class BenchOptions:
    """How to measure. `runs` (exact pair count) and `seconds` (time budget per level) exclude each other;
    with neither, each level gets :data:`DEFAULT_SECONDS`. `plot` is where :func:`run_bench` writes the
    latency plot; :func:`bench_models` itself writes nothing. Invalid settings raise BnfoldError when
    the measurement starts (``error.option`` names the field).

    Attributes:
        levels: onnxruntime graph optimization levels to measure at, in order, each one of
            ``"disabled"``, ``"basic"``, ``"extended"``, ``"all"``. Default ``("disabled", "all")``:
            the fold's own effect, and what onnxruntime's defaults give.
        threads: Intra-op threads per session (default 1); at least 1.
        batch: The size of a symbolic first input dimension (default 1); at least 1.
        shapes: Input name -> shape; any other symbolic dimension is 32.
        provider: The onnxruntime execution provider (default the CPU's).
        warmup: Untimed runs of each model before timing, per level (default 5); 0 or more.
        runs: Timed pairs per level, exactly; at least 1. Excludes `seconds`.
        seconds: Time budget per level (more than 0), giving 10 to 5000 pairs. Excludes `runs`.
        creations: Timed session creations per model and level (default 3); the median is reported.
        seed: Seed of the generated inputs and of the bootstrap (default 0).
        confidence: Confidence level of the speedup interval, between 0 and 1 (default 0.95).
        plot: A PNG path for the latency plot that :func:`run_bench` writes (``bnfold bench --plot``);
            :func:`bench_models` ignores it.
    """

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
        """Raise BnfoldError for settings that cannot give a measurement (`option` names the setting)."""
        unknown = [lvl for lvl in self.levels if lvl not in LEVELS]
        if not self.levels or unknown:
            raise BnfoldError(f"unknown optimization level {', '.join(unknown) or '(none)'}",
                              note=f"choose from {', '.join(LEVELS)}, comma-separated", option="levels")
        if self.runs is not None and self.seconds is not None:
            raise BnfoldError("runs and seconds exclude each other: give one", option="seconds")
        for name in ("threads", "batch", "creations", "runs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BnfoldError(f"must be at least 1, got {value}", option=name)
        if self.warmup < 0:
            raise BnfoldError(f"must be 0 or more, got {self.warmup}", option="warmup")
        if self.seconds is not None and not 0 < self.seconds < math.inf:
            raise BnfoldError(f"must be a finite number more than 0, got {self.seconds:g}", option="seconds")
        if not 0 < self.confidence < 1:
            raise BnfoldError("the confidence level must lie between 0 and 1", option="confidence")
        resolve_provider(self.provider)


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
                    f"({MIN_VERDICT_PAIRS} or more pairs needed)")
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
    """Everything measured by :func:`bench_models`; `to_dict()` is the JSON document of `bench --json`.

    Attributes:
        baseline: The baseline model's path, or ``"baseline"`` for a ModelProto.
        candidate: The candidate model's path, or ``"candidate"`` for a ModelProto.
        options: The settings used (the provider resolved to onnxruntime's name).
        inputs: Input name -> ``{"shape": [...], "dtype": "float32"}``: what both models were fed.
        levels: One LevelResult per optimization level: both models' session creation and latency
            times, ``speedup`` (median baseline / median candidate latency; above 1 the candidate is
            faster), its paired-bootstrap interval ``ci``, ``creation_speedup``, and ``verdict``
            (``"faster"``, ``"slower"``, ``"no-significant-difference"`` or ``"too-few-runs"``).
    """

    baseline: str
    candidate: str
    options: BenchOptions
    inputs: dict[str, dict]  # name -> {"shape": [...], "dtype": "float32"}
    levels: list[LevelResult]

    def to_dict(self) -> dict:
        import onnxruntime as ort

        opts = self.options
        return {
            "schema_version": SCHEMA_VERSION,
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


def bench_models(baseline: str | os.PathLike[str] | onnx.ModelProto,
                 candidate: str | os.PathLike[str] | onnx.ModelProto, options: BenchOptions | None = None, *,
                 session_factory: SessionFactory | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 progress: bool | None = None) -> BenchReport:
    """Measure how much faster `candidate` runs than `baseline` in onnxruntime, with a confidence interval.

    Use it to decide whether a fold pays off on a given machine and runtime setting: both models get
    the same seeded inputs and are timed in interleaved pairs (A B, B A, ...) at each optimization
    level, so drift on a busy machine hits both alike; the speedup's interval is a paired bootstrap,
    and the verdict follows the interval only. What ``bnfold bench`` runs; nothing is written.

    Args:
        baseline: The model to compare against (e.g. the original): a file path or a ModelProto.
        candidate: The model measured (e.g. the folded one): a file path or a ModelProto.
        options: A :class:`bnfold.BenchOptions`, not modified; None (the default) means
            ``BenchOptions()``: levels disabled and all, 1 thread, about 3 s per level.
        session_factory: For tests: ``session_factory(source, level, options)`` returns an object
            whose ``run(feeds)`` runs the model (`source` is a path or serialized bytes). Default
            None: an onnxruntime session.
        clock: For tests: the timer, in seconds. Default :func:`time.perf_counter`.
        progress: Show a progress bar on stderr. None (the default): only when stderr is a
            terminal and the run has lasted over a second.

    Returns:
        A :class:`bnfold.BenchReport`: per level, both models' session creation and latency
        statistics, the speedup, its interval and a verdict.

    Raises:
        BnfoldError: An option is invalid (``error.option`` names it: an unknown or empty `levels`,
            `runs` together with `seconds`, a count below 1, `warmup` < 0, `seconds` <= 0,
            `confidence` outside (0, 1), a provider onnxruntime does not have, a shape that does
            not fit); a model file is missing, empty or not an ONNX model; the models declare their
            inputs differently; onnxruntime cannot create a session for a model or fails to run it.
            An exception from `session_factory` or `clock` passes through as it is.
    """
    options = options or BenchOptions()
    options.validate()
    options = replace(options, provider=resolve_provider(options.provider))
    protos = (_load(baseline), _load(candidate))
    feeds, inputs = make_feeds(*protos, options)
    feeds = ort_values(feeds)  # converted once, outside the timed runs
    factory = session_factory or _ort_session
    ticker = _Ticker(len(options.levels), sys.stderr.isatty() if progress is None else progress)
    results = []
    sources = [serialized(file_or_proto(given, proto)) for given, proto in zip((baseline, candidate), protos)]
    del protos  # onnxruntime reads the file or the bytes
    with sources[0] as first, sources[1] as second, ticker:
        for index, level in enumerate(options.levels):
            sessions, creation = _create_sessions(factory, (first, second), level, options, clock)
            latency = _time_pairs(sessions, feeds, options, clock, ticker.at_level(index, level))
            results.append(_compare(level, creation, latency, options))
    return BenchReport(_display_name(baseline, "baseline"), _display_name(candidate, "candidate"),
                       options, inputs, results)


def _load(model) -> onnx.ModelProto:
    """The model's proto (its declared inputs make the feeds); one-line errors for bad files."""
    return model if isinstance(model, onnx.ModelProto) else load_model(model, check=False)


def _display_name(model, fallback: str) -> str:
    return fallback if isinstance(model, onnx.ModelProto) else str(model)


def _ort_session(source, level: str, options: BenchOptions):
    """An onnxruntime session at `level` with the requested threads and provider, sequential execution."""
    label = source if isinstance(source, str) else "model"
    return create_session(source, level=level, provider=options.provider, threads=options.threads,
                          label=label)


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
            sessions[side].run(feeds)
    latency: tuple[list[float], list[float]] = ([], [])
    budget = None if options.runs is not None else (options.seconds or DEFAULT_SECONDS)
    start = clock()
    pair = 0
    while True:
        for side in _order(pair):
            t0 = clock()
            sessions[side].run(feeds)
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
def make_feeds(baseline: onnx.ModelProto, candidate: onnx.ModelProto, options: BenchOptions):
    """Seeded arrays for the inputs both models declare; BnfoldError if the declarations disagree.

    Returns (feeds, description) where description maps each name to its shape and dtype.
    """
    specs = merge_specs(input_specs(baseline), input_specs(candidate), roles=("baseline", "candidate"))
    plan = plan_shapes(specs, options.shapes, batches=(options.batch,))
    (sample,) = generate_samples(specs, plan, 1, options.seed)
    description = {name: {"shape": list(array.shape), "dtype": str(array.dtype)}
                   for name, array in sample.feeds.items()}
    return dict(sample.feeds), description


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
        raise BnfoldError("a latency plot needs matplotlib, which is not installed", note=PLOT_HINT,
                          option="plot") from exc


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


# ------------------------------------------------------------------------------------------ command
def run_bench(baseline, candidate, options: BenchOptions, *, as_json: bool = False, file=None) -> BenchReport:
    """What `bnfold bench` does: measure, write the plot if asked, print the table or one JSON document."""
    if options.plot:
        require_matplotlib()
    report = bench_models(baseline, candidate, options)
    if options.plot:
        write_plot(report, options.plot)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False), file=file or sys.stdout)
    else:
        render_table(report, file=file)
    return report


def _relative(ratio: float) -> str:
    """A ratio old/new as words: 1.25 -> "1.25x faster", 0.8 -> "1.25x slower"."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _ms(seconds: float) -> float:
    return float(seconds) * 1e3
