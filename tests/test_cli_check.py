"""`bnfold check`, the CI gate: exit 0 when fold would change nothing, 1 with the BNs it would change
(or, with --strict, leave for a reason other than --exclude-node), 2 for a model it cannot read; the
JSON document is inspect's (one model) or fold's (several) with a "check" object; nothing is written.
What it prints is checked line by line and cell by cell, and the fix it prints is run: then it passes."""

from __future__ import annotations

import json
import shlex
import time
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from rich.console import Console

from bnfold import foldcmd
from bnfold.checkcmd import CheckOptions, ModelCheck, check_models, failing_table
from bnfold.cli import main
from bnfold.errors import EXIT_INTERNAL
from bnfold.fold import fold_file
from bnfold.passes.base import Decision
from bnfold.reasons import FOLDED, LOWERED, MEANINGS, TRAINING_MODE
from tests.builders import bn_initializers, bn_node, bn_stats, conv_bn, if_model, make_model, tensor

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
HEADER = ["BatchNormalization", "neighbour", "fold would", "rule", "detail"]
CONV_BN = "scaled its output channels' filters and mapped its bias"  # conv-bn's detail


def relu_bn(rng) -> onnx.ModelProto:
    """x -> Relu -> BN 'bn': nothing linear next to the BN (no-foldable-neighbour), but it can be lowered."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y")]
    return make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5])], [tensor("y", np.float32, None)],
                      bn_initializers(bn_stats(rng, 4), np.float32))


def training_conv_bn(rng) -> onnx.ModelProto:
    """x -> Conv -> BN 'bn' exported in training mode: left (training-mode) unless --assume-inference."""
    model = conv_bn(rng)
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    onnx.checker.check_model(model, full_check=True)
    return model


def branches(rng) -> onnx.ModelProto:
    """y = BN 'bn'(Conv 'conv'(x)) + BN 'bn_id'(x): reparameterize merges both BNs into the Conv; without
    it 'bn' folds into the Conv and 'bn_id' (nothing linear next to it) is left."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "a"),
             bn_node("x", "i", "bn_id"), helper.make_node("Add", ["a", "i"], ["y"], name="add")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "W"),
             *bn_initializers(bn_stats(rng, 4), np.float32), *bn_initializers(bn_stats(rng, 4), np.float32, "bn_id")]
    return make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5])], [tensor("y", np.float32, None)], inits)


def saved(model: onnx.ModelProto, path: Path, bn_name: str | None = None) -> Path:
    """`model` saved at `path` (folders made), its first BN renamed to `bn_name` if given."""
    if bn_name is not None:
        next(node for node in model.graph.node if node.op_type == "BatchNormalization").name = bn_name
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def table_rows(out: str) -> list[list[str]]:
    """The cells of every table line in `out` (header lines and rows), stripped, in order."""
    return [[cell.strip() for cell in line[1:-1].split(line[0])] for line in out.splitlines()
            if line.startswith(("┃", "│"))]


def run_fix(capsys, out: str) -> None:
    """Run, through bnfold's main, the `bnfold fold` command that check's last line prints."""
    argv = shlex.split(out.splitlines()[-1].split(": run ", 1)[1].split("; ")[0])
    assert argv[:2] == ["bnfold", "fold"]
    assert main(argv[1:]) == 0
    capsys.readouterr()


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
    """The model's line, its table, and the fix: after running the fix the check passes."""
    path = models / "unfolded.onnx"
    code, out, err = check(capsys, path)
    assert (code, err) == (1, "")
    assert out.splitlines()[0] == f"{path}: 1 of 1 BatchNormalization fail the check"
    assert table_rows(out) == [HEADER, ["bn", "Conv conv", "fold", "conv-bn", CONV_BN]]
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded: run bnfold fold "
                                    f"--in-place --verify {path}")
    run_fix(capsys, out)
    assert check(capsys, path) == (0, "check passed: 1 model, 0 BatchNormalization, none that bnfold fold would "
                                      "change\n", "")


