"""The fold rules, tried in this order for every BatchNormalization; the first that passes its check
folds it. Folding into the op before the BN comes first: it never adds a node."""

from .conv import ConvThenBN
from .linear import GemmThenBN, MatMulThenBN
from .preceding import BNThenConv, BNThenLinear

RULES = (
    ConvThenBN(),    # Conv/ConvTranspose -> BN: scale output channels
    GemmThenBN(),    # Gemm -> BN: scale B' columns, map C
    MatMulThenBN(),  # MatMul (+ Add bias) -> BN, 2-D output
    BNThenConv(),    # BN -> Conv without padding: scale input channels, bias += W shift
    BNThenLinear(),  # BN -> Gemm/MatMul: scale weight rows, bias += shift W
)
