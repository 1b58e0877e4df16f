"""What bnfold reads and writes on disk: external data never read from outside the model's folder
(absolute, `..`, symlinks out), outputs never written through a symlink or over the input's files,
modes as a normal write gives them (--in-place keeps the input's), nothing left after a failure or an
interrupt."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest

from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.external import DataFile
from bnfold.fold import fold_file
from bnfold.io import load_model, open_model, save_model, write_text_atomic
from tests.test_external_data import bare_model, conv_bn_conv, inline, names, save_external

OUTSIDE = "outside the model's folder"


@pytest.fixture
def model(rng):
    return conv_bn_conv(rng)


@pytest.fixture
def folder(tmp_path):
    inside = tmp_path / "models"
    inside.mkdir()
    return inside


@pytest.fixture
def umask():
    """A umask that differs from the usual 022, so that modes show where they come from."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _point(path, tensor_name: str, location: str) -> None:
    model = bare_model(path)
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def opened(monkeypatch):
    """Every path os.open is asked for."""
    paths = []
    real = os.open

    def spy(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", spy)
    return paths


# ------------------------------------------------------------------------------- escaping locations
def _escapes(folder) -> dict[str, str]:
    """location -> how it escapes; each one names a real file outside the folder."""
    outside = folder.parent / "secret.bin"
    outside.write_bytes(b"\0" * 9216)
    (folder / "link.bin").symlink_to(outside)
    (folder.parent / "elsewhere").mkdir()
    (folder.parent / "elsewhere" / "w.bin").write_bytes(b"\0" * 9216)
    (folder / "door").symlink_to(folder.parent / "elsewhere", target_is_directory=True)
    return {"absolute": str(outside), "dot-dot": "../secret.bin", "dot-dot-inside": "sub/../../secret.bin",
            "symlink": "link.bin", "symlinked-folder": "door/w.bin"}


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "dot-dot-inside", "symlink", "symlinked-folder"])
def test_an_escaping_location_is_refused_before_any_read(folder, model, opened, capsys, kind):
    """W2's location escapes; W1's is fine. No external file is opened at all, not even W1's: every
    location is checked first."""
    path = folder / "m.onnx"
    save_external(model, path)
    location = _escapes(folder)[kind]
    _point(path, "W2", location)
    before = {p: p.read_bytes() for p in folder.parent.rglob("*") if p.is_file()}
    opened.clear()
    assert main(["fold", str(path), "-o", str(folder.parent / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == (f"bnfold: error: {path}: external data of W2 is at {location!r}, {OUTSIDE} "
                   "Note: external data files must sit next to the model, inside its folder\n")
    assert [p for p in opened if p != str(path.resolve())] == []
    for loader in (open_model, lambda p: load_model(p, check=False)):
        with pytest.raises(BnfoldError, match=OUTSIDE):
            loader(path)
    assert {p: p.read_bytes() for p in folder.parent.rglob("*") if p.is_file()} == before


def test_each_external_file_is_opened_once(folder, model, opened):
    """Every tensor of a one-file model shares weights.bin: one descriptor, one mapping."""
    path = folder / "m.onnx"
    save_external(model, path)
    opened.clear()
    loaded, source = open_model(path)
    source.close()
    assert opened.count(str((folder / "weights.bin").resolve())) == 1


def test_a_symlink_that_stays_inside_the_folder_is_followed(folder, model):
    path = folder / "m.onnx"
    save_external(model, path)
    (folder / "sub").mkdir()
    (folder / "sub" / "alias.bin").symlink_to(folder / "weights.bin")
    _point(path, "W2", "sub/alias.bin")
    assert inline(load_model(path, check=False)) == model
    fold_file(path, folder / "out.onnx")
    assert inline(onnx.load(folder / "out.onnx")).graph.initializer[2] == model.graph.initializer[2]


# ---------------------------------------------------------------------------- symlinks at the output
@pytest.mark.parametrize("external", [False, True], ids=["model", "model-and-data"])
def test_an_output_symlink_is_replaced_and_its_target_untouched(folder, model, external):
    path = folder / "m.onnx"
    save_external(model, path) if external else onnx.save(model, path)
    victims = {name: folder.parent / f"victim-{name}" for name in ("o.onnx", "o.onnx.data")}
    for name, victim in victims.items():
        victim.write_bytes(b"keep me")
        (folder / name).symlink_to(victim)
    fold_file(path, folder / "o.onnx")
    assert not (folder / "o.onnx").is_symlink()
    assert (folder / "o.onnx.data").is_symlink() != external
    assert all(victim.read_bytes() == b"keep me" for victim in victims.values())
    assert inline(onnx.load(folder / "o.onnx")).graph.initializer[2] == model.graph.initializer[2]


# ------------------------------------------------------------------------------------- the input's files
def test_writing_over_the_inputs_data_file_is_refused(folder, model, capsys):
    """x.onnx keeps its weights in o.onnx.data; folding it to o.onnx would overwrite them."""
    path = folder / "x.onnx"
    save_external(model, path, location="o.onnx.data")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["fold", str(path), "-o", str(folder / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnfold: error: {folder / 'o.onnx.data'}: is a file of the input model")
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_symlink_to_the_inputs_data_file_is_replaced_not_written_through(folder, model):
    path = folder / "x.onnx"
    save_external(model, path)
    (folder / "o.onnx.data").symlink_to(folder / "weights.bin")
    before = (folder / "weights.bin").read_bytes()
    fold_file(path, folder / "o.onnx")
    assert (folder / "weights.bin").read_bytes() == before and not (folder / "o.onnx.data").is_symlink()
    assert inline(load_model(path)) == model


def test_a_data_file_name_taken_by_a_folder_is_refused(folder, model):
    (folder / "o.onnx.data").mkdir()
    with pytest.raises(BnfoldError, match="o.onnx.data: is a directory"):
        save_model(model, folder / "o.onnx", external_data=True)
    assert names(folder) == ["o.onnx.data"]


@pytest.mark.parametrize("location", ["m.onnx.data", "weights.bin"])
def test_in_place_with_external_data(folder, model, location):
    """The input's own data file is replaced when it has OUT.data's name; another is left as it was."""
    path = folder / "m.onnx"
    save_external(model, path, location=location)
    old_data = (folder / location).read_bytes()
    assert main(["fold", str(path), "--in-place"]) == 0
    assert names(folder) == sorted({"m.onnx", "m.onnx.data", location})
    assert (folder / location).read_bytes() == old_data or location == "m.onnx.data"
    assert [n.op_type for n in onnx.load(path).graph.node] == ["Conv", "Relu", "Conv"]


# ------------------------------------------------------------------------------------------- modes
def test_new_outputs_and_reports_get_the_mode_of_a_normal_write(folder, model, umask):
    path = folder / "m.onnx"
    save_external(model, path)
    assert main(["fold", str(path), "-o", str(folder / "o.onnx"), "--report", str(folder / "r.json")]) == 0
    write_text_atomic(folder / "t.txt", "x")
    for name in ("o.onnx", "o.onnx.data", "r.json", "t.txt"):
        assert mode(folder / name) == 0o666 & ~umask, name


def test_a_replaced_output_keeps_its_mode_and_the_data_file_takes_the_models(folder, model, umask):
    path = folder / "m.onnx"
    save_external(model, path)
    for name, old_mode in (("o.onnx", 0o604), ("o.onnx.data", 0o600)):
        (folder / name).write_bytes(b"old")
        os.chmod(folder / name, old_mode)
    fold_file(path, folder / "o.onnx")
    assert mode(folder / "o.onnx") == mode(folder / "o.onnx.data") == 0o604


@pytest.mark.parametrize("external", [False, True], ids=["model", "model-and-data"])
@pytest.mark.parametrize("input_mode", [0o644, 0o640])
def test_in_place_keeps_the_inputs_mode(folder, model, umask, external, input_mode):
    path = folder / "m.onnx"
    save_external(model, path, location="m.onnx.data") if external else onnx.save(model, path)
    os.chmod(path, input_mode)
    assert main(["fold", str(path), "--in-place"]) == 0
    assert mode(path) == input_mode
    if external:
        assert mode(folder / "m.onnx.data") == input_mode


# ---------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")],
                         ids=["interrupt", "disk-full"])
def test_a_failure_half_way_through_the_data_leaves_the_input_and_nothing_else(folder, model, monkeypatch, failure):
    path = folder / "m.onnx"
    save_external(model, path, location="m.onnx.data")
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in folder.iterdir()}
    real_add, calls = DataFile.add, []

    def fails_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return real_add(self, *args)
    monkeypatch.setattr(DataFile, "add", fails_second)
    with pytest.raises(KeyboardInterrupt if failure is KeyboardInterrupt else BnfoldError):
        fold_file(path, path)
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in folder.iterdir()} == before


def test_the_caller_model_of_save_model_is_intact_after_a_failure(folder, model, monkeypatch):
    before = model.SerializeToString()

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(DataFile, "add", full)
    with pytest.raises(BnfoldError, match="No space left"):
        save_model(model, folder / "o.onnx", external_data=True)
    assert model.SerializeToString() == before and names(folder) == []
    assert np.frombuffer(model.graph.initializer[0].raw_data, np.float32).size == 16 * 16 * 9


def test_a_fifo_is_refused_without_waiting_for_a_writer(folder, model):
    """Opening a FIFO for reading blocks until someone writes: the open must not wait (the alarm
    turns a hang into a failure)."""
    import signal
    path = folder / "m.onnx"
    save_external(model, path)
    os.mkfifo(folder / "pipe")
    _point(path, "W2", "pipe")

    def hung(*args):
        raise TimeoutError("open_model waited on the FIFO")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(BnfoldError, match="external data of W2: pipe is not a regular file"):
            open_model(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_symlink_slipped_in_after_the_check_is_not_followed(folder, model, monkeypatch):
    """The location was checked inside the folder; if the file is then swapped for a symlink out of it
    before it is opened, the open refuses to follow it (O_NOFOLLOW) instead of reading outside."""
    path = folder / "m.onnx"
    save_external(model, path)
    (folder.parent / "secret.bin").write_bytes(bytes(20000))
    target, real = str((folder / "weights.bin").resolve()), os.open

    def swapped(name, *args, **kwargs):
        if os.fspath(name) == target and not os.path.islink(target):
            os.rename(target, target + ".moved")
            os.symlink(folder.parent / "secret.bin", target)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(os, "open", swapped)
    with pytest.raises(BnfoldError, match="external data of W1: cannot open weights.bin "
                                          r"\(Too many levels of symbolic links\)"):
        load_model(path, check=False)
