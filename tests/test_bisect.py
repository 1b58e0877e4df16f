"""bnfold.bisect on tiny graphs: which tensor it names, what it counts, its report, its chunking, and
its error messages. Written against mutation testing (docs/mutation.md)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.bisect as bisect
from bnfold.bisect import BisectResult, NodeRef, bisect_models, node_dict
from bnfold.compare import Tolerance, tolerance_for
from bnfold.errors import BnfoldError
from bnfold.inputs import Sample

F32 = TensorProto.FLOAT
CPU = "CPUExecutionProvider"
SAMPLE = Sample("seed 0 sample 0 batch 1", {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)})


def _model(nodes, outputs=(("y", [2, 3]),), value_info=(), initializers=(), inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", F32, [2, 3])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(n, F32, s) for n, s in outputs],
                              list(initializers),
                              value_info=[helper.make_tensor_value_info(n, F32, s) for n, s in value_info])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _chain(add_a=0.0, add_b=0.0, add_c=0.0):
    """x -> Add(ca) -> a -> Add(cb) -> b -> Add(cc) -> y: three named nodes, three shared tensors."""
    nodes, inits = [], []
    for name, src, out, value in (("na", "x", "a", add_a), ("nb", "a", "b", add_b), ("nc", "b", "y", add_c)):
        nodes.append(helper.make_node("Add", [src, f"c{name}"], [out], name=name))
        inits.append(numpy_helper.from_array(np.full(3, value, np.float32), f"c{name}"))
    return _model(nodes, initializers=inits)


def _bisect(reference, candidate, sample=SAMPLE, labels=("reference", "candidate")):
    return bisect_models(reference, candidate, sample, CPU, tolerance_for, labels=labels)


# ------------------------------------------------------------------------------ which tensor
def test_the_first_diverging_tensor_in_node_order_is_named_with_both_producers():
    result = _bisect(_chain(), _chain(add_b=1.0, add_c=5.0))
    assert result.tensor == "b" and result.compared == 2 and result.not_comparable == 0
    assert result.reference_node == NodeRef("nb", "Add") and result.candidate_node == NodeRef("nb", "Add")
    assert result.sample == SAMPLE.label
    assert result.comparison.name == "b" and not result.comparison and result.comparison.mismatched == 6
    assert result.comparison.max_abs == pytest.approx(1.0)


def test_nothing_diverges_in_shared_tensors():
    result = _bisect(_chain(), _chain())
    assert result == BisectResult(SAMPLE.label, 3, 0)
    assert result.tensor is None and result.comparison is None
    assert result.summary() == ("none of the 3 tensors both models compute under the same name diverges on "
                                f"{SAMPLE.label}; the difference arises in tensors only one model has")


def test_a_declared_but_wrong_output_shape_does_not_hide_intermediate_tensors():
    """Shape inference is lenient: the reference declares y as 2x5 (onnxruntime runs it anyway), and
    the intermediate tensors keep their inferred types, so 'a' is still found first."""
    wrong_y = _model([helper.make_node("Neg", ["x"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["y"], name="n2")],
                     outputs=(("y", [2, 5]),))
    candidate = _model([helper.make_node("Relu", ["x"], ["a"], name="m1"), helper.make_node("Relu", ["a"], ["y"], name="m2")])
    result = _bisect(wrong_y, candidate)
    assert (result.tensor, result.compared) == ("a", 1)
    assert result.candidate_node == NodeRef("m1", "Relu") and result.reference_node == NodeRef("n1", "Neg")


def test_without_shape_inference_declared_value_info_is_used(monkeypatch):
    """Shape inference fails on some models (custom domains, over 2 GB): bisect then compares the
    tensors whose type the model declares."""
    def fails(*args, **kwargs):
        raise RuntimeError("no inference")
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fails)
    reference = _chain()
    candidate = _chain(add_a=1.0)
    assert _bisect(reference, candidate).tensor == "y"  # only the graph output is typed
    def typed(model):
        return _model(list(model.graph.node), value_info=(("a", [2, 3]),), initializers=model.graph.initializer)
    result = _bisect(typed(reference), typed(candidate))
    assert (result.tensor, result.compared, result.not_comparable) == ("a", 1, 1)


def test_an_initializer_listed_as_an_input_is_not_fed():
    """Graph inputs with a default value (an initializer of the same name) are not in the sample."""
    c = numpy_helper.from_array(np.ones(3, np.float32), "c")
    inputs = [helper.make_tensor_value_info("x", F32, ["N", 3]), helper.make_tensor_value_info("c", F32, [3])]
    reference = _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")], initializers=[c], inputs=inputs)
    candidate = _model([helper.make_node("Sub", ["x", "c"], ["y"], name="sub")], initializers=[c], inputs=inputs)
    result = _bisect(reference, candidate)
    assert (result.tensor, result.candidate_node) == ("y", NodeRef("sub", "Sub"))


# ------------------------------------------------------------------------------- error messages
def test_a_model_onnxruntime_refuses_is_named_by_its_label():
    unrunnable = _model([helper.make_node("Add", ["x", "c"], ["a"], name="na"),
                         helper.make_node("Foo", ["a"], ["y"], name="foo", domain="custom")],
                        value_info=(("a", [2, 3]),),
                        initializers=[numpy_helper.from_array(np.zeros(3, np.float32), "c")])
    unrunnable.opset_import.append(helper.make_opsetid("custom", 1))
    with pytest.raises(BnfoldError, match=r"^cand\.onnx: onnxruntime cannot create a session"):
        _bisect(_chain(), unrunnable, labels=("ref.onnx", "cand.onnx"))
    with pytest.raises(BnfoldError, match=r"^ref\.onnx: onnxruntime cannot create a session"):
        _bisect(unrunnable, _chain(), labels=("ref.onnx", "cand.onnx"))


def test_a_run_failure_names_the_model_and_the_sample():
    """A Reshape that does not fit the sample's shape fails when run, not when the session is made."""
    shape = numpy_helper.from_array(np.array([7], np.int64), "shape")
    failing = _model([helper.make_node("Reshape", ["x", "shape"], ["a"], name="r"),
                      helper.make_node("Relu", ["a"], ["y"], name="relu")],
                     outputs=(("y", None),), initializers=[shape])
    with pytest.raises(BnfoldError, match=rf"^cand\.onnx: onnxruntime failed on {SAMPLE.label} \("):
        _bisect(_chain(), failing, labels=("ref.onnx", "cand.onnx"))


