"""The assume-inference pass (bnfold/passes/assume_inference.py): a BatchNormalization exported in
training mode, per opset, becomes its inference form and folds, only when asked, and never when its
training outputs are read. Results are checked against the same model written in inference mode."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import reasons
from bnfold.cli import main
from bnfold.fold import fold_model

from .builders import (assert_close, bn_initializers, bn_node, bn_stats, make_model, op_types, oracles_for,
                       random_feeds, tensor)

EXTRA = {6: ["rm", "rv", "sm", "sv"], 7: ["rm", "rv", "sm", "sv"], 9: ["rm", "rv", "sm", "sv"],
         14: ["rm", "rv"], 15: ["rm", "rv"]}


def conv_bn(rng, opset: int, *, training: bool, extra=None, outputs=("y",), after=(), inputs=()) -> onnx.ModelProto:
    """x -> Conv -> BN -> y at `opset`; with `training`, the BN as that opset writes training mode
    (is_test=0 before 7, training outputs `extra` in 7-13, training_mode=1 from 14); `after` nodes
    may read the BN's outputs, `outputs` names the graph outputs, `inputs` adds graph inputs."""
    extra = EXTRA[opset] if extra is None else extra
    attrs = {}
    if opset < 7:
        attrs["is_test"] = 0 if training else 1
    if opset >= 14 and training:
        attrs["training_mode"] = 1
    bn = helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"],
                          ["y", *extra] if training else ["y"], name="bn", **attrs)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn, *after]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32), "W"),
             *bn_initializers(bn_stats(rng, 6), np.float32)]
    return make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5]), *inputs],
                      [tensor(name, np.float32, [2, 6, 5, 5] if name == "y" else [6]) for name in outputs], inits,
                      opset)


def models(opset: int, **kwargs) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(training-mode model, the same model in inference mode), with the same weights."""
    return (conv_bn(np.random.default_rng(7), opset, training=True, **kwargs),
            conv_bn(np.random.default_rng(7), opset, training=False))


def assert_computes(expected_model: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """`model` computes what `expected_model` does, each run by every oracle that can run it
    (onnxruntime with optimizations off, onnx's reference evaluator)."""
    feeds = random_feeds(expected_model)
    expected = [run(expected_model, feeds) for _, run in oracles_for(expected_model)]
    runs = oracles_for(model)
    assert expected and runs
    for values in expected:
        for name, run in runs:
            assert_close(values, run(model, feeds), 1e-5, 1e-4, f"{name}: ")


def decisions(report, name: str) -> list[tuple[str, str]]:
    return [(d.node, d.reason) for r in report.passes if r.name == name for d in r.decisions]


@pytest.mark.parametrize("opset", [6, 7, 9, 14, 15])
def test_training_bn_is_rewritten_then_folded(opset):
    training, inference = models(opset)
    folded, report = fold_model(training, assume_inference=True)
    assert decisions(report, "assume-inference") == [("bn", reasons.INFERENCE_ASSUMED)]
    assert decisions(report, "fold-batchnorm") == [("bn", reasons.FOLDED)]
    assert op_types(folded) == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    assert [name for name, _ in oracles_for(folded)] == ["onnxruntime", "reference"][opset < 7:]
    assert_computes(inference, folded)


@pytest.mark.parametrize("opset", [7, 14])
def test_rewritten_bn_that_stays_is_a_valid_inference_bn(opset):
    """A training BN after a Relu: rewritten, not folded; it must be the inference form (no training
    outputs, no training_mode) and the declared types of the dropped outputs go with them."""
    rng = np.random.default_rng(3)
    attrs = {"training_mode": 1} if opset >= 14 else {}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "bn_scale", "bn_B", "bn_mean", "bn_var"],
                              ["y", *EXTRA[opset]], name="bn", **attrs)]
    model = make_model(nodes, [tensor("x", np.float32, [2, 6, 4, 4])], [tensor("y", np.float32, None)],
                       bn_initializers(bn_stats(rng, 6), np.float32), opset)
    model.graph.value_info.extend([tensor("rm", np.float32, [6]), tensor("rv", np.float32, [6])])
    folded, report = fold_model(model, assume_inference=True)
    bn = folded.graph.node[1]
    assert list(bn.output) == ["y"] and not [a for a in bn.attribute if a.name == "training_mode"]
    assert not folded.graph.value_info
    assert decisions(report, "fold-batchnorm") == [("bn", reasons.NO_FOLDABLE_NEIGHBOUR)]
    onnx.checker.check_model(folded, full_check=True)
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    del expected.graph.value_info[:]
    del expected.graph.node[1].output[1:]
    del expected.graph.node[1].attribute[:]
    assert_computes(expected, folded)


