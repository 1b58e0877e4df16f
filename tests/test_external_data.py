"""Models with external data: mapped (not loaded) on input, folded like the in-memory fold, written to
OUT.data by bnfold itself (streamed, aligned, deterministic, the caller's model untouched), and every
malformed external_data entry refused with one line. Location safety is in test_file_safety.py."""

from __future__ import annotations

import mmap
import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.mapped as mapped
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.external import ALIGNMENT, NOTE, data_file_name
from bnfold.fold import fold_file, fold_model
from bnfold.io import load_model, open_model, save_model
from bnfold.mapped import SCRATCH, is_stub
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, make_model, tensor


def conv_bn_conv(rng, channels: int = 16) -> onnx.ModelProto:
    """x -> Conv(W1, b1) -> BN -> Relu -> Conv(W2) -> y: the fold rewrites W1 and b1; W2 stays as it is."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (channels, channels, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.5, channels).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (channels, channels, 3, 3)).astype(np.float32), "W2"),
             *bn_initializers(bn_stats(rng, channels), np.float32)]
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             bn_node("c1", "n1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [tensor("x", np.float32, [1, channels, 5, 5])], [tensor("y", np.float32, None)], inits)


@pytest.fixture
def model(rng):
    return conv_bn_conv(rng)


def save_external(model: onnx.ModelProto, path, location="weights.bin", one_file=True) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=one_file, location=location,
              size_threshold=1024)


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its values in memory and no data_location field (as a model saved without
    external data reads back)."""
    for t in model.graph.initializer:
        t.ClearField("data_location")
    return model


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def bare_model(path) -> onnx.ModelProto:
    return onnx.load(path, load_external_data=False)


def locations(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


# ------------------------------------------------------------------------------------------- reading
def test_external_initializers_are_mapped_not_loaded(tmp_path, model):
    path = tmp_path / "m.onnx"
    save_external(model, path)
    loaded, source = open_model(path)
    try:
        stubs = {t.name for t in loaded.graph.initializer if is_stub(t)}
        assert stubs == {"W1", "W2"}  # the 1 KiB-plus ones; the BN's parameters are read in
        assert not any(t.HasField("raw_data") for t in loaded.graph.initializer if is_stub(t))
        for t in loaded.graph.initializer:
            expected = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == t.name))
            actual = source.array(t) if is_stub(t) else numpy_helper.to_array(t)
            np.testing.assert_array_equal(actual, expected)
        assert source.had_external_data
    finally:
        source.close()


def test_load_model_reads_external_data_in_full(tmp_path, model):
    path = tmp_path / "m.onnx"
    save_external(model, path, one_file=False)
    assert inline(load_model(path)) == model


@pytest.mark.parametrize("one_file", [True, False], ids=["one-data-file", "a-file-per-tensor"])
def test_fold_of_external_data_equals_the_in_memory_fold(tmp_path, model, one_file):
    path = tmp_path / "m.onnx"
    save_external(model, path, one_file=one_file)
    (tmp_path / "out").mkdir()
    report = fold_file(path, tmp_path / "out" / "o.onnx")
    assert report.folded == 1
    expected, _ = fold_model(model)
    assert names(tmp_path / "out") == ["o.onnx", "o.onnx.data"]
    assert locations(bare_model(tmp_path / "out" / "o.onnx")) == {"o.onnx.data"}
    folded = inline(onnx.load(tmp_path / "out" / "o.onnx"))
    assert folded == expected
    assert_same_function(model, folded)
    onnx.checker.check_model(str(tmp_path / "out" / "o.onnx"), full_check=True)


def test_output_of_external_data_is_deterministic_and_aligned(tmp_path, model):
    path = tmp_path / "m.onnx"
    save_external(model, path)
    for name in ("a.onnx", "b.onnx"):
        fold_file(path, tmp_path / name)
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    a, b = bare_model(tmp_path / "a.onnx"), bare_model(tmp_path / "b.onnx")
    for t in b.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "a.onnx.data"
    assert a == b
    spans = [{e.key: e.value for e in t.external_data} for t in a.graph.initializer if t.external_data]
    assert [int(s["offset"]) % ALIGNMENT for s in spans if int(s["length"]) >= ALIGNMENT] == [0, 0]
    assert sum(int(s["length"]) for s in spans) <= (tmp_path / "a.onnx.data").stat().st_size


