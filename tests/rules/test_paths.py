"""A BN folds across a path of steps to its Conv/ConvTranspose/Gemm/MatMul (rules/path.py): per-channel
affine steps, other BNs, shape ops whose channel mapping is proved, and the affine steps beyond the BN.
Every fold is checked against the original by onnxruntime (optimizations off) and onnx's reference
evaluator; every refusal leaves the model bit-identical, with the reason code of the condition it
covers (each refusal test fails if that condition is removed from rules/path.py)."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from bnfold.math import bn_scale_shift
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, make_model, op_types, tensor

F32 = np.float32


class Path:
    """A chain of nodes from graph input x to one graph output, each reading the previous output as its
    data operand; constants become initializers named after their node."""

    def __init__(self, rng, x_shape, opset=17):
        self.rng, self.x_shape, self.opset = rng, x_shape, opset
        self.nodes, self.inits, self.last = [], [], "x"

    def add(self, op, *consts, name=None, const_first=False, **attrs) -> "Path":
        name = name or f"{op.lower()}{len(self.nodes)}"
        names = []
        for i, value in enumerate(consts):
            value = np.asarray(value)
            value = value if value.dtype.kind in "ib" else value.astype(F32)
            names.append(f"{name}_c{i}")
            self.inits.append(numpy_helper.from_array(value, names[-1]))
        inputs = names + [self.last] if const_first else [self.last] + names
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        self.last = f"{name}_out"
        return self

    def conv(self, cin, cout, kernel=1, name="conv", op="Conv", rank=2, **attrs) -> "Path":
        groups = attrs.get("group", 1)
        shape = (cin, cout // groups) if op == "ConvTranspose" else (cout, cin // groups)
        weight = self.rng.normal(0, 0.5, shape + (kernel,) * rank)
        return self.add(op, weight, self.rng.normal(0, 0.5, cout), name=name, **attrs)

    def gemm(self, k, n, name="gemm", **attrs) -> "Path":
        shape = (n, k) if attrs.get("transB") else (k, n)
        return self.add("Gemm", self.rng.normal(0, 0.5, shape), self.rng.normal(0, 0.5, n), name=name, **attrs)

    def matmul(self, k, n, name="matmul") -> "Path":
        return self.add("MatMul", self.rng.normal(0, 0.5, (k, n)), name=name)

    def bn(self, channels, name="bn", **stats) -> "Path":
        values = {**bn_stats(self.rng, channels), **stats}
        self.inits += bn_initializers(values, F32, prefix=name)
        self.nodes.append(bn_node(self.last, f"{name}_out", prefix=name, **({"is_test": 1} if self.opset < 7 else {})))
        self.last = f"{name}_out"
        return self

    def model(self, checked=True, output_shape=None) -> onnx.ModelProto:
        inputs, outputs = [tensor("x", F32, self.x_shape)], [tensor(self.last, F32, output_shape)]
        if checked:
            return make_model(self.nodes, inputs, outputs, self.inits, self.opset)
        model = helper.make_model(helper.make_graph(self.nodes, "test", inputs, outputs, self.inits),
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return model


def per_channel(rng, channels, shape=None):
    """One value per channel (shape [C] unless given), of either sign, away from 0 (a divisor too)."""
    values = rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)
    return values.reshape(shape or (channels,))


def folds(model, kept, bns=("bn",), atol=1e-4, **options):
    """Every BN in `bns` folds (the first directly, the others along with it), the graph keeps exactly
    the nodes `kept`, its outputs keep their names, and it computes what the original does."""
    folded, report = fold_model(model, **options)
    decisions = {d.node: d for d in report.decisions}
    assert decisions[bns[0]].reason == "folded", decisions[bns[0]]
    for other in bns[1:]:
        assert decisions[other].reason == "folded", decisions[other]
        assert decisions[other].detail == f"folded with BatchNormalization {bns[0]!r}"
    assert op_types(folded) == kept
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, atol=atol)
    return folded, decisions


def refused(model, reason, words, bn="bn"):
    """The BN stays with `reason` and a detail containing `words`, and the model is exactly as it was."""
    folded, report = fold_model(model)
    decision = next(d for d in report.decisions if d.node == bn)
    assert decision.reason == reason and words in decision.detail, decision
    assert folded.SerializeToString() == model.SerializeToString()


X4 = [2, 3, 5, 5]  # Conv input; 1x1 kernels keep the spatial size


# ------------------------------------------------------------------------------ per-channel affine steps
@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (), (1,), (1, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("const_first", [False, True])
def test_conv_add_then_bn(rng, shape, const_first):
    """A TF/Keras export: the bias in an Add after the Conv, per channel or one scalar."""
    value = per_channel(rng, 6, shape) if np.prod(shape, dtype=int) == 6 else rng.normal(size=shape)
    model = Path(rng, X4).conv(3, 6).add("Add", value, name="bias", const_first=const_first).bn(6).model()
    _, decisions = folds(model, ["Conv"])
    assert decisions["bn"].detail.endswith("; removed Add 'bias' with it")


@pytest.mark.parametrize("op, const_first", [("Mul", False), ("Mul", True), ("Sub", False), ("Sub", True),
                                             ("Div", False)], ids=str)
def test_conv_affine_step_then_bn(rng, op, const_first):
    """x * c, c * x, x - c, c - x (which negates the scale) and x / c."""
    model = Path(rng, X4).conv(3, 6).add(op, per_channel(rng, 6, (6, 1, 1)), const_first=const_first).bn(6).model()
    folds(model, ["Conv"])


@pytest.mark.parametrize("steps", [["Add", "Mul", "Identity", "Sub"], ["Mul", "Div", "SubFirst", "Add"],
                                   ["Identity", "SubFirst", "Identity", "Mul", "Dropout"]], ids=str)
def test_conv_chain_of_steps_then_bn(rng, steps):
    path = Path(rng, X4).conv(3, 6)
    for i, step in enumerate(steps):
        if step in ("Identity", "Dropout"):
            path.add(step, name=f"s{i}")
        else:
            path.add(step.replace("First", ""), per_channel(rng, 6, (1, 6, 1, 1)), name=f"s{i}",
                     const_first=step.endswith("First"))
    folds(path.bn(6).model(), ["Conv"])


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_transpose_add_mul_then_bn(rng, groups):
    path = Path(rng, X4).conv(3, 6, kernel=2, op="ConvTranspose", group=groups, strides=[2, 2])
    model = path.add("Add", per_channel(rng, 6, (6, 1, 1))).add("Mul", per_channel(rng, 6, (6, 1, 1))).bn(6).model()
    folds(model, ["ConvTranspose"])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_add_mul_then_bn(rng, trans_b):
    path = Path(rng, [5, 4]).gemm(4, 6, transB=trans_b, alpha=0.7, beta=1.3)
    model = path.add("Mul", per_channel(rng, 6)).add("Add", per_channel(rng, 6, (1, 6))).bn(6).model()
    folds(model, ["Gemm"])


def test_matmul_bias_add_then_steps_then_bn(rng):
    """The first Add after a MatMul is its bias, mapped through the rest of the path."""
    path = Path(rng, [5, 4]).matmul(4, 6).add("Add", rng.normal(size=6), name="bias")
    model = path.add("Mul", per_channel(rng, 6)).add("Sub", per_channel(rng, 6), const_first=True).bn(6).model()
    folds(model, ["MatMul", "Add"])


# ------------------------------------------------------------------------------------------- BN -> BN
def test_conv_bn_bn(rng):
    model = Path(rng, X4).conv(3, 6).bn(6, name="bn").bn(6, name="bn2").model()
    _, decisions = folds(model, ["Conv"], bns=("bn", "bn2"))
    assert decisions["bn2"].rule == "conv-bn" and decisions["bn2"].neighbour == "conv"


def test_bn_bn_conv(rng):
    """Consumer side: the first BN folds forward, through the second, into an unpadded Conv."""
    model = Path(rng, X4).add("Relu").bn(3, name="bn").bn(3, name="bn2").conv(3, 6, kernel=3).model()
    folds(model, ["Relu", "Conv"], bns=("bn", "bn2"))


def test_excluded_bn_is_not_taken_along(rng):
    model = Path(rng, X4).conv(3, 6).bn(6, name="bn").bn(6, name="bn2").model()
    folded, decisions = folds(model, ["Conv", "BatchNormalization"], exclude_nodes=["bn2"])
    assert decisions["bn2"].reason == "excluded-by-user"
    assert [n.name for n in folded.graph.node] == ["conv", "bn2"]


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_excluded_bn_blocks_the_path(rng, side):
    """An excluded BN is no step: the BN on its far side does not fold across it."""
    if side == "producer":
        model = Path(rng, X4).conv(3, 6).bn(6, name="bn2").bn(6, name="bn").model()
    else:
        model = Path(rng, X4).add("Relu").bn(3, name="bn").bn(3, name="bn2").conv(3, 6).model()
    folded, report = fold_model(model, exclude_nodes=["bn2"])
    decisions = {d.node: d.reason for d in report.decisions}
    assert decisions == {"bn2": "excluded-by-user", "bn": "no-foldable-neighbour"}
    assert folded.SerializeToString() == model.SerializeToString()


# -------------------------------------------------------------------------------------- beyond the BN
def test_layer_scale_after_bn_folds(rng):
    """Conv -> BN -> Mul(layer scale) -> Add -> Relu: the Mul and the Add fold with the BN."""
    path = Path(rng, X4).conv(3, 6).bn(6).add("Mul", per_channel(rng, 6, (6, 1, 1)), name="scale")
    model = path.add("Add", per_channel(rng, 6, (1, 6, 1, 1)), name="shift").add("Relu", name="relu").model()
    folded, decisions = folds(model, ["Conv", "Relu"])
    assert decisions["bn"].detail.endswith("; removed Mul 'scale', Add 'shift' with it")
    assert folded.graph.node[1].input[0] == folded.graph.node[0].output[0] == "shift_out"


def test_mul_before_bn_folds_forward(rng):
    model = Path(rng, X4).add("Relu").add("Mul", per_channel(rng, 3, (3, 1, 1)), name="pre").bn(3).conv(3, 6).model()
    _, decisions = folds(model, ["Relu", "Conv"])
    assert decisions["bn"].rule == "bn-conv" and "Mul 'pre'" in decisions["bn"].detail


def test_beyond_stops_at_a_constant_that_is_not_per_channel(rng):
    path = Path(rng, X4).conv(3, 6).bn(6).add("Mul", per_channel(rng, 6, (6, 1, 1)), name="scale")
    model = path.add("Add", rng.normal(size=(1, 6, 5, 5)), name="spatial").model()
    folded, _ = folds(model, ["Conv", "Add"])
    assert folded.graph.node[1].name == "spatial"


def test_beyond_stops_at_a_second_reader(rng):
    """A beyond step whose input is read elsewhere stays (and the BN still folds)."""
    path = Path(rng, X4).conv(3, 6).bn(6).add("Mul", per_channel(rng, 6, (6, 1, 1)), name="scale")
    model = path.model()
    model.graph.node.append(helper.make_node("Relu", ["bn_out"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", F32, X4[:1] + [6] + X4[2:]))
    folds(model, ["Conv", "Mul", "Relu"])


def test_beyond_stops_at_a_graph_output(rng):
    """The BN's output is a graph output: the Mul after it stays, so that output keeps its values."""
    model = Path(rng, X4).conv(3, 6).bn(6).add("Mul", per_channel(rng, 6, (6, 1, 1)), name="scale").model()
    model.graph.output.insert(0, tensor("bn_out", F32, [2, 6, 5, 5]))
    folded, _ = folds(model, ["Conv", "Mul"])
    assert folded.graph.node[0].output[0] == "bn_out"


