"""bnfold: fold BatchNormalization into neighbouring linear operators of ONNX models, and prove it."""

from .errors import BnfoldError

__all__ = ["BnfoldError"]
