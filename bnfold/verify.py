"""Numerical equivalence of two models, measured with onnxruntime: as a gate, and as a diagnosis.

Both models run in onnxruntime with graph optimizations disabled: onnxruntime fuses Conv+BatchNormalization
itself at session start, which would compare its fold with ours instead of the original with ours. They
get the same inputs (see :mod:`bnfold.inputs`) and every output is compared by name (see
:mod:`bnfold.compare` for the tolerance rule and its defaults per dtype). Results are objects that are
true when the models agree. On a mismatch, ``bisect`` names the first shared tensor that diverges (see
:mod:`bnfold.bisect`); :mod:`bnfold.verify_render` prints a report. Quantized models are judged layer by
layer instead, the final outputs shown for information (see :mod:`bnfold.verify_quantized`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import onnx

from .bisect import BisectResult, bisect_models
from .compare import DEFAULT_TOLERANCES, Comparison, Tolerance, compare_outputs, tolerance_for
from .errors import BnfoldError
from .inputs import (InputSpec, Sample, generate_samples, input_specs, load_samples, merge_specs,
                     plan_shapes)
from .io import load_model
from .runtime import create_session, file_or_proto, resolve_provider
from .schema import SCHEMA_VERSION
from .verify_quantized import Limits, QuantizedResult, check_limits, require_quantizers, verify_quantized

__all__ = ["DEFAULT_TOLERANCES", "Tolerance", "VerifyOptions", "SampleResult", "VerifyReport",
           "verify_models", "verify_against_reference"]

_RUN_NOTE = "if a symbolic dim got a default that does not fit, give the input's shape"


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify: where the inputs come from, the tolerance, the provider, and what to diagnose.

    Every field is optional; None means the documented default. An invalid value raises BnfoldError
    (``error.option`` names the field): the layer-by-layer settings (`max_steps` or `max_flipped`
    without `quantized`, `quantized` with `bisect`, a value out of range) at construction, the
    others when a verification starts.

    Attributes:
        inputs: An ``.npz`` file (keys: input names or ``input:NAME``), or a folder of them, one
            sample each, to feed instead of generated inputs. Excludes `shapes`, `samples`, `seed`.
        shapes: Input name -> shape, for inputs with symbolic dimensions. Otherwise a symbolic first
            dimension is the batch, verified at 1 and at 2, and any other symbolic dimension is 32.
        samples: Generated samples per batch size (default 1); at least 1.
        seed: Seed of the generated inputs (default 0); 0 or more.
        atol: Absolute tolerance for every output dtype, instead of the dtype's default
            (``bnfold.DEFAULT_TOLERANCES``; integers and bools must match exactly).
        rtol: Relative tolerance for every output dtype, likewise. An element passes when
            ``|a - b| <= atol + rtol * |a|``, `a` being the reference's value.
        provider: The onnxruntime execution provider (``"CUDAExecutionProvider"`` or ``"cuda"``);
            default the CPU.
        bisect: On a mismatch, find the first tensor both models compute that diverges
            (``VerifyReport.bisect``).
        quantized: Judge a quantized (Q/DQ) model quantizer by quantizer, not by its final outputs.
        max_steps: With `quantized`: how far, in quantization steps, a quantizer's input may move;
            finite and 0 or more (default 0.5).
        max_flipped: With `quantized`: the share of a quantizer's codes that may flip, from 0 to 1
            (default 0.01).
    """

    inputs: str | Path | None = None  # an .npz file or a folder of them
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    samples: int | None = None  # generated samples per batch value (default 1)
    seed: int | None = None  # default 0
    atol: float | None = None  # overrides the default of every dtype
    rtol: float | None = None
    provider: str | None = None  # default CPUExecutionProvider
    bisect: bool = False
    quantized: bool = False  # judge quantizers layer by layer (bnfold.verify_quantized)
    max_steps: float | None = None  # with `quantized`: default DEFAULT_MAX_STEPS
    max_flipped: float | None = None  # with `quantized`: default DEFAULT_MAX_FLIPPED

    def __post_init__(self):
        self.limits()

    def limits(self) -> Limits:
        """The limits of the layer-by-layer check; raises for limits given without it."""
        return check_limits(self.quantized, self.max_steps, self.max_flipped, self.bisect)

    def tolerance(self, dtype: str) -> Tolerance:
        """The tolerance for outputs of `dtype`: the dtype's default, with `atol`/`rtol` applied."""
        return tolerance_for(dtype, self.atol, self.rtol)

    def given(self, *names: str) -> list[str]:
        """Which of the options `names` are set (to say which ones do not apply)."""
        values = {"inputs": self.inputs, "shapes": self.shapes or None, "samples": self.samples,
                  "seed": self.seed, "bisect": self.bisect or None, "quantized": self.quantized or None}
        return [name for name in names if values[name] is not None]


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class SampleResult:
    """Every output compared on one input sample."""

    label: str
    input_shapes: Mapping[str, tuple[int, ...]]
    outputs: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {"label": self.label, "passed": self.passed,
                "inputs": {k: list(v) for k, v in self.input_shapes.items()},
                "outputs": [c.to_dict() for c in self.outputs]}


