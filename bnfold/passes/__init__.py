"""The passes bnfold runs over a model, in this order (see docs/design.md, "Passes").

Adding a pass: write one module with a :class:`~bnfold.passes.base.Pass` subclass and put an instance
here. Dead-code removal stays last: it cleans up after every other pass.
"""

from .assume_inference import AssumeInference
from .base import Decision, FoldOptions, Pass, PassResult, PipelineState
from .dead_code import RemoveDeadCode
from .fold_batchnorm import FoldBatchNorm
from .lower_standalone import LowerStandalone
from .reparameterize import Reparameterize

PIPELINE = (
    AssumeInference(),  # on request: training-mode BN -> inference mode, so that it can fold
    Reparameterize(),   # parallel Conv(+BN) / identity branches summed -> one Conv (RepVGG, MobileOne, ...)
    FoldBatchNorm(),    # BN -> neighbouring Conv/ConvTranspose/Gemm/MatMul (bnfold.rules)
    LowerStandalone(),  # on request: each BN left -> Mul then Add
    RemoveDeadCode(),   # what the passes above disconnected
)

__all__ = ["PIPELINE", "Decision", "FoldOptions", "Pass", "PassResult", "PipelineState", "run_pipeline"]


def run_pipeline(state: PipelineState, passes=None) -> list[PassResult]:
    """Run every pass of `passes` (default: PIPELINE) in order over `state.model`."""
    return [p.run(state) for p in (PIPELINE if passes is None else passes)]