def test_beyond_stops_at_a_dropout_in_training_mode(rng):
    path = Path(rng, X4, opset=15).conv(3, 6).bn(6)
    path.inits.append(numpy_helper.from_array(np.array(True), "train"))
    path.nodes.append(helper.make_node("Dropout", [path.last, "", "train"], ["drop_out"], name="drop"))
    path.last = "drop_out"
    model = path.add("Mul", per_channel(rng, 6, (6, 1, 1)), name="scale").model()
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded" and op_types(folded) == ["Conv", "Dropout", "Mul"]


def test_beyond_stops_at_a_custom_domain_op(rng):
    model = Path(rng, X4).conv(3, 6).bn(6).add("Mul", per_channel(rng, 6, (6, 1, 1)), name="scale").model()
    model.graph.node[-1].domain = "custom"
    model.opset_import.append(helper.make_opsetid("custom", 1))
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded" and op_types(folded) == ["Conv", "Mul"]


@pytest.mark.parametrize("shared", ["read elsewhere", "graph output"])
def test_beyond_before_stops_at_a_shared_tensor(rng, shared):
    """Relu -> Mul -> BN -> Conv with the Mul's output also used: the Mul stays, the BN folds forward."""
    model = Path(rng, X4).add("Relu").add("Mul", per_channel(rng, 3, (3, 1, 1)), name="pre").bn(3).conv(3, 6).model()
    if shared == "graph output":
        model.graph.output.append(tensor("pre_out", F32, X4))
    else:
        model.graph.node.append(helper.make_node("Neg", ["pre_out"], ["neg"], name="neg"))
        model.graph.output.append(tensor("neg", F32, X4))
    folds(model, ["Relu", "Mul", "Conv"] + (["Neg"] if shared == "read elsewhere" else []))


