"""The JSON reports' schema (bnfold/report.schema.json): valid, versioned, as strict as the code's
closed sets, met by every kind of document bnfold writes, documented field by field in
docs/report.md, and enforced on every document the test suite builds (tests/conftest.py)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold import schema
from bnfold.bench import BenchOptions, BenchReport, LevelResult, ModelTiming
from bnfold.checkcmd import CheckOptions, CheckRun, check_models
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.passes import PIPELINE
from bnfold.reasons import MEANINGS
from bnfold.report import FoldReport
from bnfold.rules import RULES
from bnfold.runtime import LEVELS
from bnfold.schema import SCHEMA_VERSION, load_schema, validate
from bnfold.verify import VerifyReport
from tests.builders import conv_bn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DOCS = ROOT / "docs" / "report.md"
TINY_BENCH = ["--runs", "3", "--warmup", "0", "--creations", "1"]
REASONS = f"one of the {len(MEANINGS)} values"


def _json(capsys, *argv, code=0) -> dict:
    assert main([str(a) for a in argv]) == code
    return json.loads(capsys.readouterr().out)


def _valid(document: dict, kind: str) -> dict:
    """`document` passes as `kind`, and as what it is when no kind is given."""
    validate(document, kind)
    validate(document)
    assert document["schema_version"] == SCHEMA_VERSION
    return document


def _defs() -> dict:
    return load_schema()["$defs"]


# --------------------------------------------------------------------------------- the schema itself
def test_schema_is_a_valid_2020_12_schema_over_the_four_documents():
    loaded = load_schema()
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(loaded)
    assert [branch["$ref"] for branch in loaded["oneOf"]] == [f"#/$defs/{kind}" for kind in schema.DOCUMENTS]


def test_every_top_level_document_requires_this_schema_version():
    defs = _defs()
    assert defs["schema_version"]["const"] == SCHEMA_VERSION
    for kind in schema.DOCUMENTS:
        assert defs[kind]["properties"]["schema_version"] == {"$ref": "#/$defs/schema_version"}
        assert "schema_version" in defs[kind]["required"]
    assert "schema_version" not in defs["model_entry"]["properties"]


def test_the_closed_sets_are_the_codes_own():
    """Reason codes, pass names, rule names and optimization levels: exactly the code's, so the schema
    cannot miss a new one nor keep one the code dropped."""
    defs = _defs()
    reasons = defs["reason"]["enum"]
    assert len(reasons) == len(set(reasons)) and set(reasons) == set(MEANINGS)
    assert defs["pass_result"]["properties"]["name"]["enum"] == [p.name for p in PIPELINE]
    rules = defs["decision"]["properties"]["rule"]["enum"]
    assert set(rules) == {rule.name for rule in RULES} | {"reparameterize", None}
    assert tuple(defs["level_name"]["enum"]) == LEVELS


# ------------------------------------------------------------------------------ real documents pass
@pytest.fixture
def model_file(tmp_path, rng) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(rng), path)
    return path


def test_fold_report_with_verification_and_bench_and_its_report_file(model_file, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    document = _valid(_json(capsys, "fold", model_file, "-o", out, "--report", report, "--json", "--verify",
                            "--bench", "--bench-runs", "3", "--bench-warmup", "0", "--bench-creations", "1"),
                      "fold_report")
    assert json.loads(report.read_text()) == document
    _valid(document["verification"], "verify_report")
    _valid(document["bench"], "bench_report")
    changes = document["decisions"][0]["changes"]
    assert changes["nodes_removed"] == [{"name": "bn", "op_type": "BatchNormalization"}]


def test_inspect_of_samples_with_every_pass(capsys):
    document = _valid(_json(capsys, "inspect", SAMPLES / "repvgg_small.onnx", "--json", "--assume-inference",
                            "--lower-standalone", "mul-add"), "fold_report")
    assert [p["name"] for p in document["passes"]] == [p.name for p in PIPELINE]
    left = _valid(_json(capsys, "inspect", SAMPLES / "densenet_small.onnx", "--json"), "fold_report")
    assert left["left_by_reason"] == {"no-foldable-neighbour": 8}


def test_several_models_with_a_failure(model_file, tmp_path, capsys):
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    out = tmp_path / "out"
    out.mkdir()
    document = _valid(_json(capsys, "fold", model_file, tmp_path / "broken.onnx", "--out-dir", out, "--json",
                            "--verify", code=2), "models_document")
    ok, failed = document["models"]
    assert ok["status"] == "ok" and ok["verification"]["passed"] and "schema_version" not in ok
    assert failed["status"] == "error" and failed["exit_code"] == 2 and "batchnorm_total" not in failed
    assert document["summary"]["exit_code"] == 2


def _perturbed(model: onnx.ModelProto, weight: str, change) -> onnx.ModelProto:
    """`model` with initializer `weight` changed by `change(array)`."""
    model = copy.deepcopy(model)
    for init in model.graph.initializer:
        if init.name == weight:
            init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), weight))
    return model


def test_verify_with_bisect_and_with_nan_outputs(model_file, tmp_path, capsys):
    folded, _ = bnfold.fold_model(onnx.load(model_file))
    wrong, nan = tmp_path / "wrong.onnx", tmp_path / "nan.onnx"
    onnx.save(_perturbed(folded, "W", lambda w: w * 1.01), wrong)
    onnx.save(_perturbed(folded, "W", lambda w: np.full_like(w, np.nan)), nan)
    document = _valid(_json(capsys, "verify", model_file, wrong, "--bisect", "--json", code=1), "verify_report")
    assert document["bisect"]["tensor"] == "y" and document["bisect"]["candidate_node"]["op_type"] == "Conv"
    document = _valid(_json(capsys, "verify", model_file, nan, "--json", code=1), "verify_report")
    output = document["samples"][0]["outputs"][0]
    assert output["max_abs_error"] is None and output["nonfinite_positions"][0]["candidate"] == "nan"


def test_verify_quantized_and_against_saved_outputs(tmp_path, capsys):
    folded = tmp_path / "qat.onnx"
    assert main(["fold", str(SAMPLES / "resnet_qat.onnx"), "-o", str(folded)]) == 0
    capsys.readouterr()
    document = _valid(_json(capsys, "verify", SAMPLES / "resnet_qat.onnx", folded, "--quantized", "--json"),
                      "verify_report")
    assert document["quantized"]["samples"][0]["quantizers"]
    saved = _valid(_json(capsys, "verify", "--against-reference", SAMPLES / "resnet_small.npz",
                         SAMPLES / "resnet_small.onnx", "--json"), "verify_report")
    assert saved["against_saved_outputs"] is True


def test_bench(model_file, capsys):
    document = _valid(_json(capsys, "bench", model_file, model_file, "--json", *TINY_BENCH, "--level", "basic"),
                      "bench_report")
    assert document["settings"]["runs"] == 3 and document["settings"]["seconds"] is None


def test_check_of_one_model_failing_then_folded_and_passing(model_file, tmp_path, capsys):
    document = _valid(_json(capsys, "check", model_file, "--json", code=1), "fold_report")
    assert document["check"]["failing"] == 1 and document["check"]["exit_code"] == 1
    folded = tmp_path / "folded.onnx"
    assert main(["fold", str(model_file), "-o", str(folded)]) == 0
    capsys.readouterr()
    document = _valid(_json(capsys, "check", folded, "--json", "--strict"), "fold_report")
    assert document["check"]["passed"] and document["check"]["exit_code"] == 0


def test_check_of_a_folder_with_a_failing_a_passing_and_an_unreadable_model(model_file, tmp_path, capsys):
    assert main(["fold", str(model_file), "-o", str(tmp_path / "folded.onnx")]) == 0
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    capsys.readouterr()
    document = _valid(_json(capsys, "check", tmp_path, "--json", "--lower-standalone", "mul-add", code=2),
                      "models_document")
    assert [entry.get("check", {}).get("passed") for entry in document["models"]] == [None, True, False]
    assert document["check"]["models_unreadable"] == 1 and document["summary"]["exit_code"] == 2


# --------------------------------------------------------------------------- wrong documents fail
@pytest.fixture(scope="module")
def fold_document() -> dict:
    model = SAMPLES / "resnet_small.onnx"
    document = bnfold.fold_file(model, None, dry_run=True).to_dict()
    validate(document, "fold_report")
    return document


def _set(path: str, value):
    def edit(document):
        *parents, last = path.split(".")
        for key in parents:
            document = document[int(key) if key.isdigit() else key]
        document[int(last) if last.isdigit() else last] = value
    return edit


def _drop(path: str):
    def edit(document):
        *parents, last = path.split(".")
        for key in parents:
            document = document[int(key) if key.isdigit() else key]
        del document[last]
    return edit


@pytest.mark.parametrize("edit, where, message", [
    (_drop("lowered"), "$", "'lowered' is a required property"),
    (_drop("decisions.0.changes"), "$.decisions[0]", "'changes' is a required property"),
    (_drop("decisions.0.changes.nodes_added"), "$.decisions[0].changes", "'nodes_added' is a required"),
    (_set("folded", "20"), "$.folded", "'20' is not of type 'integer'"),
    (_set("model", 3), "$.model", "3 is not of type 'string', 'null'"),
    (_set("decisions.0.neighbour", 1), "$.decisions[0].neighbour", "is not of type"),
    (_set("decisions.0.changes.nodes_removed", ["bn"]), "$.decisions[0].changes.nodes_removed[0]",
     "is not of type 'object'"),
    (_set("extra", 1), "$", "('extra' was unexpected)"),
    (_set("decisions.0.extra", 1), "$.decisions[0]", "('extra' was unexpected)"),
    (_set("op_counts.during", {}), "$.op_counts", "('during' was unexpected)"),
    (_set("decisions.0.reason", "fused"), "$.decisions[0].reason", f"'fused' is not {REASONS}"),
    (_set("left_by_reason", {"folded": 1}), "$.left_by_reason", "'folded'"),
    (_set("passes.0.name", "fold"), "$.passes[0].name", f"'fold' is not one of the {len(PIPELINE)} values"),
    (_set("schema_version", 2), None, "the report has schema_version 2; this bnfold's schema is version 1"),
    (_drop("schema_version"), None, "the report has no schema_version"),
])
def test_a_wrong_fold_report_is_refused_naming_the_field(fold_document, edit, where, message):
    document = copy.deepcopy(fold_document)
    edit(document)
    with pytest.raises(BnfoldError) as refused:
        validate(document)
    text = str(refused.value)
    assert message in text and "\n" not in text
    if where is not None:
        assert f"not a valid bnfold fold_report (schema version 1): at {where}: " in text
        assert isinstance(refused.value.__cause__, jsonschema.ValidationError)


def test_a_models_entry_and_a_verification_are_checked_too(fold_document):
    entry = {key: value for key, value in fold_document.items() if key not in ("schema_version", "model")}
    entry.update(model="m.onnx", output=None, status="ok", exit_code=0, error=None, seconds=0.5)
    summary = {"models": 1, "ok": 1, "failed": 0, "batchnorm_total": 20, "folded": 20, "left_by_reason": {},
               "seconds": 0.5, "jobs": 1, "exit_code": 0}
    document = {"schema_version": 1, "models": [entry], "summary": summary}
    validate(document, "models_document")
    for key, value, message in (("schema_version", 1, "('schema_version' was unexpected)"),
                                ("error", "boom", "'boom' is not of type 'null'"),
                                ("exit_code", 2, "0 was expected")):
        wrong = copy.deepcopy(document)
        wrong["models"][0][key] = value
        with pytest.raises(BnfoldError, match=re.escape(message)):
            validate(wrong)
    wrong = copy.deepcopy(document)
    del wrong["models"][0]["passes"]
    with pytest.raises(BnfoldError, match=r"at \$\.models\[0\]: 'passes' is a dependency of 'batchnorm_total'"):
        validate(wrong)


@pytest.fixture(scope="module")
def check_documents() -> dict[str, dict]:
    """bnfold check's documents, by the definition they are: one model that fails; it and a model that
    passes."""
    models = [str(SAMPLES / "resnet_small.onnx"), str(SAMPLES / "repvgg_small_deploy.onnx")]
    return {"fold_report": check_models(models[:1], CheckOptions()).document(several=False),
            "models_document": check_models(models, CheckOptions()).document(several=True)}


def _edits(*edits):
    def edit(document):
        for each in edits:
            each(document)
    return edit


@pytest.mark.parametrize("kind, edit, where, message", [
    ("fold_report", _drop("check.failing"), "$.check", "'failing' is a required property"),
    ("fold_report", _drop("check.exit_code"), "$.check", "'exit_code' is a required property"),
    ("fold_report", _set("check.extra", 0), "$.check", "('extra' was unexpected)"),
    ("fold_report", _set("check.models_failing", 1), "$.check", "('models_failing' was unexpected)"),
    ("fold_report", _set("check.foldable", -1), "$.check.foldable", "-1 is less than the minimum of 0"),
    ("fold_report", _set("check.strict", "no"), "$.check.strict", "'no' is not of type 'boolean'"),
    ("fold_report", _set("check.exit_code", 4), "$.check.exit_code", "4 is not one of the 6 values"),
    ("fold_report", _set("check.passed", True), "$.check.failing", "0 was expected"),
    ("fold_report", _set("check.exit_code", 0), "$.check.exit_code", "0 should not be valid"),
    ("models_document", _drop("check.models_unreadable"), "$.check", "'models_unreadable' is a required"),
    ("models_document", _set("check.extra", 0), "$.check", "('extra' was unexpected)"),
    ("models_document", _edits(_set("check.passed", True), _set("check.failing", 0), _set("check.exit_code", 0)),
     "$.check.models_failing", "0 was expected"),
    ("models_document", _edits(_set("check.passed", True), _set("check.failing", 0), _set("check.models_failing", 0),
                               _set("check.foldable", 0)), "$.check.exit_code", "0 was expected"),
    ("models_document", _drop("models.0.check.strict"), "$.models[0].check", "'strict' is a required property"),
    ("models_document", _set("models.0.check.exit_code", 1), "$.models[0].check", "('exit_code' was unexpected)"),
    ("models_document", _set("models.1.check.passed", False), "$.models[1].check.failing",
     "0 is less than the minimum of 1"),
    ("models_document", _drop("models.0.check"), "$.models[0]", "'check' is a required property"),
    ("models_document", _edits(_set("models.0.status", "error"), _set("models.0.exit_code", 2),
                               _set("models.0.error", "x")), "$.models[0].check", "should not be valid under {}"),
    ("models_document", _edits(_drop("check"), _drop("models.0.check")), "$.models[1].check",
     "should not be valid under {}"),
])
def test_a_wrong_check_verdict_is_refused_naming_the_field(check_documents, kind, edit, where, message):
    """The check object is as strict as the rest: every key, no other, and passed agreeing with the counts
    and the exit code; a model entry has one exactly when the document has one and the model was read."""
    document = copy.deepcopy(check_documents[kind])
    validate(document)
    edit(document)
    with pytest.raises(BnfoldError) as refused:
        validate(document)
    text = str(refused.value)
    assert f"not a valid bnfold {kind} (schema version 1): at {where}: " in text and message in text, text


def test_validate_refuses_what_is_not_a_report():
    with pytest.raises(BnfoldError, match="a bnfold report is a JSON object, not list"):
        validate([])
    with pytest.raises(BnfoldError, match="'check' is not a bnfold document; choose from fold_report, "):
        validate({"schema_version": 1}, "check")
    with pytest.raises(BnfoldError, match=r"not a valid bnfold bench_report .* at \$: 'baseline' is a required"):
        validate({"schema_version": 1}, "bench_report")


def test_validate_without_jsonschema_says_how_to_install_it(monkeypatch, fold_document):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` now fails
    schema._validator.cache_clear()
    try:
        with pytest.raises(BnfoldError) as refused:
            validate(fold_document)
    finally:
        schema._validator.cache_clear()
    assert refused.value.one_line() == ("validating a report needs the jsonschema package Note: pip install "
                                        "'jsonschema>=4.18'")


# ---------------------------------------------------------------------------------------- the docs
def _property_paths(node: dict, prefix: str = ""):
    """The names of an object definition's properties, dotted into inline objects."""
    for name, sub in node.get("properties", {}).items():
        yield prefix + name
        yield from _property_paths(sub, f"{prefix}{name}.")