def test_a_left_batchnorm_passes_unless_lowering_would_change_it(models, capsys):
    """A BN with nothing linear next to it stays (pass); with --lower-standalone mul-add fold would
    rewrite it, so the check fails and the fix it prints carries the flag."""
    path = models / "sub" / "relu_bn.onnx"
    assert check(capsys, path) == (0, "check passed: 1 model, 1 BatchNormalization, none that bnfold fold would "
                                      "change (left: no-foldable-neighbour: 1)\n", "")
    code, out, _ = check(capsys, path, "--lower-standalone", "mul-add")
    assert code == 1
    assert table_rows(out)[1:] == [["bn", "-", "lower to Mul + Add", "-",
                                    "now Mul 'bn_mul' then Add 'bn_add', constants [4, 1, 1] float32"]]
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be lowered to Mul + Add: run bnfold "
                                    f"fold --in-place --verify --lower-standalone mul-add {path}")
    run_fix(capsys, out)
    assert check(capsys, path, "--lower-standalone", "mul-add")[:2] == (
        0, "check passed: 1 model, 0 BatchNormalization, none that bnfold fold would change\n")


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
        assert table_rows(out)[1:] == [["bn", "-", "leave: no-foldable-neighbour", "-",
                                        "fed by Relu 'relu', read by graph output"]]
        assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization cannot be folded "
                                        "(no-foldable-neighbour: 1): accept each with --exclude-node NAME, or "
                                        "change the model")
    else:
        assert out == ("check passed: 1 model, 1 BatchNormalization, none that bnfold fold would change "
                       "(left: excluded-by-user: 1)\n")


def test_folders_are_searched_and_only_failing_models_get_a_table(models, capsys):
    code, out, err = check(capsys, models)
    assert (code, err) == (1, "")
    assert out.splitlines()[0] == f"{models / 'unfolded.onnx'}: 1 of 1 BatchNormalization fail the check"
    assert "folded.onnx:" not in out.replace("unfolded.onnx:", "") and "relu_bn.onnx:" not in out
    assert table_rows(out) == [HEADER, ["bn", "Conv conv", "fold", "conv-bn", CONV_BN]]
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded in 1 of 3 models: run "
                                    f"bnfold fold --in-place --verify {models / 'unfolded.onnx'}")


def test_strict_over_a_folder_gives_both_failures_with_their_model_counts(models, capsys):
    code, out, _ = check(capsys, models, "--strict")
    assert code == 1
    assert [line for line in out.splitlines() if line.endswith(" fail the check")] == [
        f"{models / 'sub' / 'relu_bn.onnx'}: 1 of 1 BatchNormalization fail the check",
        f"{models / 'unfolded.onnx'}: 1 of 1 BatchNormalization fail the check"]
    assert table_rows(out) == [HEADER, ["bn", "-", "leave: no-foldable-neighbour", "-",
                                        "fed by Relu 'relu', read by graph output"],
                               HEADER, ["bn", "Conv conv", "fold", "conv-bn", CONV_BN]]
    assert out.splitlines()[-1] == (
        "check failed: 1 BatchNormalization can be folded in 1 of 3 models: run bnfold fold --in-place --verify "
        f"{models / 'unfolded.onnx'}; 1 BatchNormalization in 1 of 3 models cannot be folded "
        "(no-foldable-neighbour: 1): accept each with --exclude-node NAME, or change the model")


def test_folds_and_lowerings_are_counted_apart_and_one_fix_does_both(models, capsys):
    relu, unfolded = models / "sub" / "relu_bn.onnx", models / "unfolded.onnx"
    code, out, _ = check(capsys, models, "--lower-standalone", "mul-add")
    assert code == 1
    assert out.splitlines()[-1] == (
        "check failed: 1 BatchNormalization can be folded and 1 lowered to Mul + Add in 2 of 3 models: run "
        f"bnfold fold --in-place --verify --lower-standalone mul-add {relu} {unfolded}")
    run_fix(capsys, out)
    assert check(capsys, models, "--lower-standalone", "mul-add")[:2] == (
        0, "check passed: 3 models, 0 BatchNormalization, none that bnfold fold would change\n")


def test_reparameterize_is_checked_as_asked_and_a_left_bn_is_listed_only_with_strict(tmp_path, capsys, rng):
    """With reparameterize (the default) both BNs merge into the Conv; --no-reparameterize is checked
    as asked (one BN folds, the other is left and, without --strict, not listed) and is in the fix."""
    path = saved(branches(rng), tmp_path / "branches.onnx")
    code, out, _ = check(capsys, path)
    assert code == 1 and out.splitlines()[0] == f"{path}: 2 of 2 BatchNormalization fail the check"
    assert table_rows(out)[1:] == [
        ["bn", "Conv conv", "fold", "reparameterize",
         "merged with its Conv's branch into Conv 'conv' (reparameterize)"],
        ["bn_id", "Conv conv", "fold", "reparameterize",
         "merged as an identity branch into Conv 'conv' (reparameterize)"]]
    code, out, _ = check(capsys, path, "--no-reparameterize")
    assert code == 1 and out.splitlines()[0] == f"{path}: 1 of 2 BatchNormalization fail the check"
    assert table_rows(out)[1:] == [["bn", "Conv conv", "fold", "conv-bn", CONV_BN]]
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded: run bnfold fold --in-place "
                                    f"--verify --no-reparameterize {path}")
    run_fix(capsys, out)
    assert check(capsys, path, "--no-reparameterize")[:2] == (
        0, "check passed: 1 model, 1 BatchNormalization, none that bnfold fold would change "
           "(left: no-foldable-neighbour: 1)\n")


