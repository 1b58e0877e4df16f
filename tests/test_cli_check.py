"""`bnfold check`, the CI gate: exit 0 when fold would change nothing, 1 with the BNs it would change
(or, with --strict, leave for a reason other than --exclude-node), 2 for a model it cannot read; the
JSON document is inspect's (one model) or fold's (several) with a "check" object; nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold.cli import main
from bnfold.fold import fold_file
from tests.builders import bn_initializers, bn_node, bn_stats, conv_bn, make_model, tensor

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def relu_bn(rng) -> onnx.ModelProto:
    """x -> Relu -> BN 'bn': nothing linear next to the BN (no-foldable-neighbour), but it can be lowered."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y")]
    return make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5])], [tensor("y", np.float32, None)],
                      bn_initializers(bn_stats(rng, 4), np.float32))


def files_below(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def models(tmp_path, rng) -> Path:
    """models/{unfolded.onnx (Conv -> BN), folded.onnx (its fold), sub/relu_bn.onnx}."""
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    onnx.save(conv_bn(rng), folder / "unfolded.onnx")
    fold_file(folder / "unfolded.onnx", folder / "folded.onnx")
    onnx.save(relu_bn(rng), folder / "sub" / "relu_bn.onnx")
    return folder


def check(capsys, *argv) -> tuple[int, str, str]:
    code = main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------- exit codes
def test_a_model_with_nothing_left_to_fold_passes(models, capsys):
    code, out, err = check(capsys, models / "folded.onnx", SAMPLES / "repvgg_small_deploy.onnx")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == ("check passed: 2 models, 0 BatchNormalization, none that bnfold fold "
                                    "would change")


def test_a_foldable_batchnorm_fails_and_is_listed_with_what_fold_would_do(models, capsys):
    code, out, err = check(capsys, models / "unfolded.onnx")
    assert (code, err) == (1, "")
    assert f"{models / 'unfolded.onnx'}: 1 of 1 BatchNormalization fail the check" in out
    row = next(line for line in out.splitlines() if "│ bn " in line)
    assert "Conv conv" in row and "fold" in row and "conv-bn" in row
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded: run bnfold fold "
                                    f"--in-place --verify {models / 'unfolded.onnx'}")


def test_a_left_batchnorm_passes_unless_lowering_would_change_it(models, capsys):
    """A BN with nothing linear next to it stays (pass); with --lower-standalone mul-add fold would
    rewrite it, so the check fails and the fix it prints carries the flag."""
    path = models / "sub" / "relu_bn.onnx"
    code, out, _ = check(capsys, path)
    assert code == 0 and out.splitlines()[-1].endswith("(left: no-foldable-neighbour: 1)")
    code, out, _ = check(capsys, path, "--lower-standalone", "mul-add")
    assert code == 1
    assert "lower to Mul + Add" in next(line for line in out.splitlines() if "│ bn " in line)
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be lowered to Mul + Add: run bnfold "
                                    f"fold --in-place --verify --lower-standalone mul-add {path}")


@pytest.mark.parametrize("model, excluded, strict, expected", [
    ("sub/relu_bn.onnx", False, True, 1),   # left for a reason: --strict fails
    ("sub/relu_bn.onnx", True, True, 0),    # left because the user said so: accepted
    ("unfolded.onnx", True, False, 0),      # a foldable BN excluded by name
    ("unfolded.onnx", True, True, 0),
])
def test_strict_fails_on_what_is_left_unless_excluded_by_name(models, capsys, model, excluded, strict, expected):
    flags = (["--exclude-node", "bn"] if excluded else []) + (["--strict"] if strict else [])
    code, out, _ = check(capsys, models / model, *flags)
    assert code == expected
    if expected:
        assert "leave: no-foldable-neighbour" in next(line for line in out.splitlines() if "│ bn " in line)
        assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization cannot be folded "
                                        "(no-foldable-neighbour: 1): accept each with --exclude-node NAME, or "
                                        "change the model")


def test_folders_are_searched_and_only_failing_models_get_a_table(models, capsys):
    code, out, err = check(capsys, models)
    assert (code, err) == (1, "")
    assert f"{models / 'unfolded.onnx'}: 1 of 1" in out
    assert "folded.onnx:" not in out.replace("unfolded.onnx:", "") and "relu_bn.onnx:" not in out
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded in 1 of 3 models: run "
                                    f"bnfold fold --in-place --verify {models / 'unfolded.onnx'}")


