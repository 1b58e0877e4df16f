"""Fuzz: seeded mutations of the sample models (tests/fuzzing.py) through `inspect`, `fold` and
`fold --verify`, in process.

Every case must end in success or one clean error line (exit 1 or 2), never a traceback, an internal
error (exit 3) or a library warning on stderr; an error leaves no output and no temporary file, the
input is never changed, and a written model passes onnx's full checker (design.md, Invariants 1 and 3).
A deadline per case catches hangs. The outcome classes are counted and printed.

The default seed and case count are fixed so that CI is reproducible; BNFOLD_FUZZ_SEED and
BNFOLD_FUZZ_CASES change them for longer runs. A failure names its case;
``python -m tests.fuzzing SEED INDEX OUT.onnx`` writes that case's model to a file.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import signal
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.cli import main
from bnfold.constants import NotConstant
from bnfold.graph import GraphIndex, ModelContext
from tests.fuzzing import Case, mutate, sample_bytes

SEED = int(os.environ.get("BNFOLD_FUZZ_SEED", "0"))
CASES = int(os.environ.get("BNFOLD_FUZZ_CASES", "300"))
DEADLINE_S = 30  # generous: catches a hang, not slowness
COMMANDS = {
    "inspect": lambda model, out: ["inspect", model],
    "fold --json": lambda model, out: ["fold", model, "-o", out, "--json"],
    "fold --verify": lambda model, out: ["fold", model, "-o", out, "--verify"],
}
ERROR = "bnfold: error: "
NOTE = "bnfold: note: "
MAX_SHOWN = 15  # failures listed in the assertion message


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs past its deadline; not an Exception, so that bnfold's own
    handlers cannot turn it into an error message."""


@contextmanager
def deadline(seconds: float):
    """Interrupt the block after `seconds`; if it is stuck outside Python, abort the process (with a
    traceback of every thread) after twice that, rather than hang CI. An alarm already set (pytest-timeout's)
    is set again afterwards with the time it had left."""
    def expire(signum, frame):
        raise CaseTimeout(f"over {seconds} s")
    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(2 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - started), 1e-3))


@dataclass
class Run:
    """One command's result: exit code, stdout, stderr (with any Python warning appended as a line)."""

    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str | None:
        lines = [line for line in self.stderr.splitlines() if line.startswith(ERROR)]
        return lines[-1] if lines else None


def run_cli(argv: list[str], capfd) -> Run:
    """bnfold.cli.main in process; stderr at the file-descriptor level (onnxruntime's C++ logs too)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capfd.readouterr()
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)  # what a user would see
    return Run(code, out, err)


def stderr_problems(run: Run) -> list[str]:
    """Notes may precede; an error is exactly one last line `bnfold: error: ...`; nothing else."""
    lines = run.stderr.splitlines()
    body = [line for line in lines if not line.startswith(NOTE)]
    if run.code == 0:
        return [f"stderr on success: {body}"] if body else []
    if len(body) != 1 or not body[0].startswith(ERROR) or lines[-1] != body[0]:
        return [f"stderr is not one error line: {lines}"]
    return []


def outcome_class(run: Run, model: str, out: str) -> str:
    """ok, or the exit code and the first words of the error, paths replaced by MODEL and OUT."""
    if run.code == 0:
        return "ok"
    line = run.error_line() or "(no error line)"
    text = line[len(ERROR):].replace(model, "MODEL").replace(out, "OUT")
    text = re.sub(r"^(MODEL|OUT|reference|candidate): ", "", text)
    words = re.split(r"[:(]", text, maxsplit=1)[0].split()[:6]
    return f"exit {run.code}: {' '.join(words)}"


@dataclass
class CaseResult:
    """A case's outcome class per command, what went wrong, and how long its commands took."""

    classes: dict[str, str]
    problems: list[str]
    seconds: float


def run_case(case: Case, folder: Path, capfd) -> CaseResult:
    """Run every command on the case in `folder` (model in in/, output to out/) and check each."""
    source, outputs = folder / "in" / "model.onnx", folder / "out"
    source.parent.mkdir(exist_ok=True)
    outputs.mkdir(exist_ok=True)
    source.write_bytes(case.data)
    target = outputs / "folded.onnx"
    capfd.readouterr()  # what came before is not the commands'
    classes, problems, runs = {}, [], {}
    started = time.monotonic()
    try:
        with deadline(DEADLINE_S):
            for command, argv in COMMANDS.items():
                run = runs[command] = run_cli(argv(str(source), str(target)), capfd)
                classes[command] = outcome_class(run, str(source), str(target))
                problems += [f"{command}: {p}" for p in command_problems(command, run, target, outputs)]
                _clear(outputs)
    except CaseTimeout:
        problems.append(f"no result after {time.monotonic() - started:.0f} s (deadline {DEADLINE_S} s)")
        _clear(outputs)
    seconds = time.monotonic() - started
    if source.read_bytes() != case.data:
        problems.append("the input file was changed")
    return CaseResult(classes, problems or consistency_problems(runs), seconds)