@pytest.mark.parametrize("position", ["chain", "beyond"])
def test_bn_in_training_mode_is_no_step(rng, position):
    """A training-mode BN (opset 15) normalizes with batch statistics: no fold may take it along."""
    path = Path(rng, X4, opset=15).conv(3, 6)
    if position == "chain":
        path.bn(6, name="train").bn(6, name="bn")
    else:
        path.bn(6, name="bn").bn(6, name="train")
    train = path.nodes[1 if position == "chain" else 2]
    train.attribute.append(helper.make_attribute("training_mode", 1))
    train.output.extend(["running_mean", "running_var"])  # the schema requires them in training mode
    folded, report = fold_model(path.model(output_shape=[2, 6, 5, 5]))
    decisions = {d.node: d.reason for d in report.decisions}
    assert decisions["train"] == "training-mode"
    assert decisions["bn"] == ("no-foldable-neighbour" if position == "chain" else "folded")
    assert [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"] == ["train"] + \
        (["bn"] if position == "chain" else [])


# ------------------------------------------------------------------------------ padding before a Conv
def test_bn_before_padded_conv_is_refused(rng):
    model = Path(rng, X4).add("Relu").bn(3).conv(3, 6, kernel=3, pads=[1, 1, 1, 1]).model()
    refused(model, "padding-prevents-fold", "pads [1, 1, 1, 1]")


@pytest.mark.parametrize("after", [[], ["Mul"]], ids=str)
def test_bn_with_zero_shift_folds_into_padded_conv(rng, after):
    """beta = 0 and mean = 0: the composed shift is exactly 0, so the padding reads what the BN would."""
    path = Path(rng, X4).add("Relu").bn(3, B=np.zeros(3), mean=np.zeros(3))
    for op in after:
        path.add(op, per_channel(rng, 3, (3, 1, 1)))
    folds(path.conv(3, 6, kernel=3, pads=[1, 1, 1, 1]).model(), ["Relu", "Conv"])


def test_zero_shift_bn_then_add_before_padded_conv_is_refused(rng):
    """The shift that matters is the composed one: an Add after a shift-free BN brings one back."""
    path = Path(rng, X4).add("Relu").bn(3, B=np.zeros(3), mean=np.zeros(3)).add("Add", per_channel(rng, 3, (3, 1, 1)))
    refused(path.conv(3, 6, kernel=3, pads=[1, 1, 1, 1]).model(), "padding-prevents-fold", "pads")


# -------------------------------------------------------------------------------------------- shape ops
@pytest.mark.parametrize("batch", [2, "B"])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_levit_token_mlp(rng, batch, flatten, bias):
    """MatMul on [B, T, K] tokens -> Reshape/Flatten to [B*T, C] -> BN1d -> Reshape back."""
    path = Path(rng, [batch, 5, 4]).matmul(4, 6)
    if bias:
        path.add("Add", rng.normal(size=6), name="bias")
    path.add("Flatten", axis=2) if flatten else path.add("Reshape", np.array([-1, 6]))
    model = path.bn(6).add("Reshape", np.array([-1, 5, 6]), name="back").model()
    folds(model, ["MatMul", "Add", "Flatten" if flatten else "Reshape", "Reshape"])


def test_matmul_transpose_bn_transpose(rng):
    path = Path(rng, [2, 5, 4]).matmul(4, 6).add("Transpose", perm=[0, 2, 1])
    model = path.bn(6).add("Transpose", perm=[0, 2, 1], name="back").model()
    folds(model, ["MatMul", "Add", "Transpose", "Transpose"])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("dropout", [False, True])
def test_iresnet_head(rng, trans_b, dropout):
    """Relu -> BN2d -> Flatten -> (Dropout) -> Gemm: feature c*H*W + i carries BN channel c."""
    path = Path(rng, [2, 3, 2, 2]).add("Relu").bn(3).add("Flatten")
    if dropout:
        path.add("Dropout")
    folds(path.gemm(12, 5, transB=trans_b).model(), ["Relu", "Flatten", "Gemm"])


def test_channels_last_matmul(rng):
    path = Path(rng, [2, 3, 4, 5]).add("Relu").bn(3).add("Transpose", perm=[0, 2, 3, 1])
    folds(path.matmul(3, 6).model(), ["Relu", "Transpose", "MatMul", "Add"])


def test_transpose_that_keeps_the_channel_axis(rng):
    path = Path(rng, [2, 3, 4, 5]).add("Relu").bn(3).add("Transpose", perm=[0, 1, 3, 2])
    folds(path.conv(3, 6, kernel=3).model(), ["Relu", "Transpose", "Conv"])


def test_bn1d_unsqueeze_conv1d(rng):
    path = Path(rng, [2, 3]).add("Relu").bn(3).add("Unsqueeze", np.array([-1]))
    folds(path.conv(3, 6, rank=1).model(), ["Relu", "Unsqueeze", "Conv"])


def test_conv_squeeze_bn1d(rng):
    path = Path(rng, [2, 3, 1, 1]).conv(3, 6).add("Squeeze", np.array([2, 3]))
    folds(path.bn(6).model(), ["Conv", "Squeeze"])


def test_reshape_within_one_bn_channel(rng):
    """Conv [1, 8, 6, 6] -> Reshape [1, 4, 72] -> BN1d(4): Conv channel k lies within BN channel k // 2."""
    scale = per_channel(rng, 4).repeat(2).reshape(8, 1, 1)  # one value per BN channel
    path = Path(rng, [1, 3, 6, 6]).conv(3, 8).add("Mul", scale)
    model = path.add("Reshape", np.array([1, 4, 72])).bn(4).model()
    folds(model, ["Conv", "Reshape"])


def test_one_channel_bn_across_reshape_and_transpose(rng):
    """BN(1) [2, 1, 3, 3] -> Reshape [2, 1, 9] -> Transpose(0, 2, 1) -> MatMul [1, 5]: every element is
    BN channel 0, whichever axis the Transpose moves."""
    path = Path(rng, [2, 1, 3, 3]).add("Relu").bn(1).add("Reshape", np.array([2, 1, 9]))
    folds(path.add("Transpose", perm=[0, 2, 1]).matmul(1, 5).model(), ["Relu", "Reshape", "Transpose", "MatMul", "Add"])


def test_one_channel_bn_with_unknown_sizes_before_a_flatten(rng):
    """BN(1) over [N, 1, H, W] (H, W symbolic) -> Flatten -> MatMul: one channel needs no sizes."""
    path = Path(rng, ["N", 1, "H", "W"]).add("Relu").bn(1).add("Flatten")
    folds(path.matmul(4, 5).model(), ["Relu", "Flatten", "MatMul", "Add"])  # run with H = W = 2


def test_bn2d_flatten_bn1d_gemm(rng):
    """BN2d cannot fold across BN1d (12 values for its 3 channels); once BN1d has folded into the Gemm,
    BN2d folds into it too."""
    path = Path(rng, [2, 3, 2, 2]).add("Relu").bn(3).add("Flatten").bn(12, name="bn2")
    _, decisions = folds(path.gemm(12, 5).model(), ["Relu", "Flatten", "Gemm"])
    assert decisions["bn2"].reason == "folded" and decisions["bn2"].rule == "bn-linear"


def test_gemm_trans_a_through_transpose(rng):
    """BN over [M, K] -> Transpose -> Gemm(transA=1): the BN's channels land on the reduced axis."""
    path = Path(rng, [5, 4]).add("Relu").bn(4).add("Transpose", perm=[1, 0])
    folds(path.gemm(4, 6, transA=1).model(), ["Relu", "Transpose", "Gemm"])


# ------------------------------------------------------------------------------------------- refusals
def conv_step_bn(rng, op, value, x_shape=None, const_first=False, channels=6, **attrs):
    """x -> Conv -> op(constant `value`) -> BN."""
    path = Path(rng, x_shape or X4).conv(3, channels).add(op, value, name="step", const_first=const_first, **attrs)
    return path.bn(channels).model()


@pytest.mark.parametrize("shape, words", [
    ((1, 6, 5, 5), "varies along axes [1, 2, 3]"),  # over space
    ((1, 1, 5, 1), "varies along axis 2"),  # over one spatial axis only
    ((2, 1, 1, 1), "varies along axis 0"),  # onto the batch
    ((2, 6, 1, 1), "varies along axes [0, 1]")], ids=str)
def test_not_per_channel(rng, shape, words):
    refused(conv_step_bn(rng, "Add", rng.normal(size=shape)), "not-per-channel", words)


def test_constant_that_grows_the_input(rng):
    """[1, 6, 1, 1] + [1, 6, 4, 4] is [1, 6, 4, 4]: the Conv's output would need 16 values per channel."""
    model = conv_step_bn(rng, "Mul", rng.normal(size=(1, 6, 4, 4)), x_shape=[1, 3, 1, 1])
    refused(model, "not-per-channel", "varies along axes [1, 2, 3]")


def test_constant_that_grows_an_axis_of_one_channel(rng):
    """Conv [2, 1, 1, 3] + [1, 1, 4, 1] -> Reshape [8, 1, 3] -> BN1d(1): each index of axis 2 carries the
    BN's one channel, but the constant has 4 values where the input has 1 (the broadcast grows it)."""
    path = Path(rng, [2, 3, 1, 3]).conv(3, 1).add("Add", rng.normal(size=(1, 1, 4, 1)), name="step")
    model = path.add("Reshape", np.array([8, 1, 3])).bn(1).model()
    refused(model, "not-per-channel", "broadcasts axis 2 of its input (size 1)")


def test_constant_of_higher_rank(rng):
    path = Path(rng, X4).conv(3, 6).add("Add", per_channel(rng, 6, (1, 1, 6, 1, 1)), name="step")
    model = path.add("Reshape", np.array([2, 6, 5, 5])).bn(6).model()
    refused(model, "not-per-channel", "does not broadcast onto a rank-4 input without growing it")


def test_constant_along_an_axis_as_long_as_the_channels(rng):
    """Conv [2, 6, 5, 6] + [1, 1, 1, 6]: six values, but along the width, not the channels."""
    model = conv_step_bn(rng, "Add", per_channel(rng, 6, (1, 1, 1, 6)), x_shape=[2, 3, 5, 6])
    refused(model, "not-per-channel", "varies along axis 3: the BN's channels lie along axis 1")


def test_values_differ_within_one_bn_channel_across_a_reshape(rng):
    """Conv channels 2k and 2k + 1 both lie in BN channel k: a constant must be equal on both."""
    path = Path(rng, [1, 3, 6, 6]).conv(3, 8).add("Mul", per_channel(rng, 8, (8, 1, 1)), name="step")
    model = path.add("Reshape", np.array([1, 4, 72])).bn(4).model()
    refused(model, "not-per-channel", "takes different values within one BN channel")


@pytest.mark.parametrize("op, bad", [("Div", 0.0), ("Mul", np.inf), ("Add", np.nan), ("Sub", -np.inf)])
def test_affine_constant_invalid(rng, op, bad):
    value = per_channel(rng, 6, (6, 1, 1))
    value[2] = bad
    refused(conv_step_bn(rng, op, value), "affine-constant-invalid", "not finite or divides by 0")


def test_refusal_of_a_bn_on_the_path_names_it(rng):
    """Conv -> bnA (var < 0) -> bn: bn's own statistics are valid, so its detail names the BN that is not."""
    model = Path(rng, X4).conv(3, 6).bn(6, name="bnA", var=-np.ones(6)).bn(6, name="bn").model()
    refused(model, "invalid-statistics", "BN 'bnA' on the path: var + epsilon <= 0 in 6 channel(s)")


def test_custom_domain_mul_is_no_step(rng):
    model = conv_step_bn(rng, "Mul", per_channel(rng, 6, (6, 1, 1)))
    model.graph.node[1].domain = "custom"
    model.opset_import.append(helper.make_opsetid("custom", 1))
    refused(model, "no-foldable-neighbour", "fed by Mul 'step'")


def test_bn_as_the_weight_operand_is_no_consumer_fold(rng):
    """BN -> MatMul as its right operand: the BN would have to fold into the data, not a weight."""
    path = Path(rng, [4, 6]).add("Relu").bn(6)
    path.nodes.append(helper.make_node("MatMul", ["w", path.last], ["y"], name="matmul"))
    path.last = "y"
    model = path.model(checked=False, output_shape=[5, 6])
    model.graph.input.append(tensor("w", F32, [5, 4]))
    onnx.checker.check_model(model, full_check=True)
    refused(model, "no-foldable-neighbour", "read by MatMul")


def test_constant_that_grows_the_channel_axis(rng):
    """Gemm [5, 1] + [1, 4] is [5, 4]: a BN over 4 channels, but one Gemm column to fold them into."""
    path = Path(rng, [5, 4]).gemm(4, 1).add("Add", per_channel(rng, 4, (1, 4)), name="step")
    refused(path.bn(4).model(), "channel-axis-mismatch", "BN has 4 channels, the neighbour 1")


def test_divided_by_the_path_is_no_step(rng):
    """c / x is not affine in x."""
    refused(conv_step_bn(rng, "Div", per_channel(rng, 6, (6, 1, 1)), const_first=True), "no-foldable-neighbour",
            "fed by Div 'step'")


@pytest.mark.parametrize("shape, channels", [([1, 6, 48], 6), ([1, 16, 18], 16)], ids=str)
def test_reshape_that_regroups_channels(rng, shape, channels):
    """Conv [1, 8, 6, 6] -> Reshape -> BN1d: a Conv channel spreads over several BN channels."""
    path = Path(rng, [1, 3, 6, 6]).conv(3, 8).add("Reshape", np.array(shape))
    refused(path.bn(channels).model(), "channel-axis-mismatch", "does not carry one of the BN's")


@pytest.mark.parametrize("rows", [3, 4])
def test_transpose_moves_the_bn_off_the_conv_channels(rng, rows):
    """Conv [2, 4, rows, 5] -> Transpose(0, 2, 1, 3) -> BN(rows): the BN normalizes the Conv's rows."""
    path = Path(rng, [2, 3, rows, 5]).conv(3, 4).add("Transpose", perm=[0, 2, 1, 3]).bn(rows)
    refused(path.model(), "channel-axis-mismatch",
            "the BN's channels are axis 2 of Conv output conv_out, the channels it folds into are axis 1")


def test_reshape_that_spreads_the_batch_over_channels(rng):
    """Gemm [2, 12] -> Reshape [1, 4, 6] -> BN(4): row 0 becomes channels 0-1, row 1 channels 2-3, so a
    Gemm column carries a different channel in each row."""
    path = Path(rng, [2, 4]).gemm(4, 12).add("Reshape", np.array([1, 4, 6])).bn(4)
    refused(path.model(), "channel-axis-mismatch", "does not carry one of the BN's 4 channels per index")


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_custom_domain_neighbour(rng, side):
    path = Path(rng, X4)
    if side == "producer":
        model = path.conv(3, 6, name="lin").add("Mul", per_channel(rng, 6, (6, 1, 1))).bn(6).model()
    else:
        model = path.add("Relu").bn(3).add("Mul", per_channel(rng, 3, (3, 1, 1))).conv(3, 6, name="lin").model()
    next(n for n in model.graph.node if n.name == "lin").domain = "custom"
    model.opset_import.append(helper.make_opsetid("custom", 1))
    refused(model, "no-foldable-neighbour", "Mul")


def test_transpose_moves_the_bn_off_the_matmul_columns(rng):
    """MatMul [2, 6, 6] -> Transpose(2, 1, 0) -> BN(6): it normalizes the tokens, not the weight's columns."""
    path = Path(rng, [2, 6, 4]).matmul(4, 6).add("Transpose", perm=[2, 1, 0]).bn(6)
    refused(path.model(), "channel-axis-mismatch",
            "the BN's channels are axis 1 of MatMul output matmul_out, the channels it folds into are axis 2")


def test_unknown_sizes_after_the_channel_axis(rng):
    """Conv [N, 6, H, W] (H, W symbolic) -> Reshape [0, 6, -1] -> BN1d: the BN channel's extent is unknown."""
    path = Path(rng, ["N", 3, "H", "W"]).conv(3, 6).add("Reshape", np.array([0, 6, -1]), name="flat").bn(6)
    refused(path.model(), "shape-unknown", "the sizes after axis 1 are unknown")


def test_unknown_sizes_before_a_flatten(rng):
    """BN over [2, 3, H, 4] -> Flatten -> MatMul: which features carry which channel depends on H."""
    path = Path(rng, [2, 3, "H", 4]).add("Relu").bn(3).add("Flatten").matmul(24, 5)
    refused(path.model(), "shape-unknown", "sizes after axis 1 are unknown")


def test_unknown_size_of_an_axis_before_a_transpose(rng):
    """BN [2, 3, 4] -> Reshape(a shape fed at run time) -> Transpose -> MatMul: no axis of the Reshape's
    output is known to carry one BN channel per index."""
    path = Path(rng, [2, 3, 4]).add("Relu").bn(3)
    path.nodes.append(helper.make_node("Reshape", [path.last, "shape"], ["r_out"], name="r"))
    path.last = "r_out"
    model = path.add("Transpose", perm=[0, 2, 1]).matmul(4, 5).model(checked=False)
    model.graph.input.append(helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [3]))
    refused(model, "shape-unknown", "Transpose 'transpose3' has shape [?, ?, ?]: the sizes after axis 0 are unknown")


