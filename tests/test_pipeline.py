"""The pass pipeline (docs/design.md, "Passes"): every pass runs, in order, and reports its decisions;
every reason code is registered once and documented."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import onnx
from onnx import helper, numpy_helper

import bnfold.passes as passes
from bnfold import reasons
from bnfold.fold import fold_model
from bnfold.passes import PIPELINE, Decision, Pass, PassResult
from bnfold.report import passes_table

from .builders import assert_same_function, bn_initializers, bn_node, bn_stats, conv_bn, make_model, tensor

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_order():
    names = [p.name for p in PIPELINE]
    assert names == ["assume-inference", "reparameterize", "fold-batchnorm", "lower-standalone", "remove-dead-code"]
    assert len(set(names)) == len(names)


def test_report_has_one_result_per_pass_in_pipeline_order(rng):
    _, report = fold_model(conv_bn(rng))
    assert [r.name for r in report.passes] == [p.name for p in PIPELINE]
    assert [p["name"] for p in report.to_dict()["passes"]] == [p.name for p in PIPELINE]


class _Recorder(Pass):
    """A pass that only records that it ran and what the model held at that moment."""
    name = "recorder"

    def __init__(self):
        self.seen: list[list[str]] = []

    def run(self, state) -> PassResult:
        ops = [n.op_type for n in state.model.graph.node]
        self.seen.append(ops)
        return PassResult(self.name, [Decision(node="x", reason="recorded", op_type="Conv")], modified=False)


def test_a_pass_added_to_the_pipeline_runs_between_its_neighbours(rng, monkeypatch):
    recorder = _Recorder()
    i = [p.name for p in PIPELINE].index("fold-batchnorm") + 1
    monkeypatch.setattr(passes, "PIPELINE", (*PIPELINE[:i], recorder, *PIPELINE[i:]))
    _, report = fold_model(conv_bn(rng))
    assert recorder.seen == [["Conv"]]  # after the BN fold, before anything else
    assert [r.name for r in report.passes] == ["assume-inference", "reparameterize", "fold-batchnorm", "recorder",
                                               "lower-standalone", "remove-dead-code"]
    rows = _table_rows(passes_table(report))
    assert ["recorder", "recorded", "1", "Conv x1"] in rows


def test_dead_code_pass_reports_each_node_it_removes(rng):
    """A BN whose weight is a Constant node: folding replaces it, and the dead-code pass removes the
    Constant and says so; the BN fold pass reports the BN."""
    w = rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], name="weight", value=numpy_helper.from_array(w)),
             helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, [tensor("x", np.float32, [1, 4, 7, 7])], [tensor("y", np.float32, None)],
                       bn_initializers(bn_stats(rng, 6), np.float32))
    folded, report = fold_model(model)
    _, _, fold_result, _, dead_result = report.passes
    assert [(d.node, d.reason) for d in fold_result.decisions] == [("bn", "folded")] and fold_result.modified
    assert [(d.node, d.op_type, d.reason) for d in dead_result.decisions] == [("weight", "Constant", "removed")]
    assert dead_result.modified
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert_same_function(model, folded)


def test_passes_report_unmodified_when_nothing_folds(rng):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y")]
    model = make_model(nodes, [tensor("x", np.float32, [1, 6, 5, 5])], [tensor("y", np.float32, None)],
                       bn_initializers(bn_stats(rng, 6), np.float32))
    folded, report = fold_model(model)
    assert [(r.name, r.modified, len(r.decisions)) for r in report.passes] == [
        ("assume-inference", False, 0), ("reparameterize", False, 0), ("fold-batchnorm", False, 1),
        ("lower-standalone", False, 0), ("remove-dead-code", False, 0)]
    assert folded.SerializeToString() == model.SerializeToString()


def test_rank_unsupported_is_a_known_rank_rank_unknown_an_unknown_one(rng):
    """MatMul -> BN with a rank-3 right operand: the rank is known, and not one the rule folds."""
    w = numpy_helper.from_array(rng.normal(0, 0.5, (3, 4, 2)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"), bn_node("m", "y")]
    model = make_model(nodes, [tensor("x", np.float32, [2, 4])], [tensor("y", np.float32, None)],
                       [w, *bn_initializers(bn_stats(rng, 2), np.float32)])
    folded, report = fold_model(model)
    assert report.decisions[0].reason == reasons.RANK_UNSUPPORTED
    assert_same_function(model, folded)


# ------------------------------------------------------------------------------------ reason codes
def test_reason_codes_are_unique_and_each_has_one_meaning():
    codes = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}
    assert codes == set(reasons.MEANINGS)
    assert len(set(reasons.MEANINGS.values())) == len(reasons.MEANINGS)


def test_readme_lists_every_reason_a_bn_can_be_left_with():
    """README's "What it leaves" table documents exactly the registry's codes for a BN left in place."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## What it leaves", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M))
    assert documented == set(reasons.MEANINGS) - {reasons.FOLDED, reasons.REMOVED}


def test_rules_and_passes_use_only_registered_codes():
    """No reason code is spelled as a string literal outside the registry."""
    pattern = re.compile(r"[\"']([a-z]+(?:-[a-z0-9]+)+)[\"']")
    codes = set(reasons.MEANINGS)
    for path in [*(ROOT / "bnfold" / "rules").glob("*.py"), *(ROOT / "bnfold" / "passes").glob("*.py"),
                 ROOT / "bnfold" / "constants.py", ROOT / "bnfold" / "batchnorm.py"]:
        literals = set(pattern.findall(path.read_text())) & codes
        assert not literals, f"{path.name} spells reason codes {sorted(literals)}: use bnfold.reasons"


def _table_rows(table) -> list[list[str]]:
    return [list(row) for row in zip(*(column._cells for column in table.columns))]


@pytest.mark.parametrize("fold", ["model", "file"])
def test_exclude_nodes_as_one_string_is_refused(rng, tmp_path, fold):
    """A bare string would be iterated as characters and exclude nothing the caller meant."""
    from bnfold import BnfoldError, fold_file
    model = conv_bn(rng)
    with pytest.raises(BnfoldError, match=r"takes a list of node names, not the string 'bn'") as caught:
        if fold == "model":
            fold_model(model, exclude_nodes="bn")
        else:
            onnx.save(model, tmp_path / "m.onnx")
            fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx", exclude_nodes="bn")
    assert caught.value.option == "exclude_nodes" and not (tmp_path / "out.onnx").exists()