def command_problems(command: str, run: Run, target: Path, outputs: Path) -> list[str]:
    problems = [f"exit {run.code}"] if run.code not in (0, 1, 2) else []
    if run.code == 1 and command != "fold --verify":
        problems.append("exit 1 (a check failed) without a check")
    problems += stderr_problems(run)
    if command.endswith("--json") and run.code == 0:
        problems += json_problems(run.stdout)
    written = sorted(p.name for p in outputs.iterdir())
    expected = [target.name] if run.code == 0 and command != "inspect" else []
    if written != expected:
        problems.append(f"output folder holds {written}, expected {expected}")
    elif expected:
        try:
            onnx.checker.check_model(str(target), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            problems.append(f"the written model fails the checker: {str(exc).splitlines()[0]}")
    return problems


def json_problems(stdout: str) -> list[str]:
    """--json prints one strict JSON document (no NaN or Infinity, which JSON does not have)."""
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")
    try:
        json.loads(stdout, parse_constant=reject)
    except ValueError as exc:
        return [f"stdout is not one JSON document: {exc}"]
    return []


def consistency_problems(runs: dict[str, Run]) -> list[str]:
    """inspect and fold run the same loading and pipeline: they refuse the same models, with the same
    message; fold --verify refuses at least those."""
    if len(runs) < len(COMMANDS):
        return []
    inspect, fold, verify = runs["inspect"], runs["fold --json"], runs["fold --verify"]
    problems = []
    if (inspect.code, inspect.error_line()) != (fold.code, fold.error_line()):
        problems.append(f"inspect and fold disagree: {inspect.error_line()} / {fold.error_line()}")
    if fold.code != 0 and (verify.code, verify.error_line()) != (fold.code, fold.error_line()):
        problems.append(f"fold refused but fold --verify said: {verify.error_line()}")
    return problems


def _clear(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def counts_table(counts: dict[str, Counter]) -> str:
    classes = sorted({c for counter in counts.values() for c in counter}, key=lambda c: (c != "ok", c))
    width = max(len(c) for c in classes)
    header = f"{'outcome':<{width}}  " + "  ".join(f"{c:>13}" for c in COMMANDS)
    rows = [f"{c:<{width}}  " + "  ".join(f"{counts[cmd][c]:>13}" for cmd in COMMANDS) for c in classes]
    total = f"{'total':<{width}}  " + "  ".join(f"{sum(counts[cmd].values()):>13}" for cmd in COMMANDS)
    return "\n".join([header, *rows, total])


def test_mutated_models_end_in_success_or_one_clean_error(tmp_path, capfd):
    counts = {command: Counter() for command in COMMANDS}
    failures, seconds = [], []
    for index in range(CASES):
        case = mutate(SEED, index)
        result = run_case(case, tmp_path, capfd)
        for command, outcome in result.classes.items():
            counts[command][outcome] += 1
        if result.problems:
            failures.append(f"{case.describe()}: " + " | ".join(result.problems))
        seconds.append(result.seconds)
    with capfd.disabled():
        print(f"\nfuzz: seed {SEED}, {CASES} cases in {sum(seconds):.0f} s (slowest {max(seconds):.1f} s), "
              f"{len(failures)} failing\n{counts_table(counts)}")
    assert all(sum(counter.values()) == CASES for counter in counts.values()) or failures
    assert not failures, "\n".join(failures[:MAX_SHOWN] + [f"{len(failures)} failing cases in all"])


# ------------------------------------------------------------------------------ found by fuzzing
# Each model the fuzzer broke bnfold with, rebuilt by an explicit edit of a committed sample (case
# numbers change whenever the generator does), and the outcome class it must have now.
def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _attribute(node, name):
    return next(a for a in node.attribute if a.name == name)


def _swap_inputs(node, a, b):
    node.input[a], node.input[b] = node.input[b], node.input[a]


def _on_model(edit):
    """A byte edit made of an edit of the parsed model."""
    def apply(data: bytes) -> bytes:
        model = onnx.load_from_string(data)
        edit(model)
        return model.SerializeToString()
    return apply


def _replace(old: bytes, new: bytes):
    """A byte edit: the first `old` becomes `new` (same length: no protobuf length changes)."""
    return lambda data: data.replace(old, new, 1)


def _expand_to_a_weight(model):
    _swap_inputs(_node(model, "node_Expand_192"), 0, 1)


def _auto_pad_and_pads(model):
    _attribute(_node(model, "node_conv2d_3"), "auto_pad").s = b"SAME_UPPER"


def _negative_input_dim(model):
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -1


def _no_outputs(model):
    model.graph.ClearField("output")


def _unknown_data_type(model):
    _initializer(model, "3.bias").data_type = 99


def _raw_data_longer(name: str, extra: int):
    def edit(model):
        _initializer(model, name).raw_data += bytes(extra)
    return edit


def _value_info_contradicts_weight(model):
    declared = next(v for v in model.graph.value_info if v.name == "10.weight")
    declared.type.tensor_type.shape.dim[1].dim_value = 0


def _bias_as_conv_weight(model):
    _swap_inputs(_node(model, "node_conv2d_1"), 1, 2)


def _two_dim_conv_bias(model):
    _attribute(_node(model, "node_Shape_8"), "end").i = 2  # the Shape that the Expand of the zero bias reads


REGRESSIONS = {  # name: (sample, byte edit, outcome class (prefix) per command)
    # constant evaluation: Expand to a "shape" that is a float weight made numpy raise RuntimeError
    "expand-to-a-weight": ("resnet_small", _on_model(_expand_to_a_weight), {"fold --json": "ok"}),
    # onnxruntime logged its own error on stderr before bnfold's line
    "auto-pad-and-pads": ("mobilenetv2_small", _on_model(_auto_pad_and_pads),
                          {"fold --verify": "exit 2: onnxruntime cannot create a session"}),
    # generating inputs of a negative declared dim made numpy raise
    "negative-input-dim": ("resnet_small_opset9", _on_model(_negative_input_dim),
                           {"fold --verify": "exit 2: input 'input' declares a negative dim"}),
    # verify compared nothing: a model without outputs passed
    "no-outputs": ("preact_block", _on_model(_no_outputs),
                   {"fold --verify": "exit 2: the model declares no outputs"}),
    # onnx's checker raises ValueError for an unknown element type
    "unknown-data-type": ("video_conv3d", _on_model(_unknown_data_type), {"fold --json": "exit 2"}),
    # ... and UnicodeDecodeError when its message quotes a name that is not UTF-8
    "op-type-not-utf8": ("video_conv3d", _replace(b'"\x04Gemm', b'"\x04Ge\xffm'), {"fold --json": "exit 2"}),
    # protobuf gives a name that is not UTF-8 as bytes, which the report's table and JSON cannot show
    "node-name-not-utf8": ("video_conv3d", _replace(b"\x15/1/BatchNorm", b"\x15/1/\xc2atchNorm"),
                           {"inspect": "exit 2"}),
    # onnx's checker only refuses raw_data too short for the dims; numpy cannot reshape a longer one
    "raw-data-too-long": ("shared_conv_opset13", _on_model(_raw_data_longer("bn_a.running_mean", 4)),
                          {"fold --json": "exit 2"}),
    "raw-data-not-whole-elements": ("shared_conv_opset13", _on_model(_raw_data_longer("bn_a.running_var", 1)),
                                    {"fold --json": "exit 2"}),
    # a value_info contradicting a large (mapped) initializer passed bnfold's check, not the checker's
    "value-info-contradicts-weight": ("audio_conv1d", _on_model(_value_info_contradicts_weight),
                                      {"fold --json": "exit 2"}),
    # BN -> Conv whose weight input is its 1-D bias: the rule indexed a dim the weight lacks
    "bias-as-conv-weight": ("preact_block", _on_model(_bias_as_conv_weight), {"fold --json": "ok"}),
    # Conv -> BN with a 2-D bias: the fold's arithmetic could not broadcast it
    "two-dim-conv-bias": ("audio_conv1d", _on_model(_two_dim_conv_bias), {"fold --json": "ok"}),
}


@pytest.mark.parametrize("name", REGRESSIONS)
def test_model_found_by_fuzzing_ends_cleanly(name, tmp_path, capfd):
    sample, edit, expected = REGRESSIONS[name]
    result = run_case(Case(SEED, -1, sample, name, edit(sample_bytes()[sample])), tmp_path, capfd)
    assert not result.problems
    for command, outcome in expected.items():
        assert result.classes[command].startswith(outcome), (command, result.classes[command])


def test_expand_to_a_huge_constant_is_refused_before_it_is_allocated():
    """A few bytes of model can ask Expand for gigabytes: constant evaluation refuses past its limit
    (here 128 MiB, twice it) instead of allocating them."""
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
                    numpy_helper.from_array(np.array([32, 1 << 20], np.int64), "shape")]
    graph = helper.make_graph([helper.make_node("Expand", ["zero", "shape"], ["big"], name="expand")], "g", [], [],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(NotConstant, match="huge constant"):
        GraphIndex(model.graph, ModelContext(model)).constants.value("big")
