"""The reparameterize pass: parallel Conv / identity branches over one input merged into one Conv, each
case checked against the original (onnxruntime, optimizations off, and onnx's reference evaluator), and
one test per refusal, each failing if its check is removed."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, make_model, op_types, tensor

F32 = np.float32


class Block:
    """A hand-built graph: x -> Relu -> branches over r -> sum -> y."""

    def __init__(self, rng, channels=8, size=6, input_channels=None):
        self.rng, self.channels = rng, channels
        self.inputs = [tensor("x", F32, [1, input_channels or channels, size, size])]
        self.nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
        self.inits: list = []

    def conv(self, name, kernel, source="r", bias=True, cin=None, groups=1, **attrs):
        w = self.rng.normal(0, 0.5, (self.channels, (cin or self.channels) // groups, *kernel)).astype(F32)
        self.inits.append(numpy_helper.from_array(w, f"{name}_W"))
        inputs = [source, f"{name}_W"]
        if bias:
            self.inits.append(numpy_helper.from_array(self.rng.normal(0, 0.5, self.channels).astype(F32), f"{name}_B"))
            inputs.append(f"{name}_B")
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, group=groups, **attrs))
        return name

    def bn(self, name, source="r"):
        self.inits += bn_initializers(bn_stats(self.rng, self.channels), F32, prefix=name)
        self.nodes.append(bn_node(source, name, prefix=name))
        return name

    def add(self, a, b, name):
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        return name

    def model(self, output, *, extra_outputs=(), opset=17):
        outputs = [tensor(output, F32, None)] + [tensor(o, F32, None) for o in extra_outputs]
        return make_model(self.nodes, self.inputs, outputs, self.inits, opset)


def merged(model, **options):
    folded, report = fold_model(model, **options)
    sums = next(p for p in report.passes if p.name == "reparameterize").decisions
    return folded, report, sums


def assert_merged_into_one_conv(model, count=1):
    folded, report, sums = merged(model)
    assert [d.reason for d in sums] == ["merged"] * count, sums
    assert op_types(folded).count("Conv") == 1 and "Add" not in op_types(folded), op_types(folded)
    assert "BatchNormalization" not in op_types(folded)
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, atol=1e-4)
    return folded, report


# ------------------------------------------------------------------------------------------ merges
def test_repvgg_block_3x3_1x1_identity_bn(rng):
    b = Block(rng)
    b.add(b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1), bias=False), "a1"), b.bn("bid"), "y")
    folded, report = assert_merged_into_one_conv(b.model("y"))
    bn = next(d for d in report.decisions if d.node == "bid")
    assert (bn.reason, bn.rule, bn.neighbour) == ("folded", "reparameterize", "c3")
    assert report.folded == report.total == 1
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert (conv.name, conv.input[1], conv.output[0]) == ("c3", "c3_W", "y")  # the kept weight keeps its name


def test_conv_bn_branches_are_merged_from_the_original_weights_rounded_once(rng):
    """RepVGG's train form: 3x3 Conv+BN, 1x1 Conv+BN, BN(x). The merged kernel is the float64 sum of
    s_i * W_i from the original weights, rounded once: bit for bit what numpy computes."""
    b = Block(rng)
    c3 = b.bn("bn3", source=b.conv("c3", (3, 3), pads=[1, 1, 1, 1]))
    c1 = b.bn("bn1", source=b.conv("c1", (1, 1), bias=False))
    b.add(b.add(c3, c1, "a1"), b.bn("bid"), "y")
    model = b.model("y")
    folded, report = assert_merged_into_one_conv(model)
    assert [(d.node, d.reason, d.rule) for d in report.decisions] == [
        ("bn3", "folded", "reparameterize"), ("bn1", "folded", "reparameterize"), ("bid", "folded", "reparameterize")]
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}

    def affine(prefix):
        scale = values[f"{prefix}_scale"] / np.sqrt(values[f"{prefix}_var"] + np.float32(1e-5).astype(np.float64))
        return scale, values[f"{prefix}_B"] - values[f"{prefix}_mean"] * scale
    (s3, t3), (s1, t1), (sid, tid) = affine("bn3"), affine("bn1"), affine("bid")
    expected = values["c3_W"] * s3[:, None, None, None]
    expected[:, :, 1:2, 1:2] += values["c1_W"] * s1[:, None, None, None]
    expected[np.arange(8), np.arange(8), 1, 1] += sid
    bias = s3 * values["c3_B"] + t3 + t1 + tid
    got = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    np.testing.assert_array_equal(got[conv.input[1]], expected.astype(F32))
    np.testing.assert_array_equal(got[conv.input[2]], bias.astype(F32))


def test_identity_branch_without_bn_and_operands_in_either_order(rng):
    b = Block(rng)
    b.add("r", b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), "y")
    assert_merged_into_one_conv(b.model("y"))


def test_acnet_asymmetric_branches_without_a_square_one(rng):
    """1x3 + 3x1 only: the merged kernel is 3x3, its pads from each axis's widest branch."""
    b = Block(rng)
    b.add(b.conv("h", (1, 3), pads=[0, 1, 0, 1]), b.conv("v", (3, 1), pads=[1, 0, 1, 0]), "y")
    folded, _ = assert_merged_into_one_conv(b.model("y"))
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [1, 1, 1, 1]