def test_data_file_name_is_the_output_file_name_plus_data():
    assert data_file_name("dir/model.onnx") == "model.onnx.data"
    assert data_file_name("model") == "model.data"


def test_a_fold_of_a_fold_with_external_data_changes_nothing(tmp_path, model):
    """design.md, Invariants 5 through external data: the second fold copies every value unchanged."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    fold_file(path, tmp_path / "once.onnx")
    report = fold_file(tmp_path / "once.onnx", tmp_path / "twice.onnx")
    assert report.folded == 0
    assert (tmp_path / "once.onnx.data").read_bytes() == (tmp_path / "twice.onnx.data").read_bytes()
    assert inline(onnx.load(tmp_path / "once.onnx")) == inline(onnx.load(tmp_path / "twice.onnx"))


def test_attribute_and_subgraph_tensors_with_external_data_are_read_in(tmp_path, rng):
    """Only main-graph initializers stay mapped; a Constant's value and a branch's initializer are read."""
    big = rng.normal(0, 1, (16, 32)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("Add", ["x", "K"], ["t"])], "then", [],
                               [tensor("t", np.float32, [16, 32])], [numpy_helper.from_array(big + 1, "K")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [tensor("e", np.float32, [16, 32])])
    nodes = [helper.make_node("Constant", [], ["x"], value=numpy_helper.from_array(big, "c")),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    model = make_model(nodes, [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [tensor("y", np.float32, [16, 32])], [])
    path = tmp_path / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, location="w.bin", size_threshold=1024, convert_attribute=True)
    assert bare_model(path).graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    loaded, source = open_model(path)
    source.close()
    assert loaded == model
    save_model(model, tmp_path / "out.onnx", external_data=True)
    nested = _then_branch(bare_model(tmp_path / "out.onnx")).initializer[0]
    assert {e.key: e.value for e in nested.external_data}["location"] == "out.onnx.data"
    np.testing.assert_array_equal(numpy_helper.to_array(_then_branch(onnx.load(tmp_path / "out.onnx")).initializer[0]),
                                  big + 1)


def _then_branch(model: onnx.ModelProto) -> onnx.GraphProto:
    return next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")


# -------------------------------------------------------------------------------------- writing
def test_save_with_external_data_moves_values_kept_in_typed_fields(tmp_path, rng):
    """float_data and int32_data (float16 bits) hold values too: converted to raw bytes and moved."""
    floats = rng.normal(0, 1, 600).astype(np.float32)
    halves = rng.normal(0, 1, 700).astype(np.float16)
    model = make_model([helper.make_node("Add", ["F", "x"], ["y"]), helper.make_node("Cast", ["H"], ["z"], to=1)],
                       [tensor("x", np.float32, [600])],
                       [tensor("y", np.float32, [600]), tensor("z", np.float32, [700])],
                       [helper.make_tensor("F", TensorProto.FLOAT, [600], floats),
                        helper.make_tensor("H", TensorProto.FLOAT16, [700], halves)])
    assert not any(t.HasField("raw_data") for t in model.graph.initializer)
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert locations(bare_model(tmp_path / "out.onnx")) == {"out.onnx.data"}
    assert all(t.data_location == TensorProto.EXTERNAL for t in bare_model(tmp_path / "out.onnx").graph.initializer)
    loaded = onnx.load(tmp_path / "out.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), floats)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), halves)


def test_save_with_external_data_does_not_change_the_callers_model(tmp_path, model):
    before = model.SerializeToString()
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert inline(onnx.load(tmp_path / "out.onnx")) == model


def test_a_data_file_in_the_current_folder_does_not_matter(tmp_path, model, monkeypatch):
    """onnx.save_model checks OUT.data relative to the working folder; bnfold writes its own."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "cwd" / "o.onnx.data").write_bytes(b"someone else's")
    monkeypatch.chdir(tmp_path / "cwd")
    save_model(model, tmp_path / "out" / "o.onnx", external_data=True)
    assert (tmp_path / "cwd" / "o.onnx.data").read_bytes() == b"someone else's"
    assert inline(onnx.load(tmp_path / "out" / "o.onnx")) == model


