"""benchmarks/reparam.py: its rows count and judge what each model holds, its goal verdicts say what the
intervals say, and its 224x224 variants deploy to the function they train. Nothing is timed here (the
benchmark itself times)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import fold_file
from tests.builders import load_benchmark

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SAMPLES = BENCHMARKS.parent / "sample_models"


reparam = load_benchmark("reparam")
BY_NAME = {arch.name: arch for arch in reparam.ARCHS}


@pytest.fixture(autouse=True)
def _benchmark_helpers(monkeypatch):
    """The script imports its neighbours (measure.py) by name, as a script run from benchmarks/ does."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def _case_with_bnfold(arch, work: Path):
    """The committed sample copied into `work`, folded by bnfold where the benchmark's runner puts it."""
    case = reparam.sample_case(arch, SAMPLES, work)
    (work / reparam.BNFOLD).mkdir()
    fold_file(str(case.train(work)), str(work / reparam.BNFOLD / f"{case.key}.onnx"))
    return case


def test_rows_count_what_a_committed_sample_holds(tmp_path):
    case = _case_with_bnfold(BY_NAME["RepVGG"], tmp_path)
    rows = reparam.assess_case(case, tmp_path, {reparam.BNFOLD: {"note": ""}})
    assert [r.label for r in rows] == [reparam.TRAIN, reparam.BNFOLD, reparam.DEPLOY]
    train, fold, deploy = rows
    assert _counted(train) == {"BatchNormalization": 20, "Conv": 16, "Add": 16}
    assert _counted(fold) == _counted(deploy) == {"BatchNormalization": 0, "Conv": 8, "Add": 0}
    assert all(r.sound and 0 < r.max_abs < 1e-3 for r in rows)
    text = reparam.render([reparam.CaseResult(case, rows, None)], _environment(), "cmd", 60.0, 1.0)
    assert "| RepVGG | `sample_models/repvgg_small.onnx`, 1x3x32x32 | 20 → 0 (0) | 16 → 8 (8) | yes | yes |" in text
    assert "| **bnfold** | 0 | 8 | 0 |" in text


def _counted(row) -> dict[str, int]:
    return {op: row.counts[op] for op in reparam.COUNTED}


@pytest.mark.parametrize("arch", reparam.ARCHS, ids=lambda a: a.name)
def test_bnfold_reaches_the_deploy_counts(arch, tmp_path):
    case = _case_with_bnfold(arch, tmp_path)
    rows = reparam.assess_case(case, tmp_path, {reparam.BNFOLD: {"note": ""}})
    assert rows[0].counts["BatchNormalization"] > 0
    assert reparam.counts_reached(rows) and reparam.same_ops(rows)


def test_counts_are_not_reached_with_a_conv_more_or_a_changed_fold():
    deploy = reparam.Row(reparam.DEPLOY, None, Counter(Conv=8, Relu=8))
    fold = reparam.Row(reparam.BNFOLD, None, Counter(Conv=8, Relu=8, Add=2))
    assert reparam.counts_reached([fold, deploy]) and not reparam.same_ops([fold, deploy])
    fold.counts = Counter(Conv=8, Relu=8, BatchNormalization=0)
    assert reparam.counts_reached([fold, deploy]) and reparam.same_ops([fold, deploy])
    fold.counts = Counter(Conv=9, Relu=8)
    assert not reparam.counts_reached([fold, deploy])
    fold.counts = Counter(Conv=8, Relu=8, BatchNormalization=1)
    assert not reparam.counts_reached([fold, deploy])
    fold.counts, fold.status = Counter(deploy.counts), "changed function: output moved"
    assert not reparam.counts_reached([fold, deploy]) and not reparam.same_ops([fold, deploy])
    assert not reparam.counts_reached([deploy]) and not reparam.same_ops([deploy])


def test_a_fold_that_moved_the_outputs_is_marked_and_a_crash_is_a_row(tmp_path):
    case = _case_with_bnfold(BY_NAME["ACNet"], tmp_path)
    path = tmp_path / reparam.BNFOLD / f"{case.key}.onnx"
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if t.dims and len(t.dims) == 1 and t.dims[0] > 1)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.5, bias.name))
    onnx.save(model, str(path))
    rows = reparam.assess_case(case, tmp_path, {reparam.BNFOLD: {"note": ""}, "onnxsim": {"error": "ValueError: x"}})
    fold, crashed = rows[1], rows[2]
    assert fold.status.startswith("changed function:") and not fold.sound
    assert crashed.label == "onnxsim" and crashed.status == "crashed: ValueError: x" and not crashed.sound
    assert rows[0].sound and rows[-1].sound


def _level(ratio: float, low: float, high: float):
    """A bench result as the deploy-baseline pair gives it: speedup = deploy / row, the inverse ratio."""
    return SimpleNamespace(speedup=1 / ratio, ci=(1 / high, 1 / low))


def test_latency_ratio_inverts_the_bench_speedup():
    ratio, low, high = reparam.latency_ratio(_level(1.02, 1.0, 1.04))
    assert (ratio, low, high) == pytest.approx((1.02, 1.0, 1.04))


@pytest.mark.parametrize("ratio, low, high, verdict", [
    (1.02, 1.00, 1.04, "yes"), (0.97, 0.95, 0.99, "yes"), (1.02, 0.98, 1.07, "not shown"),
    (1.08, 1.06, 1.10, "no"), (1.06, 1.04, 1.08, "no")])
def test_goal_verdict_follows_the_interval(ratio, low, high, verdict):
    assert reparam.goal_verdict(_level(ratio, low, high)) == verdict


def _environment() -> dict[str, str]:
    return {"cpu": "cpu", "cores": "2", "python": "3", "onnx": "1"}


@pytest.mark.parametrize("arch", reparam.ARCHS, ids=lambda a: a.name)
def test_large_variants_deploy_to_the_function_they_train(arch):
    """What the benchmark exports at 224x224, checked in torch at 64x64: the train form's outputs stay
    in a sane range (randomized BN statistics alone grow them past 1e5), and the deploy form, built as
    large_case builds it, has no BatchNorm and computes the same function (in float64, where the merge
    rounds nothing)."""
    torch = pytest.importorskip("torch")
    from bnfold.zoo import deploy
    torch.manual_seed(0)
    train = reparam.train_form(arch, 64).double()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in train.modules())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = train(x).numpy()
        merged = deploy(train)
        got = merged(x).numpy()
    assert want.shape == (1, 1000) and np.abs(want).max() < 1e4
    assert bns > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in merged.modules())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
    if arch.name == "RepVGG":
        assert bns == 61  # RepVGG-A0's BNs