def test_a_batchnorm_in_a_subgraph_is_named_by_its_graph(tmp_path, capsys, rng):
    path = saved(if_model(rng), tmp_path / "if.onnx")
    code, out, _ = check(capsys, path)
    assert code == 1
    assert table_rows(out)[1:] == [["if:then_branch/bn", "Conv conv_then", "fold", "conv-bn", CONV_BN]]


def test_the_fix_names_only_the_excluded_nodes_its_models_have(models, capsys, rng):
    """fold refuses an --exclude-node name that none of its inputs has: the printed fix would fail."""
    onnx.save(conv_bn(rng), models / "also_unfolded.onnx")
    code, out, _ = check(capsys, models / "sub" / "relu_bn.onnx", models / "unfolded.onnx", "--exclude-node", "bn")
    assert code == 0
    code, out, _ = check(capsys, models / "sub" / "relu_bn.onnx", models / "also_unfolded.onnx", "--strict",
                         "--exclude-node", "bn", "--lower-standalone", "mul-add")
    assert code == 0, out


def test_the_fix_carries_every_pass_option_and_the_excluded_names_of_the_models_it_folds(tmp_path, capsys, rng):
    """Checked with every pass option: the fix repeats them, names only the --exclude-node names of
    the models it folds (relu_bn's model has nothing to fold), and once run the same check passes."""
    training = saved(training_conv_bn(rng), tmp_path / "training.onnx")
    split = saved(branches(rng), tmp_path / "branches.onnx")
    relu = saved(relu_bn(rng), tmp_path / "relu.onnx", bn_name="relu_bn")
    flags = ["--assume-inference", "--no-reparameterize", "--lower-standalone", "mul-add",
             "--exclude-node", "bn_id", "--exclude-node", "relu_bn"]
    code, out, _ = check(capsys, training, split, relu, *flags)
    assert code == 1
    assert [line for line in out.splitlines() if line.endswith(" fail the check")] == [
        f"{training}: 1 of 1 BatchNormalization fail the check", f"{split}: 1 of 2 BatchNormalization fail the check"]
    assert table_rows(out) == [HEADER, ["bn", "Conv conv", "fold", "conv-bn", CONV_BN]] * 2
    assert out.splitlines()[-1] == (
        "check failed: 2 BatchNormalization can be folded in 2 of 3 models: run bnfold fold --in-place --verify "
        f"--assume-inference --no-reparameterize --lower-standalone mul-add --exclude-node bn_id {training} {split}")
    run_fix(capsys, out)
    assert check(capsys, training, split, relu, *flags)[:2] == (
        0, "check passed: 3 models, 2 BatchNormalization, none that bnfold fold would change "
           "(left: excluded-by-user: 2)\n")


def test_a_training_mode_batchnorm_fails_only_with_assume_inference(tmp_path, capsys, rng):
    training = saved(training_conv_bn(rng), tmp_path / "training.onnx")
    relu = saved(relu_bn(rng), tmp_path / "relu.onnx")
    assert check(capsys, training, relu) == (
        0, "check passed: 2 models, 2 BatchNormalization, none that bnfold fold would change "
           "(left: no-foldable-neighbour: 1, training-mode: 1)\n", "")
    code, out, _ = check(capsys, training, "--assume-inference")
    assert code == 1 and table_rows(out)[1:] == [["bn", "Conv conv", "fold", "conv-bn", CONV_BN]]
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded: run bnfold fold --in-place "
                                    f"--verify --assume-inference {training}")