def test_an_inline_input_keeps_its_layout_and_an_external_one_keeps_external_data(tmp_path, model):
    onnx.save(model, tmp_path / "inline.onnx")
    save_external(model, tmp_path / "ext.onnx")
    (tmp_path / "out").mkdir()
    fold_file(tmp_path / "inline.onnx", tmp_path / "out" / "a.onnx")
    fold_file(tmp_path / "ext.onnx", tmp_path / "out" / "b.onnx")
    assert names(tmp_path / "out") == ["a.onnx", "b.onnx", "b.onnx.data"]


# ------------------------------------------------------------------------------ folded weights spill
@pytest.fixture
def no_budget(monkeypatch):
    """Every folded weight goes to the scratch file, as past IN_MEMORY_BUDGET in a large model."""
    monkeypatch.setattr(mapped, "IN_MEMORY_BUDGET", 0)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_spilled_weights_give_the_same_bytes(tmp_path, model, monkeypatch, external):
    path = tmp_path / "m.onnx"
    save_external(model, path) if external else onnx.save(model, path)
    (tmp_path / "kept").mkdir()
    (tmp_path / "spilled").mkdir()
    fold_file(path, tmp_path / "kept" / "o.onnx")
    monkeypatch.setattr(mapped, "IN_MEMORY_BUDGET", 0)
    fold_file(path, tmp_path / "spilled" / "o.onnx")
    assert names(tmp_path / "kept") == names(tmp_path / "spilled")
    for name in names(tmp_path / "kept"):
        assert (tmp_path / "kept" / name).read_bytes() == (tmp_path / "spilled" / name).read_bytes(), name


