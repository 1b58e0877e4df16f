"""`bnfold fold` over many models: folders, the layout of the outputs, collisions refused before
anything is written, --exclude-node across inputs, --jobs, the summary table and JSON document, and
flags given without the flag they need."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.cli import build_parser, main
from tests.builders import conv_bn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def files_below(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def everything_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def tree(tmp_path, rng) -> Path:
    """models/{a.onnx, sub/b.onnx, sub/deeper/c.onnx}, plus files that are not models."""
    models = tmp_path / "models"
    (models / "sub" / "deeper").mkdir(parents=True)
    for place, channels in (("a.onnx", 6), ("sub/b.onnx", 8), ("sub/deeper/c.onnx", 10)):
        onnx.save(conv_bn(rng, channels_out=channels), models / place)
    (models / "sub" / "b.onnx.data").write_bytes(b"\0" * 64)  # external data files are not models
    (models / "notes.txt").write_text("not a model\n")
    return models


@pytest.fixture
def model_file(tmp_path, rng):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(rng), path)
    return path


def _out(tmp_path, name="out") -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def test_a_folder_keeps_its_layout_and_each_output_is_its_models_fold(tree, tmp_path):
    out = _out(tmp_path)
    assert main(["fold", str(tree), "--out-dir", str(out)]) == 0
    assert everything_below(out) == ["a.onnx", "sub", "sub/b.onnx", "sub/deeper", "sub/deeper/c.onnx"]
    single = _out(tmp_path, "single")
    for place in ("a.onnx", "sub/b.onnx", "sub/deeper/c.onnx"):
        assert main(["fold", str(tree / place), "-o", str(single / "x.onnx")]) == 0
        assert (out / place).read_bytes() == (single / "x.onnx").read_bytes(), place


def test_jobs_do_not_change_a_byte(tmp_path, capsys):
    """design.md, Invariants 5: the sample models folded in one process and in two give the same
    files, and the same document, in input order, whatever order the folds finished in."""
    documents = []
    for jobs in ("1", "2"):
        out = _out(tmp_path, f"jobs{jobs}")
        assert main(["fold", str(SAMPLES), "--out-dir", str(out), "--jobs", jobs, "--json"]) == 0
        documents.append(json.loads(capsys.readouterr().out))
    assert files_below(tmp_path / "jobs1") == files_below(tmp_path / "jobs2")
    assert len(files_below(tmp_path / "jobs1")) == len(list(SAMPLES.glob("*.onnx")))
    for document in documents:
        for entry in document["models"]:
            entry.pop("seconds")
            entry["output"] = Path(entry["output"]).name
        document["summary"].pop("seconds")
        document["summary"].pop("jobs")
    assert documents[0] == documents[1]
    models = [entry["model"] for entry in documents[0]["models"]]
    assert models == sorted(str(p) for p in SAMPLES.glob("*.onnx"))


def test_the_json_document_of_several_models(tree, tmp_path, capsys):
    """One entry per model (input order; its report's fields when it was read), then totals; one bad
    model is reported and does not stop the others; the exit code says it failed."""
    (tree / "sub" / "bad.onnx").write_bytes(bytes(range(256)) * 8)
    out = _out(tmp_path)
    assert main(["fold", str(tree), "--out-dir", str(out), "--json", "--report", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert json.loads((tmp_path / "r.json").read_text()) == document
    assert [e["model"] for e in document["models"]] == [str(tree / p) for p in
                                                        ("a.onnx", "sub/b.onnx", "sub/bad.onnx", "sub/deeper/c.onnx")]
    good, bad = document["models"][0], document["models"][2]
    assert (good["output"], good["status"], good["exit_code"], good["error"]) == (str(out / "a.onnx"), "ok", 0, None)
    assert (good["batchnorm_total"], good["folded"], good["left_by_reason"]) == (1, 1, {})
    assert good["seconds"] >= 0 and good["decisions"][0]["reason"] == "folded"
    assert (bad["status"], bad["exit_code"]) == ("error", 2) and "not an ONNX model" in bad["error"]
    assert "batchnorm_total" not in bad
    assert document["summary"] == {"models": 4, "ok": 3, "failed": 1, "batchnorm_total": 3, "folded": 3,
                                   "left_by_reason": {}, "seconds": document["summary"]["seconds"],
                                   "jobs": 1, "exit_code": 2}
    assert captured.err.startswith("bnfold: error:") and "bad.onnx" in captured.err
    assert everything_below(out) == ["a.onnx", "sub", "sub/b.onnx", "sub/deeper", "sub/deeper/c.onnx"]


def test_the_summary_table(tree, tmp_path, capsys):
    """One row per model, in input order, with its verify result; no per-model tables."""
    assert main(["fold", str(tree), "--dry-run", "--verify", "--exclude-node", "bn"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if ".onnx" in line]
    assert [row.split("│")[1].strip() for row in rows] == [str(tree / p) for p in
                                                            ("a.onnx", "sub/b.onnx", "sub/deeper/c.onnx")]
    assert all([cell.strip() for cell in row.split("│")[2:7]] == ["ok", "1", "0", "excluded-by-user: 1", "pass"]
               for row in rows), rows
    assert "3 models, 0 failed: would fold 0 of 3 BatchNormalization" in out
    assert "BatchNormalization nodes" not in out  # the one-model table is not repeated per model


def test_a_failed_model_leaves_no_folder_behind(tmp_path, rng, capsys):
    models = tmp_path / "models"
    (models / "good").mkdir(parents=True)
    (models / "broken").mkdir()
    onnx.save(conv_bn(rng), models / "good" / "m.onnx")
    (models / "broken" / "m.onnx").write_text("not a model")
    out = _out(tmp_path)
    assert main(["fold", str(models), "--out-dir", str(out)]) == 2
    assert everything_below(out) == ["good", "good/m.onnx"]
    assert "broken/m.onnx: not an ONNX model" in capsys.readouterr().err


def test_files_and_folders_mix_when_no_outputs_collide(tree, tmp_path, rng):
    onnx.save(conv_bn(rng), tmp_path / "lone.onnx")
    out = _out(tmp_path)
    assert main(["fold", str(tmp_path / "lone.onnx"), str(tree / "sub"), "--out-dir", str(out)]) == 0
    assert everything_below(out) == ["b.onnx", "deeper", "deeper/c.onnx", "lone.onnx"]


@pytest.mark.parametrize("inputs, message", [
    (["a/m.onnx", "b/m.onnx"], "both {t}/a/m.onnx and {t}/b/m.onnx would be written there"),
    (["a/m.onnx", "b"], "both {t}/a/m.onnx and {t}/b/m.onnx would be written there"),
    (["a/m.onnx", "out/m.onnx"], "the output of {t}/a/m.onnx would replace input {t}/out/m.onnx"),
])
def test_outputs_that_collide_are_refused_before_anything_is_written(tmp_path, rng, capsys, inputs, message):
    for folder in ("a", "b", "out"):
        (tmp_path / folder).mkdir()
        onnx.save(conv_bn(rng), tmp_path / folder / "m.onnx")
    before = files_below(tmp_path)
    assert main(["fold", *(str(tmp_path / i) for i in inputs), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnfold: error: {tmp_path}/out/m.onnx: {message.format(t=tmp_path)}"), err
    assert files_below(tmp_path) == before


@pytest.mark.parametrize("where", [["--in-place"], ["--out-dir", "out"]])
def test_a_file_given_twice_is_refused(model_file, tmp_path, capsys, monkeypatch, where):
    """The same file, spelled two ways."""
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["fold", str(model_file), "model.onnx", *where]) == 2
    assert capsys.readouterr().err == "bnfold: error: model.onnx: given twice Note: give each input once\n"
    assert everything_below(tmp_path) == ["model.onnx", "out"]


def test_an_out_dir_inside_the_folder_is_not_searched(tree):
    """Folding a folder into a folder inside it, twice: the second run does not fold the first's
    outputs again (no out/out/...)."""
    out = tree / "folded"
    out.mkdir()
    for _ in range(2):
        assert main(["fold", str(tree), "--out-dir", str(out)]) == 0
    assert everything_below(out) == ["a.onnx", "sub", "sub/b.onnx", "sub/deeper", "sub/deeper/c.onnx"]


def test_links_to_folders_are_not_followed(tree, tmp_path, rng):
    """A link back to the folder (a loop) and a link to a folder outside it are not searched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx.save(conv_bn(rng), outside / "elsewhere.onnx")
    os.symlink(tree, tree / "sub" / "loop")
    os.symlink(outside, tree / "outside")
    out = _out(tmp_path)
    assert main(["fold", str(tree), "--out-dir", str(out)]) == 0
    assert everything_below(out) == ["a.onnx", "sub", "sub/b.onnx", "sub/deeper", "sub/deeper/c.onnx"]


@pytest.mark.parametrize("content", [[], ["m.onnx.data", "readme.txt"]])
def test_a_folder_without_models_is_an_error(tmp_path, capsys, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    for name in content:
        (folder / name).write_bytes(b"x")
    assert main(["fold", str(folder), "--out-dir", str(_out(tmp_path))]) == 2
    assert capsys.readouterr().err == f"bnfold: error: {folder}: no .onnx file in this folder or below it\n"


def test_in_place_and_dry_run_over_a_folder(tree, capsys):
    before = files_below(tree)
    assert main(["fold", str(tree), "--dry-run", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert {e["output"] for e in document["models"]} == {None}
    assert document["summary"]["folded"] == 3 and files_below(tree) == before
    assert main(["fold", str(tree), "--in-place"]) == 0
    after = files_below(tree)
    assert after.keys() == before.keys()
    changed = {place for place in after if after[place] != before[place]}
    assert changed == {"a.onnx", "sub/b.onnx", "sub/deeper/c.onnx"}
    for place in changed:
        assert [n.op_type for n in onnx.load(tree / place).graph.node] == ["Conv"]


def test_exclude_node_needs_one_input_that_has_it(tmp_path, rng, capsys):
    """A name is an error only when no input has it, and then nothing is written."""
    renamed = conv_bn(rng)
    renamed.graph.node[1].name = "other_bn"
    onnx.save(conv_bn(rng), tmp_path / "a.onnx")
    onnx.save(renamed, tmp_path / "b.onnx")
    out = _out(tmp_path)
    inputs = [str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--out-dir", str(out), "--json"]
    assert main(["fold", *inputs, "--exclude-node", "bn"]) == 0
    a, b = json.loads(capsys.readouterr().out)["models"]
    assert (a["left_by_reason"], b["folded"]) == ({"excluded-by-user": 1}, 1)
    shutil.rmtree(out)
    out.mkdir()
    assert main(["fold", *inputs, "--exclude-node", "bn", "--exclude-node", "typo"]) == 2
    assert capsys.readouterr().err.startswith(
        "bnfold: error: --exclude-node: typo: no BatchNormalization node has that name in any INPUT")
    assert list(out.iterdir()) == []


def _fold_flag_groups():
    namespace = build_parser().parse_args(["fold", "m.onnx"])
    return [(parent, action.option_strings[0], action.nargs != 0) for parent, actions in
            (("--verify", namespace.verify_flags), ("--bench", namespace.bench_flags)) for action in actions]


@pytest.mark.parametrize("parent, flag, takes_value", _fold_flag_groups())
def test_a_flag_without_the_flag_it_needs_is_an_error(model_file, tmp_path, capsys, parent, flag, takes_value):
    """Every verify flag needs --verify and every bench flag --bench (the lists come from the parser,
    so a new flag is covered); nothing is read or written."""
    value = ["1"] if takes_value else []
    assert main(["fold", str(model_file), "-o", str(tmp_path / "o.onnx"), flag, *value]) == 2
    assert capsys.readouterr().err == (f"bnfold: error: {flag} applies only with {parent} Note: add {parent}, "
                                       f"or drop {flag}\n")
    assert not (tmp_path / "o.onnx").exists()


def test_bench_defaults_are_bench_options_defaults():
    """The fold parser's bench flags default to None (to tell given flags apart); the options built
    from them are BenchOptions' own defaults."""
    from bnfold.bench import BenchOptions
    from bnfold.cli_options import bench_options_from_args
    namespace = build_parser().parse_args(["fold", "m.onnx", "--bench"])
    assert bench_options_from_args(namespace, prefix="bench-") == BenchOptions()
    namespace = build_parser().parse_args(["bench", "a.onnx", "b.onnx"])
    assert bench_options_from_args(namespace) == BenchOptions()


def test_bench_plot_takes_one_model(tree, tmp_path, capsys):
    assert main(["fold", str(tree), "--out-dir", str(_out(tmp_path)), "--bench",
                 "--bench-plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.startswith("bnfold: error: --bench-plot: draws the latencies of one model")


def test_a_bug_on_one_model_is_its_outcome(tree, tmp_path, capsys, monkeypatch):
    """An internal error (exit 3) on one model is reported as that model's; the others are folded."""
    import bnfold.foldcmd
    real = bnfold.foldcmd.fold_file

    def buggy(source, *args, **kwargs):
        if source.endswith("b.onnx"):
            raise RuntimeError("a bug")
        return real(source, *args, **kwargs)
    monkeypatch.setattr(bnfold.foldcmd, "fold_file", buggy)
    out = _out(tmp_path)
    assert main(["fold", str(tree), "--out-dir", str(out)]) == 3
    err = capsys.readouterr().err
    assert f"bnfold: error: {tree}/sub/b.onnx: internal error: RuntimeError: a bug" in err
    assert everything_below(out) == ["a.onnx", "sub", "sub/deeper", "sub/deeper/c.onnx"]


def test_a_worker_that_dies_is_reported_and_does_not_hang(tree, tmp_path, capsys, monkeypatch):
    """A worker killed mid-fold (e.g. for lack of memory) breaks the process pool: its model, and any
    not yet folded, are reported as errors (exit 3) instead of a hang or a traceback."""
    import bnfold.foldcmd
    real = bnfold.foldcmd.fold_file

    def dies(source, *args, **kwargs):
        if source.endswith("b.onnx"):
            os._exit(9)
        return real(source, *args, **kwargs)
    monkeypatch.setattr(bnfold.foldcmd, "fold_file", dies)  # forked workers inherit it
    assert main(["fold", str(tree), "--out-dir", str(_out(tmp_path)), "--jobs", "2", "--json"]) == 3
    entries = {Path(e["model"]).name: e for e in json.loads(capsys.readouterr().out)["models"]}
    assert entries["b.onnx"]["exit_code"] == 3 and "ended abruptly" in entries["b.onnx"]["error"]


def test_progress_bar_only_on_a_terminal(tree, tmp_path, capsys, monkeypatch):
    assert main(["fold", str(tree), "--dry-run", "--json"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["fold", str(tree), "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    assert "folding" in captured.err and "3/3" in captured.err
    assert json.loads(captured.out)["summary"]["models"] == 3  # stdout holds the document alone
    assert main(["fold", str(tree / "a.onnx"), "--dry-run"]) == 0
    assert "folding" not in capsys.readouterr().err  # one model: no bar


def test_verify_failure_in_a_folder_writes_nothing_for_that_model(tree, tmp_path, capsys):
    """--verify over a folder, in worker processes: a model whose fold fails verification (NaN inputs
    fail any model) is written nowhere, its verify report is shown, exit 1."""
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((2, 4, 7, 7), np.nan, np.float32))
    out = _out(tmp_path)
    assert main(["fold", str(tree / "a.onnx"), str(tree / "sub" / "b.onnx"), "--out-dir", str(out),
                 "--verify", "--inputs", str(nan), "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and captured.err.count("nothing was written") == 2
    assert list(out.iterdir()) == []
