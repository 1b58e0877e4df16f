"""Every reason code bnfold gives for a decision, with its one meaning.

Codes are stable strings (reports, scripts and the README use them); a code is never reused for a
different meaning. Rules, passes, the report and the README take them from here.
"""

from __future__ import annotations

FOLDED = "folded"
REMOVED = "removed"
NO_FOLDABLE_NEIGHBOUR = "no-foldable-neighbour"
NEIGHBOUR_HAS_OTHER_CONSUMERS = "neighbour-has-other-consumers"
NEIGHBOUR_OUTPUT_IS_GRAPH_OUTPUT = "neighbour-output-is-graph-output"
WEIGHTS_NOT_CONSTANT = "weights-not-constant"
WEIGHTS_OVERRIDABLE = "weights-overridable"
QUANTIZED_WEIGHTS = "quantized-weights"
TRAINING_MODE = "training-mode"
BN_EXTRA_OUTPUTS_USED = "bn-extra-outputs-used"
NON_SPATIAL_BN = "non-spatial-bn"
CHANNEL_AXIS_MISMATCH = "channel-axis-mismatch"
RANK_UNKNOWN = "rank-unknown"
RANK_UNSUPPORTED = "rank-unsupported"
MALFORMED_NEIGHBOUR = "malformed-neighbour"
PADDING_PREVENTS_FOLD = "padding-prevents-fold"
INVALID_STATISTICS = "invalid-statistics"
DTYPE_UNSUPPORTED = "dtype-unsupported"
DTYPE_OVERFLOW = "dtype-overflow"
EXCLUDED_BY_USER = "excluded-by-user"
DROPOUT_IN_TRAINING_MODE = "dropout-in-training-mode"
DROPOUT_MASK_USED = "dropout-mask-used"
NOT_PER_CHANNEL = "not-per-channel"
AFFINE_CONSTANT_INVALID = "affine-constant-invalid"
SHAPE_UNKNOWN = "shape-unknown"
INFERENCE_ASSUMED = "inference-assumed"
LOWERED = "lowered"
MERGED = "merged"
ZERO_ADD_REMOVED = "zero-add-removed"
NON_BRANCH_OPERAND = "non-branch-operand"
BRANCH_MISMATCH = "branch-mismatch"
PADDING_MISALIGNED = "padding-misaligned"
IDENTITY_NOT_ONE_TO_ONE = "identity-not-one-to-one"
NEGATED_CODE_OUT_OF_RANGE = "negated-code-out-of-range"
QUANTIZED_SCALE_INVALID = "quantized-scale-invalid"
QUANTIZATION_OPSET_TOO_OLD = "quantization-opset-too-old"
ACTIVATION_QUANTIZED = "activation-quantized"

MEANINGS = {
    FOLDED: "folded into its neighbour",
    REMOVED: "removed: nothing reads it any more",
    NO_FOLDABLE_NEIGHBOUR: "no Conv/ConvTranspose/Gemm/MatMul feeds it or is fed only by it, directly or "
                           "across the steps a fold may cross",
    NEIGHBOUR_HAS_OTHER_CONSUMERS: "the neighbour's output is also read elsewhere",
    NEIGHBOUR_OUTPUT_IS_GRAPH_OUTPUT: "the tensor the fold would change is a graph output",
    WEIGHTS_NOT_CONSTANT: "weights or BN parameters are not compile-time constants",
    WEIGHTS_OVERRIDABLE: "an initializer is also a graph input (IR >= 4): callers may override it",
    QUANTIZED_WEIGHTS: "quantized weights bnfold does not fold (a BN before the op, block quantization, "
                       "a quantized bias that is not int32 with zero point 0, a grouped ConvTranspose)",
    TRAINING_MODE: "the BN normalizes with batch statistics",
    BN_EXTRA_OUTPUTS_USED: "the BN's running/saved statistics outputs are read",
    NON_SPATIAL_BN: "spatial=0 with parameters that vary inside a channel",
    CHANNEL_AXIS_MISMATCH: "the BN's channel axis is not the neighbour's output (or input) channel axis",
    RANK_UNKNOWN: "a rank needed to prove the fold is unknown",
    RANK_UNSUPPORTED: "a rank is known but not one the rule can fold",
    MALFORMED_NEIGHBOUR: "the neighbour's weight, bias and group do not fit together as its operator requires",
    PADDING_PREVENTS_FOLD: "a padded Conv after the BN would see zeros instead of the BN's shift",
    INVALID_STATISTICS: "var + epsilon <= 0, or a statistic is not finite",
    DTYPE_UNSUPPORTED: "the weight dtype is not float16/bfloat16/float32/float64",
    DTYPE_OVERFLOW: "the folded weights would overflow the weight dtype",
    EXCLUDED_BY_USER: "excluded by the user (--exclude-node)",
    DROPOUT_IN_TRAINING_MODE: "a Dropout between the BN and its neighbour may drop values (is_test=0, or "
                              "training_mode not a constant false)",
    DROPOUT_MASK_USED: "a Dropout between the BN and its neighbour has its mask output read",
    NOT_PER_CHANNEL: "an Add/Sub/Mul/Div constant between the BN and its neighbour is not one value per "
                     "channel (it varies over space or the batch, or would broadcast its input larger)",
    AFFINE_CONSTANT_INVALID: "an Add/Sub/Mul/Div constant between the BN and its neighbour is not finite, or "
                             "a divisor is 0",
    SHAPE_UNKNOWN: "a size needed to map the BN's channel axis across a shape op is unknown",
    INFERENCE_ASSUMED: "a training-mode BN rewritten to normalize with its running statistics "
                       "(--assume-inference)",
    LOWERED: "a BN no rule folds, rewritten as Mul then Add (--lower-standalone mul-add)",
    MERGED: "an Add/Sum of parallel branches over one input merged into one Conv (reparameterize)",
    ZERO_ADD_REMOVED: "an Add of an all-zero constant removed: it is the identity (reparameterize)",
    NON_BRANCH_OPERAND: "an Add/Sum of branches has an operand that is not a branch over the same input",
    BRANCH_MISMATCH: "the branches' Convs differ in weight shape, dtype, group, strides or dilations",
    PADDING_MISALIGNED: "a branch's padding puts its kernel off the merged kernel's output grid",
    NEGATED_CODE_OUT_OF_RANGE: "a BN with a negative scale would negate a weight code or zero point that has "
                               "no negation in its type (int8 -128; uint8 codes but 0)",
    QUANTIZED_SCALE_INVALID: "a folded quantization scale would be 0 or not finite",
    QUANTIZATION_OPSET_TOO_OLD: "a per-tensor weight scale would become per-channel, which DequantizeLinear "
                                "supports from opset 13",
    ACTIVATION_QUANTIZED: "a QuantizeLinear/DequantizeLinear pair lies between the BN and its linear op: "
                          "folding would move the quantization grid",
    IDENTITY_NOT_ONE_TO_ONE: "an identity branch does not map each channel and position onto itself "
                             "(stride, padding, or input and output channel counts)",
}
