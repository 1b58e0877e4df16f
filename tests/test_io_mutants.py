"""bnfold.io: every way a file fails to be a model is one BnfoldError line naming the file; saving
is atomic (no partial or temporary file, input untouched) in both the streamed and the external-data
path. Written against mutation testing (docs/mutation.md); tiny models only."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.io as io
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.external import DataFile
from bnfold.io import (atomic_output, check_model, check_output_path, load_model, open_model, save_model,
                       write_model, write_text_atomic)
from bnfold.mapped import is_stub, load_mapped
from bnfold.wire import tensor_payload_bytes
from tests.builders import conv_bn, gemm_bn

CHECKER_NOTE = "bnfold only rewrites models that onnx.checker.check_model accepts"


@pytest.fixture
def small(rng):
    return gemm_bn(rng)


@pytest.fixture
def big(rng):
    """Weights large enough to become stubs of the mapped file."""
    return conv_bn(rng, channels_in=16, channels_out=32)


def _error(call, *args, **kwargs) -> BnfoldError:
    with pytest.raises(BnfoldError) as info:
        call(*args, **kwargs)
    return info.value


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.save with external data moves the weights out of the model it is given (bnfold's save_model
    does not: test_external_data.py)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as read back from external data is the same but for an explicit data_location=DEFAULT."""
    copy = _copy(model)
    for tensor in copy.graph.initializer:
        if tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return copy