def _doc_sections() -> dict[str, list[str]]:
    """docs/report.md's sections by the definition their heading names in backticks: the first cells
    of their table rows, unquoted."""
    sections, current = {}, None
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            named = re.search(r"`(\w+)`$", line)
            current = sections.setdefault(named.group(1), []) if named else None
        elif current is not None and (row := re.match(r"\| `([^`]+)` \|", line)):
            current.append(row.group(1))
    return sections


def test_docs_list_every_property_of_every_definition_and_no_other():
    sections = _doc_sections()
    for name, definition in _defs().items():
        paths = list(_property_paths(definition))
        if paths:
            assert name in sections, f"docs/report.md has no section on `{name}`"
            assert sections[name] == paths, f"docs/report.md's rows of `{name}` are not its properties, in order"


def test_docs_example_is_a_valid_document():
    text = DOCS.read_text()
    examples = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    assert examples
    for example in examples:
        validate(json.loads(example))
    assert f'"schema_version": {SCHEMA_VERSION}' in text


# ------------------------------------------------------------------ the check of the whole suite

def test_a_document_built_inside_another_is_checked_as_part_of_it(report_schema_check):
    before = Counter(report_schema_check.counts)
    broken = VerifyReport(reference="r", candidate="c", provider=None, samples=())  # provider: a string
    FoldReport(verification=broken).to_dict()
    failures = report_schema_check.take_failures()
    assert report_schema_check.counts - before == Counter(fold_report=1)
    assert len(failures) == 1 and "at $.verification.provider: None is not of type 'string'" in failures[0]


