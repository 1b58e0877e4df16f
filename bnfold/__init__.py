"""bnfold: fold BatchNormalization into neighbouring linear operators of ONNX models, and prove it."""

from .bench import BenchOptions, BenchReport, bench_models
from .errors import BnfoldError
from .fold import fold_file, fold_model
from .export import export_model
from .report import Decision, FoldReport
from .verify import (DEFAULT_TOLERANCES, Tolerance, VerifyOptions, VerifyReport, verify_against_reference,
                     verify_models)

__all__ = ["BenchOptions", "BenchReport", "BnfoldError", "DEFAULT_TOLERANCES", "Decision", "FoldReport", "Tolerance", "VerifyOptions",
           "VerifyReport", "bench_models", "export_model", "fold_file", "fold_model", "verify_against_reference",
           "verify_models"]
