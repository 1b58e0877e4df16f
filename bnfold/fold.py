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
from typing import Iterable

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


def fold_model(model: onnx.ModelProto, *, exclude_nodes: Iterable[str] = (), assume_inference: bool = False,
               lower_standalone: str = "keep", reparameterize: bool = True) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold a copy of `model`; the caller's model is never changed. `assume_inference`,
    `lower_standalone` and `reparameterize` are FoldOptions' (bnfold.passes.base)."""
    options = fold_options(exclude_nodes, assume_inference, lower_standalone, reparameterize)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, fold_in_place(work, options)


def fold_options(exclude_nodes: Iterable[str] = (), assume_inference: bool = False,
                 lower_standalone: str = "keep", reparameterize: bool = True) -> FoldOptions:
    """FoldOptions, checked before any work (a bad value is a BnfoldError naming its option)."""
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
              reparameterize: bool = True, dry_run: bool = False, external_data: bool = False, verify=None) -> FoldReport:
    """Load, fold and atomically save a model. With dry_run nothing is written.

    `verify` (bnfold.verify.VerifyOptions) compares the folded model with the original before the
    output is renamed into place; on a mismatch it raises VerificationFailed and writes nothing.
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
        if not dry_run and output_path is not None:
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