@dataclass(frozen=True)
class VerifyReport:
    """The verdict of a verification: true when every output of every sample passes.

    ``bool(report)`` (or `passed`) is the result; ``to_dict()`` is the JSON document of
    ``bnfold verify --json``.

    Attributes:
        reference: The reference model's path, or ``"reference (in memory)"``; for
            :func:`verify_against_reference`, the saved outputs' path.
        candidate: The candidate model's path (or its label).
        provider: The onnxruntime execution provider both models ran on.
        samples: One :class:`SampleResult` per input sample: every output's comparison (error
            statistics, tolerance, why it fails).
        notes: What was chosen for the caller, e.g. the sizes given to symbolic dimensions.
        bisect: With ``VerifyOptions(bisect=True)`` and a mismatch: the first shared tensor that
            diverges; else None.
        against_saved_outputs: True when the reference is saved outputs, not a model.
        quantized: With ``VerifyOptions(quantized=True)``: the quantizer-by-quantizer result, which
            is then the verdict (the outputs are for information); else None.
    """

    reference: str
    candidate: str
    provider: str
    samples: tuple[SampleResult, ...]
    notes: tuple[str, ...] = ()
    bisect: BisectResult | None = None
    against_saved_outputs: bool = False
    quantized: QuantizedResult | None = None  # when set, the verdict; the outputs are for information

    @property
    def passed(self) -> bool:
        return self.quantized.passed if self.quantized is not None else all(self.samples)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "passed": self.passed, "reference": self.reference,
                "candidate": self.candidate, "against_saved_outputs": self.against_saved_outputs,
                "provider": self.provider, "graph_optimizations": "disabled", "notes": list(self.notes),
                "samples": [s.to_dict() for s in self.samples],
                "bisect": self.bisect.to_dict() if self.bisect else None,
                "quantized": self.quantized.to_dict() if self.quantized is not None else None}


# --------------------------------------------------------------------------------------------- verify
def verify_models(reference: str | Path | onnx.ModelProto, candidate: str | Path | onnx.ModelProto,
                  options: VerifyOptions | None = None, *, candidate_label: str | None = None) -> VerifyReport:
    """Check that two models compute the same: run both in onnxruntime on the same inputs, compare outputs.

    The gate behind ``bnfold verify`` and ``fold --verify``: use it to prove that a folded (or
    otherwise rewritten) model still computes what the original does. Both run with graph
    optimizations disabled (onnxruntime's own Conv+BN fusion would hide a wrong fold), on seeded
    generated inputs (or those of `options.inputs`); every output is compared by name under the
    tolerance of its dtype. A mismatch is a result, not an error.

    Args:
        reference: The original model: a file path, or a ModelProto used as it is.
        candidate: The model to check against it: a file path, or a ModelProto. Files are read
            without onnx's checker (onnxruntime judges what runs).
        options: A :class:`bnfold.VerifyOptions`; None (the default) means ``VerifyOptions()``: one
            seeded sample per batch size, the dtype's default tolerances, the CPU provider.
        candidate_label: The name the report and errors give the candidate instead of its path
            (e.g. the output a staged copy will become). Default: the path, or
            ``"candidate (in memory)"``.

    Returns:
        A :class:`bnfold.VerifyReport` that is true when every output of every sample passes (with
        ``options.quantized``: when every quantizer passes); its samples hold each output's error
        statistics, and its ``bisect`` the first diverging tensor when ``options.bisect`` was set.

    Raises:
        BnfoldError: A model file is missing, empty or not an ONNX model; the reference declares no
            outputs; the models declare their inputs differently (names, dtypes, ranks); an option
            is invalid (``error.option`` names it: `inputs` together with `shapes`, `samples` or
            `seed`, `samples` < 1, `seed` < 0, a shape that does not fit, a provider onnxruntime
            does not have, `quantized` for a model without QuantizeLinear); the inputs file cannot
            be read or does not fit the models; onnxruntime cannot create a session for a model or
            fails to run it.
    """
    options = options or VerifyOptions()
    ref_model, ref_label = _load(reference, "reference")
    cand_model, cand_label = _load(candidate, "candidate")
    cand_label = candidate_label or cand_label
    if not ref_model.graph.output:  # every comparison would pass: nothing would be checked
        raise BnfoldError(f"{ref_label}: the model declares no outputs, so there is nothing to compare")
    if options.quantized:
        require_quantizers(ref_model, ref_label)
    specs = merge_specs(input_specs(ref_model), input_specs(cand_model))
    samples, notes = _samples(specs, options)
    provider = resolve_provider(options.provider)
    ref_session = create_session(file_or_proto(reference, ref_model), provider=provider,
                                 label=ref_label)
    cand_session = create_session(file_or_proto(candidate, cand_model), provider=provider,
                                  label=cand_label)
    results = tuple(SampleResult(s.label, _shapes(s), compare_outputs(_run(ref_session, s),
                                                                     _run(cand_session, s),
                                                                     options.tolerance))
                    for s in samples)
    del ref_session, cand_session  # bisect builds its own sessions: free these first
    bisect = None
    failing = next((s for s, r in zip(samples, results) if not r), None)
    if options.bisect and failing is not None:
        bisect = bisect_models(ref_model, cand_model, failing, provider, options.tolerance,
                               labels=(ref_label, cand_label))
    quantized = None
    if options.quantized:
        quantized = verify_quantized(ref_model, cand_model, samples, provider, options.tolerance,
                                     options.limits(), labels=(ref_label, cand_label))
    return VerifyReport(ref_label, cand_label, provider, results, tuple(notes), bisect, quantized=quantized)


