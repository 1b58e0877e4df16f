"""An interrupted `bnfold fold` (SIGINT, SIGTERM; one model or a folder with --jobs 2) leaves no
temporary file, no output and no folder it created, and exits 130 or 143 without a traceback
(design.md, Invariants 1).

Each case folds a model of a few hundred MB in a child process, waits until its temporary output
appears (the fold is then writing), and signals it. SIGINT to a single fold, whose path differs
from SIGTERM's only in the exception raised, runs with the slow cases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold.wire import GRAPH, INITIALIZER, RAW_DATA, record_prefix

ROOT = Path(__file__).resolve().parent.parent
LAYERS, WIDTH = 64, 1024  # 64 Conv weights of 4 MiB: 256 MiB


def write_large_model(path: Path) -> None:
    """x -> (Conv 1x1 -> BN) x LAYERS with WIDTH x WIDTH weights. The weights are appended as extra
    `graph` records (protobuf merges them, as bnfold.io.write_model does): encoding a model this size
    with protobuf would take longer than the test."""
    nodes, small = [], []
    x = "x"
    for i in range(LAYERS):
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        params = [f"bn{i}_{k}" for k in ("scale", "bias", "mean", "var")]
        small += [helper.make_tensor(name, TensorProto.FLOAT, [WIDTH], np.full(WIDTH, value, np.float32))
                  for name, value in zip(params, (1.5, 0.5, 0.25, 2.0))]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *params], [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    shape = [1, WIDTH, 1, 1]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    payload = np.full((WIDTH, WIDTH), 1.0 / WIDTH, np.float32).tobytes()
    with open(path, "wb") as out:
        out.write(model.SerializeToString())
        for i in range(LAYERS):
            header = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[WIDTH, WIDTH, 1, 1])
            body = header.SerializeToString() + record_prefix(RAW_DATA, len(payload))
            inner = record_prefix(INITIALIZER, len(body) + len(payload)) + body
            out.write(record_prefix(GRAPH, len(inner) + len(payload)) + inner)
            out.write(payload)


@pytest.fixture(scope="module")
def large_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("large") / "large.onnx"
    write_large_model(path)
    return path


def _interrupt(arguments: list[str], watched: Path, signum: int, *, group: bool = False) -> tuple[int, str]:
    """Run `bnfold ARGUMENTS`, send `signum` once a temporary file shows in `watched` (to the whole
    process group with `group`, as a terminal's Ctrl-C does), and return the exit code and stderr."""
    child = subprocess.Popen([sys.executable, "-m", "bnfold", *arguments], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not _temporaries(watched):
            assert child.poll() is None, f"finished before writing anything: {child.stderr.read()}"
            time.sleep(0.005)
        if group:
            os.killpg(child.pid, signum)
        else:
            child.send_signal(signum)
        _, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    return child.returncode, err


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated"),
                                                pytest.param(signal.SIGINT, 130, "interrupted",
                                                             marks=pytest.mark.slow)])
def test_an_interrupted_fold_leaves_nothing(large_model, tmp_path, signum, code, said):
    out = tmp_path / "out"
    out.mkdir()
    before = large_model.stat()
    returncode, err = _interrupt(["fold", str(large_model), "--out-dir", str(out)], out, signum)
    assert (returncode, err) == (code, f"bnfold: {said}\n")
    assert list(out.iterdir()) == []
    after = large_model.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("signum, code, group", [
    pytest.param(signal.SIGTERM, 143, False, id="SIGTERM to bnfold"),
    pytest.param(signal.SIGINT, 130, True, id="Ctrl-C to the process group")])
def test_an_interrupted_parallel_fold_of_a_folder_leaves_nothing(large_model, tmp_path, signum, code, group):
    """--jobs 2: bnfold stops its workers (SIGTERM to bnfold alone reaches them only through bnfold;
    Ctrl-C reaches all at once) and removes the subfolder it created for their outputs."""
    models, out = tmp_path / "models", tmp_path / "out"
    (models / "sub").mkdir(parents=True)
    out.mkdir()
    for name in ("a.onnx", "b.onnx"):
        os.link(large_model, models / "sub" / name)  # two models, one copy on disk
    returncode, err = _interrupt(["fold", str(models), "--out-dir", str(out), "--jobs", "2"], out, signum,
                                 group=group)
    assert returncode == code, err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []
