"""bnfold: fold BatchNormalization into neighbouring linear operators of ONNX models, and prove it."""

from .errors import BnfoldError
from .fold import fold_file, fold_model
from .report import Decision, FoldReport

__all__ = ["BnfoldError", "Decision", "FoldReport", "fold_file", "fold_model"]