def bn_conv_bn_conv(rng, channels: int = 16) -> onnx.ModelProto:
    """x -> BN0 -> Conv(W1, b1, unpadded) -> BN -> Relu -> Conv(W2): BN0 folds forward into conv1,
    BN back into it, so W1 is written twice."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (channels, channels, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.5, channels).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (channels, channels, 3, 3)).astype(np.float32), "W2"),
             *bn_initializers(bn_stats(rng, channels), np.float32),
             *bn_initializers(bn_stats(rng, channels), np.float32, prefix="bn0")]
    nodes = [bn_node("x", "x0", prefix="bn0"),
             helper.make_node("Conv", ["x0", "W1", "b1"], ["c1"], name="conv1"),
             bn_node("c1", "n1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [tensor("x", np.float32, [1, channels, 5, 5])], [tensor("y", np.float32, None)], inits)


def test_a_folded_weight_past_the_budget_waits_in_the_scratch_file(tmp_path, rng, no_budget):
    """W1, folded twice, is stored twice: the second copy starts on a page boundary after the first
    (so that a filesystem may share its blocks with the output's). The file has no name."""
    from bnfold.fold import fold_in_place
    model = bn_conv_bn_conv(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    (tmp_path / "scratch").mkdir()
    loaded, source = open_model(path, scratch_dir=tmp_path / "scratch")
    try:
        fold_in_place(loaded, source=source)
        w1 = next(t for t in loaded.graph.initializer if t.name == "W1")
        key, start, end = source.span(w1)
        assert is_stub(w1) and key == SCRATCH and not w1.HasField("raw_data")
        assert start == mmap.PAGESIZE * -(-9216 // mmap.PAGESIZE) and end - start == 9216
        expected, _ = fold_model(model)
        folded_w1 = next(t for t in expected.graph.initializer if t.name == "W1")
        np.testing.assert_array_equal(source.array(w1), numpy_helper.to_array(folded_w1))
        assert names(tmp_path / "scratch") == []
    finally:
        source.close()


def test_a_weight_folded_twice_is_read_back_from_the_scratch_file(tmp_path, rng, monkeypatch):
    """BN -> Conv -> BN: the second fold reads the weight the first one spilled."""
    model = bn_conv_bn_conv(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    fold_file(path, tmp_path / "kept.onnx")
    monkeypatch.setattr(mapped, "IN_MEMORY_BUDGET", 0)
    report = fold_file(path, tmp_path / "spilled.onnx")
    assert report.folded == 2
    assert (tmp_path / "kept.onnx").read_bytes() == (tmp_path / "spilled.onnx").read_bytes()
    assert_same_function(model, onnx.load(tmp_path / "spilled.onnx"))


# -------------------------------------------------------------------------------- bad entries
def _rewrite_entries(path, **changes) -> None:
    """Set (or, with None, remove) external_data entries of W1 in the model file at `path`."""
    model = bare_model(path)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    entries = {e.key: e.value for e in w1.external_data}
    entries.update(changes)
    del w1.external_data[:]
    for key, value in entries.items():
        if value is not None:
            entry = w1.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, path)


BAD_ENTRIES = {
    "no-location": ({"location": None}, "external data of W1 has no location"),
    "nul-in-location": ({"location": "w\0.bin"}, "external data of W1 has an invalid location"),
    "negative-offset": ({"offset": "-4"}, "invalid offset '-4'"),
    "text-length": ({"length": "lots"}, "invalid length 'lots'"),
    "past-the-end": ({"offset": "100000000"}, "lie past the end of weights.bin"),
    "every-digit": ({"offset": "1234567890"}, "bytes 1234567890 to 1234577106 lie past the end of weights.bin"),
    "length-past-the-end": ({"offset": "0", "length": "100000000"},
                            "bytes 0 to 100000000 lie past the end of weights.bin"),
    "short-length": ({"length": "1024"}, "1024 bytes in weights.bin, but its shape and type need 9216 bytes"),
    "missing-file": ({"location": "nowhere.bin"}, "cannot open nowhere.bin (No such file or directory)"),
    "a-folder": ({"location": "sub"}, "sub is not a regular file"),
}


@pytest.mark.parametrize("changes, message", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_a_bad_external_data_entry_is_one_line(tmp_path, model, capsys, changes, message):
    """Each refusal of where the bytes are says where they must be (the note); a length that does
    not fit the shape is about the tensor, not its file, and has none."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    (tmp_path / "sub").mkdir()
    _rewrite_entries(path, **changes)
    before = sorted(p.name for p in tmp_path.iterdir())
    note = None if "shape and type need" in message else NOTE
    for loader in (open_model, load_model):
        with pytest.raises(BnfoldError, match=re.escape(message)) as error:
            loader(path, check=False) if loader is load_model else loader(path)
        assert error.value.note == note
    assert main(["fold", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnfold: error: {path}: external data of W1") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_length_may_be_left_out(tmp_path, model):
    """Without a length a tensor's values run to the end of the file (the last tensor here)."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    bare = bare_model(path)
    w1 = next(t for t in bare.graph.initializer if t.name == "W1")
    (tmp_path / "w1.bin").write_bytes(b"\0" * 8 + w1.raw_data)
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w1.bin"), ("offset", "8")):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(bare, path)
    assert inline(load_model(path)) == model
    loaded, source = open_model(path)
    assert is_stub(next(t for t in loaded.graph.initializer if t.name == "W1"))
    source.close()


def test_a_tensor_with_external_data_and_values_in_the_model_file_is_refused(tmp_path, model):
    """The file checker's rule, kept when the checker only sees a weightless copy (the fold's path)."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    bare = bare_model(path)
    next(t for t in bare.graph.initializer if t.name == "W1").raw_data = b"\1" * 9216
    path.write_bytes(bare.SerializeToString())
    with pytest.raises(onnx.checker.ValidationError, match="stored externally"):
        onnx.checker.check_model(str(path))
    for loader in (open_model, lambda p: load_model(p, check=False)):
        with pytest.raises(BnfoldError) as error:
            loader(path)
        assert str(error.value) == (f"{path}: external data of W1: the tensor also holds values in the model file "
                                    "(the ONNX checker rejects a tensor stored externally with a data field)")


def test_values_in_a_typed_field_of_an_external_tensor_are_refused_too(tmp_path, model):
    """float_data counts as values in the model file, as raw_data does."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    bare = bare_model(path)
    next(t for t in bare.graph.initializer if t.name == "W1").float_data.extend([1.0] * 2304)
    path.write_bytes(bare.SerializeToString())
    with pytest.raises(BnfoldError, match="external data of W1: the tensor also holds values in the model file"):
        load_model(path, check=False)


# ------------------------------------------------------------------------------ copying unchanged bytes
def _short_copies(real):
    def copy(src, dst, count, offset_src=None, *args):
        return real(src, dst, min(count, 1000), offset_src, *args)
    return copy


def _unsupported(*args):
    raise OSError(18, "Invalid cross-device link")


@pytest.mark.parametrize("kernel_copy", ["short-copies", "unsupported", "missing"])
def test_unchanged_bytes_are_the_same_however_they_are_copied(tmp_path, model, monkeypatch, kernel_copy):
    """copy_file_range may copy less than asked, refuse (another filesystem) or not exist (not Linux):
    the fallback reads and writes in chunks (made small here so that it loops)."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    (tmp_path / "kernel").mkdir()
    (tmp_path / "other").mkdir()
    fold_file(path, tmp_path / "kernel" / "o.onnx")
    monkeypatch.setattr(mapped, "_COPY_CHUNK", 1000)
    if kernel_copy == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", _short_copies(os.copy_file_range)
                            if kernel_copy == "short-copies" else _unsupported)
    fold_file(path, tmp_path / "other" / "o.onnx")
    for name in ("o.onnx", "o.onnx.data"):
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "other" / name).read_bytes()


def test_a_source_that_ends_early_is_a_write_error(tmp_path, model):
    """A data file truncated after it was checked: the copy fails, nothing is written."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    loaded, source = open_model(path)
    os.truncate(tmp_path / "weights.bin", 100)
    try:
        with pytest.raises(BnfoldError, match="cannot write"):
            save_model(loaded, tmp_path / "o.onnx", source=source)
    finally:
        source.close()
    assert names(tmp_path) == ["m.onnx", "weights.bin"]


def test_large_model_benchmark_smoke_run(tmp_path, monkeypatch):
    """benchmarks/large_model.py end to end on small layers: it generates, measures and writes its table."""
    from tests.builders import load_benchmark
    large_model = load_benchmark("large_model")
    monkeypatch.setattr(large_model, "CHANNELS", 32)
    out = tmp_path / "LARGE.md"
    assert large_model.main(["--size-gb", "0.0005", "--rounds", "1", "--work", str(tmp_path),
                             "--output", str(out)]) == 0
    text = out.read_text()
    assert "| fold time <= 1.5x `cp -r` | all-folded |" in text
    assert "| peak RSS < 25% of model size | classifier |" in text
    assert names(tmp_path) == ["LARGE.md"]  # the generated models are gone


@pytest.mark.parametrize("external", [False, True], ids=["model-file", "external-data"])
def test_bfloat16_stubs_are_bfloat16(tmp_path, external):
    """Stubs are sized and read by bnfold.dtypes.numpy_dtype: 2 bytes a bfloat16, read as bfloat16
    (an onnx that maps BFLOAT16 to its float32 storage would refuse this valid model)."""
    import ml_dtypes
    values = np.arange(1024, dtype=np.float32).reshape(32, 32).astype(ml_dtypes.bfloat16)
    weight = TensorProto(name="W", data_type=TensorProto.BFLOAT16, dims=[32, 32], raw_data=values.tobytes())
    model = make_model([helper.make_node("Identity", ["W"], ["y"])], [],
                       [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [32, 32])], [weight])
    path = tmp_path / "m.onnx"
    save_external(model, path) if external else onnx.save(model, path)
    loaded, source = open_model(path)
    try:
        stub = loaded.graph.initializer[0]
        assert is_stub(stub)
        array = source.array(stub)
        assert array.dtype == ml_dtypes.bfloat16 and np.array_equal(array, values)
    finally:
        source.close()


def test_a_scratch_file_that_cannot_be_written_is_one_line(tmp_path, model, monkeypatch, capsys):
    """The scratch file goes in the output's folder (fold_file passes it); failing to create it is one line."""
    import tempfile
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(mapped, "IN_MEMORY_BUDGET", 0)
    created = tempfile.mkstemp

    def refuse_scratch(*args, dir=None, suffix=None, **kwargs):
        if suffix == ".scratch":
            assert dir == tmp_path / "out"
            raise FileNotFoundError(2, "No such file or directory", str(dir))
        return created(*args, dir=dir, suffix=suffix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse_scratch)
    (tmp_path / "out").mkdir()
    assert main(["fold", str(path), "-o", str(tmp_path / "out" / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnfold: error: {tmp_path / 'out'}: cannot write the scratch file of folded weights "
                          "(No such file or directory)") and err.count("\n") == 1
    assert names(tmp_path) == ["m.onnx", "out"] and list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_a_fold_that_passes_2_gb_writes_external_data(tmp_path, rng):
    """A 1.07 GB weight shared by two Conv+BN pairs: each fold gets its own copy (a shared weight is
    never changed in place), so the output holds 2.15 GB and must go to OUT.data, unasked. Real
    sizes; test_io monkeypatches the limit instead."""
    from bnfold.io import write_model
    from bnfold.wire import GRAPH, INITIALIZER, RAW_DATA, record_prefix
    channels = 16384
    inits = [*bn_initializers(bn_stats(rng, channels), np.float32, "bn1"),
             *bn_initializers(bn_stats(rng, channels), np.float32, "bn2")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"), bn_node("c1", "y1", prefix="bn1"),
             helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2"), bn_node("c2", "y2", prefix="bn2")]
    graph = helper.make_graph(nodes, "shared", [tensor("x", np.float32, [1, channels, 1, 1])],
                              [tensor(y, np.float32, [1, channels, 1, 1]) for y in ("y1", "y2")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    header = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[channels, channels, 1, 1]).SerializeToString()
    size = channels * channels * 4
    body = header + record_prefix(RAW_DATA, size)
    inner = record_prefix(INITIALIZER, len(body) + size)
    path = tmp_path / "m.onnx"
    with open(path, "wb") as handle:  # W streamed in rows: the test holds no 1 GB buffer
        write_model(model, handle)
        handle.write(record_prefix(GRAPH, len(inner) + len(body) + size) + inner + body)
        for _ in range(channels // 1024):
            handle.write(rng.standard_normal(1024 * channels, dtype=np.float32).tobytes())
    report = fold_file(path, tmp_path / "out.onnx")
    assert report.folded == 2
    assert names(tmp_path) == ["m.onnx", "out.onnx", "out.onnx.data"]
    assert (tmp_path / "out.onnx.data").stat().st_size > 2**31
    assert (tmp_path / "out.onnx").stat().st_size < 1 << 20
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


# ------------------------------------------------------------------------ spans, reads, tensors found
def _externalize(folder, tensors, name="w.bin") -> None:
    """Move each tensor's raw_data into `folder`/`name`, one after the other, and point it there."""
    with open(folder / name, "ab") as handle:
        for t in tensors:
            offset = handle.tell()
            handle.write(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", name), ("offset", offset), ("length", handle.tell() - offset)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)


def test_a_length_left_out_at_the_end_of_the_file_is_zero_bytes(tmp_path, model):
    """Without a length, an offset at the end of the file leaves 0 bytes: a length error, not a span past the end."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    bare = bare_model(path)
    w1 = next(t for t in bare.graph.initializer if t.name == "W1")
    _externalize(tmp_path, [w1], "w1.bin")
    del w1.external_data[1:]
    entry = w1.external_data.add()
    entry.key, entry.value = "offset", "9216"
    onnx.save(bare, path)
    with pytest.raises(BnfoldError, match=re.escape("W1: 0 bytes in w1.bin, but its shape and type need 9216 bytes")):
        load_model(path, check=False)


def test_a_negative_dimension_of_an_external_tensor_is_named(tmp_path, model):
    path = tmp_path / "m.onnx"
    save_external(model, path)
    bare = bare_model(path)
    next(t for t in bare.graph.initializer if t.name == "W1").dims[0] = -16
    onnx.save(bare, path)
    with pytest.raises(BnfoldError, match=re.escape("9216 bytes in weights.bin, but its shape and type need a "
                                                    "negative dimension")):
        open_model(path)


def test_an_unnamed_tensor_is_named_as_such(tmp_path):
    """A Constant's value has no name of its own: the error still says which kind of tensor it is."""
    value = numpy_helper.from_array(np.zeros(300, np.float32), "")
    model = make_model([helper.make_node("Constant", [], ["y"], value=value)], [], [tensor("y", np.float32, [300])], [])
    value = model.graph.node[0].attribute[0].t
    _externalize(tmp_path, [value])
    del value.external_data[0]  # the location
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(BnfoldError, match="external data of an unnamed tensor has no location"):
        load_model(tmp_path / "m.onnx", check=False)


def test_a_read_error_is_one_line_with_the_note(tmp_path, model, monkeypatch):
    path = tmp_path / "m.onnx"
    save_external(model, path)

    def failing(*args):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "pread", failing)
    with pytest.raises(BnfoldError) as error:
        load_model(path, check=False)
    assert str(error.value) == f"{path}: cannot read external data (Input/output error)"
    assert error.value.note == NOTE


def test_a_file_that_ends_while_being_read_is_one_line(tmp_path, model, monkeypatch):
    """Truncated after its size was checked: pread returns fewer bytes than the span."""
    path = tmp_path / "m.onnx"
    save_external(model, path)
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, count, offset: real(fd, count, offset)[:-1])
    with pytest.raises(BnfoldError) as error:
        load_model(path, check=False)
    assert str(error.value) == f"{path}: external data of W1: weights.bin ended while being read"
    assert error.value.note == NOTE


def test_only_main_graph_initializers_stay_mapped(tmp_path):
    """Sparse initializers, and a function's Constants and subgraph initializers, are read in, never
    stubs, even when large enough to map."""
    values = np.arange(300, dtype=np.float32)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(values, "S"),
                                       numpy_helper.from_array(np.arange(300, dtype=np.int64) * 2), [600])
    branch = helper.make_graph([helper.make_node("Add", ["k", "c"], ["t"])], "then", [],
                               [tensor("t", np.float32, [300])], [numpy_helper.from_array(values + 1, "k")])
    branch.node.insert(0, helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(values + 2, "c")))
    body = [helper.make_node("Constant", [], ["f"], value=numpy_helper.from_array(values + 3, "f")),
            helper.make_node("If", ["cond"], ["out"], then_branch=branch,
                             else_branch=helper.make_graph([helper.make_node("Identity", ["f"], ["e"])], "else", [],
                                                           [tensor("e", np.float32, [300])]))]
    function = helper.make_function("local", "F", ["cond"], ["out"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("F", ["cond"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [tensor("y", np.float32, [300])], sparse_initializer=[sparse])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    g = model.graph
    then = next(a.g for a in model.functions[0].node[1].attribute if a.name == "then_branch")
    inner = [g.sparse_initializer[0].values, g.sparse_initializer[0].indices, then.initializer[0],
             then.node[0].attribute[0].t, model.functions[0].node[0].attribute[0].t]
    _externalize(tmp_path, inner)
    onnx.save(model, tmp_path / "m.onnx")
    loaded, source = open_model(tmp_path / "m.onnx")
    if source is not None:
        source.close()
    assert loaded == expected


def test_the_data_file_layout_at_the_size_boundaries(tmp_path):
    """A payload of exactly STUB_MIN_BYTES leaves the model file (float_data too), small payloads follow
    each other with no padding, and one of exactly ALIGNMENT bytes starts on a multiple of it; a
    main-graph initializer of exactly STUB_MIN_BYTES stays mapped when read back."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(0, 1, n).astype(np.float32) for n in (256, 256, 1024))
    inits = [helper.make_tensor("A", TensorProto.FLOAT, [256], a), numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(c, "C")]
    model = make_model([helper.make_node("Identity", [x], [x.lower()]) for x in "ABC"], [],
                       [tensor("a", np.float32, [256]), tensor("b", np.float32, [256]), tensor("c", np.float32, [1024])],
                       inits)
    save_model(model, tmp_path / "out.onnx", external_data=True)
    spans = {t.name: {e.key: e.value for e in t.external_data} for t in bare_model(tmp_path / "out.onnx").graph.initializer}
    assert {name: (int(s["offset"]), int(s["length"])) for name, s in spans.items()} == \
        {"A": (0, 1024), "B": (1024, 1024), "C": (4096, 4096)}
    assert (tmp_path / "out.onnx.data").stat().st_size == 8192
    loaded, source = open_model(tmp_path / "out.onnx")
    try:
        assert [is_stub(t) for t in loaded.graph.initializer] == [True, True, True]
        for t, values in zip(loaded.graph.initializer, (a, b, c)):
            np.testing.assert_array_equal(source.array(t), values)
    finally:
        source.close()


def test_a_large_string_tensor_stays_in_the_model_file(tmp_path):
    """Strings have no raw_data form: however many there are, they are not moved to OUT.data."""
    words = np.array([f"word {i}".encode() for i in range(300)], dtype=object)
    model = make_model([helper.make_node("Identity", ["S"], ["y"])], [],
                       [helper.make_tensor_value_info("y", TensorProto.STRING, [300])],
                       [numpy_helper.from_array(words, "S")])
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert bare_model(tmp_path / "out.onnx").graph.initializer[0].data_location != TensorProto.EXTERNAL
    assert onnx.load(tmp_path / "out.onnx").graph.initializer[0] == model.graph.initializer[0]
