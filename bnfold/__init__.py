"""bnfold: fold BatchNormalization into neighbouring linear operators of ONNX models, and prove it.

The fold API is imported eagerly; verify, bench and export (which pull in onnxruntime or torch) are
imported on first use, so `import bnfold` stays light.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import BnfoldError
from .fold import VerificationFailed, fold_file, fold_model
from .report import Decision, FoldReport

if TYPE_CHECKING:  # the lazy names, for type checkers (py.typed); "X as X" re-exports them
    from .bench import BenchOptions as BenchOptions, BenchReport as BenchReport, bench_models as bench_models
    from .compare import DEFAULT_TOLERANCES as DEFAULT_TOLERANCES, Tolerance as Tolerance
    from .export import export_model as export_model
    from .graphsurgeon import fold_graph as fold_graph
    from .verify import (VerifyOptions as VerifyOptions, VerifyReport as VerifyReport,
                         verify_against_reference as verify_against_reference, verify_models as verify_models)

_LAZY = {
    "verify_models": "verify", "verify_against_reference": "verify", "VerifyOptions": "verify",
    "VerifyReport": "verify", "Tolerance": "compare", "DEFAULT_TOLERANCES": "compare",
    "bench_models": "bench", "BenchOptions": "bench", "BenchReport": "bench",
    "export_model": "export", "fold_graph": "graphsurgeon",
}

__all__ = ["BnfoldError", "Decision", "FoldReport", "VerificationFailed", "fold_file", "fold_model", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