def test_mobileone_depthwise_branches_in_a_sum(rng):
    """Several depthwise 3x3 branches, a 1x1 scale branch and an identity BN, as one Sum."""
    c = 8
    b = Block(rng, c)
    names = [b.conv(f"k{i}", (3, 3), groups=c, pads=[1, 1, 1, 1]) for i in range(3)]
    names += [b.conv("scale", (1, 1), groups=c), b.bn("bid")]
    b.nodes.append(helper.make_node("Sum", names, ["y"], name="sum"))
    assert_merged_into_one_conv(b.model("y"))


def test_strided_branches_without_identity(rng):
    b = Block(rng, size=7)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), b.conv("c1", (1, 1), strides=[2, 2]), "y")
    assert_merged_into_one_conv(b.model("y"))


def test_grouped_identity_maps_each_channel_to_its_own_slot(rng):
    b = Block(rng, channels=8)
    b.add(b.conv("g", (3, 3), groups=2, pads=[1, 1, 1, 1]), b.bn("bid"), "y")
    assert_merged_into_one_conv(b.model("y"))


def test_dilated_branches_on_the_same_grid(rng):
    b = Block(rng, size=9)
    b.add(b.conv("d3", (3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]), b.conv("d1", (1, 1), dilations=[2, 2]), "y")
    assert_merged_into_one_conv(b.model("y"))


def test_conv1d_branches(rng):
    w3, w1 = rng.normal(size=(4, 4, 3)).astype(F32), rng.normal(size=(4, 4, 1)).astype(F32)
    nodes = [helper.make_node("Conv", ["x", "W3"], ["a"], name="a", pads=[1, 1]),
             helper.make_node("Conv", ["x", "W1"], ["b"], name="b"), helper.make_node("Add", ["a", "b"], ["y"], name="s")]
    model = make_model(nodes, [tensor("x", F32, [1, 4, 10])], [tensor("y", F32, None)],
                       [numpy_helper.from_array(w3, "W3"), numpy_helper.from_array(w1, "W1")])
    assert_merged_into_one_conv(model)


def test_bn_after_the_sum_folds_into_the_merged_conv(rng):
    """RepViT: BN(dw3x3 + dw1x1 + x); the fold pass left the BN, the merge makes it foldable."""
    c = 8
    b = Block(rng, c)
    s = b.add(b.add(b.conv("k3", (3, 3), groups=c, pads=[1, 1, 1, 1]), b.conv("k1", (1, 1), groups=c), "a1"), "r", "a2")
    b.bn("y", source=s)
    folded, report = assert_merged_into_one_conv(b.model("y"))
    bn = report.decisions[0]
    assert (bn.node, bn.reason, bn.rule, bn.neighbour) == ("y", "folded", "reparameterize", "k3"), bn
    assert report.left_by_reason == {}
    assert [o.name for o in folded.graph.output] == ["y"]


def test_a_bn_after_the_sum_that_cannot_fold_stays(rng):
    """Its statistics are not constants: the branches merge, the BN stays for the fold pass to judge."""
    c = 8
    b = Block(rng, c)
    s = b.add(b.conv("k3", (3, 3), groups=c, pads=[1, 1, 1, 1]), b.conv("k1", (1, 1), groups=c), "a1")
    b.bn("y", source=s)
    b.inits = [i for i in b.inits if i.name != "y_mean"]
    b.inputs.append(tensor("y_mean", F32, [c]))
    folded, report, sums = merged(b.model("y"))
    assert [d.reason for d in sums] == ["merged"] and op_types(folded) == ["Relu", "Conv", "BatchNormalization"]
    assert report.decisions[0].reason == "weights-not-constant"
    assert_same_function(b.model("y"), folded)


def test_x_plus_zero_goes_first(rng):
    """timm's MobileOne writes `0 + conv(x)` for an absent branch: the zero Add is the identity."""
    b = Block(rng)
    b.inits.append(numpy_helper.from_array(np.zeros((), F32), "zero"))
    z = b.add("zero", b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), "z")
    b.add(z, b.conv("c1", (1, 1)), "y")
    folded, _, sums = merged(b.model("y"))
    assert [d.reason for d in sums] == ["zero-add-removed", "merged"]
    assert op_types(folded) == ["Relu", "Conv"]
    assert_same_function(b.model("y"), folded)


def test_a_zero_add_that_would_broadcast_its_input_stays(rng):
    b = Block(rng)
    b.inits.append(numpy_helper.from_array(np.zeros((2, 1, 1, 1), F32), "zero"))
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), "zero", "y")
    folded, _, sums = merged(b.model("y"))
    assert sums == [] and "Add" in op_types(folded)