@pytest.mark.parametrize("opset, reader", [(14, "graph output"), (9, "node"), (7, "subgraph")])
def test_bn_whose_training_outputs_are_read_stays(opset, reader):
    """Dropping a training output that something reads would break its reader: the BN stays in
    training mode, unchanged."""
    read = "rm" if opset >= 14 else "sm"
    after, outputs, inputs = [], ["y", read], []
    if reader == "node":
        after, outputs = [helper.make_node("Identity", [read], ["seen"], name="id")], ["y", "seen"]
    elif reader == "subgraph":
        branch = helper.make_graph([helper.make_node("Identity", [read], ["inner"], name="inner_id")], "branch", [],
                                   [tensor("inner", np.float32, None)])
        after = [helper.make_node("If", ["cond"], ["seen"], name="if", then_branch=branch, else_branch=branch)]
        outputs, inputs = ["y", "seen"], [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])]
    training, _ = models(opset, after=after, outputs=outputs, inputs=inputs)
    folded, report = fold_model(training, assume_inference=True)
    assert decisions(report, "assume-inference") == [("bn", reasons.BN_EXTRA_OUTPUTS_USED)]
    assert decisions(report, "fold-batchnorm")[0][1] in (reasons.TRAINING_MODE, reasons.BN_EXTRA_OUTPUTS_USED)
    assert folded.SerializeToString() == training.SerializeToString()


def test_training_bn_is_left_alone_without_the_option():
    training, _ = models(14)
    folded, report = fold_model(training)
    assert decisions(report, "assume-inference") == []
    assert decisions(report, "fold-batchnorm") == [("bn", reasons.TRAINING_MODE)]
    assert folded.SerializeToString() == training.SerializeToString()


def test_excluded_training_bn_is_left_in_training_mode():
    training, _ = models(6)
    folded, report = fold_model(training, assume_inference=True, exclude_nodes=["bn"])
    assert decisions(report, "assume-inference") == [("bn", reasons.EXCLUDED_BY_USER)]
    assert folded.SerializeToString() == training.SerializeToString()


def test_inference_bn_is_not_considered():
    _, inference = models(14)
    folded, report = fold_model(inference, assume_inference=True)
    assert decisions(report, "assume-inference") == []
    assert decisions(report, "fold-batchnorm") == [("bn", reasons.FOLDED)]


# ------------------------------------------------------------------------------------- command line
NOTE = ("bnfold: note: {model}: BatchNormalization 'bn' ran in training mode; rewritten to use its running "
        "statistics (--assume-inference)\n")


@pytest.fixture
def training_file(tmp_path):
    path = tmp_path / "train.onnx"
    onnx.save(models(14)[0], path)
    return path


def test_fold_rewrites_with_one_note_per_node(training_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["fold", str(training_file), "-o", str(out), "--assume-inference", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == NOTE.format(model=training_file)
    passes = {p["name"]: p["decisions"] for p in json.loads(captured.out)["passes"]}
    assert [(d["node"], d["reason"]) for d in passes["assume-inference"]] == [("bn", "inference-assumed")]
    assert op_types(onnx.load(out)) == ["Conv"]


def test_verify_checks_the_fold_not_the_assumption(training_file, tmp_path, capsys):
    """The input normalizes with batch statistics (onnxruntime runs it so): --verify compares the fold
    with the input whose training-mode BNs were rewritten, and passes."""
    out = tmp_path / "out.onnx"
    assert main(["fold", str(training_file), "-o", str(out), "--assume-inference", "--verify"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert op_types(onnx.load(out)) == ["Conv"]


def test_fold_without_the_flag_leaves_training_bn_and_says_nothing(training_file, tmp_path, capsys):
    assert main(["fold", str(training_file), "-o", str(tmp_path / "out.onnx"), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["left_by_reason"] == {"training-mode": 1}


def test_inspect_notes_and_reports_the_rewrite(training_file, capsys):
    assert main(["inspect", str(training_file), "--assume-inference"]) == 0
    captured = capsys.readouterr()
    assert captured.err == NOTE.format(model=training_file)
    assert any("assume-inference" in line and "inference-assumed" in line for line in captured.out.splitlines())
    assert main(["inspect", str(training_file), "--assume-inference", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folded"] == 1


def test_folder_with_jobs_passes_both_options_to_every_worker(tmp_path, capsys):
    """Each worker process folds with the options given: its output is what fold_model makes of it."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    relu_bn = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y")],
                         [tensor("x", np.float32, [1, 6, 3, 3])], [tensor("y", np.float32, [1, 6, 3, 3])],
                         bn_initializers(bn_stats(np.random.default_rng(0), 6), np.float32))
    inputs = {"a.onnx": models(14)[0], "b.onnx": models(9)[0], "c.onnx": relu_bn}
    for name, model in inputs.items():
        onnx.save(model, folder / name)
    assert main(["fold", str(folder), "--out-dir", str(out), "--jobs", "2", "--assume-inference",
                 "--lower-standalone", "mul-add"]) == 0
    assert capsys.readouterr().err.count("bnfold: note:") == 2
    ops = {}
    for name, model in inputs.items():
        expected, _ = fold_model(model, assume_inference=True, lower_standalone="mul-add")
        assert onnx.load(out / name).SerializeToString() == expected.SerializeToString()
        ops[name] = op_types(expected)
    assert ops == {"a.onnx": ["Conv"], "b.onnx": ["Conv"], "c.onnx": ["Relu", "Mul", "Add"]}
