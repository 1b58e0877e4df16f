"""Loading through the memory map, streaming saves, external data, and atomic writes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.fold import fold_file, fold_model
from bnfold.io import load_model, open_model, save_model
from bnfold.mapped import is_stub, load_mapped
from bnfold.wire import tensor_payload_bytes
from tests.builders import at_least, conv_bn, gemm_bn


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
    expected, _ = fold_model(big_model)
    onnx.save(big_model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    report = fold_file(path, tmp_path / "out.onnx")
    assert report.folded == 1
    folded = onnx.load(tmp_path / "out.onnx")
    for tensor in folded.graph.initializer:  # read back from OUT.data: an explicit data_location=DEFAULT
        tensor.ClearField("data_location")
    assert folded == expected


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
    with pytest.raises(BnfoldError, match="bnfold's check of the mapped weights rejects this model: .*raw_data size"):
        fold_file(path, tmp_path / "out.onnx")
    if at_least(onnx, "1.23"):  # the same verdict as onnx's own checker, which checks sizes since 1.23
        with pytest.raises(onnx.checker.ValidationError):
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


def test_invalid_ir3_model_is_refused_through_the_mapped_path(tmp_path, rng, capsys):
    """IR 3 requires every initializer to be listed in graph.input. The checker sees a weightless
    copy, where a stub is declared as an input, so bnfold must check this of the stubs itself."""
    model = conv_bn(rng, channels_in=16, channels_out=32, opset=7)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)  # valid with every initializer listed
    del model.graph.input[[v.name for v in model.graph.input].index("W")]
    path = tmp_path / "ir3.onnx"
    onnx.save(model, path)
    mapped, source = load_mapped(path)
    source.close()
    assert [t.name for t in mapped.graph.initializer if is_stub(t)] == ["W"]  # the path under test
    with pytest.raises(BnfoldError, match="W in initializer but not in graph input"):
        open_model(path)
    assert main(["fold", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and "W in initializer but not in graph input" in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ir3.onnx"]


def _values_cleared(tensor: TensorProto) -> TensorProto:
    bare = TensorProto()
    bare.CopyFrom(tensor)
    for name in ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        bare.ClearField(name)
    return bare


# One tensor per storage field, with values whose encoding width varies: int32_data holds float16 and
# bfloat16 bit patterns (1-3 bytes each), bools, and int8/int16 values that are 10 bytes when negative.
STORAGE_CASES = {
    "raw_data": helper.make_tensor("t", TensorProto.FLOAT, [300], np.ones(300, np.float32).tobytes(), raw=True),
    "raw_data-empty": helper.make_tensor("t", TensorProto.FLOAT, [0], b"", raw=True),
    "float_data": helper.make_tensor("t", TensorProto.FLOAT, [3], [1.0, -2.5, 3e38]),
    "double_data": helper.make_tensor("t", TensorProto.DOUBLE, [2], [1.0, -1e300]),
    "int32_data-float16": helper.make_tensor("t", TensorProto.FLOAT16, [4], np.array([0, 1, -2, 65504], np.float16)),
    "int32_data-bfloat16": helper.make_tensor("t", TensorProto.BFLOAT16, [3], [0.0, -1.5, 3.0e38]),
    "int32_data-int8": helper.make_tensor("t", TensorProto.INT8, [4], [-1, 2, -128, 127]),
    "int32_data-int16": helper.make_tensor("t", TensorProto.INT16, [3], [-32768, 300, 0]),
    "int32_data-int32": helper.make_tensor("t", TensorProto.INT32, [3], [-2**31, 2**31 - 1, 127]),
    "int32_data-bool": helper.make_tensor("t", TensorProto.BOOL, [3], [True, False, True]),
    "int64_data": helper.make_tensor("t", TensorProto.INT64, [4], [-1, 2**40, 0, -2**63]),
    "uint64_data": helper.make_tensor("t", TensorProto.UINT64, [3], [0, 2**64 - 1, 300]),
    "string_data": helper.make_tensor("t", TensorProto.STRING, [2], [b"ab", b"x" * 200]),
    "empty": helper.make_tensor("t", TensorProto.FLOAT, [0], []),
}


@pytest.mark.parametrize("tensor", STORAGE_CASES.values(), ids=STORAGE_CASES.keys())
def test_payload_bytes_is_the_serialized_size_of_the_values(tensor):
    """The size that decides whether a model exceeds protobuf's 2 GiB: exactly what the value fields
    add to the serialized tensor, for every field a tensor can store its values in."""
    assert tensor_payload_bytes(tensor) == tensor.ByteSize() - _values_cleared(tensor).ByteSize()


def test_payload_bytes_of_a_large_int8_tensor(rng):
    """Negative int8 values take 10 bytes each in int32_data (more than the 8 once assumed)."""
    values = rng.integers(-128, 0, 10_000).astype(np.int8)
    tensor = helper.make_tensor("t", TensorProto.INT8, values.shape, values)
    assert tensor_payload_bytes(tensor) == tensor.ByteSize() - _values_cleared(tensor).ByteSize()
    assert tensor_payload_bytes(tensor) > 8 * values.size


def test_a_model_over_the_protobuf_limit_is_saved_with_external_data(tmp_path, big_model, monkeypatch):
    """Past protobuf's limit (lowered here to just under this model's weights) the weights go to
    OUT.data even when external data was not asked for; the model reads back the same."""
    import bnfold.io
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in big_model.graph.initializer}
    weights = sum(tensor_payload_bytes(t) for t in big_model.graph.initializer)
    monkeypatch.setattr(bnfold.io, "PROTOBUF_LIMIT", (64 << 20) + weights + 1)
    save_model(big_model, tmp_path / "under.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["under.onnx"]
    monkeypatch.setattr(bnfold.io, "PROTOBUF_LIMIT", (64 << 20) + weights)
    save_model(big_model, tmp_path / "over.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["over.onnx", "over.onnx.data", "under.onnx"]
    loaded = onnx.load(tmp_path / "over.onnx")
    assert {t.name for t in loaded.graph.initializer} == expected.keys()
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), expected[tensor.name])


# ------------------------------------------------------------- what the weightless checker cannot see
def _refusal(tmp_path, data: bytes, capsys) -> str:
    """The one error line of `bnfold fold` on a model file holding `data`; nothing is written."""
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    assert main(["fold", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnfold: error: {path}: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
    return err


@pytest.mark.parametrize("extra", [4, 1], ids=["one-element-too-long", "not-whole-elements"])
def test_raw_data_of_a_small_initializer_longer_than_its_shape_is_refused(tmp_path, big_model, capsys, extra):
    """onnx's checker refuses raw_data too short for its dims, not too long: bnfold refuses both."""
    mean = next(t for t in big_model.graph.initializer if t.name == "bn_mean")
    mean.raw_data = mean.raw_data + bytes(extra)
    err = _refusal(tmp_path, big_model.SerializeToString(), capsys)
    assert "bnfold's check of the mapped weights rejects this model: TensorProto (tensor name: bn_mean) " \
           f"raw_data size ({128 + extra} bytes) does not match the declared shape and type (128 bytes)" in err