def test_unknown_sizes_at_a_per_channel_step(rng):
    """Conv [2, 6, H, W] * [1, 6, 1, 1] -> Reshape [2, 6, 25] -> BN: the constant is one value per channel;
    what is unknown is which BN channel each Conv element carries."""
    path = Path(rng, [2, 3, "H", "W"]).conv(3, 6).add("Mul", per_channel(rng, 6, (1, 6, 1, 1)), name="step")
    model = path.add("Reshape", np.array([2, 6, 25])).bn(6).model()
    refused(model, "shape-unknown", "has shape [2, 6, ?, ?]: the sizes after axis 1 are unknown")


def test_one_channel_constant_along_an_axis_of_unknown_size(rng):
    """Conv [2, 1, 5, W] * [1, 1, 1, 5]: equal to a per-channel Mul only if W is 5, not if it is 1."""
    model = conv_step_bn(rng, "Mul", np.full((1, 1, 1, 5), 1.5), x_shape=[2, 3, 5, "W"], channels=1)
    refused(model, "shape-unknown", "has shape [2, 1, 5, ?]: the size of axis 3 is unknown")


def test_unknown_rank_on_the_path(rng):
    """Conv -> Reshape(a shape fed at run time, of unknown length) -> BN: its output rank is unknown."""
    path = Path(rng, X4).conv(3, 6)
    path.nodes.append(helper.make_node("Reshape", [path.last, "shape"], ["r_out"], name="r"))
    path.last = "r_out"
    model = path.bn(6).model(checked=False)
    model.graph.input.append(helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [None]))
    refused(model, "rank-unknown", "the rank of Reshape 'r' output r_out is unknown")


