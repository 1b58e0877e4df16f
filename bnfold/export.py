"""Export a torch model to ONNX with every BatchNorm kept as a BatchNormalization node.

torch's exporters fold BatchNorm on their own, silently and depending on flags: the TorchScript
exporter fuses Conv+BN when it exports in eval mode, and the dynamo exporter's optimizer folds
Conv/Gemm+BN. bnfold wants the folds to be its own (reported, checked), so this module exports with
those fusions off — TorchScript with ``training=PRESERVE`` on an eval-mode model and no constant
folding; dynamo with ``optimize=False`` — and then counts: the number of inference-mode
BatchNormalization nodes in the ONNX graph (subgraphs included) must equal the number of inference
batch-norm calls torch made in one forward pass, or the export fails.

torch is imported here only, and lazily, so the rest of bnfold works without it.

Determinism: the weights, the randomized BN statistics and the reference inputs all come from
``seed``; the same call gives byte-identical files (the dynamo exporter's per-node stack traces,
which hold absolute paths of this machine, are removed).

Reference file (``reference=FILE.npz``): an uncompressed npz holding, for each ONNX graph input,
``input:<input name>`` — the float32 array the model was run on — and, for each ONNX graph output,
``output:<output name>`` — the eval-mode PyTorch result computed in float64 (the model and the input
converted with ``.double()``), the ground truth to compare the ONNX model and its folded version with.
Inputs are named ``input`` (or ``input_0``, ``input_1``, ... when there are several) and outputs
``output`` (or ``output_0``, ...), whatever the exporter would have chosen.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .batchnorm import is_inference_mode
from .errors import EXIT_CHECK_FAILED, BnfoldError, first_line
from .graph import all_graphs
from .io import atomic_output, check_model, check_output_path, save_model
from .runtime import create_session

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSET = 18  # the dynamo exporter's native opset; lower ones go through a version converter
_INSTALL_NOTE = "install the extra: pip install 'bnfold[torch]'"
_STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote: the files, the opset and the BatchNorm count check.

    Attributes:
        path: The ONNX file written.
        reference: The float64 reference ``.npz`` written, or None.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        opset: The model's default-domain opset.
        input_names: The graph's input names: ``input``, or ``input_0``, ``input_1``, ...
        output_names: The graph's output names: ``output``, or ``output_0``, ``output_1``, ...
        bn_calls: Inference-mode batch-norm calls torch made in one forward pass.
        bn_nodes: Inference-mode BatchNormalization nodes in the exported graph (at least `bn_calls`).
    """

    path: Path
    reference: Path | None
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    bn_calls: int  # inference-mode batch-norm calls torch made in one forward pass
    bn_nodes: int  # inference-mode BatchNormalization nodes in the exported graph

    def summary(self) -> str:
        """One line for the terminal."""
        line = (f"wrote {self.path} ({self.exporter} exporter, opset {self.opset}): {self.bn_nodes} "
                f"BatchNormalization nodes kept for {self.bn_calls} BatchNorm calls in forward")
        if self.reference:
            line += f"; float64 reference in {self.reference}"
        return line