@pytest.mark.parametrize("change, message", [
    (lambda dim: setattr(dim[1], "dim_value", 0), "differ in dimension 1: (16) vs (0) for W"),
    (lambda dim: dim.pop(), "differ in rank: (4) vs (3) for W"),
    (None, "Inferred elem type differs from existing elem type: (1) vs (10) for W")], ids=["dim", "rank", "type"])
def test_a_value_info_that_contradicts_a_mapped_weight_is_refused(tmp_path, big_model, capsys, change, message):
    """The file checker's shape inference refuses it; the weightless copy declares W as an input,
    which inference does not compare with value_info: bnfold compares them itself."""
    info = helper.make_tensor_value_info("W", TensorProto.FLOAT16 if change is None else TensorProto.FLOAT,
                                         [32, 16, 3, 3])
    if change is not None:
        change(info.type.tensor_type.shape.dim)
    big_model.graph.value_info.append(info)
    path = tmp_path / "file.onnx"
    onnx.save(big_model, path)
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(str(path), full_check=True)
    path.unlink()
    assert message in _refusal(tmp_path, big_model.SerializeToString(), capsys)


def test_a_value_info_that_agrees_with_a_mapped_weight_is_accepted(tmp_path, big_model):
    info = helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, "c", 3, None])
    big_model.graph.value_info.append(info)
    onnx.save(big_model, tmp_path / "m.onnx")
    assert fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx").folded == 1


