"""verify's options and report fields, in process: the bounds of samples and seed, which options do not
apply to loaded inputs, tolerances, bisect only when asked, and the JSON keys scripts read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.errors import BnfoldError
from bnfold.verify import VerifyOptions, verify_models

from .test_verify import _two_convs


def test_one_sample_is_enough_and_zero_is_refused():
    reference, folded = _two_convs()
    report = verify_models(reference, folded, VerifyOptions(samples=1))
    assert [s.label for s in report.samples] == ["seed 0 sample 0 batch 1", "seed 0 sample 0 batch 2"]
    with pytest.raises(BnfoldError) as info:
        verify_models(reference, folded, VerifyOptions(samples=0))
    assert (info.value.message, info.value.option) == ("must be at least 1, got 0", "samples")


def test_seed_zero_is_the_default_and_a_negative_seed_is_refused():
    reference, folded = _two_convs()
    assert verify_models(reference, folded, VerifyOptions(seed=0)).to_dict() == \
        verify_models(reference, folded).to_dict()
    with pytest.raises(BnfoldError) as info:
        verify_models(reference, folded, VerifyOptions(seed=-1))
    assert (info.value.message, info.value.option) == ("must be 0 or more, got -1", "seed")


@pytest.mark.parametrize("option", [{"shapes": {"x": (1, 3, 8, 8)}}, {"samples": 2}, {"seed": 3}])
def test_generation_options_do_not_apply_to_loaded_inputs(tmp_path, option):
    reference, folded = _two_convs()
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(BnfoldError) as info:
        verify_models(reference, folded, VerifyOptions(inputs=tmp_path / "x.npz", **option))
    assert info.value.option == next(iter(option))
    assert info.value.message == "does not apply when the input values are loaded from files"


def test_tolerance_overrides_reach_the_comparison():
    options = VerifyOptions(atol=0.25, rtol=0.5)
    assert (options.tolerance("float32").atol, options.tolerance("float32").rtol) == (0.25, 0.5)
    assert VerifyOptions(rtol=0.5).tolerance("float16").rtol == 0.5


def test_report_json_keys():
    reference, folded = _two_convs()
    document = verify_models(reference, folded, VerifyOptions(samples=1)).to_dict()
    sample = document["samples"][0]
    assert (sample["label"], sample["passed"], sample["inputs"]) == ("seed 0 sample 0 batch 1", True,
                                                                     {"x": [1, 3, 8, 8]})
    assert document["notes"] == ["symbolic dims set to defaults: N (batch) = 1 and 2"]


def test_a_mismatch_is_bisected_only_when_asked():
    reference, wrong = _two_convs(perturb=1e-2)
    assert verify_models(reference, wrong).bisect is None
    assert verify_models(reference, wrong, VerifyOptions(bisect=True)).bisect.tensor == "bn1_out"


def test_a_run_failure_names_the_sample_and_how_to_fix_it():
    """Reshape to a fixed size fails when the symbolic batch gets its default 2."""
    shape = onnx.numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BnfoldError) as info:
        verify_models(model, model)
    assert "onnxruntime failed on seed 0 sample 0 batch 2" in info.value.message
    assert info.value.note == "if a symbolic dim got a default that does not fit, give the input's shape"


def test_a_model_onnxruntime_cannot_load_is_named_by_its_role():
    reference, folded = _two_convs()
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BnfoldError) as info:
        verify_models(broken, folded)
    assert info.value.message.startswith("reference (in memory): onnxruntime cannot create a session")
    with pytest.raises(BnfoldError) as info:
        verify_models(reference, broken)
    assert info.value.message.startswith("candidate (in memory): onnxruntime cannot create a session")


def test_top1_agreement_is_in_the_json():
    from bnfold.compare import Tolerance, compare_arrays
    a = np.array([[0.0, 1.0], [2.0, 0.0]])
    document = compare_arrays("y", a, a[::-1].copy(), Tolerance(0.0, 0.0)).to_dict()
    assert document["top1_agreement"] == 0.0
