"""benchmarks/graphsurgeon.py: its quick run measures every step in a child process and writes every
row of its tables. No timed assertion: the numbers are the benchmark's, committed in GRAPHSURGEON.md."""

from __future__ import annotations

import re

from tests.builders import load_benchmark

bench = load_benchmark("graphsurgeon")
NUMBER = r"\d+\.\d+ \(\d+\.\d+-\d+\.\d+\)"  # a median (min-max)
RATIO = r"\d+\.\d+x \(\d+\.\d+-\d+\.\d+\)"


def test_the_quick_run_writes_a_row_per_step_and_per_ratio(tmp_path):
    output = tmp_path / "GRAPHSURGEON.md"
    assert bench.main(["--quick", "--output", str(output)]) == 0
    text = output.read_text()
    assert "Model: `sample_models/resnet_small.onnx`" in text and "20 BatchNormalization" in text
    for step in bench.STEPS:
        row = re.search(rf"^\| {re.escape(step.name)} \| {step.setup} \| .+ \| {NUMBER} \| \d+ \(\d+-\d+\) \| "
                        r"\d+ \| -?\d+ \|$", text, re.MULTILINE)
        assert row, step.name
    for top, bottom, _ in bench.RATIOS:
        assert re.search(rf"^\| {re.escape(top)} / {re.escape(bottom)} \| .+ \| {RATIO} \| {RATIO} \|$", text,
                         re.MULTILINE), (top, bottom)
    assert "## What it shows" in text and "`fold_graph` (export, check, fold, import back) takes" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GRAPHSURGEON.md"]