def export_model(model: str | Callable[[], object], out_path: str | os.PathLike, *,
                 input_shapes: Sequence[Sequence[int]] | None = None, opset: int | None = None,
                 dynamic_batch: bool = False, exporter: str = DEFAULT_EXPORTER, randomize_bn: bool = False,
                 seed: int = 0, reference: str | os.PathLike | None = None) -> ExportResult:
    """Export a torch model to ONNX with every BatchNorm kept; optionally write a float64 reference.

    torch's exporters fold BatchNorm themselves, silently; this exports with those fusions off, so
    that bnfold's folds can be reported and checked, and fails unless the graph holds one
    inference-mode BatchNormalization per batch-norm call torch made. The export is run once in
    onnxruntime and compared with torch. Needs the torch extra (``pip install 'bnfold[torch]'``).
    The same arguments give byte-identical files.

    Args:
        model: A sample architecture's name (``"resnet_small"``; ``bnfold.export.sample_names()`` lists
            them), a ``"package.module:callable"`` string, or a callable (a factory, or an
            ``nn.Module`` class) returning an ``nn.Module``. It is built with weights seeded by
            `seed` and exported in eval mode.
        out_path: The ONNX file to write (atomically); its folder must exist.
        input_shapes: One shape per model input, e.g. ``[(1, 3, 224, 224)]``; positive integers.
            Default: the sample's shapes; any other model needs them.
        opset: The ONNX opset to write (default 18, the dynamo exporter's own).
        dynamic_batch: If True, the first dimension of every input and output is symbolic
            (``batch``). Default False.
        exporter: ``"dynamo"`` (the default) or ``"torchscript"``.
        randomize_bn: If True, give every BatchNorm random, reproducible statistics and affine
            parameters (a fresh BN is an identity that would hide a wrong fold). Default False.
        seed: Seed of the weights, the randomized statistics and the reference inputs (default 0).
        reference: If given, also write there an ``.npz`` with the float32 inputs (``input:NAME``)
            and the eval-mode float64 PyTorch outputs (``output:NAME``), for
            :func:`bnfold.verify_against_reference`. Default None.

    Returns:
        A :class:`bnfold.export.ExportResult`: the paths written, exporter, opset, input and output
        names, and the BatchNorm counts.

    Raises:
        BnfoldError: torch (or, for dynamo, onnxscript) is not installed; `exporter` is unknown;
            the exporter cannot write `opset`; `model` is not a sample name, or its module cannot
            be imported, or does not name a callable; building the model fails or does not return
            an ``nn.Module``; no input shapes are given for a model without defaults, or a dimension
            is not positive; the forward pass fails or does not return a tensor or a tuple of
            tensors; the exporter fails or writes a model onnx's checker rejects; an output's folder
            does not exist or a file cannot be written. With ``error.exit_code`` 1: the exported
            graph lost BatchNorms, or onnxruntime cannot run it or computes another output than
            torch. Nothing is written then.
    """
    torch = _import_torch(exporter)
    opset = DEFAULT_OPSET if opset is None else opset
    _check_opset(torch, exporter, opset)
    out_path = Path(out_path)
    reference = Path(reference) if reference is not None else None
    for target in (out_path, reference):
        if target is not None:
            check_output_path(target)  # fail before the (slow) export
    module, inputs = _prepare(torch, model, input_shapes, randomize_bn, seed)
    input_names = _names("input", len(inputs))
    bn_calls, outputs = _count_batchnorm_calls(torch, module, inputs)
    output_names = _names("output", len(outputs))
    proto = _export(torch, module, inputs, input_names, output_names, opset, exporter, dynamic_batch)
    _strip_stack_traces(proto)
    bn_nodes = _check_export(proto, opset, exporter, bn_calls, inputs, outputs, input_names)
    if reference is not None:
        write_npz(_reference_arrays(module, inputs, input_names, output_names), reference)
    save_model(proto, out_path)
    return ExportResult(out_path, reference, exporter, opset, tuple(input_names), tuple(output_names),
                        bn_calls, bn_nodes)


def sample_names() -> list[str]:
    """The names of the sample architectures (bnfold.zoo, which needs torch), in registry order."""
    return list(_samples())


