"""The fold driver: file or model in, the pass pipeline over it, model or file and report out.

``fold_model`` works on a copy of a ModelProto; ``fold_file`` loads a file (large weights stay mapped),
runs the pipeline, optionally verifies the staged output, and saves it atomically. The passes
themselves, and their order, are in :mod:`bnfold.passes`.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import onnx

from . import passes
from .errors import EXIT_CHECK_FAILED, BnfoldError
from .graph import ModelContext
from .io import check_output_path, load_model, open_model, save_model
from .mapped import MappedFile
from .passes import FoldOptions, PipelineState
from .passes.assume_inference import assumed_reference
from .passes.lower_standalone import check_lowering
from .reasons import INFERENCE_ASSUMED
from .report import FoldReport, op_counts

if TYPE_CHECKING:  # verify pulls in onnxruntime: imported only when a fold is verified
    from .verify import VerifyOptions


def fold_model(model: onnx.ModelProto, *, exclude_nodes: Iterable[str] = (), assume_inference: bool = False,
               lower_standalone: str = "keep", reparameterize: bool = True) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization of an in-memory model that folds exactly, into a copy.

    Use it when the model is already a ModelProto (built, edited or exported in this process);
    :func:`fold_file` is faster and leaner for files, since it keeps large weights mapped and checks
    the file first. The model is folded as it is: it is not run through onnx's checker.

    Args:
        model: The model to fold. It is copied first and never modified.
        exclude_nodes: Names of BatchNormalization nodes to leave as they are (reason
            ``excluded-by-user``); a list or set of names (one bare string is refused). Default: none.
        assume_inference: If True, rewrite each BN exported in training mode to normalize with its
            running statistics (reason ``inference-assumed``), so it can fold. This changes what the
            model computes, so it is off by default.
        lower_standalone: What becomes of a BN left unfolded: ``"keep"`` (the default) leaves it,
            ``"mul-add"`` rewrites it as ``Mul(x, scale)`` then ``Add(., shift)`` (reason ``lowered``).
        reparameterize: If True (the default), first merge parallel Conv / identity branches that sum
            into one output (RepVGG, MobileOne, ACNet...) into one Conv.

    Returns:
        A tuple ``(folded, report)``: the folded copy of `model`, and a :class:`bnfold.FoldReport`
        with one decision per BN and per pass (``report.folded``, ``report.total``,
        ``report.left_by_reason``); ``report.model`` is None.

    Raises:
        BnfoldError: `lower_standalone` is not ``"keep"`` or ``"mul-add"``, or `exclude_nodes` names
            a node that is not a BatchNormalization of the model (``error.option`` names the
            parameter). A model that onnx's full checker rejects may also fail with another exception
            (ValueError, TypeError, KeyError...): check it first with
            ``onnx.checker.check_model(model, full_check=True)``.
    """
    options = fold_options(exclude_nodes, assume_inference, lower_standalone, reparameterize)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, fold_in_place(work, options)


def fold_options(exclude_nodes: Iterable[str] = (), assume_inference: bool = False,
                 lower_standalone: str = "keep", reparameterize: bool = True) -> FoldOptions:
    """FoldOptions, checked before any work (a bad value is a BnfoldError naming its option)."""
    if isinstance(exclude_nodes, (str, bytes)):  # iterating it would exclude single characters
        raise BnfoldError(f"takes a list of node names, not the string {exclude_nodes!r}", option="exclude_nodes",
                          note=f"pass [{exclude_nodes!r}]")
    return FoldOptions(frozenset(exclude_nodes), bool(assume_inference), check_lowering(lower_standalone),
                       bool(reparameterize))


class VerificationFailed(BnfoldError):
    """`fold --verify` found the folded model computes something else; nothing was written."""

    def __init__(self, report: FoldReport):
        super().__init__(f"{report.model}: {_why_rejected(report)}; nothing was written",
                         note="see the verify report above; a BatchNormalization excluded by name is left "
                              "as it is", exit_code=EXIT_CHECK_FAILED)
        self.report = report

    def __reduce__(self):
        return type(self), (self.report,)


def _why_rejected(report: FoldReport) -> str:
    """What verification found: different values, or only NaN/Inf, which it never accepts (a model whose
    own outputs are not finite cannot be shown to compute the same)."""
    if report.verification is not None and report.verification.quantized is not None:
        return "the folded model differs from the original layer by layer"
    samples = report.verification.samples if report.verification is not None else ()
    failing = [c for sample in samples for c in sample.outputs if not c]
    if failing and all(c.problem is None and not c.mismatched for c in failing):
        return "the outputs hold NaN or Inf, which verification never accepts"
    return "the folded model's outputs differ from the original's"


