"""examples/dask_fold.py on a real local Dask cluster (2 worker processes): every model is folded and
verified as `bnfold fold --verify` does it, a corrupt file is reported without stopping the others, and
the cluster's processes are gone when it returns."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from multiprocessing import resource_tracker

import pytest

from bnfold.cli import main as bnfold_main

from .conftest import ROOT

dask = pytest.importorskip("dask")
pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")  # a dependency of distributed

SAMPLES = ROOT / "sample_models"
MODELS = {"mlp_bn1d.onnx": 2, "shared_conv.onnx": 2, "video_conv3d.onnx": 3, "nested/audio_conv1d.onnx": 4}
CORRUPT = "nested/corrupt.onnx"


@pytest.fixture(scope="module")
def example():
    """The script as a module. Not registered in sys.modules, so Dask pickles its task function by
    value, as it does when the script runs as __main__."""
    spec = importlib.util.spec_from_file_location("dask_fold", ROOT / "examples" / "dask_fold.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    for name in MODELS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / name.split("/")[-1], folder / name)
    (folder / CORRUPT).write_bytes(b"not a model")
    return folder


@pytest.fixture
def scratch(tmp_path):
    """Dask's scheduler and workers keep their scratch space in tmp_path, not the system temp folder."""
    with dask.config.set({"temporary-directory": str(tmp_path / "dask")}):
        yield tmp_path / "dask"


def _contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_model_is_folded_and_verified_like_the_cli_and_a_bad_one_is_reported(example, models, scratch,
                                                                                     tmp_path, capfd):
    inputs = _contents(models)
    resource_tracker.ensure_running()  # multiprocessing's helper, started once and kept for the process
    processes_before = set(psutil.Process().children(recursive=True))
    out = tmp_path / "out"
    code = example.main([str(models), str(out), "--workers", "2"])
    assert set(psutil.Process().children(recursive=True)) <= processes_before  # the cluster is shut down
    assert scratch.is_dir()
    assert code == 2  # the corrupt file is refused: bad input

    captured = capfd.readouterr()  # the workers' output too
    assert "Traceback" not in captured.err  # a refused file is a result, not a task that crashed
    lines = captured.out.splitlines()
    assert sorted(lines[:-1]) == sorted(
        [f"ok      {name}: folded {n} of {n} BatchNormalization, outputs match on 1 sample(s)"
         for name, n in MODELS.items()]
        + [f"failed  {CORRUPT}: {models / CORRUPT}: not an ONNX model (not a protobuf ModelProto)"])
    assert lines[-1] == "4 of 5 models folded and verified (11 of 11 BatchNormalization folded), 1 failed"

    assert _contents(models) == inputs
    written = _contents(out)
    assert sorted(written) == sorted(MODELS)  # nothing for the corrupt file, no temporary file left
    for name, data in written.items():
        expected = tmp_path / "cli" / name
        expected.parent.mkdir(parents=True, exist_ok=True)
        assert bnfold_main(["fold", str(models / name), "-o", str(expected), "--verify"]) == 0
        assert data == expected.read_bytes(), name


def test_a_running_cluster_is_used_and_left_running_and_its_broken_worker_named(example, models, scratch,
                                                                                tmp_path, capsys):
    """A worker that cannot import bnfold (here: a preload hides it) fails each task with the
    ImportError, reported per model; the tasks must not break the worker's connection and hang."""
    from distributed import Client, LocalCluster
    hide = tmp_path / "hide_bnfold.py"
    hide.write_text("import sys\nsys.modules['bnfold'] = None\n")
    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      preload=[str(hide)]) as cluster:
        assert example.main([str(models / "nested"), str(out), "--scheduler", cluster.scheduler_address]) == 3
        with Client(cluster) as client:  # still there for its owner
            assert len(client.scheduler_info()["workers"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines[:-1]) == [f"failed  {name}: internal error: ModuleNotFoundError: import of bnfold "
                                  "halted; None in sys.modules" for name in ("audio_conv1d.onnx", "corrupt.onnx")]
    assert lines[-1] == "0 of 2 models folded and verified (0 of 0 BatchNormalization folded), 2 failed"
    assert not out.exists()


def test_a_mismatch_and_an_internal_error_get_their_lines_and_exit_codes(example, tmp_path):
    from bnfold import VerifyOptions, fold_file
    from bnfold.fold import VerificationFailed
    with pytest.raises(VerificationFailed) as caught:
        fold_file(SAMPLES / "shared_conv_opset13.onnx", tmp_path / "out.onnx",
                  verify=VerifyOptions(atol=0.0, rtol=0.0))  # a correct fold still differs by ulps
    line = example.describe("m.onnx", caught.value)
    assert line.startswith("failed  m.onnx: the folded model's outputs differ, nothing written: ")
    assert "outside tolerance" in line
    assert example.exit_code(caught.value) == 1
    died = RuntimeError("worker died")
    assert example.describe("m.onnx", died) == "failed  m.onnx: internal error: RuntimeError: worker died"
    assert example.exit_code(died) == 3


@pytest.mark.parametrize("make_args, message", [
    (lambda models, tmp: [models / "missing", tmp / "out"], "not a folder"),
    (lambda models, tmp: [models, models / "out"], "must not contain one another"),
    (lambda models, tmp: [tmp / "out" / "models", tmp / "out"], "must not contain one another"),
    (lambda models, tmp: [models / "nested" / "empty", tmp / "out"], "no .onnx file in it"),
    (lambda models, tmp: [models, tmp / "out", "--workers", "0"], "at least 1"),
    (lambda models, tmp: [models, tmp / "out", "--scheduler", "tcp://h:8786", "--workers", "2"],
     "does not apply with --scheduler"),
])
def test_bad_arguments_are_one_line_errors_before_any_work(example, models, tmp_path, capsys, make_args,
                                                           message):
    (models / "nested" / "empty").mkdir()
    (tmp_path / "out" / "models").mkdir(parents=True)
    with pytest.raises(SystemExit) as caught:
        example.main([str(a) for a in make_args(models, tmp_path)])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not any((tmp_path / "out").rglob("*.onnx")) and not (models / "out").exists()


def test_without_dask_it_says_what_to_install(example, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(SystemExit) as caught:
        example.main([str(models), str(tmp_path / "out")])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        'dask_fold: error: needs Dask\'s distributed scheduler: pip install "bnfold[dask]"')
    assert not (tmp_path / "out").exists()