def verify_against_reference(saved: str | Path, model: str | Path | onnx.ModelProto,
                             options: VerifyOptions | None = None) -> VerifyReport:
    """Check a model's outputs against saved reference outputs, e.g. float64 results from PyTorch.

    Use it to measure a model (original or folded) against ground truth rather than against another
    model: ``bnfold export --reference`` (:func:`bnfold.export_model` with `reference`) saves the
    inputs it ran and the eval-mode float64 PyTorch outputs. The model runs on the saved inputs; its
    outputs are cast exactly to float64 and compared with the saved ones under the tolerance of the
    model's output dtype. A mismatch is a result, not an error.

    Args:
        saved: An ``.npz`` file, or a folder of them (one sample each), holding ``input:NAME`` and
            ``output:NAME`` arrays.
        model: The model to check: a file path, or a ModelProto used as it is.
        options: A :class:`bnfold.VerifyOptions` of which only `atol`, `rtol` and `provider` apply
            (the saved file gives the inputs); None (the default) means ``VerifyOptions()``.

    Returns:
        A :class:`bnfold.VerifyReport` (``against_saved_outputs`` true, ``reference`` the saved
        path) that is true when every saved output matches.

    Raises:
        BnfoldError: `options` sets `inputs`, `shapes`, `samples`, `seed`, `bisect` or `quantized`
            (``error.option`` names it); `saved` is missing, unreadable, or its arrays do not fit
            the model's inputs; the model file is missing, empty or not an ONNX model; the provider
            is not available; onnxruntime cannot create a session for the model or fails to run it.
    """
    options = options or VerifyOptions()
    given = options.given("inputs", "shapes", "samples", "seed", "bisect", "quantized")
    if given:
        raise BnfoldError("does not apply when comparing with saved outputs: the saved file gives the "
                          "inputs", option=given[0])
    proto, label = _load(model, "model")
    samples = load_samples(saved, input_specs(proto), with_outputs=True)
    provider = resolve_provider(options.provider)
    session = create_session(file_or_proto(model, proto), provider=provider, label=label)
    results = tuple(SampleResult(s.label, _shapes(s), compare_outputs(s.expected, _run(session, s),
                                                                     options.tolerance, check_dtype=False))
                    for s in samples)
    return VerifyReport(str(saved), label, provider, results, against_saved_outputs=True)


def _load(source: str | Path | onnx.ModelProto, role: str) -> tuple[onnx.ModelProto, str]:
    if isinstance(source, onnx.ModelProto):
        return source, f"{role} (in memory)"
    # onnxruntime is the judge of what runs: the checker's stricter opinion is not needed here.
    return load_model(source, check=False), str(source)


def _samples(specs: list[InputSpec], options: VerifyOptions) -> tuple[list[Sample], list[str]]:
    if options.inputs is not None:
        given = options.given("shapes", "samples", "seed")
        if given:
            raise BnfoldError("does not apply when the input values are loaded from files",
                              option=given[0])
        return load_samples(options.inputs, specs), []
    if options.samples is not None and options.samples < 1:
        raise BnfoldError(f"must be at least 1, got {options.samples}", option="samples")
    if options.seed is not None and options.seed < 0:
        raise BnfoldError(f"must be 0 or more, got {options.seed}", option="seed")
    plan = plan_shapes(specs, options.shapes)
    samples = generate_samples(specs, plan, 1 if options.samples is None else options.samples,
                               0 if options.seed is None else options.seed)
    return samples, [plan.note] if plan.note else []


def _run(session, sample: Sample) -> dict:
    return session.run(sample.feeds, inputs_label=sample.label, note=_RUN_NOTE)


def _shapes(sample: Sample) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in sample.feeds.items()}
