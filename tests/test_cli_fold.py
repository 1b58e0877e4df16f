"""`bnfold fold` and `bnfold inspect` from the command line: outputs, reports, and every bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.cli import main
from tests.builders import assert_same_function, conv_bn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_file(tmp_path, rng):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(rng), path)
    return path


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_fold_writes_output_and_leaves_input_untouched(model_file, tmp_path, capsys):
    before = model_file.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["fold", str(model_file), "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert model_file.read_bytes() == before
    assert "folded 1 of 1" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["folded"] == 1 and report["decisions"][0]["reason"] == "folded"
    assert_same_function(onnx.load(model_file), onnx.load(out))
    assert listing(tmp_path) == {"model.onnx", "out.onnx", "r.json"}


def test_fold_json_is_one_document(model_file, tmp_path, capsys):
    assert main(["fold", str(model_file), "-o", str(tmp_path / "o.onnx"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["batchnorm_total"] == 1
    assert document["op_counts"]["after"] == {"Conv": 1}


def test_dry_run_writes_nothing(model_file, tmp_path):
    assert main(["fold", str(model_file), "--dry-run"]) == 0
    assert listing(tmp_path) == {"model.onnx"}


def test_several_inputs_to_out_dir_in_parallel(tmp_path, rng):
    """Each output is the fold of its own input: byte-identical to a serial fold of that input (two
    different models, so outputs swapped or mixed between workers would show)."""
    inputs = {"a.onnx": conv_bn(rng), "b.onnx": conv_bn(rng, channels_out=8)}
    for name, model in inputs.items():
        onnx.save(model, tmp_path / name)
    out, serial = tmp_path / "out", tmp_path / "serial"
    out.mkdir()
    serial.mkdir()
    assert main(["fold", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--out-dir", str(out), "--jobs", "2"]) == 0
    assert listing(out) == {"a.onnx", "b.onnx"}
    for name, model in inputs.items():
        assert main(["fold", str(tmp_path / name), "-o", str(serial / name)]) == 0
        assert (out / name).read_bytes() == (serial / name).read_bytes(), name
        assert_same_function(model, onnx.load(out / name))
    assert (out / "a.onnx").read_bytes() != (out / "b.onnx").read_bytes()


def test_in_place_replaces_atomically(model_file, tmp_path):
    """design.md, Invariants 1: the input is replaced by a new file (a rename: new inode, no temporary
    left) that computes what the original did."""
    original = onnx.load(model_file)
    inode = model_file.stat().st_ino
    assert main(["fold", str(model_file), "--in-place"]) == 0
    folded = onnx.load(model_file)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert model_file.stat().st_ino != inode
    assert listing(tmp_path) == {"model.onnx"}
    assert_same_function(original, folded)


def test_in_place_write_failure_keeps_the_original(model_file, tmp_path, monkeypatch, capsys):
    """design.md, Invariants 1: a write that fails half-way leaves the input's bytes (and inode) as
    they were, and no temporary."""
    import bnfold.io

    def fails_half_way(model, handle, source=None):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bnfold.io, "write_model", fails_half_way)
    before, inode = model_file.read_bytes(), model_file.stat().st_ino
    assert main(["fold", str(model_file), "--in-place"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert model_file.read_bytes() == before and model_file.stat().st_ino == inode
    assert listing(tmp_path) == {"model.onnx"}


def test_exclude_node(model_file, tmp_path, capsys):
    assert main(["fold", str(model_file), "-o", str(tmp_path / "o.onnx"), "--exclude-node", "bn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["left_by_reason"] == {"excluded-by-user": 1}


def test_external_data_output(tmp_path, rng):
    model_file = tmp_path / "big.onnx"
    onnx.save(conv_bn(rng, channels_in=16, channels_out=32), model_file)
    out = tmp_path / "ext.onnx"
    assert main(["fold", str(model_file), "-o", str(out), "--external-data"]) == 0
    assert (tmp_path / "ext.onnx.data").exists()
    assert_same_function(onnx.load(model_file), onnx.load(out))


def test_external_data_verify_failure_leaves_nothing(tmp_path, rng, capsys):
    """design.md, Invariants 1: --external-data stages OUT and OUT.data together; when verification
    fails, neither they nor the staging folder may remain. Verification is made to fail with an input
    of NaNs: a NaN output fails in any model, whatever the fold computes. The same command with random
    inputs (the control) writes both files."""
    model_file = tmp_path / "big.onnx"
    onnx.save(conv_bn(rng, channels_in=16, channels_out=32), model_file)
    nan_inputs = tmp_path / "nan.npz"
    np.savez(nan_inputs, x=np.full((2, 16, 7, 7), np.nan, np.float32))
    passing, failing = tmp_path / "passing", tmp_path / "failing"
    passing.mkdir()
    failing.mkdir()
    command = ["fold", str(model_file), "--external-data", "--verify"]
    assert main(command + ["-o", str(passing / "ext.onnx")]) == 0
    assert listing(passing) == {"ext.onnx", "ext.onnx.data"}
    capsys.readouterr()
    assert main(command + ["-o", str(failing / "ext.onnx"), "--inputs", str(nan_inputs)]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "nothing was written" in captured.err
    assert listing(failing) == set()


def test_inspect_lists_decisions(model_file, capsys):
    assert main(["inspect", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert any(re.search(r"\bbn\b.*\bConv conv\b.*\bfolded\b", line) for line in out.splitlines()), out
    assert main(["inspect", str(model_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decisions"][0]["neighbour"] == "conv"


def test_inspect_shows_every_pass(capsys):
    """A dynamo export's zero biases are Shape/Expand/CastLike expressions: folding frees them, and
    inspect says what each pass of the pipeline would do (table and JSON)."""
    from bnfold.passes import PIPELINE
    sample = str(ROOT / "sample_models" / "resnet_small.onnx")
    assert main(["inspect", sample]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "│" in line]
    assert any(re.search(r"│\s*stem\.0\.0\.weight, \+stem\.0\.0\.bias\s*│", row) for row in rows)  # names that map back
    assert any(re.search(r"fold-batchnorm\s*│\s*folded\s*│\s*20\b", row) for row in rows)
    assert any(re.search(r"remove-dead-code\s*│\s*removed\s*│\s*\d+\s*│.*Expand x40", row) for row in rows)
    assert main(["inspect", sample, "--json"]) == 0
    passes = json.loads(capsys.readouterr().out)["passes"]
    assert [p["name"] for p in passes] == [p.name for p in PIPELINE]
    removed = passes[-1]["decisions"]
    assert removed and {d["reason"] for d in removed} == {"removed"}
    assert {"Shape", "Expand", "CastLike"} <= {d["op_type"] for d in removed}


def _bad_inputs(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 20)
    (tmp_path / "noise.onnx").write_bytes(bytes(range(256)) * 8)
    bad = conv_bn(np.random.default_rng(0))
    bad.graph.node[0].input[1] = "missing_weight"
    onnx.save(bad, tmp_path / "invalid.onnx")
    (tmp_path / "folder.onnx").mkdir()
    return {"missing.onnx": "no such file", "empty.onnx": "empty", "text.onnx": "ONNX", "noise.onnx": "not an ONNX model",
            "invalid.onnx": "checker rejects", "folder.onnx": "directory"}


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    for name, phrase in _bad_inputs(tmp_path).items():
        assert main(["fold", str(tmp_path / name), "-o", str(tmp_path / "out.onnx")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("bnfold: error:") and phrase in err and err.count("\n") == 1, err
        assert not (tmp_path / "out.onnx").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_usage(model_file, tmp_path, capsys):
    assert main(["fold", str(model_file)]) == 2
    assert "no output given" in capsys.readouterr().err
    assert main(["fold", str(model_file), "-o", str(model_file)]) == 2
    assert "output is the input" in capsys.readouterr().err
    assert main(["fold", str(model_file), str(model_file), "-o", str(tmp_path / "x.onnx")]) == 2
    assert main(["fold", str(model_file), "-o", str(tmp_path / "nope" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fold", str(model_file), "--out-dir", str(tmp_path / "nope")]) == 2
    assert main(["fold"]) == 2


def test_shim_and_console_script_run_without_traceback(tmp_path):
    for command in ([sys.executable, str(ROOT / "cli.py")], [sys.executable, "-m", "bnfold"]):
        result = subprocess.run(command + ["inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.startswith("bnfold: error:") and "Traceback" not in result.stderr


def test_fold_verify_passes_and_writes(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["fold", str(model_file), "-o", str(out), "--verify", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["verification"]["passed"] is True
    assert out.exists()


def test_fold_verify_rejects_a_wrong_fold_and_writes_nothing(model_file, tmp_path, capsys, monkeypatch):
    import bnfold.rules.conv as conv_rule
    real = conv_rule.fold_after_conv

    def wrong(*args):
        new_weight, new_bias = real(*args)
        new_weight.flat[0] *= 1.01  # one weight off by 1%
        return new_weight, new_bias
    monkeypatch.setattr(conv_rule, "fold_after_conv", wrong)
    out = tmp_path / "out.onnx"
    assert main(["fold", str(model_file), "-o", str(out), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert captured.err.startswith("bnfold: error:") and "nothing was written" in captured.err
    assert listing(tmp_path) == {"model.onnx"}


def test_fold_dry_run_verify_writes_nothing(model_file, tmp_path):
    assert main(["fold", str(model_file), "--dry-run", "--verify"]) == 0
    assert listing(tmp_path) == {"model.onnx"}


def test_one_bad_file_does_not_stop_the_others(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["fold", str(model_file), str(tmp_path / "missing.onnx"), "--out-dir", str(out)]) == 2
    assert listing(out) == {"model.onnx"}
    assert "no such file" in capsys.readouterr().err


def test_fold_bench_measures_the_written_model(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["fold", str(model_file), "-o", str(out), "--bench", "--bench-runs", "3", "--bench-warmup", "1",
                 "--bench-creations", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)["bench"]
    assert [level["level"] for level in bench["levels"]] == ["disabled", "all"]
    assert main(["fold", str(model_file), "--dry-run", "--bench"]) == 2


def test_exclude_node_with_unknown_name_is_an_error(model_file, tmp_path, capsys):
    assert main(["fold", str(model_file), "-o", str(tmp_path / "o.onnx"), "--exclude-node", "typo"]) == 2
    assert "no BatchNormalization node has that name" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_errors_survive_the_trip_between_processes():
    """--jobs runs folds in worker processes: errors must keep their note, exit code and report."""
    import pickle

    from bnfold.errors import BnfoldError
    from bnfold.fold import VerificationFailed
    from bnfold.report import FoldReport
    error = pickle.loads(pickle.dumps(BnfoldError("bad", note="fix it", exit_code=2)))
    assert (error.message, error.note, error.exit_code) == ("bad", "fix it", 2)
    failed = pickle.loads(pickle.dumps(VerificationFailed(FoldReport(model="m.onnx"))))
    assert failed.exit_code == 1 and failed.report.model == "m.onnx"
    from bnfold.foldcmd import FoldJob, FoldOutcome
    outcome = FoldOutcome(FoldJob("m.onnx", "out/m.onnx"), failed.report, failed, 0.5)
    back = pickle.loads(pickle.dumps(outcome))
    assert (back.job, back.report.model, back.exit_code, back.seconds) == (outcome.job, "m.onnx", 1, 0.5)


@pytest.mark.parametrize("arguments", [["inspect", "--json", "sample_models/resnet50_small.onnx"],
                                       ["inspect", "sample_models/resnet50_small.onnx"],
                                       ["fold", "sample_models", "--dry-run"]],
                         ids=["json", "rich table", "folder summary"])
def test_a_reader_that_goes_away_ends_the_command_quietly(arguments):
    """`bnfold ... | head -1`: stdout closes early; bnfold exits 141 (128 + SIGPIPE, as a unix tool
    that SIGPIPE ends) and says nothing, not an internal error. The read end is closed before the
    child writes, so every write fails."""
    child = subprocess.Popen([sys.executable, "-m", "bnfold", *arguments], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read()
    assert (child.wait(), err) == (141, b"")


def test_a_bug_folding_one_file_is_reported_as_inspect_reports_it(model_file, tmp_path, capsys, monkeypatch):
    """One INPUT file: a bug is the command's internal error (exit 3), in the same words as inspect's;
    only over several models does it become one model's outcome (tests/test_cli_folder.py)."""
    import bnfold.fold
    import bnfold.foldcmd

    def buggy(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(bnfold.foldcmd, "fold_file", buggy)
    monkeypatch.setattr(bnfold.fold, "fold_file", buggy)
    lines = []
    for command in (["fold", str(model_file), "-o", str(tmp_path / "o.onnx")], ["inspect", str(model_file)]):
        assert main(command) == 3
        lines.append(capsys.readouterr().err)
    assert lines[0] == lines[1] == ("bnfold: internal error: RuntimeError: a bug. Note: rerun with --debug for "
                                    "the traceback and report it.\n")


@pytest.mark.parametrize("poison, said", [
    (np.nan, "the outputs hold NaN or Inf, which verification never accepts"),
    (None, "the folded model's outputs differ from the original's")])
def test_verify_says_whether_values_differ_or_are_not_finite(model_file, tmp_path, capsys, poison, said):
    """A NaN input makes both models' outputs NaN: the same function, but verification cannot show it,
    and says so rather than that the fold changed the outputs. A zero tolerance rejects float32 rounding."""
    x = np.random.default_rng(0).normal(size=(2, 4, 7, 7)).astype(np.float32)
    if poison is not None:
        x[0, 0, 0, 0] = poison
    np.savez(tmp_path / "x.npz", x=x)
    tolerance = [] if poison is not None else ["--atol", "0", "--rtol", "0"]
    out = tmp_path / "out.onnx"
    code = main(["fold", str(model_file), "-o", str(out), "--verify", "--inputs", str(tmp_path / "x.npz"), *tolerance])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert f"bnfold: error: {model_file}: {said}; nothing was written" in err
