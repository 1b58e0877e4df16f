"""bnfold.verify: what a report says about where its numbers come from (labels, provider, saved
outputs), which options apply, and that every session runs on the provider asked for. Written
against mutation testing (docs/mutation.md); tiny models only."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.verify import VerifyOptions, verify_against_reference, verify_models

F32 = TensorProto.FLOAT
W = np.array([[1.0, -2.0], [0.5, 1.5], [2.0, 0.0]], np.float32)


def _gemm(w=W) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                               helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", F32, ["N", 3])],
                              [helper.make_tensor_value_info("y", F32, ["N", 2])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def saved(tmp_path):
    """A reference file as `bnfold export --reference` writes it: inputs and float64 outputs."""
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    path = tmp_path / "ref.npz"
    np.savez(path, **{"input:x": x, "output:y": np.maximum(x.astype(np.float64) @ W, 0)})
    return path


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_gemm(), path)
    return path


# -------------------------------------------------------------------------- saved outputs
@pytest.mark.parametrize("option, value", [("inputs", "feeds.npz"), ("shapes", {"x": (1, 3)}), ("samples", 2),
                                           ("seed", 1), ("bisect", True)])
def test_options_about_inputs_do_not_apply_to_saved_outputs(saved, model_file, option, value):
    with pytest.raises(BnfoldError) as info:
        verify_against_reference(saved, model_file, VerifyOptions(**{option: value}))
    assert info.value.option == option
    assert str(info.value) == "does not apply when comparing with saved outputs: the saved file gives the inputs"


def test_saved_outputs_report_names_the_file_and_the_model(saved, model_file):
    report = verify_against_reference(saved, model_file)
    assert report and report.against_saved_outputs
    assert (report.reference, report.candidate, report.provider) == (str(saved), str(model_file), "CPUExecutionProvider")
    comparison = report.samples[0].outputs[0]
    assert comparison.reference_dtype == "float64" and comparison.dtype == "float32"  # no dtype check
    in_memory = verify_against_reference(saved, _gemm())
    assert in_memory and in_memory.candidate == "model (in memory)"
    document = report.to_dict()
    assert document["reference"] == str(saved) and document["candidate"] == str(model_file)
    assert document["against_saved_outputs"] is True


def test_saved_outputs_that_differ_fail(saved, tmp_path):
    report = verify_against_reference(saved, _gemm(W * 1.01))
    assert not report and report.samples[0].outputs[0].mismatched > 0


def test_a_model_onnxruntime_refuses_is_named_by_its_path(saved, tmp_path):
    model = _gemm()
    model.graph.node[1].op_type = "NoSuchOp"
    path = tmp_path / "refused.onnx"
    onnx.save(model, path)
    with pytest.raises(BnfoldError, match=rf"^{path}: onnxruntime cannot create a session"):
        verify_against_reference(saved, path)
    with pytest.raises(BnfoldError, match=rf"^{path}: onnxruntime cannot create a session"):
        verify_models(_gemm(), path)


# ------------------------------------------------------------------------------- providers
def test_an_unknown_provider_is_refused(saved, model_file):
    for call in (lambda: verify_against_reference(saved, model_file, VerifyOptions(provider="NoSuch")),
                 lambda: verify_models(model_file, model_file, VerifyOptions(provider="NoSuch"))):
        with pytest.raises(BnfoldError, match="execution provider NoSuch is not available") as info:
            call()
        assert info.value.option == "provider"


def test_every_session_runs_on_the_provider_asked_for(saved, model_file, monkeypatch):
    """onnxruntime always lists the Azure provider (it runs nothing itself: the CPU takes every node),
    which makes a provider other than the default testable on any machine."""
    import onnxruntime as ort

    if "AzureExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a second provider")
    providers = []
    real = ort.InferenceSession

    def recording(model, sess_options=None, *args, **kwargs):
        providers.append(tuple(kwargs.get("providers") or ()))
        return real(model, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    options = VerifyOptions(provider="azure")
    report = verify_against_reference(saved, model_file, options)
    assert report.provider == "AzureExecutionProvider" and report.to_dict()["provider"] == "AzureExecutionProvider"
    report = verify_models(_gemm(), _gemm(W * 1.5), VerifyOptions(provider="azure", bisect=True))
    assert report.provider == "AzureExecutionProvider" and report.bisect.tensor == "h"
    assert len(providers) >= 5  # one for the saved outputs, two to compare, two or more to bisect
    assert set(providers) == {("AzureExecutionProvider", "CPUExecutionProvider")}


# ------------------------------------------------------------------------------------ labels
def test_labels_of_models_in_memory_and_in_files(model_file):
    report = verify_models(_gemm(), model_file)
    assert (report.reference, report.candidate) == ("reference (in memory)", str(model_file))
    report = verify_models(model_file, _gemm())
    assert (report.reference, report.candidate) == (str(model_file), "candidate (in memory)")