def randomize_batchnorm(module, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, reproducibly from `seed`.

    A fresh BN (mean 0, var 1, gamma 1, beta 0) is an identity up to epsilon and hides a wrong fold.
    Here mean ~ N(0, 0.5^2), var = 10^U(-1.5, 1) (three decades), |gamma| ~ U(0.5, 1.5) with a
    negative sign one time in four, beta ~ N(0, 0.5^2).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            n = bn.num_features
            if bn.running_mean is not None:
                bn.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                bn.running_var.copy_(10 ** (2.5 * torch.rand(n, generator=generator) - 1.5))
            if bn.affine:
                sign = torch.where(torch.rand(n, generator=generator) < 0.25, -1.0, 1.0)
                bn.weight.copy_(sign * (0.5 + torch.rand(n, generator=generator)))
                bn.bias.copy_(0.5 * torch.randn(n, generator=generator))


def write_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write an uncompressed .npz atomically and reproducibly (fixed zip timestamps, sorted keys)."""
    with atomic_output(path) as staged:
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_STORED) as archive:
            for key in sorted(arrays):
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)


def count_batchnorm_nodes(model: onnx.ModelProto) -> int:
    """How many BatchNormalization nodes a model holds, subgraphs (If/Loop/Scan bodies) included."""
    return sum(n.op_type == "BatchNormalization" for n in _all_nodes(model.graph))


def _all_nodes(graph: onnx.GraphProto):
    """Every node of a graph and of the graphs nested in it."""
    return (node for sub in all_graphs(graph) for node in sub.node)


# ------------------------------------------------------------------------------- arguments and model
def _import_torch(exporter: str):
    """torch (and onnxscript for dynamo), or a one-line error saying how to install them."""
    if exporter not in EXPORTERS:
        raise BnfoldError(f"unknown exporter {exporter!r}", note=f"choose one of {', '.join(EXPORTERS)}",
                          option="exporter")
    try:
        import torch
        if exporter == "dynamo":
            import onnxscript  # noqa: F401  (the dynamo exporter needs it; say so before torch does)
    except ImportError as exc:
        raise BnfoldError(f"bnfold export needs {exc.name or 'torch'}, which is not installed",
                          note=_INSTALL_NOTE) from exc
    return torch


def _check_opset(torch, exporter: str, opset: int) -> None:
    """Refuse opsets the exporter cannot write before torch prints its own diagnostics."""
    constants = getattr(torch.onnx, "_constants", None)
    newest = onnx.defs.onnx_opset_version()
    if exporter == "torchscript":
        low, high = getattr(constants, "ONNX_MIN_OPSET", 7), getattr(constants, "ONNX_MAX_OPSET", newest)
    else:
        low, high = 7, newest
    if not low <= opset <= high:
        raise BnfoldError(f"the {exporter} exporter of torch {torch.__version__} cannot write opset {opset}",
                          note=f"choose an opset from {low} to {high}", option="opset")


def _samples() -> dict:
    """The sample architectures by name (bnfold.zoo imports torch: only export needs them)."""
    from .zoo import SAMPLES

    return SAMPLES


def _resolve(model) -> tuple[Callable, tuple[tuple[int, ...], ...] | None]:
    """(factory, default input shapes) for a sample name, a module:callable string or a callable."""
    if callable(model):
        return model, None
    if not isinstance(model, str):
        raise BnfoldError(f"cannot export {model!r}: give a sample name, module:callable, or a factory")
    if ":" in model:
        return _load_callable(model), None
    samples = _samples()
    if model not in samples:
        raise BnfoldError(f"unknown sample model {model!r}",
                          note=f"choose one of {', '.join(samples)}, or give module:callable")
    return samples[model].factory, samples[model].input_shapes


def _train_form(model) -> Callable | None:
    """For a sample that is a deploy twin, its train form's factory: the twin is made from the train form's
    seeded weights and randomized BNs, as `bnfold export` gives them to the train form itself."""
    if not isinstance(model, str) or ":" in model:
        return None
    return _samples()[model].train_form


def _load_callable(spec: str) -> Callable:
    """Import ``package.module:attr.attr`` and return the callable it names."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise BnfoldError(f"bad model spec {spec!r}", note="write module:callable, e.g. mypkg.models:build")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or any error raised while importing user code
        raise BnfoldError(f"cannot import {module_name!r} ({type(exc).__name__}: {exc})",
                          note="the module must be importable from the current directory or sys.path") from exc
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise BnfoldError(f"{module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise BnfoldError(f"{spec!r} is not callable", note="name a function or class returning an nn.Module")
    return target


def _build(factory: Callable, model) -> object:
    """Call the factory; the result must be an nn.Module, returned in eval mode."""
    import torch

    try:
        module = factory()
    except Exception as exc:
        raise BnfoldError(f"building {_label(model)} failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(module, torch.nn.Module):
        raise BnfoldError(f"{_label(model)} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _prepare(torch, model, input_shapes, randomize_bn: bool, seed: int):
    """The eval-mode module (weights seeded, BN randomized if asked) and its seeded float32 inputs."""
    factory, default_shapes = _resolve(model)
    shapes = _check_shapes(input_shapes or default_shapes, model)
    train_form = _train_form(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _build(train_form or factory, model)
    if randomize_bn:
        randomize_batchnorm(module, seed)
    if train_form is not None:
        from .zoo import deploy

        module = deploy(module).eval()
    generator = torch.Generator().manual_seed(seed)
    return module, tuple(torch.randn(shape, generator=generator) for shape in shapes)


def _check_shapes(shapes, model) -> list[tuple[int, ...]]:
    if not shapes:
        raise BnfoldError(f"{_label(model)} has no default input shape", note="give one, e.g. 1x3x224x224",
                          option="input_shapes")
    result = [tuple(int(d) for d in shape) for shape in shapes]
    if any(not shape or min(shape) < 1 for shape in result):
        raise BnfoldError(f"bad input shapes {result}", note="every dimension must be a positive integer",
                          option="input_shapes")
    return result


def _label(model) -> str:
    return model if isinstance(model, str) else getattr(model, "__qualname__", repr(model))


def _names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


# ------------------------------------------------------------------------------------- forward passes
def _count_batchnorm_calls(torch, module, inputs) -> tuple[int, list]:
    """Run one float32 forward; count batch_norm calls that use running statistics (inference).

    Counted at the functional level, so BN modules, a module called twice and direct
    ``F.batch_norm`` calls all count as the exporter sees them.
    """
    from torch.overrides import TorchFunctionMode

    batch_norm = torch.nn.functional.batch_norm

    class Counter(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is batch_norm:
                training = kwargs.get("training", args[5] if len(args) > 5 else False)
                running_mean = kwargs.get("running_mean", args[1] if len(args) > 1 else None)
                self.calls += int(running_mean is not None and not training)
            return func(*args, **kwargs)

    counter = Counter()
    try:
        with torch.no_grad(), counter:
            outputs = module(*inputs)
    except Exception as exc:
        raise BnfoldError(f"the model's forward pass failed on inputs of shapes "
                          f"{[tuple(x.shape) for x in inputs]} ({type(exc).__name__}: {exc})",
                          note="check the input shapes", option="input_shapes") from exc
    return counter.calls, _flat_outputs(torch, outputs)


def _flat_outputs(torch, outputs) -> list:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)) and outputs and all(isinstance(t, torch.Tensor) for t in outputs):
        return list(outputs)
    raise BnfoldError(f"the model returned {type(outputs).__name__}; bnfold export needs a tensor or a "
                      "tuple of tensors")


def _reference_arrays(module, inputs, input_names, output_names) -> dict[str, np.ndarray]:
    """The float32 inputs and the float64 eval-mode outputs of a double-precision copy of the model."""
    import torch

    double = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        outputs = _flat_outputs(torch, double(*(x.double() for x in inputs)))
    arrays = {f"input:{name}": x.numpy() for name, x in zip(input_names, inputs)}
    arrays.update({f"output:{name}": y.numpy() for name, y in zip(output_names, outputs)})
    return arrays


# ------------------------------------------------------------------------------------------- exporting
def _export(torch, module, inputs, input_names, output_names, opset, exporter, dynamic_batch) -> onnx.ModelProto:
    """Run torch's exporter with its BN fusions off; torch's chatter goes to stderr, not stdout."""
    with _quiet_torch():
        try:
            if exporter == "torchscript":
                return _export_torchscript(torch, module, inputs, input_names, output_names, opset, dynamic_batch)
            return _export_dynamo(torch, module, inputs, input_names, output_names, opset, dynamic_batch)
        except BnfoldError:
            raise
        except Exception as exc:
            raise BnfoldError(f"the {exporter} exporter failed: {first_line(exc)}",
                              note="try the other exporter", option="exporter") from exc


def _export_torchscript(torch, module, inputs, input_names, output_names, opset, dynamic_batch):
    """TorchScript export: PRESERVE keeps the eval mode but skips the eval-mode Conv+BN fusion."""
    axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None
    buffer = io.BytesIO()
    torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                      output_names=output_names, dynamic_axes=axes,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(torch, module, inputs, input_names, output_names, opset, dynamic_batch):
    """Dynamo export with its optimizer (which folds Conv/Gemm+BN) off."""
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in inputs)
    program = torch.onnx.export(module, inputs, None, dynamo=True, optimize=False, opset_version=opset,
                                input_names=input_names, output_names=output_names, dynamic_shapes=shapes,
                                verbose=False)
    return program.model_proto


@contextlib.contextmanager
def _quiet_torch():
    """Send the exporters' prints to stderr and keep their warnings and info logs out of the way."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _strip_stack_traces(proto: onnx.ModelProto) -> None:
    """Drop per-node stack traces: they hold this machine's absolute paths and break reproducibility."""
    for node in _all_nodes(proto.graph):
        kept = [p for p in node.metadata_props if p.key != _STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


# ----------------------------------------------------------------------------- checking the export
def _check_export(proto, opset: int, exporter: str, bn_calls: int, inputs, outputs, input_names) -> int:
    """Opset as asked, every BN kept, checker passes, output as torch's; the kept BN count."""
    import torch

    written = _default_opset(proto)
    if written != opset:  # the dynamo exporter silently keeps opset 18 when its converter fails
        raise BnfoldError(f"the {exporter} exporter of torch {torch.__version__} cannot write opset {opset} "
                          f"(it wrote opset {written})", note="choose another opset, or the other exporter",
                          option="opset")
    bn_nodes = _check_batchnorms(proto, bn_calls, exporter)
    check_model(proto)
    _check_runs(proto, inputs, outputs, input_names, exporter)
    return bn_nodes


def _check_batchnorms(proto: onnx.ModelProto, bn_calls: int, exporter: str) -> int:
    """Count inference BatchNormalization nodes; fail if the exporter dropped (folded) any."""
    nodes = [n for n in _all_nodes(proto.graph) if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
    inference = sum(is_inference_mode(n, _default_opset(proto)) for n in nodes)
    if inference < bn_calls:
        raise BnfoldError(f"the {exporter} exporter kept {inference} of {bn_calls} BatchNorms "
                          f"(it folded or removed {bn_calls - inference})",
                          note="try the other exporter; bnfold wants every BatchNorm in the graph",
                          exit_code=EXIT_CHECK_FAILED)
    return inference


def _check_runs(proto: onnx.ModelProto, inputs, outputs, input_names, exporter: str) -> None:
    """Run the export once in onnxruntime and compare with torch: exporters do write wrong models.

    The bound (1e-3 of the output's magnitude) is far above float32 rounding, which is ~1e-7 of it
    on the samples, and far below the error of a wrong graph; it is a sanity check, not `verify`.
    """
    feeds = {name: x.numpy() for name, x in zip(input_names, inputs)}
    try:
        session = create_session(proto, label="export", log_severity=4)
        got = list(session.run(feeds).values())
    except BnfoldError as exc:
        raise BnfoldError(f"the {exporter} exporter wrote a model that onnxruntime cannot run: "
                          f"{first_line(exc.__cause__ or exc)}", note="try the other exporter",
                          exit_code=EXIT_CHECK_FAILED) from exc
    for index, (expected, actual) in enumerate(zip(outputs, got)):
        expected = expected.numpy()
        error = float(np.max(np.abs(actual - expected), initial=0.0))
        if actual.shape != expected.shape or not error <= 1e-3 * (1.0 + float(np.max(np.abs(expected), initial=0.0))):
            raise BnfoldError(f"the {exporter} exporter wrote a model whose output {index} differs from torch's "
                              f"(shape {actual.shape} vs {expected.shape}, max abs error {error:.3g})",
                              note="try the other exporter", exit_code=EXIT_CHECK_FAILED)