def test_errors_the_checker_raises_as_value_errors_are_refusals(tmp_path, big_model, capsys):
    """A name that is not UTF-8, an unknown data type: onnx's checker raises ValueError for these."""
    data = big_model.SerializeToString()
    assert data.count(b'"\x12BatchNormalization') == 1  # the op_type record
    err = _refusal(tmp_path, data.replace(b'"\x12BatchNormalization', b'"\x12BatchNormalizatio\xff'), capsys)
    assert "the ONNX checker rejects this model: 'utf-8' codec can't decode" in err
    (tmp_path / "bad.onnx").unlink()
    next(t for t in big_model.graph.initializer if t.name == "bn_B").data_type = 99
    err = _refusal(tmp_path, big_model.SerializeToString(), capsys)
    assert "the ONNX checker rejects this model: Invalid tensor data type 99" in err
    with pytest.raises(BnfoldError, match="the ONNX checker rejects this model: Invalid tensor data type 99"):
        load_model(tmp_path / "bad.onnx")  # the file checker raises it too


def _large(name: str, data_type: int, dims: list[int], **fields) -> onnx.TensorProto:
    """An initializer past the weightless copy's size limit: the checker never sees it, bnfold does."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
    for field, values in fields.items():
        if field == "raw_data":
            tensor.raw_data = values
        else:
            getattr(tensor, field).extend(values)
    return tensor


@pytest.mark.parametrize("tensor", [
    _large("count", TensorProto.INT64, [5001], int64_data=range(5000)),
    _large("short8", TensorProto.FLOAT8E4M3FN, [5000], raw_data=bytes(4999)),
    _large("typed", TensorProto.FLOAT, [2000], float_data=[0.0] * 1999),
    _large("both", TensorProto.FLOAT, [2000], raw_data=bytes(8000), float_data=[1.0]),
], ids=["int64-count", "float8-raw-short", "float-count", "raw-and-typed"])
def test_a_large_initializer_the_file_checker_refuses_is_refused(tmp_path, big_model, capsys, tensor):
    """A tensor kept out of the checker's weightless copy is checked by bnfold by the checker's rules:
    the same verdict as onnx.checker on the file (which checks these since onnx 1.23; bnfold always)."""
    big_model.graph.initializer.append(tensor)
    if at_least(onnx, "1.23"):
        with pytest.raises(onnx.checker.ValidationError):
            onnx.checker.check_model(big_model, full_check=True)
    err = _refusal(tmp_path, big_model.SerializeToString(), capsys)
    assert tensor.name in err


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_a_typed_field_with_too_few_values_is_refused_on_every_onnx(tmp_path, rng, capsys, where):
    """onnx's checker counts a float_data field's values only since onnx 1.23; before, reading such a
    tensor failed inside the fold (an internal error). bnfold counts them itself, in every graph."""
    from tests.builders import if_model
    model = if_model(rng) if where == "subgraph" else conv_bn(rng)
    tensor = next(t for t in model.graph.initializer if t.name == "bn_mean")
    values = onnx.numpy_helper.to_array(tensor).ravel()[:-1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())
    if where == "constant":
        model.graph.initializer.remove(tensor)
        model.graph.node.insert(0, helper.make_node("Constant", [], ["bn_mean"], value=tensor))
    elif where == "subgraph":
        model.graph.initializer.remove(tensor)
        then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
        then_branch.initializer.append(tensor)
    err = _refusal(tmp_path, model.SerializeToString(), capsys)
    assert "(tensor name: bn_mean)" in err and "rejects this model" in err