def test_the_fix_names_only_the_excluded_nodes_its_models_have(models, capsys, rng):
    """fold refuses an --exclude-node name that none of its inputs has: the printed fix would fail."""
    onnx.save(conv_bn(rng), models / "also_unfolded.onnx")
    code, out, _ = check(capsys, models / "sub" / "relu_bn.onnx", models / "unfolded.onnx", "--exclude-node", "bn")
    assert code == 0
    code, out, _ = check(capsys, models / "sub" / "relu_bn.onnx", models / "also_unfolded.onnx", "--strict",
                         "--exclude-node", "bn", "--lower-standalone", "mul-add")
    assert code == 0, out


# ------------------------------------------------------------------------------------------ JSON
def test_json_of_one_model_is_inspects_document_with_the_verdict(models, capsys):
    path = models / "unfolded.onnx"
    assert main(["inspect", str(path), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    code, out, _ = check(capsys, path, "--json")
    document = json.loads(out)
    assert code == 1
    assert document.pop("check") == {"passed": False, "strict": False, "foldable": 1, "lowered": 0,
                                     "excluded": 0, "unfoldable": 0, "failing": 1, "exit_code": 1}
    assert document == inspected


def test_json_of_several_models_is_folds_document_with_verdicts(models, capsys):
    code, out, _ = check(capsys, models, "--json", "--strict")
    document = json.loads(out)
    assert code == 1
    assert [entry["model"] for entry in document["models"]] == [
        str(models / place) for place in ("folded.onnx", "sub/relu_bn.onnx", "unfolded.onnx")]
    assert [entry["check"]["passed"] for entry in document["models"]] == [True, False, False]
    assert document["models"][1]["check"]["unfoldable"] == 1
    assert document["summary"]["exit_code"] == 1 and document["summary"]["batchnorm_total"] == 2
    assert document["check"] == {"passed": False, "strict": True, "foldable": 1, "lowered": 0, "excluded": 0,
                                 "unfoldable": 1, "failing": 2, "exit_code": 1, "models_failing": 2,
                                 "models_unreadable": 0}


def test_jobs_give_the_same_document(models, capsys):
    documents = []
    for jobs in ("1", "2"):
        code, out, _ = check(capsys, models, "--json", "--jobs", jobs)
        document = json.loads(out)
        for entry in document["models"]:
            entry.pop("seconds")
        document["summary"].pop("seconds")
        document["summary"].pop("jobs")
        documents.append((code, document))
    assert documents[0] == documents[1] and documents[0][0] == 1


# ------------------------------------------------------------------------------------ bad input
def test_a_bad_model_is_one_error_line_and_the_others_are_still_checked(models, capsys):
    (models / "broken.onnx").write_bytes(b"not a model")
    code, out, err = check(capsys, models / "broken.onnx", models / "unfolded.onnx")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"bnfold: error: {models / 'broken.onnx'}: ")
    assert "Traceback" not in err + out
    assert f"{models / 'unfolded.onnx'}: 1 of 1" in out
    assert out.splitlines()[-1].endswith("; 1 of 2 models could not be read (see the errors above)")
    code, out, err = check(capsys, models / "broken.onnx", models / "folded.onnx", "--json")
    document = json.loads(out)
    assert code == 2 and len(err.splitlines()) == 1
    assert [entry["status"] for entry in document["models"]] == ["error", "ok"]
    assert "check" not in document["models"][0] and document["models"][1]["check"]["passed"]
    assert document["check"]["models_unreadable"] == 1 and document["check"]["exit_code"] == 2


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_one_bad_model_is_one_error_line(tmp_path, capsys, json_flag):
    code, out, err = check(capsys, tmp_path / "missing.onnx", *json_flag)
    assert code == 2 and err == f"bnfold: error: {tmp_path / 'missing.onnx'}: no such file\n"
    assert out == ("" if json_flag else "check failed: the model could not be read (see the error above)\n")


@pytest.mark.parametrize("flags, message", [
    (["--exclude-node", "nope"], "bnfold: error: --exclude-node: nope: no BatchNormalization node has that name"),
    (["--jobs", "0"], "bnfold: error: --jobs: must be at least 1, not 0"),
    (["--lower-standalone", "x"], "bnfold: error: --lower-standalone: unknown value 'x'"),
])
def test_bad_usage_is_one_error_line(models, capsys, flags, message):
    code, out, err = check(capsys, models / "unfolded.onnx", *flags)
    assert (code, out) == (2, "") and len(err.splitlines()) == 1 and err.startswith(message), err


def test_nothing_is_written(models, capsys):
    before = files_below(models)
    for flags in ([], ["--json"], ["--strict", "--lower-standalone", "mul-add", "--jobs", "2"]):
        assert check(capsys, models, *flags)[0] == 1
    assert files_below(models) == before