def test_the_table_says_what_fold_would_do_and_falls_back_on_the_reasons_meaning():
    """A decision without detail (Decision.detail may be empty) shows what its reason code means; a
    BN with no neighbour or rule shows '-'."""
    check_ = ModelCheck(folds=(Decision("a", FOLDED, rule="conv-bn", neighbour="conv", neighbour_op="Conv",
                                        graph="loop:body"),),
                        lowers=(Decision("b", LOWERED, detail="now Mul then Add"),), excluded=(),
                        unfoldable=(Decision("c", TRAINING_MODE),), strict=True)
    console = Console(width=160, file=StringIO(), soft_wrap=False)
    console.print(failing_table(check_))
    assert table_rows(console.file.getvalue()) == [
        HEADER, ["loop:body/a", "Conv conv", "fold", "conv-bn", MEANINGS[FOLDED]],
        ["b", "-", "lower to Mul + Add", "-", "now Mul then Add"],
        ["c", "-", "leave: training-mode", "-", MEANINGS[TRAINING_MODE]]]


def test_long_names_are_never_cut(tmp_path, capsys, rng):
    """A model's line stays one line however long its path (CI logs are searched by it); a BN name too
    long for its column folds onto the next lines instead of being cut."""
    name = "bn_" + "0123456789" * 20
    path = saved(conv_bn(rng), tmp_path / ("d" * 80) / ("e" * 80) / "unfolded.onnx", bn_name=name)
    code, out, _ = check(capsys, path)
    assert code == 1 and out.splitlines()[0] == f"{path}: 1 of 1 BatchNormalization fail the check"
    rows = table_rows(out)[1:]
    assert len(rows) > 1 and "".join(row[0] for row in rows) == name


def test_the_model_line_is_not_highlighted_in_a_terminal(models, capsys, monkeypatch):
    """rich colours numbers and paths it finds in text unless told not to: the line stays plain."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, _ = check(capsys, models / "unfolded.onnx")
    assert code == 1 and "\x1b[" in out  # the table is styled: colours are on
    assert out.splitlines()[0] == f"{models / 'unfolded.onnx'}: 1 of 1 BatchNormalization fail the check"


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
    start = time.perf_counter()
    code, out, _ = check(capsys, models, "--json", "--strict")
    wall = time.perf_counter() - start
    document = json.loads(out)
    assert 0 <= document["summary"]["seconds"] <= wall  # the run's time, not a clock reading
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
    assert out.splitlines()[-1] == ("check failed: 1 BatchNormalization can be folded in 1 of 2 models: run bnfold "
                                    f"fold --in-place --verify {models / 'unfolded.onnx'}; 1 of 2 models could not be "
                                    "read (see the errors above)")
    code, out, err = check(capsys, models / "broken.onnx", models / "folded.onnx", "--json")
    document = json.loads(out)
    assert code == 2 and len(err.splitlines()) == 1
    assert [entry["status"] for entry in document["models"]] == ["error", "ok"]
    assert "check" not in document["models"][0] and document["models"][1]["check"]["passed"]
    assert document["check"]["models_unreadable"] == 1 and document["check"]["exit_code"] == 2


def boom(job):
    raise RuntimeError("boom")


def test_a_bug_is_one_line_and_debug_raises_it(models, capsys, monkeypatch):
    """A bug (not a BnfoldError) checking one model is bnfold's internal error, raised with --debug;
    checking several, it is that model's error line, as for a model that cannot be read."""
    monkeypatch.setattr(foldcmd, "run_fold_job", boom)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "check", str(models / "unfolded.onnx")])
    capsys.readouterr()
    assert check(capsys, models / "unfolded.onnx") == (
        EXIT_INTERNAL, "", "bnfold: internal error: RuntimeError: boom. Note: rerun with --debug for the traceback "
                           "and report it.\n")
    code, out, err = check(capsys, models / "unfolded.onnx", models / "folded.onnx")
    assert code == EXIT_INTERNAL and out == "check failed: 2 of 2 models could not be read (see the errors above)\n"
    assert err.splitlines() == [f"bnfold: error: {models / name}: internal error: RuntimeError: boom Note: rerun "
                                "this model with --debug for the traceback and report it"
                                for name in ("unfolded.onnx", "folded.onnx")]


def test_check_models_runs_in_this_process_and_keeps_a_bug_as_the_models_error(models, monkeypatch):
    """The library call's defaults (the CLI passes both): one job at a time, a bug is an outcome."""
    monkeypatch.setattr(foldcmd, "run_fold_job", boom)
    run = check_models([str(models)], CheckOptions())
    assert run.jobs == 1 and run.checks == [None] * 3
    assert [o.error.exit_code for o in run.outcomes] == [EXIT_INTERNAL] * 3


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