def test_a_zero_add_writing_a_graph_output_hands_its_name_to_the_producer(rng):
    b = Block(rng)
    b.inits.append(numpy_helper.from_array(np.zeros(8, F32).reshape(8, 1, 1), "zero"))
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), "zero", "y")
    model = b.model("y")
    folded, _, sums = merged(model)
    assert [d.reason for d in sums] == ["zero-add-removed"] and op_types(folded) == ["Relu", "Conv"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert_same_function(model, folded)


def test_no_reparameterize_leaves_every_branch(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.bn("bid"), "y")
    model = b.model("y")
    folded, report, sums = merged(model, reparameterize=False)
    assert sums == [] and op_types(folded) == op_types(model)
    assert report.decisions[0].reason == "no-foldable-neighbour"


# ---------------------------------------------------------------------------------------- refusals
def refused(model, reason):
    folded, report, sums = merged(model)
    assert [d.reason for d in sums] == [reason], sums
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()
    return sums[0]


def test_stride_mismatch(rng):
    """On a 1x1 input both give a 1x1 output, on different grids."""
    b = Block(rng, size=1)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), b.conv("c1", (1, 1), strides=[1, 1]), "y")
    refused(b.model("y"), "branch-mismatch")


def test_group_mismatch(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1], groups=2), b.conv("c1", (1, 1), groups=1), "y")
    refused(b.model("y"), "branch-mismatch")


@pytest.mark.parametrize("shifted", [{"pads": [2, 2, 0, 0]}, {"pads": [1, 1, 3, 3], "dilations": [2, 2]}],
                         ids=["shifted-by-one", "shifted-by-half-a-dilation"])
def test_misaligned_padding(rng, shifted):
    """Two 3x3 branches with outputs of one shape, the second's kernel shifted off the first's grid."""
    b = Block(rng, size=8)
    centred = {"pads": [2, 2, 2, 2], "dilations": [2, 2]} if "dilations" in shifted else {"pads": [1, 1, 1, 1]}
    b.add(b.conv("c3", (3, 3), **centred), b.conv("s3", (3, 3), **shifted), "y")
    refused(b.model("y"), "padding-misaligned")


def test_an_off_centre_kernel_on_the_same_grid_merges(rng):
    """A 3x3 padded at the end only and a 1x1: the 1x1 reads the 3x3's first tap."""
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[0, 0, 2, 2]), b.conv("c1", (1, 1)), "y")
    assert_merged_into_one_conv(b.model("y"))


def test_auto_pad_same_is_not_merged(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), auto_pad="SAME_UPPER"), b.conv("c1", (1, 1)), "y")
    refused(b.model("y"), "padding-misaligned")


def test_identity_with_stride(rng):
    """On a 1x1 input a strided 3x3 keeps the shape, but its grid is not the input's."""
    b = Block(rng, size=1)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), "r", "y")
    refused(b.model("y"), "identity-not-one-to-one")


def test_identity_that_broadcasts_one_channel_onto_many(rng):
    b = Block(rng, channels=8, input_channels=1)
    b.add(b.conv("c3", (1, 1), cin=1), "r", "y")
    refused(b.model("y"), "identity-not-one-to-one")


def test_branch_read_elsewhere(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "y")
    b.nodes.append(helper.make_node("Relu", ["c1"], ["other"], name="other"))
    refused(b.model("y", extra_outputs=["other"]), "neighbour-has-other-consumers")


def test_branch_is_a_graph_output(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "y")
    refused(b.model("y", extra_outputs=["c1"]), "neighbour-output-is-graph-output")


def test_non_constant_weight(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "y")
    b.inits = [i for i in b.inits if i.name != "c1_W"]
    b.inputs.append(tensor("c1_W", F32, [8, 8, 1, 1]))
    refused(b.model("y"), "weights-not-constant")


def test_non_branch_operand(rng):
    b = Block(rng)
    b.add(b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "a1"), "x", "y")
    folded, _, sums = merged(b.model("y"))  # the outer Add adds x, not a branch of r; the inner one merges
    assert [(d.node, d.reason) for d in sums] == [("a1", "merged"), ("y", "non-branch-operand")]
    b2 = Block(rng)
    names = [b2.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b2.conv("c1", (1, 1)), "x"]
    b2.nodes.append(helper.make_node("Sum", names, ["y"], name="sum"))
    refused(b2.model("y"), "non-branch-operand")


def test_an_excluded_identity_bn_is_not_merged(rng):
    b = Block(rng)
    b.add(b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "a1"), b.bn("bid"), "y")
    folded, report = fold_model(b.model("y"), exclude_nodes=["bid"])
    sums = next(p for p in report.passes if p.name == "reparameterize").decisions
    assert [d.reason for d in sums] == ["merged", "excluded-by-user"]
    assert "BatchNormalization" in op_types(folded)
    assert_same_function(b.model("y"), folded)


def test_a_training_mode_identity_bn_is_not_merged(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.bn("bid"), "y")
    b.nodes[-2].attribute.append(helper.make_attribute("training_mode", 1))
    b.nodes[-2].output.extend(["running_mean", "running_var"])
    refused(b.model("y"), "training-mode")