def test_matmul_output_read_besides_its_bias_add(rng):
    path = Path(rng, [2, 5, 4]).matmul(4, 6).add("Add", rng.normal(size=6), name="bias")
    model = path.add("Reshape", np.array([-1, 6])).bn(6).model()
    model.graph.node.append(helper.make_node("Relu", ["matmul_out"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", F32, [2, 5, 6]))
    refused(model, "neighbour-has-other-consumers", "MatMul output matmul_out is also read by Relu 'relu'")


def test_dropout_in_training_mode_on_the_path(rng):
    path = Path(rng, X4, opset=15).conv(3, 6).add("Mul", per_channel(rng, 6, (6, 1, 1)))
    path.inits.append(numpy_helper.from_array(np.array(True), "train"))
    path.nodes.append(helper.make_node("Dropout", [path.last, "", "train"], ["drop_out"], name="drop"))
    path.last = "drop_out"
    refused(path.bn(6).model(), "dropout-in-training-mode", "Dropout 'drop' has training_mode=true")


@pytest.mark.parametrize("where", ["conv_out", "step_out"])
def test_step_tensor_is_a_graph_output(rng, where):
    model = conv_step_bn(rng, "Mul", per_channel(rng, 6, (6, 1, 1)))
    model.graph.output.append(tensor(where, F32, [2, 6, 5, 5]))
    refused(model, "neighbour-output-is-graph-output", f"output {where} is a graph output")


@pytest.mark.parametrize("where", ["conv_out", "step_out"])
def test_step_tensor_read_elsewhere(rng, where):
    model = conv_step_bn(rng, "Mul", per_channel(rng, 6, (6, 1, 1)))
    model.graph.node.append(helper.make_node("Relu", [where], ["r"], name="relu"))
    model.graph.output.append(tensor("r", F32, [2, 6, 5, 5]))
    refused(model, "neighbour-has-other-consumers", f"output {where} is also read by Relu 'relu'")


def test_consumer_side_step_read_elsewhere(rng):
    """BN -> Flatten -> Gemm with the Flatten's output read twice: no sole consumer, so no match."""
    path = Path(rng, [2, 3, 2, 2]).add("Relu").bn(3).add("Flatten", name="flat").gemm(12, 5)
    model = path.model()
    model.graph.node.append(helper.make_node("Relu", ["flat_out"], ["r"], name="relu2"))
    model.graph.output.append(tensor("r", F32, [2, 12]))
    refused(model, "no-foldable-neighbour", "read by Flatten")


def test_transpose_with_an_invalid_perm(rng):
    """A Transpose whose perm repeats an axis (the checker rejects it; fold_model must still refuse)."""
    path = Path(rng, [2, 3, 4, 5]).add("Relu").bn(3).add("Transpose", perm=[0, 2, 2, 1], name="t")
    model = path.matmul(3, 6).model(checked=False)
    model.graph.value_info.append(tensor("t_out", F32, [2, 4, 4, 3]))
    refused(model, "malformed-neighbour", "perm [0, 2, 2, 1] is not a permutation of 4 axes")


# ------------------------------------------------------------------------------ opset < 7 broadcasting
def legacy_model(rng, value, **attrs):
    """Opset 6: Conv -> Add(constant, legacy broadcast attributes) -> BN(is_test=1)."""
    return Path(rng, X4, opset=6).conv(3, 6).add("Add", value, name="step", **attrs).bn(6).model()


def legacy_reference(model, x):
    """What an opset-6 Conv -> Add(broadcast=1, axis=1) -> BN computes, in float64 by hand (onnxruntime
    runs no BN before opset 7; the 1x1 Conv is an einsum)."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    y = np.einsum("oc,nchw->nohw", inits["conv_c0"][:, :, 0, 0], x) + inits["conv_c1"].reshape(1, -1, 1, 1)
    y = y + inits["step_c0"].reshape(1, -1, 1, 1)
    scale, shift = bn_scale_shift(inits["bn_scale"], inits["bn_B"], inits["bn_mean"], inits["bn_var"], 1e-5)
    return y * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("axis", [1, -3])
def test_legacy_broadcast_with_axis(rng, axis):
    """Add-6 with broadcast=1, axis=1 (or -3 of 4) aligns a [C] constant with axis 1, not the last."""
    model = legacy_model(rng, per_channel(rng, 6), broadcast=1, axis=axis)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "folded" and op_types(folded) == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    x = rng.normal(size=X4)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    conv = folded.graph.node[0]
    actual = np.einsum("oc,nchw->nohw", inits[conv.input[1]][:, :, 0, 0], x) + inits[conv.input[2]].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(actual, legacy_reference(model, x), rtol=1e-5, atol=1e-5)


def test_legacy_full_shape_constant_that_varies_spatially(rng):
    refused(legacy_model(rng, rng.normal(size=(2, 6, 5, 5))), "not-per-channel", "varies along axes [0, 1, 2, 3]")


def test_legacy_constant_past_the_last_axis(rng):
    """broadcast=1, axis=2 with a [C, 1, 1] constant would need a fifth axis."""
    model = Path(rng, X4, opset=6).conv(3, 6).add("Add", per_channel(rng, 6, (6, 1, 1)), name="step", broadcast=1,
                                                   axis=2).bn(6).model(checked=False)
    refused(model, "not-per-channel", "does not broadcast onto a rank-4 input")


def test_legacy_constant_as_first_operand(rng):
    """Before opset 7 only the second operand broadcasts: c + x with a [C] constant c is no per-channel
    Add, whatever broadcast and axis say."""
    path = Path(rng, X4, opset=6).conv(3, 6)
    model = path.add("Add", per_channel(rng, 6), name="step", const_first=True, broadcast=1, axis=1).bn(6)
    refused(model.model(checked=False), "not-per-channel", "does not broadcast onto a rank-4 input")


def test_legacy_constant_without_broadcast(rng):
    """broadcast=0 with a [C] constant: Add-6 requires equal shapes; bnfold does not guess an axis."""
    model = Path(rng, X4, opset=6).conv(3, 6).add("Add", per_channel(rng, 6), name="step").bn(6).model(checked=False)
    refused(model, "not-per-channel", "does not broadcast onto a rank-4 input")
