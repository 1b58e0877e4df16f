"""benchmarks/patterns.py: its pattern models are valid and hold what their rows say, and its cells
call a result what it is. No tool runs here (the benchmark itself runs them)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tests.builders import load_benchmark



patterns = load_benchmark("patterns")
BY_KEY = {p.key: p for p in patterns.PATTERNS}


def test_rows_have_unique_keys():
    assert len(BY_KEY) == len(patterns.PATTERNS)


@pytest.mark.parametrize("pattern", patterns.PATTERNS, ids=lambda p: p.key)
def test_pattern_model_is_valid_and_holds_its_row(pattern):
    model = patterns.build(pattern)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == patterns.OPSET
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["BatchNormalization"] == pattern.bn
    assert all(ops[op] == 1 for op in pattern.chain)
    assert sum(ops[op] for op in patterns.ARITHMETIC) == pattern.bn + len(pattern.chain)
    assert pattern.expected in ("folds", "stays")
    assert model.SerializeToString() == patterns.build(pattern).SerializeToString()  # seeded


def test_bn_statistics_are_not_the_identity():
    """A BN that computes (almost) nothing would let a wrong fold pass the comparison."""
    model = patterns.build(BY_KEY["conv-identity-bn"])
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    scale, shift, mean, var = (values[name] for name in bn.input[1:])
    assert np.ptp(scale) > 0.5 and np.abs(shift).max() > 0.5 and np.abs(mean).max() > 0.2
    assert (var > 0).all()


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_a_result_whose_outputs_moved_is_wrong(tmp_path):
    pattern = BY_KEY["conv-identity-bn"]
    original = patterns.build(pattern)
    feeds = patterns.seeded_feeds(original)
    want = patterns.outputs(_saved(original, tmp_path / "a.onnx"), feeds)
    assert patterns.verdict(pattern, {"note": ""}, tmp_path / "a.onnx", feeds, want) == "leaves BN"
    bn = next(n for n in original.graph.node if n.op_type == "BatchNormalization")
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    shift = next(t for t in broken.graph.initializer if t.name == bn.input[2])
    shift.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(shift) + 0.01, shift.name))
    cell = patterns.verdict(pattern, {"note": ""}, _saved(broken, tmp_path / "b.onnx"), feeds, want)
    assert cell.startswith("wrong (outputs moved")


def test_a_tool_error_and_an_unrunnable_output_are_errors(tmp_path):
    pattern = BY_KEY["conv-identity-bn"]
    assert patterns.verdict(pattern, {"error": "ValueError: x"}, tmp_path / "none", [], []) == "error: ValueError: x"
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert patterns.verdict(pattern, {"note": ""}, tmp_path / "bad.onnx", [], []).startswith(
        "error: output does not run")


def _without_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its BN bypassed: what a fold leaves, as far as the counting goes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    bn = next(n for n in result.graph.node if n.op_type == "BatchNormalization")
    for node in result.graph.node:
        node.input[:] = [bn.input[0] if name == bn.output[0] else name for name in node.input]
    result.graph.node.remove(bn)
    return result


def test_cells_name_what_stayed_on_the_data_path():
    pattern = BY_KEY["conv-bn-mul"]
    model = patterns.build(pattern)
    assert patterns.removed(pattern, model) == "leaves BN"
    folded = _without_bn(model)
    assert patterns.removed(pattern, folded) == "folds BN, keeps Mul"
    mul = next(n for n in folded.graph.node if n.op_type == "Mul")
    folded.graph.node.remove(mul)
    folded.graph.output[0].name = mul.input[0]
    assert patterns.removed(pattern, folded) == "folds"
    weight_math = onnx.helper.make_node("Mul", [mul.input[1], mul.input[1]], ["squared"])
    folded.graph.node.insert(0, weight_math)
    assert patterns.removed(pattern, folded) == "folds (+1 nodes computing constants)"


def test_bn_turned_into_other_arithmetic_is_not_a_fold():
    pattern = BY_KEY["conv-identity-bn"]
    model = _without_bn(patterns.build(pattern))
    last = model.graph.node[-1]
    model.graph.node.append(onnx.helper.make_node("Add", [last.output[0], last.output[0]], ["sum"]))
    assert patterns.removed(pattern, model) == "BN → Add"


def _add_constant_after(model: onnx.ModelProto, index: int) -> onnx.ModelProto:
    """A copy of `model` with an Add of a constant vector on the output of its node `index`."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = list(result.graph.node)
    source = nodes[index].output[0]
    for node in nodes[index + 1:]:
        node.input[:] = ["shifted" if name == source else name for name in node.input]
    add = onnx.helper.make_node("Add", [source, "shift"], ["shifted"])
    result.graph.initializer.append(numpy_helper.from_array(np.ones(128, np.float32), "shift"))
    del result.graph.node[:]
    result.graph.node.extend([*nodes[:index + 1], add, *nodes[index + 1:]])
    return result


def test_an_add_of_a_constant_right_after_a_matmul_is_its_bias():
    """Folding a BN into a MatMul (no bias input) leaves MatMul -> Add: a fold, not a lowered BN."""
    pattern = BY_KEY["levit-token-mlp"]
    model = _without_bn(patterns.build(pattern))
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Reshape", "Reshape"]
    assert patterns.removed(pattern, _add_constant_after(model, 0)) == "folds"
    assert patterns.removed(pattern, _add_constant_after(model, 1)) == "BN → Add"