# ------------------------------------------------------------------------------------- report
def test_summary_counts_the_matching_tensors_before_the_diverging_one():
    result = _bisect(_chain(), _chain(add_c=1.0))
    assert result.summary().startswith("'y' is the first tensor that diverges (2 shared tensor(s) before it "
                                       "match), produced by nc (Add) in the reference and nc (Add) in the "
                                       f"candidate; on {SAMPLE.label}: 6/6 element(s) outside tolerance")


def test_node_ref_of_an_unnamed_node():
    assert str(NodeRef("", "Relu")) == "(unnamed) (Relu)"
    assert str(NodeRef("r", "Relu")) == "r (Relu)"


def test_to_dict_of_a_divergence_has_the_nodes_and_the_failing_comparison():
    result = _bisect(_chain(), _chain(add_b=1.0))
    document = result.to_dict()
    json.dumps(document, allow_nan=False)
    assert {k: v for k, v in document.items() if k != "comparison"} == {
        "sample": SAMPLE.label, "tensor": "b", "compared": 2, "not_comparable": 0,
        "reference_node": {"name": "nb", "op_type": "Add"}, "candidate_node": {"name": "nb", "op_type": "Add"}}
    assert document["comparison"] == result.comparison.to_dict()
    assert document["comparison"]["passed"] is False and document["comparison"]["name"] == "b"


def test_to_dict_without_a_divergence():
    assert BisectResult("s", 4, 1).to_dict() == {"sample": "s", "tensor": None, "compared": 4, "not_comparable": 1,
                                                 "reference_node": None, "candidate_node": None, "comparison": None}
    assert node_dict(None) is None and node_dict(NodeRef("n", "Add")) == {"name": "n", "op_type": "Add"}


# ----------------------------------------------------------------------------------- chunking
def _tensor_type(elem, dims):
    return helper.make_tensor_type_proto(elem, dims).tensor_type


def test_estimated_bytes_uses_the_element_size_and_the_largest_input_dim_for_unknown_dims():
    sample = Sample("s", {"x": np.zeros((2, 7), np.float32), "m": np.zeros((3,), np.int64)})
    assert bisect._estimated_bytes(_tensor_type(F32, [2, 3]), sample) == 24
    assert bisect._estimated_bytes(_tensor_type(TensorProto.FLOAT16, [2, 3]), sample) == 12
    assert bisect._estimated_bytes(_tensor_type(TensorProto.DOUBLE, ["N", 5]), sample) == 8 * 7 * 5
    assert bisect._estimated_bytes(_tensor_type(F32, [None, None]), sample) == 4 * 49
    assert bisect._estimated_bytes(_tensor_type(F32, []), sample) == 4  # a scalar


def test_estimated_bytes_without_input_dims_counts_unknown_dims_as_one():
    scalars = Sample("s", {"x": np.zeros((), np.float32)})
    assert bisect._estimated_bytes(_tensor_type(F32, ["N", 3]), scalars) == 12
    assert bisect._estimated_bytes(_tensor_type(F32, ["N", 3]), Sample("s", {})) == 12


def test_chunks_are_the_longest_consecutive_runs_within_the_budget(monkeypatch):
    monkeypatch.setattr(bisect, "_BISECT_CHUNK_BYTES", 400)
    sizes = {"a": 10, "b": 90, "c": 1, "d": 99, "e": 60, "f": 10, "g": 500, "h": 1}  # float32: 4 bytes each
    types = {name: _tensor_type(F32, [n]) for name, n in sizes.items()}
    chunks = list(bisect._chunks(list(sizes), types, SAMPLE))
    assert chunks == [["a", "b"], ["c", "d"], ["e", "f"], ["g"], ["h"]]
    assert list(bisect._chunks([], types, SAMPLE)) == []


def test_bisect_in_chunks_of_one_tensor_finds_the_same_tensor(monkeypatch):
    monkeypatch.setattr(bisect, "_BISECT_CHUNK_BYTES", 1)
    result = _bisect(_chain(), _chain(add_c=1.0))
    assert (result.tensor, result.compared) == ("y", 3)


def test_tolerance_is_asked_for_the_candidate_dtype():
    asked = []

    def tolerance(dtype):
        asked.append(dtype)
        return Tolerance(2.0, 0.0)
    result = bisect_models(_chain(), _chain(add_b=1.0), SAMPLE, CPU, tolerance)
    assert result.tensor is None and result.compared == 3 and set(asked) == {"float32"}