def _unchecked(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model the checker rejects (an unknown input name) but protobuf parses."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[0].input[0] = "nowhere"
    return bad


# ---------------------------------------------------------------------------- loading: bad files
@pytest.mark.parametrize("loader", [load_model, open_model])
def test_missing_directory_and_empty_files_are_one_line_errors(tmp_path, loader):
    assert str(_error(loader, tmp_path / "m.onnx")) == f"{tmp_path / 'm.onnx'}: no such file"
    assert str(_error(loader, tmp_path)) == f"{tmp_path}: is a directory, not an ONNX model file"
    (tmp_path / "e.onnx").write_bytes(b"")
    assert str(_error(loader, tmp_path / "e.onnx")) == f"{tmp_path / 'e.onnx'}: file is empty"


def test_unchecked_load_still_refuses_missing_and_empty_files(tmp_path):
    assert str(_error(load_model, tmp_path / "m.onnx", check=False)).endswith(": no such file")
    (tmp_path / "e.onnx").write_bytes(b"")
    assert str(_error(load_model, tmp_path / "e.onnx", check=False)).endswith(": file is empty")


@pytest.mark.parametrize("loader", [load_model, open_model])
def test_garbage_is_not_a_protobuf_model(tmp_path, loader):
    path = tmp_path / "g.onnx"
    path.write_bytes(b"\xff" * 64)
    assert str(_error(loader, path)) == f"{path}: not an ONNX model (not a protobuf ModelProto)"


def test_garbage_without_the_checker_is_still_not_a_model(tmp_path):
    path = tmp_path / "g.onnx"
    path.write_bytes(b"\xff" * 64)
    message = str(_error(load_model, path, check=False))
    assert message.startswith(f"{path}: not an ONNX model (") and "\n" not in message


@pytest.mark.parametrize("loader", [load_model, open_model])
def test_a_model_without_ir_version_is_not_a_model(tmp_path, small, loader):
    small.ClearField("ir_version")
    path = tmp_path / "m.onnx"
    path.write_bytes(small.SerializeToString())
    assert str(_error(loader, path)) == f"{path}: not an ONNX model (no IR version)"


def test_without_the_checker_no_graph_or_no_ir_version_is_not_a_model(tmp_path, small):
    no_ir = onnx.ModelProto()
    no_ir.CopyFrom(small)
    no_ir.ClearField("ir_version")
    no_graph = onnx.ModelProto()
    no_graph.CopyFrom(small)
    no_graph.ClearField("graph")
    for name, model in (("no_ir", no_ir), ("no_graph", no_graph)):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(model.SerializeToString())
        assert str(_error(load_model, path, check=False)) == \
            f"{path}: not an ONNX model (no graph or no IR version)"


def test_ir_version_1_is_a_model_without_the_checker(tmp_path, small):
    """Only a missing (0) IR version is refused by the loader itself."""
    small.ir_version = 1
    path = tmp_path / "m.onnx"
    path.write_bytes(small.SerializeToString())
    assert load_model(path, check=False).ir_version == 1


@pytest.mark.parametrize("loader", [load_model, open_model])
def test_checker_rejection_is_one_line_with_a_note(tmp_path, small, loader):
    path = tmp_path / "bad.onnx"
    onnx.save(_unchecked(small), path)
    error = _error(loader, path)
    assert str(error).startswith(f"{path}: the ONNX checker rejects this model: ")
    assert "nowhere" in str(error) and "\n" not in str(error)
    assert error.note == CHECKER_NOTE and error.exit_code == 2


def test_load_model_checks_by_default_and_not_when_asked(tmp_path, small):
    path = tmp_path / "bad.onnx"
    onnx.save(_unchecked(small), path)
    with pytest.raises(BnfoldError, match="checker rejects"):
        load_model(path)
    assert load_model(path, check=False).graph.node[0].input[0] == "nowhere"


def test_open_model_of_a_mapped_model_checks_the_graph(tmp_path, big):
    path = tmp_path / "bad.onnx"
    onnx.save(_unchecked(big), path)
    model, source = load_mapped(path)
    source.close()
    assert any(is_stub(t) for t in model.graph.initializer)  # the mapped path is the one under test
    error = _error(open_model, path)
    assert str(error).startswith(f"{path}: the ONNX checker rejects this model: ") and "nowhere" in str(error)
    assert error.note == CHECKER_NOTE


def test_open_model_maps_large_weights_and_loads_the_same_values(tmp_path, big):
    path = tmp_path / "m.onnx"
    onnx.save(big, path)
    model, source = open_model(path)
    try:
        assert source is not None and [t.name for t in model.graph.initializer if is_stub(t)] == ["W"]
        w = next(t for t in model.graph.initializer if t.name == "W")
        np.testing.assert_array_equal(source.array(w), numpy_helper.to_array(big.graph.initializer[0]))
    finally:
        source.close()


def test_open_model_of_a_small_model_is_a_full_load(tmp_path, small):
    path = tmp_path / "m.onnx"
    onnx.save(small, path)
    model, source = open_model(path)
    source.close()
    assert model == small


def test_open_model_with_external_data_maps_it(tmp_path, big):
    path = tmp_path / "ext.onnx"
    onnx.save(_copy(big), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    model, source = open_model(path)
    try:
        assert [t.name for t in model.graph.initializer if is_stub(t)] == ["W"]
        np.testing.assert_array_equal(source.array(model.graph.initializer[0]),
                                      numpy_helper.to_array(big.graph.initializer[0]))
        assert [_inline(model).graph.initializer[1:]] == [big.graph.initializer[1:]]
    finally:
        source.close()


def test_missing_external_data_is_one_line_with_a_note(tmp_path, big):
    path = tmp_path / "ext.onnx"
    onnx.save(big, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    os.unlink(tmp_path / "ext.onnx.data")
    for error in (_error(load_model, path, check=False), _error(open_model, path)):
        assert str(error) == f"{path}: external data of W: cannot open ext.onnx.data (No such file or directory)"
        assert error.note == "external data files must sit next to the model, inside its folder"


def test_unreadable_file_says_it_cannot_be_read(tmp_path, small, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(small, path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(onnx, "load", denied)
    assert str(_error(load_model, path, check=False)) == f"{path}: cannot read (Permission denied)"


def test_cli_prints_a_bad_file_as_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "g.onnx"
    path.write_bytes(b"\xff" * 64)
    assert main(["fold", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == f"bnfold: error: {path}: not an ONNX model (not a protobuf ModelProto)\n"
    assert _names(tmp_path) == ["g.onnx"]


def test_check_model_in_memory(small):
    check_model(small)
    error = _error(check_model, _unchecked(small))
    assert str(error).startswith("the ONNX checker rejects this model: ") and "nowhere" in str(error)
    assert error.note == CHECKER_NOTE


def test_check_model_runs_the_full_checker_with_shape_inference(small):
    """A declared output shape that contradicts inference passes the plain checker, not the full one."""
    wrong = _copy(small)
    del wrong.graph.output[0].type.tensor_type.shape.dim[:]
    wrong.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 99
    onnx.checker.check_model(wrong)  # the plain checker accepts it
    error = _error(check_model, wrong)
    assert str(error).startswith("the ONNX checker rejects this model: ") and "\n" not in str(error)


# ------------------------------------------------------------------------------------ IR 3
def test_ir3_stub_listed_as_graph_input_is_accepted(tmp_path, rng):
    model = conv_bn(rng, channels_in=16, channels_out=32, opset=7)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    path = tmp_path / "ir3.onnx"
    onnx.save(model, path)
    loaded, source = open_model(path)
    source.close()
    assert loaded.ir_version == 3 and any(is_stub(t) for t in loaded.graph.initializer)


# ------------------------------------------------------------------------------------ saving
def test_save_streamed_writes_one_file_that_loads_back(tmp_path, small):
    save_model(small, tmp_path / "out.onnx")
    assert _names(tmp_path) == ["out.onnx"]
    assert onnx.load(tmp_path / "out.onnx") == small


def test_save_with_external_data_moves_large_weights_only(tmp_path, big):
    expected = {t.name: numpy_helper.to_array(t) for t in big.graph.initializer}
    sizes = {t.name: len(t.raw_data) for t in big.graph.initializer}
    save_model(big, tmp_path / "out.onnx", external_data=True)
    assert _names(tmp_path) == ["out.onnx", "out.onnx.data"]
    bare = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = {t.name for t in bare.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
    assert external == {name for name, size in sizes.items() if size >= 1024} == {"W"}
    assert {e.value for t in bare.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"out.onnx.data"}
    loaded = onnx.load(tmp_path / "out.onnx")
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])


def test_save_with_external_data_of_a_small_model_writes_no_data_file(tmp_path, small):
    save_model(small, tmp_path / "out.onnx", external_data=True)
    assert _names(tmp_path) == ["out.onnx"]
    assert onnx.load(tmp_path / "out.onnx") == small


def test_save_with_external_data_from_a_mapped_file(tmp_path, big):
    path = tmp_path / "m.onnx"
    onnx.save(big, path)
    model, source = open_model(path)
    assert any(is_stub(t) for t in model.graph.initializer)
    save_model(model, tmp_path / "out.onnx", external_data=True, source=source)
    source.close()
    assert _names(tmp_path) == ["m.onnx", "out.onnx", "out.onnx.data"]
    assert _inline(onnx.load(tmp_path / "out.onnx")) == onnx.load(path)


@pytest.mark.parametrize("external_data", [False, True])
def test_accept_sees_the_complete_staged_file_next_to_the_target(tmp_path, big, external_data):
    seen, expected = [], _copy(big)

    def accept(staged):
        seen.append(staged)
        assert staged.parent.parent == tmp_path or staged.parent == tmp_path
        assert staged != tmp_path / "out.onnx" and not (tmp_path / "out.onnx").exists()
        assert _inline(onnx.load(staged)) == expected
    save_model(big, tmp_path / "out.onnx", external_data=external_data, accept=accept)
    assert len(seen) == 1
    assert _inline(onnx.load(tmp_path / "out.onnx")) == expected


@pytest.mark.parametrize("external_data", [False, True])
def test_a_refused_file_leaves_nothing_and_keeps_the_old_one(tmp_path, big, external_data):
    (tmp_path / "out.onnx").write_bytes(b"old")

    def refuse(staged):
        raise BnfoldError("refused")
    with pytest.raises(BnfoldError, match="refused"):
        save_model(big, tmp_path / "out.onnx", external_data=external_data, accept=refuse)
    assert _names(tmp_path) == ["out.onnx"] and (tmp_path / "out.onnx").read_bytes() == b"old"


def test_a_write_error_with_external_data_is_one_line_and_leaves_nothing(tmp_path, big, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(DataFile, "add", full)
    error = _error(save_model, big, tmp_path / "out.onnx", external_data=True)
    assert str(error) == f"{tmp_path / 'out.onnx'}: cannot write (No space left on device)"
    assert _names(tmp_path) == []


def test_a_write_error_without_strerror_still_says_what(tmp_path, small, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk gone")
    monkeypatch.setattr(io, "write_model", broken)
    assert str(_error(save_model, small, tmp_path / "out.onnx")) == f"{tmp_path / 'out.onnx'}: cannot write (disk gone)"
    assert _names(tmp_path) == []


def test_the_size_that_forces_external_data_counts_mapped_stubs(tmp_path, big, monkeypatch):
    """A stub counts as its record in the mapped file: a mapped model over the limit goes external too."""
    path = tmp_path / "m.onnx"
    onnx.save(big, path)
    model, source = open_model(path)
    assert any(is_stub(t) for t in model.graph.initializer)
    weights = sum(tensor_payload_bytes(t) for t in big.graph.initializer)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", (64 << 20) + weights - 100)
    out = tmp_path / "out"
    out.mkdir()
    save_model(model, out / "o.onnx", source=source)
    source.close()
    assert _names(out) == ["o.onnx", "o.onnx.data"]
    assert _inline(onnx.load(out / "o.onnx")) == onnx.load(path)


def test_output_folder_must_exist_and_target_must_not_be_a_directory(tmp_path, small):
    missing = tmp_path / "nope" / "out.onnx"
    assert str(_error(save_model, small, missing)) == f"{missing}: output folder {tmp_path / 'nope'} does not exist"
    (tmp_path / "d").mkdir()
    assert str(_error(save_model, small, tmp_path / "d")) == f"{tmp_path / 'd'}: is a directory"
    assert check_output_path(tmp_path / "x.onnx") == tmp_path


def test_check_output_path_of_a_bare_name_is_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_path("x.onnx").resolve() == tmp_path.resolve()


def test_write_model_needs_the_source_of_a_stub(tmp_path, big):
    path = tmp_path / "m.onnx"
    onnx.save(big, path)
    model, source = load_mapped(path)
    source.close()
    with open(tmp_path / "out.bin", "wb") as handle, pytest.raises(ValueError, match="W is a stub"):
        write_model(model, handle)


def test_write_model_output_parses_to_the_same_model(tmp_path, big):
    with open(tmp_path / "out.bin", "wb") as handle:
        write_model(big, handle)
    assert onnx.load_model_from_string((tmp_path / "out.bin").read_bytes()) == big


# --------------------------------------------------------------------------------- atomic_output
def test_atomic_output_renames_on_success_and_leaves_no_temporary(tmp_path):
    with atomic_output(tmp_path / "r.txt") as staged:
        assert staged.parent.parent == tmp_path and staged.name == "r.txt" and staged.exists()
        staged.write_text("done")
        assert not (tmp_path / "r.txt").exists()
    assert _names(tmp_path) == ["r.txt"] and (tmp_path / "r.txt").read_text() == "done"


def test_atomic_output_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    (tmp_path / "r.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "r.txt") as staged:
            staged.write_text("new")
            raise RuntimeError("boom")
    assert _names(tmp_path) == ["r.txt"] and (tmp_path / "r.txt").read_text() == "old"


def test_atomic_output_turns_an_os_error_into_one_line(tmp_path):
    with pytest.raises(BnfoldError) as info:
        with atomic_output(tmp_path / "r.txt"):
            raise OSError(28, "No space left on device")
    assert str(info.value) == f"{tmp_path / 'r.txt'}: cannot write (No space left on device)"
    assert _names(tmp_path) == []
    with pytest.raises(BnfoldError) as info:
        with atomic_output(tmp_path / "r.txt"):
            raise OSError("gone")
    assert str(info.value) == f"{tmp_path / 'r.txt'}: cannot write (gone)"


def test_atomic_output_refuses_a_missing_folder(tmp_path):
    with pytest.raises(BnfoldError, match="does not exist"):
        with atomic_output(tmp_path / "nope" / "r.txt"):
            pass


def test_write_text_atomic(tmp_path):
    write_text_atomic(tmp_path / "r.json", "{}\n")
    write_text_atomic(tmp_path / "r.json", "[]\n")
    assert _names(tmp_path) == ["r.json"] and (tmp_path / "r.json").read_text() == "[]\n"