def fold_file(input_path: str | os.PathLike, output_path: str | os.PathLike | None, *,
              exclude_nodes: Iterable[str] = (), assume_inference: bool = False, lower_standalone: str = "keep",
              reparameterize: bool = True, dry_run: bool = False, external_data: bool = False,
              verify: VerifyOptions | None = None) -> FoldReport:
    """Fold every BatchNormalization of a model file that folds exactly, and save the result atomically.

    The way to fold files: the input is checked (onnx's full checker) before anything is written,
    large weights stay memory-mapped (in the model file or its external data files) instead of being
    loaded, and the output is staged next to its target and renamed into place, so an error never
    leaves a partial file. With `verify`, the staged output is first compared with the input in
    onnxruntime and written only if every output matches. What `bnfold fold` runs for each model.

    Args:
        input_path: The ONNX model file to fold. It is never modified, unless it is also
            `output_path`.
        output_path: Where to write the folded model; an existing file is replaced. It may be
            `input_path` itself (fold in place): a model that nothing changed is then not rewritten
            and keeps its bytes and mtime. None writes nothing, like `dry_run`.
        exclude_nodes: Names of BatchNormalization nodes to leave as they are; a list or set of
            names (one bare string is refused). Default: none.
        assume_inference: If True, rewrite each BN exported in training mode to normalize with its
            running statistics, so it can fold; this changes what the model computes. Default False.
        lower_standalone: ``"keep"`` (the default) or ``"mul-add"``: as in :func:`fold_model`.
        reparameterize: If True (the default), first merge parallel Conv / identity branches into
            one Conv, as in :func:`fold_model`.
        dry_run: If True, fold and report (and verify, if asked) but write nothing. Default False.
        external_data: If True, write the output's initializers of 1 KiB or more to one data file
            next to it, ``<output file name>.data``. The output uses external data anyway when the
            input does or when it would pass 2 GB. Default False.
        verify: A :class:`bnfold.VerifyOptions`: compare the folded model with the original in
            onnxruntime (``bnfold.VerifyOptions()`` for the defaults) before it is written. None
            (the default) does not verify.

    Returns:
        A :class:`bnfold.FoldReport` of the fold: ``report.model`` is `input_path` as a string, and
        ``report.verification`` the :class:`bnfold.VerifyReport` when `verify` was given.

    Raises:
        VerificationFailed: With `verify`, the folded model's outputs differ from the original's or
            hold NaN or Inf. Nothing was written; ``error.report`` is the FoldReport, its
            ``verification`` the evidence; ``error.exit_code`` is 1. A subclass of BnfoldError.
        BnfoldError: The input is missing, empty, not an ONNX model, rejected by onnx's full
            checker, or its external data lies outside its folder; the output's folder does not
            exist, the output is a folder or would overwrite another file of the input (its external
            data), or cannot be written; an option is invalid (``error.option`` names it, as in
            :func:`fold_model`); with `verify`, an invalid VerifyOptions value, or onnxruntime cannot
            create a session for or run a model. Nothing was written.
    """
    options = fold_options(exclude_nodes, assume_inference, lower_standalone, reparameterize)
    writes = output_path is not None and not dry_run
    if writes:
        check_output_path(output_path)  # before any work, and the scratch file goes on its filesystem
    model, source = open_model(input_path, scratch_dir=Path(output_path).parent if writes else None)
    try:
        report = fold_in_place(model, options, source=source)
        report.model = str(input_path)
        accept = None
        if verify is not None:
            accept = partial(_verify_staged, input_path, output_path, verify, report, options)
        if writes and not left_as_it_is(report, input_path, output_path, external_data):
            save_model(model, output_path, external_data=external_data, source=source, accept=accept)
        elif accept is not None:
            with tempfile.TemporaryDirectory(prefix="bnfold-") as folder:
                save_model(model, Path(folder) / "folded.onnx", external_data=external_data, source=source,
                           accept=accept)
    finally:
        del model
        if source is not None:
            source.close()
    return report


def left_as_it_is(report: FoldReport, input_path, output_path, external_data: bool) -> bool:
    """A model no pass changed, written over itself, is not written at all: the file keeps its bytes,
    inode and mtime, so pre-commit hooks and build tools see no change. Not when external data is asked
    for (a new layout). A last link in either path is not followed (lstat): a link folded in place stays
    a link, and an output that is a link to the input is replaced, as any link at an output is."""
    if external_data or any(result.modified for result in report.passes):
        return False
    try:
        given, target = os.lstat(input_path), os.lstat(output_path)
    except OSError:
        return False
    return (given.st_dev, given.st_ino) == (target.st_dev, target.st_ino)


def _verify_staged(original, output_path, options, report: FoldReport, fold_options: FoldOptions,
                   staged: Path) -> None:
    from .verify import verify_models
    reference = original
    if any(d.reason == INFERENCE_ASSUMED for result in report.passes for d in result.decisions):
        reference = assumed_reference(load_model(original, check=False), fold_options)
    verification = verify_models(reference, staged, options, candidate_label=str(output_path or "(not written)"))
    report.verification = verification
    if not verification:
        raise VerificationFailed(report)


def fold_in_place(model: onnx.ModelProto, options: FoldOptions = FoldOptions(), *,
                  source: MappedFile | None = None) -> FoldReport:
    """Run the pipeline (bnfold.passes.PIPELINE) over `model` itself, no copy: the fast path for files,
    where bnfold owns the loaded model. `source` is the mapped file that stub initializers point into
    (see bnfold.mapped)."""
    state = PipelineState(model, ModelContext(model, source), options)
    counts_before = op_counts(model)
    results = passes.run_pipeline(state)
    return FoldReport(passes=results, counts_before=counts_before, counts_after=op_counts(model))
