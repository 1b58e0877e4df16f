"""bnfold: fold BatchNormalization into neighbouring linear operators of ONNX models, and prove it.

The fold API is imported eagerly; verify, bench and export (which pull in onnxruntime or torch) are
imported on first use, so `import bnfold` stays light.
"""

from importlib import import_module

from .errors import BnfoldError
from .fold import VerificationFailed, fold_file, fold_model
from .report import Decision, FoldReport

_LAZY = {
    "verify_models": "verify", "verify_against_reference": "verify", "VerifyOptions": "verify",
    "VerifyReport": "verify", "Tolerance": "compare", "DEFAULT_TOLERANCES": "compare",
    "bench_models": "bench", "BenchOptions": "bench", "BenchReport": "bench",
    "export_model": "export",
}

__all__ = ["BnfoldError", "Decision", "FoldReport", "VerificationFailed", "fold_file", "fold_model", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
