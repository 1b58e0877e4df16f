"""What fold_file and verify_models return or raise survives pickling with every field: process pools
(`fold --jobs`) and Dask (examples/dask_fold.py) carry them between processes and machines that way."""

from __future__ import annotations

import pickle

import pytest

from bnfold import BnfoldError, FoldReport, VerifyOptions, VerifyReport, fold_file, verify_models
from bnfold.fold import VerificationFailed

from .conftest import ROOT

MODEL = ROOT / "sample_models" / "shared_conv_opset13.onnx"  # 3 KB, 2 BatchNormalization
EXACT = VerifyOptions(atol=0.0, rtol=0.0, bisect=True)  # a correct fold still differs by float32 ulps


def _round_trip(value):
    return pickle.loads(pickle.dumps(value))


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory) -> VerificationFailed:
    """A real VerificationFailed: its report holds failing comparisons and a bisect result."""
    with pytest.raises(VerificationFailed) as caught:
        fold_file(MODEL, tmp_path_factory.mktemp("mismatch") / "out.onnx", verify=EXACT)
    return caught.value


def test_a_fold_report_with_its_verification_round_trips(tmp_path):
    report = fold_file(MODEL, tmp_path / "out.onnx", verify=VerifyOptions())
    assert report.folded == 2 and report.verification
    copy = _round_trip(report)
    assert type(copy) is FoldReport and copy == report
    assert copy.to_dict() == report.to_dict()
    assert (copy.folded, copy.total, copy.left_by_reason) == (2, 2, {})


def test_a_failing_verify_report_round_trips_with_its_bisect_result(tmp_path):
    fold_file(MODEL, tmp_path / "out.onnx")
    report = verify_models(MODEL, tmp_path / "out.onnx", EXACT)
    assert not report and report.bisect.tensor is not None
    copy = _round_trip(report)
    assert type(copy) is VerifyReport and copy == report and not copy
    assert copy.to_dict() == report.to_dict()
    assert copy.bisect.summary() == report.bisect.summary()


def test_a_bnfold_error_keeps_its_note_exit_code_and_option():
    copy = _round_trip(BnfoldError("bad value", note="give another", exit_code=1, option="shapes"))
    assert type(copy) is BnfoldError
    assert (copy.message, copy.note, copy.exit_code, copy.option) == ("bad value", "give another", 1, "shapes")
    assert copy.one_line() == "bad value Note: give another"


def test_verification_failed_keeps_its_report(mismatch):
    copy = _round_trip(mismatch)
    assert type(copy) is VerificationFailed
    assert (copy.message, copy.note, copy.exit_code) == (mismatch.message, mismatch.note, 1)
    assert copy.report == mismatch.report and copy.report.model == str(MODEL)
    assert not copy.report.verification and copy.report.verification.bisect is not None
