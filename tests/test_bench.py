"""bnfold bench: interleaving, statistics, inputs, output formats and errors.

Nothing here asserts on real timings: the order of runs and the statistics are checked with a fake
session and a fake clock, and the real onnxruntime path only for structure and exit codes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.fold  # noqa: F401  (the harness folds: a broken fold must fail here, not skip)
from bnfold import bench, inputs
from bnfold.bench import BenchOptions, bench_models, bootstrap_speedup_ci
from bnfold.cli import main
from bnfold.cli_options import add_bench_arguments, bench_options_from_args
from bnfold.errors import BnfoldError
from tests.builders import load_benchmark


# ------------------------------------------------------------------------------------------ models
def conv_model(*, bn: bool, input_name: str = "x", dims=("N", 3, 8, 8), elem=TensorProto.FLOAT,
               seed: int = 0) -> onnx.ModelProto:
    """Conv(4 filters) followed by BatchNormalization (bn=True) or Relu."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", [input_name, "W"], ["c"], pads=[1, 1, 1, 1])]
    if bn:
        for name, value in (("s", rng.random(4) + 0.5), ("b", rng.standard_normal(4)),
                            ("m", rng.standard_normal(4)), ("v", rng.random(4) + 0.5)):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4, *dims[2:]])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(input_name, elem, list(dims))],
                              [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def pair(tmp_path):
    """A Conv+BN model and a Conv+Relu model with the same input, saved to files."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_model(bn=True), a)
    onnx.save(conv_model(bn=False), b)
    return str(a), str(b)


# -------------------------------------------------------------------------- fake sessions and clock
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeWorld:
    """Sessions that log every creation and run and advance the clock by a fixed cost per model."""

    def __init__(self, baseline: onnx.ModelProto, candidate: onnx.ModelProto, costs=(0.002, 0.001)):
        self.clock = FakeClock()
        self.labels = {baseline.SerializeToString(): "A", candidate.SerializeToString(): "B"}
        self.feeds: list[dict] = []  # what each run was given
        self.costs = dict(zip("AB", costs))
        self.log: list[tuple[str, str, str]] = []  # (event, level, label)

    def factory(self, source, level, options):
        label = self.labels[source]
        self.log.append(("create", level, label))
        self.clock.now += 0.01
        world = self

        class Session:
            def run(self, feeds):
                world.feeds.append(feeds)
                world.log.append(("run", level, label))
                world.clock.now += world.costs[label]
                return [feeds["x"]]

        return Session()

    def bench(self, baseline, candidate, **options):
        return bench_models(baseline, candidate, BenchOptions(**options), session_factory=self.factory,
                            clock=self.clock, progress=False)


# ------------------------------------------------------------------------------------ interleaving
def test_runs_alternate_ab_ba_and_levels_come_in_order():
    a, b = conv_model(bn=True), conv_model(bn=False)
    world = FakeWorld(a, b)
    world.bench(a, b, levels=("disabled", "all"), warmup=2, runs=3, creations=2)
    for level in ("disabled", "all"):
        creates = [lab for ev, lvl, lab in world.log if ev == "create" and lvl == level]
        runs = [lab for ev, lvl, lab in world.log if ev == "run" and lvl == level]
        assert creates == ["A", "B", "B", "A"]
        # 2 warmup pairs then 3 timed pairs, each pair alternating which model goes first
        assert runs == ["A", "B", "B", "A"] + ["A", "B", "B", "A", "A", "B"]
    levels_seen = [lvl for _, lvl, _ in world.log]
    assert levels_seen == sorted(levels_seen, key=("disabled", "all").index)


def test_fake_costs_give_exact_statistics_and_verdict():
    a, b = conv_model(bn=True), conv_model(bn=False)
    report = FakeWorld(a, b, costs=(0.002, 0.001)).bench(a, b, levels=("all",), warmup=0, runs=5)
    level = report.levels[0]
    assert level.speedup == pytest.approx(2.0)
    assert level.ci == pytest.approx((2.0, 2.0))
    assert level.verdict == "faster"
    assert "candidate 2.000x faster" in level.verdict_line(0.95)
    assert level.baseline.latency_s == pytest.approx([0.002] * 5)


def test_slower_candidate_is_called_slower():
    a, b = conv_model(bn=True), conv_model(bn=False)
    report = FakeWorld(a, b, costs=(0.001, 0.003)).bench(a, b, levels=("disabled",), warmup=0, runs=5)
    assert report.levels[0].verdict == "slower"
    assert "3.000x slower" in report.levels[0].verdict_line(0.95)


def test_too_few_pairs_give_no_verdict():
    a, b = conv_model(bn=True), conv_model(bn=False)
    report = FakeWorld(a, b, costs=(0.002, 0.001)).bench(a, b, levels=("all",), warmup=0, runs=4)
    assert report.levels[0].verdict == "too-few-runs"
    assert "too few runs for a verdict" in report.levels[0].verdict_line(0.95)


def test_time_budget_stops_after_budget_but_not_before_min_pairs():
    a, b = conv_model(bn=True), conv_model(bn=False)
    # each pair costs 0.2 s of fake time: 1 s is reached after 5 pairs, but at least MIN_PAIRS run
    report = FakeWorld(a, b, costs=(0.1, 0.1)).bench(a, b, levels=("all",), warmup=0, seconds=1.0)
    assert len(report.levels[0].baseline.latency_s) == bench.MIN_PAIRS
    report = FakeWorld(a, b, costs=(0.1, 0.1)).bench(a, b, levels=("all",), warmup=0, seconds=3.0)
    assert len(report.levels[0].baseline.latency_s) == 15


def test_progress_bar_only_when_enabled_and_after_the_delay():
    quiet = bench._Ticker(2, enabled=False)
    with quiet:
        quiet.at_level(0, "all")(0.5)
    assert quiet.bar is None
    late = bench._Ticker(2, enabled=True)
    with late:
        late.start += 100  # as if the run had just begun: no bar yet
        late.at_level(0, "all")(0.5)
        assert late.bar is None
        late.start -= 200  # as if it had been running for long
        late.at_level(1, "all")(0.5)
        assert late.bar is not None and late.bar.tasks[0].completed == 1.5


# ---------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_contains_the_ratio_and_is_seeded():
    rng = np.random.default_rng(1)
    drift = np.linspace(1.0, 1.5, 200)  # common drift: pairing must keep the interval tight
    a = drift * (1.2 + 0.05 * rng.standard_normal(200))
    b = drift * (1.0 + 0.05 * rng.standard_normal(200))
    ratio = np.median(a) / np.median(b)
    low, high = bootstrap_speedup_ci(a, b, seed=3)
    assert low < ratio < high
    assert (low, high) == bootstrap_speedup_ci(a, b, seed=3)
    assert low > 1.0
    wider = bootstrap_speedup_ci(a, b, seed=3, confidence=0.99)
    assert wider[0] <= low and wider[1] >= high


def test_bootstrap_of_equal_distributions_straddles_one():
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 0.05, 300), rng.normal(1.0, 0.05, 300)
    low, high = bootstrap_speedup_ci(a, b)
    assert low < 1.0 < high


def test_bootstrap_rejects_unpaired_samples():
    with pytest.raises(ValueError):
        bootstrap_speedup_ci([1.0, 2.0], [1.0])


# -------------------------------------------------------------------------------------------- inputs
def test_symbolic_dims_use_batch_then_the_documented_default():
    feeds, described = bench.make_feeds(conv_model(bn=True, dims=("N", 3, "H", 8)),
                                        conv_model(bn=False, dims=(None, 3, "h", 8)), BenchOptions(batch=4))
    assert feeds["x"].shape == (4, 3, inputs.OTHER_DIM, 8)
    assert described["x"] == {"shape": [4, 3, inputs.OTHER_DIM, 8], "dtype": "float32"}


def test_shape_option_overrides_and_fixed_dims_fill_symbolic_ones():
    feeds, _ = bench.make_feeds(conv_model(bn=True, dims=("N", 3, "H", 8)),
                                conv_model(bn=False, dims=("N", 3, 16, 8)),
                                BenchOptions(shapes={"x": (2, 3, 16, 8)}))
    assert feeds["x"].shape == (2, 3, 16, 8)
    feeds, _ = bench.make_feeds(conv_model(bn=True, dims=("N", 3, "H", 8)),
                                conv_model(bn=False, dims=("N", 3, 16, 8)), BenchOptions(batch=3))
    assert feeds["x"].shape == (3, 3, 16, 8)


def _typed_model(elem, dims=(5,)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", elem, list(dims))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", elem, list(dims))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_feeds_are_the_ones_verify_generates():
    """One generator for verify and bench: integers in [0, INT_HIGH), bools, seeded floats."""
    ids, mask = _typed_model(TensorProto.INT64, (4000,)), _typed_model(TensorProto.BOOL)
    one, _ = bench.make_feeds(ids, ids, BenchOptions(seed=7))
    two, _ = bench.make_feeds(ids, ids, BenchOptions(seed=7))
    np.testing.assert_array_equal(one["x"], two["x"])
    assert one["x"].dtype == np.int64 and one["x"].min() == 0 and one["x"].max() == inputs.INT_HIGH - 1
    specs = inputs.input_specs(ids)
    (sample,) = inputs.generate_samples(specs, inputs.plan_shapes(specs, {}, batches=(1,)), 1, 7)
    np.testing.assert_array_equal(one["x"], sample.feeds["x"])
    assert bench.make_feeds(mask, mask, BenchOptions())[0]["x"].dtype == np.bool_


def test_bfloat16_inputs_are_fed():
    model = _typed_model(TensorProto.BFLOAT16, ("N", 3))
    report = bench_models(model, model, BenchOptions(levels=("disabled",), warmup=0, runs=2, creations=1),
                          progress=False)
    assert report.inputs["x"] == {"shape": [1, 3], "dtype": "bfloat16"}


@pytest.mark.parametrize("base, cand, options, message", [
    (conv_model(bn=True), conv_model(bn=False, input_name="z"), BenchOptions(), "declare different inputs"),
    (conv_model(bn=True), conv_model(bn=False, elem=TensorProto.DOUBLE), BenchOptions(),
     "float32 in the baseline but float64 in the candidate"),
    (conv_model(bn=True), conv_model(bn=False, dims=("N", 3, 8)), BenchOptions(), "rank"),
    (conv_model(bn=True, dims=(1, 3, 8, 8)), conv_model(bn=False, dims=(2, 3, 8, 8)), BenchOptions(), "dim 0"),
    (conv_model(bn=True), conv_model(bn=False), BenchOptions(shapes={"y": (1,)}), "no input 'y'"),
    (conv_model(bn=True), conv_model(bn=False), BenchOptions(shapes={"x": (1, 3)}), "has rank 4"),
    (conv_model(bn=True), conv_model(bn=False), BenchOptions(shapes={"x": (1, 4, 8, 8)}), "dim 1 is fixed at 3"),
])
def test_incompatible_inputs_are_one_line_errors(base, cand, options, message):
    with pytest.raises(BnfoldError, match=message):
        bench.make_feeds(base, cand, options)


# --------------------------------------------------------------------------------- real onnxruntime
def test_real_sessions_with_model_protos():
    report = bench_models(conv_model(bn=True), conv_model(bn=False),
                          BenchOptions(levels=("disabled", "basic"), warmup=1, runs=3, creations=1),
                          progress=False)
    assert [lvl.level for lvl in report.levels] == ["disabled", "basic"]
    assert report.baseline == "baseline" and report.inputs["x"]["shape"] == [1, 3, 8, 8]
    for level in report.levels:
        assert len(level.baseline.latency_s) == len(level.candidate.latency_s) == 3
        assert level.ci[0] <= level.ci[1]


def test_cli_json_is_one_document(pair, capsys):
    code = main(["bench", *pair, "--runs", "3", "--warmup", "1", "--creations", "1", "--json",
                 "--batch", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["baseline"] == pair[0] and doc["candidate"] == pair[1]
    assert doc["settings"]["inputs"] == {"x": {"shape": [2, 3, 8, 8], "dtype": "float32"}}
    assert [lvl["level"] for lvl in doc["levels"]] == ["disabled", "all"]
    for level in doc["levels"]:
        for side in ("baseline", "candidate"):
            lat = level[side]["latency_ms"]
            assert lat["runs"] == 3 and len(lat["samples"]) == 3
            assert lat["p10"] <= lat["median"] <= lat["p90"]
            assert len(level[side]["session_creation_ms"]["samples"]) == 1
        assert level["verdict"] == "too-few-runs"  # 3 pairs: below MIN_VERDICT_PAIRS
        assert level["ci"][0] <= level["ci"][1]


def test_cli_table_has_rows_and_verdicts(pair, capsys):
    code = main(["bench", *pair, "--runs", "5", "--warmup", "0", "--creations", "1", "--level", "extended"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "extended" in out and "baseline" in out and "candidate" in out
    assert out.count("extended: ") == 1 and "CI" in out


@pytest.mark.parametrize("extra, message", [
    (["--level", "fast"], "--level: unknown optimization level fast"),
    (["--runs", "0"], "--runs: must be at least 1"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--seconds", "0"], "--seconds: must be a finite number more than 0"),
    (["--seconds", "inf"], "--seconds: must be a finite number more than 0, got inf"),
    (["--seconds", "nan"], "--seconds: must be a finite number more than 0, got nan"),
    (["--provider", "NoSuchExecutionProvider"],
     "--provider: execution provider NoSuchExecutionProvider is not available"),
    (["--shape", "x=1x3"], "--shape: input 'x' has rank 4"),
    (["--shape", "nonsense"], "--shape: expected NAME=DIMS"),
])
def test_cli_bad_options_exit_2(pair, capsys, extra, message):
    amount = [] if {"--runs", "--seconds"} & set(extra) else ["--runs", "1"]
    assert main(["bench", *pair, *amount, "--creations", "1", *extra]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("bnfold: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_bad_files_exit_2(tmp_path, pair, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    other = tmp_path / "other.onnx"
    onnx.save(conv_model(bn=False, input_name="image"), other)
    for args in ([pair[0], str(tmp_path / "missing.onnx")], [str(empty), pair[1]], [pair[0], str(other)]):
        assert main(["bench", *args, "--runs", "1", "--creations", "1"]) == 2
        _, err = capsys.readouterr()
        assert err.startswith("bnfold: error: ") and len(err.strip().splitlines()) == 1


def test_unrunnable_model_is_a_one_line_error(tmp_path, pair, capsys):
    broken = conv_model(bn=False)
    broken.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    assert main(["bench", pair[0], str(path), "--runs", "1"]) == 2
    assert "onnxruntime cannot create a session" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- plot
def test_plot_is_written(pair, tmp_path, capsys):
    png = tmp_path / "lat.png"
    assert main(["bench", *pair, "--runs", "4", "--creations", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_plot_without_matplotlib_says_how_to_install(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    png = tmp_path / "lat.png"
    assert main(["bench", *pair, "--runs", "1", "--plot", str(png)]) == 2
    assert "pip install 'bnfold[plot]'" in capsys.readouterr().err
    assert not png.exists()


# -------------------------------------------------------------------------------- fold --bench hooks
def test_prefixed_arguments_round_trip():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs")  # a command's own option must not clash with the prefixed ones
    add_bench_arguments(parser.add_argument_group("bench"), prefix="bench-")
    args = parser.parse_args(["--bench-runs", "7", "--bench-level", "basic,all", "--bench-shape",
                              "x=1X3x8x8", "--bench-threads", "2", "--bench-shape", "s="])
    options = bench_options_from_args(args, prefix="bench-")
    assert options.runs == 7 and options.levels == ("basic", "all") and options.threads == 2
    assert options.shapes == {"x": (1, 3, 8, 8), "s": ()} and options.seconds is None


def test_fold_bench_errors_name_the_prefixed_flag(pair, tmp_path, capsys):
    code = main(["fold", pair[0], "-o", str(tmp_path / "f.onnx"), "--bench", "--bench-runs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bnfold: error: --bench-runs: must be at least 1"), err


def test_run_bench_renders_json_to_the_given_file(pair, tmp_path):
    import io
    out = io.StringIO()
    report = bench.run_bench(*pair, BenchOptions(levels=("all",), runs=2, creations=1), as_json=True,
                             file=out)
    document = json.loads(out.getvalue())  # exactly one JSON document, nothing else
    assert document["baseline"] == str(pair[0]) and document["candidate"] == str(pair[1])
    (level,) = document["levels"]
    assert level["level"] == "all" and level["baseline"]["latency_ms"]["runs"] == 2
    medians = [float(np.median(level[side]["latency_ms"]["samples"])) for side in ("baseline", "candidate")]
    assert level["speedup"] == pytest.approx(medians[0] / medians[1], rel=1e-6)
    assert level["speedup"] == pytest.approx(report.levels[0].speedup)


# ------------------------------------------------------------------------------- benchmarks harness
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _save_with_reference(model: onnx.ModelProto, folder: Path, name: str) -> None:
    """The model and a reference .npz (its own outputs in float64: enough to exercise the harness)."""
    import onnxruntime as ort
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.savez(folder / f"{name}.npz", **{"input:x": x, "output:y": y.astype(np.float64)})


def test_harness_counts_ops_and_flags_a_changed_function(tmp_path):
    measure = load_benchmark("measure")
    _save_with_reference(conv_model(bn=True), tmp_path, "orig")
    wrong = conv_model(bn=True)
    wrong.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(4, 3.0, np.float32), "s"))
    onnx.save(wrong, tmp_path / "wrong.onnx")
    reference = measure.load_reference(tmp_path / "orig.npz")
    original = measure.assess(tmp_path / "orig.onnx", reference)
    assert (original.bn_left, original.nodes) == (1, 2)
    assert original.max_abs < 1e-4 and original.errors == [original.max_abs]
    same = measure.assess(tmp_path / "orig.onnx", reference)
    assert measure.changed_function(same, original) is None
    changed = measure.assess(tmp_path / "wrong.onnx", reference)
    assert "output y moved" in measure.changed_function(changed, original)


def test_harness_float64_evaluation_extends_the_reference(tmp_path):
    """Seeded inputs are added when the double-precision evaluation reproduces the stored output."""
    from onnx.reference import ReferenceEvaluator
    measure = load_benchmark("measure")
    model = conv_model(bn=True, dims=(1, 3, 8, 8))
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (exact,) = ReferenceEvaluator(measure.to_double(model)).run(None, {"x": x.astype(np.float64)})
    np.savez(tmp_path / "m.npz", **{"input:x": x, "output:y": exact})
    reference = measure.extend_reference(measure.load_reference(tmp_path / "m.npz"), tmp_path / "m.onnx", 3)
    assert len(reference.samples) == 4 and "3 seeded inputs" in reference.note
    np.savez(tmp_path / "m.npz", **{"input:x": x, "output:y": exact + 1.0})  # a reference it cannot match
    reference = measure.extend_reference(measure.load_reference(tmp_path / "m.npz"), tmp_path / "m.onnx", 3)
    assert len(reference.samples) == 1 and "does not reproduce" in reference.note


def test_harness_smoke_run_writes_results(tmp_path):
    samples, out = tmp_path / "samples", tmp_path / "RESULTS.md"
    samples.mkdir()
    _save_with_reference(conv_model(bn=True, dims=(1, 3, 8, 8)), samples, "tiny")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--samples", str(samples),
                           "--output", str(out), "--work", str(tmp_path / "work"),
                           "--tools", "load+save,bnfold,onnxruntime"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "## Goals" in text and "## tiny" in text
    table = text.split("## tiny", 1)[1].splitlines()
    row = next(line for line in table if line.startswith("| bnfold |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0" and cells[-1] == "ok"  # no BN left, function unchanged
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------- import weight
def _imported_after(code: str) -> set[str]:
    """The top-level modules imported by running `code` in a fresh interpreter under test."""
    script = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_importing_bench_and_the_cli_imports_no_matplotlib_nor_onnxruntime():
    imported = _imported_after("import bnfold.bench, bnfold.cli\nbnfold.cli.build_parser()")
    assert "matplotlib" not in imported and "onnxruntime" not in imported