@pytest.mark.parametrize("several", [False, True])
def test_a_check_document_is_checked_whole_once_it_has_its_verdict(report_schema_check, monkeypatch, several):
    """CheckRun.document is checked as a document of its own, after it added its verdict: the report
    inside it is not checked alone (it has no verdict yet), a wrong verdict fails, and so does none."""
    run = check_models([str(SAMPLES / "resnet_small.onnx")], CheckOptions())
    before = Counter(report_schema_check.counts)
    run.document(several)
    assert report_schema_check.counts - before == Counter(check=1) and report_schema_check.take_failures() == []
    monkeypatch.setattr(CheckRun, "_verdict", lambda self: {"passed": True})
    run.document(several)
    (failure,) = report_schema_check.take_failures()
    assert "at $.check: 'strict' is a required property" in failure
    report_schema_check.check(run.outcomes[0].report.to_dict(), "check")
    assert report_schema_check.take_failures() == ['bnfold check\'s document has no "check" verdict']


def test_a_number_json_cannot_carry_fails(report_schema_check):
    """A float the schema would take as a number but json.dumps(allow_nan=False) refuses."""
    timing = ModelTiming([0.01], [0.001, 0.002])

    def bench(speedup: float) -> list[str]:
        level = LevelResult("all", timing, timing, speedup, (0.9, 1.1), 1.0, "no-significant-difference")
        BenchReport("a.onnx", "b.onnx", BenchOptions(runs=2), {}, [level]).to_dict()
        return report_schema_check.take_failures()
    assert bench(1.0) == []
    (failure,) = bench(float("inf"))
    assert failure.startswith("bench_report: cannot be written as JSON: Out of range float values")


def test_the_check_fails_the_test_that_built_a_wrong_document(tmp_path):
    """Run as pytest runs the suite: the plugin of tests/conftest.py on two tests, one of which builds
    a report with an unknown reason code. That one fails, the other passes."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.conftest import (pytest_configure, pytest_runtest_call, pytest_runtest_teardown,  # noqa\n"
        "                            pytest_terminal_summary, pytest_unconfigure)\n")
    (tmp_path / "test_reports.py").write_text(
        "from bnfold.passes.base import Decision, PassResult\n"
        "from bnfold.report import FoldReport\n\n\n"
        "def report(reason):\n"
        "    return FoldReport(passes=[PassResult('fold-batchnorm', [Decision(node='bn', reason=reason)])])\n\n\n"
        "def test_right():\n    report('folded').to_dict()\n\n\n"
        "def test_wrong():\n    report('fused').to_dict()\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout
    assert re.search(r"FAILED .*test_wrong", done.stdout)
    assert f"not a valid bnfold fold_report (schema version 1): at $.left_by_reason: 'fused' is not {REASONS}" \
        in done.stdout
    assert "report schema: 2 JSON documents validated (fold_report 2, " in done.stdout
