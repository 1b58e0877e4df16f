"""Loading through the memory map, streaming saves, external data, and atomic writes."""

import numpy as np
import onnx
import pytest

from bnfold.errors import BnfoldError
from bnfold.fold import fold_file, fold_model
from bnfold.io import load_model, open_model, save_model
from bnfold.mapped import is_stub
from tests.builders import conv_bn, gemm_bn


@pytest.fixture
def big_model(rng):
    """Large enough that its weights become stubs of the mapped file."""
    return conv_bn(rng, channels_in=16, channels_out=32)


def test_mapped_roundtrip_is_lossless(tmp_path, big_model):
    path = tmp_path / "m.onnx"
    onnx.save(big_model, path)
    model, source = open_model(path)
    assert any(is_stub(t) for t in model.graph.initializer)
    save_model(model, tmp_path / "copy.onnx", source=source)
    source.close()
    assert onnx.load(tmp_path / "copy.onnx") == onnx.load(path)


def test_fold_file_equals_fold_model_and_is_deterministic(tmp_path, big_model):
    path = tmp_path / "m.onnx"
    onnx.save(big_model, path)
    fold_file(path, tmp_path / "a.onnx")
    fold_file(path, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    expected, _ = fold_model(onnx.load(path))
    assert onnx.load(tmp_path / "a.onnx") == expected
    onnx.checker.check_model(str(tmp_path / "a.onnx"), full_check=True)


def test_external_data_input_is_folded(tmp_path, big_model):
    path = tmp_path / "ext.onnx"
    onnx.save(big_model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    report = fold_file(path, tmp_path / "out.onnx")
    assert report.folded == 1
    expected, _ = fold_model(onnx.load(path))
    assert onnx.load(tmp_path / "out.onnx") == expected


def test_external_data_escaping_the_folder_is_refused(tmp_path, big_model):
    path = tmp_path / "ext.onnx"
    onnx.save(big_model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(model, path)
    with pytest.raises(BnfoldError):
        fold_file(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_save_failure_leaves_no_file(tmp_path, rng, monkeypatch):
    import bnfold.io
    model = gemm_bn(rng)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bnfold.io, "write_model", broken)
    with pytest.raises(BnfoldError, match="No space left"):
        save_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_load_model_reads_what_onnx_reads(tmp_path, big_model):
    path = tmp_path / "m.onnx"
    onnx.save(big_model, path)
    assert load_model(path) == big_model
    assert np.array_equal(onnx.numpy_helper.to_array(load_model(path).graph.initializer[0]),
                          onnx.numpy_helper.to_array(big_model.graph.initializer[0]))


def test_wrong_payload_size_of_a_mapped_tensor_is_rejected(tmp_path, big_model):
    """The checker sees weightless copies of mapped models; bnfold checks payload sizes itself."""
    weight = big_model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]
    path = tmp_path / "bad.onnx"
    onnx.save(big_model, path)
    with pytest.raises(BnfoldError, match="checker rejects.*raw_data size"):
        fold_file(path, tmp_path / "out.onnx")
    with pytest.raises(onnx.checker.ValidationError):  # the same verdict as onnx's own checker
        onnx.checker.check_model(str(path), full_check=True)


def test_checker_verdicts_agree_with_the_file_checker(tmp_path, big_model):
    """A model the file checker rejects for a graph error is rejected through the mapped path too."""
    big_model.graph.node[0].input[1] = "no_such_weight"
    path = tmp_path / "bad.onnx"
    onnx.save(big_model, path)
    with pytest.raises(BnfoldError, match="checker rejects"):
        fold_file(path, tmp_path / "out.onnx")


def test_folding_a_folded_file_gives_the_same_bytes(tmp_path, big_model):
    """Invariant 5 through files: bnfold's own output format (one graph record per initializer)
    is read back through the memory map and written again unchanged."""
    path = tmp_path / "m.onnx"
    onnx.save(big_model, path)
    fold_file(path, tmp_path / "once.onnx")
    report = fold_file(tmp_path / "once.onnx", tmp_path / "twice.onnx")
    assert report.total == 0
    assert (tmp_path / "once.onnx").read_bytes() == (tmp_path / "twice.onnx").read_bytes()
