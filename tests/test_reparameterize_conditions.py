"""Each condition of the reparameterize pass pinned by reason code and detail text, and each merge
checked against the original: a test fails when a condition, a message or a rewrite step changes."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import assert_same_function, make_model, op_types, tensor
from tests.test_reparameterize import Block, assert_merged_into_one_conv, merged, refused

F32 = np.float32


def detail(model, reason, **options):
    folded, report, sums = merged(model, **options)
    assert [d.reason for d in sums] == [reason], sums
    return sums[0].detail


def attrs(folded, name):
    node = next(n for n in folded.graph.node if n.name == name)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------- refusals
def test_refusal_details(rng):
    b = Block(rng, size=1)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), b.conv("c1", (1, 1)), "y")
    assert refused(b.model("y"), "branch-mismatch").detail == \
        "Conv 'c1' differs from Conv 'c3' in weight shape, dtype, group, strides or dilations"
    b = Block(rng, size=8)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("s3", (3, 3), pads=[2, 2, 0, 0]), "y")
    assert refused(b.model("y"), "padding-misaligned").detail == \
        "Conv 's3' (kernel 3, pads 2/0) is not on the output grid of a kernel 3 with pads 1/1 along spatial axis 0"
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), auto_pad="SAME_UPPER"), b.conv("c1", (1, 1)), "y")
    assert refused(b.model("y"), "padding-misaligned").detail == \
        "Conv 'c3' has auto_pad=SAME_UPPER: its pads depend on the input size"
    b = Block(rng, channels=8, input_channels=1)
    b.add(b.conv("c3", (1, 1), cin=1), "r", "y")
    assert refused(b.model("y"), "identity-not-one-to-one").detail == \
        "the Convs map 1 input channels to 8 outputs: an identity branch needs as many of each"
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "y")
    b.nodes.append(helper.make_node("Relu", ["c1"], ["other"], name="other"))
    assert refused(b.model("y", extra_outputs=["other"]), "neighbour-has-other-consumers").detail == \
        "Conv 'c1' output c1 is also read by Relu 'other'"


def test_an_excluded_conv_branch_bn_is_refused_by_name(rng):
    b = Block(rng)
    b.add(b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.bn("b1", b.conv("c1", (1, 1))), "a1"), "r", "y")
    model = b.model("y")
    folded, report, sums = merged(model, exclude_nodes=["b1"])
    assert {(d.reason, d.detail) for d in sums} == {("excluded-by-user", "the branch's BN 'b1' is excluded by name")}
    assert folded.graph.SerializeToString() == model.graph.SerializeToString()


def test_an_identity_off_the_grid_of_a_dilated_kernel(rng):
    """Pads 1/3 with dilation 2: the right output size, but every tap reads x at an odd offset."""
    b = Block(rng, size=8)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 3, 3], dilations=[2, 2]), "r", "y")
    assert refused(b.model("y"), "identity-not-one-to-one").detail == \
        "the merged Conv does not map x onto itself along spatial axis 0 (stride 1, pads 1/3, kernel 3)"


@pytest.mark.parametrize("conv", [{"pads": [0, 0, 2, 2]}, {"pads": [2, 2, 2, 2], "dilations": [2, 2]},
                                  {"pads": [0, 0, 4, 4], "dilations": [2, 2]}])
def test_an_identity_at_any_tap_of_the_merged_kernel(rng, conv):
    b = Block(rng, size=8)
    b.add(b.conv("c3", (3, 3), **conv), b.bn("bid"), "y")
    assert_merged_into_one_conv(b.model("y"))


# ------------------------------------------------------------------------------------------ merges
def test_the_merge_detail_names_each_branch(rng):
    b = Block(rng)
    b.add(b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.bn("b1", b.conv("c1", (1, 1))), "a1"), "r", "y")
    folded, report = assert_merged_into_one_conv(b.model("y"))
    sums = next(p for p in report.passes if p.name == "reparameterize").decisions
    assert sums[0].detail == "3 branches over r merged into Conv 'c3': Conv 'c3', Conv 'c1' + BatchNormalization 'b1', identity"
    bn = next(d for d in report.decisions if d.node == "b1")
    assert (bn.reason, bn.detail, bn.neighbour, bn.neighbour_op) == (
        "folded", "merged with its Conv's branch into Conv 'c3' (reparameterize)", "c3", "Conv")


def test_valid_branches_merge_and_lose_auto_pad(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), auto_pad="VALID"), b.conv("d3", (3, 3), auto_pad="VALID"), "y")
    folded, _ = assert_merged_into_one_conv(b.model("y"))
    assert "auto_pad" not in attrs(folded, "c3") and "pads" not in attrs(folded, "c3")


def test_merged_pads_of_zero_are_no_attribute(rng):
    b = Block(rng)
    b.add(b.conv("c1", (1, 1), pads=[0, 0, 0, 0]), b.conv("d1", (1, 1)), "y")
    folded, _ = assert_merged_into_one_conv(b.model("y"))
    assert "pads" not in attrs(folded, "c1")


def test_the_largest_kernel_is_kept_whatever_the_order(rng):
    b = Block(rng)
    b.add(b.conv("c13", (1, 3), pads=[0, 1, 0, 1]), b.conv("c33", (3, 3), pads=[1, 1, 1, 1]), "y")
    folded, _ = assert_merged_into_one_conv(b.model("y"))
    assert [n.name for n in folded.graph.node if n.op_type == "Conv"] == ["c33"]


def test_kernel_shape_follows_the_merged_kernel(rng):
    """3x1 and 1x3 (equal size, the first kept): the kept Conv's kernel_shape becomes 3x3."""
    b = Block(rng)
    b.add(b.conv("c31", (3, 1), pads=[1, 0, 1, 0], kernel_shape=[3, 1]),
          b.conv("c13", (1, 3), pads=[0, 1, 0, 1], kernel_shape=[1, 3]), "y")
    folded, _ = assert_merged_into_one_conv(b.model("y"))
    assert attrs(folded, "c31")["kernel_shape"] == [3, 3]


def test_a_kept_conv_without_bias_gets_one_named_after_it(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1], bias=False), b.conv("c1", (1, 1), bias=False), "y")
    folded, _ = assert_merged_into_one_conv(b.model("y"))
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.input[2] == "c3_W_bias"


# ----------------------------------------------------------------------------------- BN after sum
def test_a_bn_after_a_sum_read_twice_stays(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "s")
    b.bn("y", "s")
    b.nodes.append(helper.make_node("Relu", ["s"], ["other"], name="other"))
    model = b.model("y", extra_outputs=["other"])
    folded, _, _ = merged(model)
    assert_same_function(model, folded, atol=1e-4)


def test_a_bn_after_a_sum_that_is_a_graph_output_stays(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "s")
    b.bn("y", "s")
    model = b.model("y", extra_outputs=["s"])
    folded, _, _ = merged(model)
    assert_same_function(model, folded, atol=1e-4)


def test_an_excluded_bn_after_the_sum_is_not_merged(rng):
    b = Block(rng)
    b.add(b.conv("c3", (3, 3), pads=[1, 1, 1, 1]), b.conv("c1", (1, 1)), "s")
    b.bn("y", "s")
    model = b.model("y")
    folded, report = fold_model(model, exclude_nodes=["y"])
    assert "BatchNormalization" in op_types(folded)
    assert_same_function(model, folded, atol=1e-4)


# ------------------------------------------------------------------------------------------ x + 0
def zero_add(rng, zero_shape, output="y", extra=()):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["r", "z"], [output], name="add")]
    nodes += list(extra)
    inits = [numpy_helper.from_array(np.zeros(zero_shape, F32), "z")]
    return nodes, inits


def removed(model):
    folded, report, sums = merged(model)
    assert_same_function(model, folded)
    return [d.reason for d in sums] == ["zero-add-removed"]


def test_a_zero_of_the_same_rank_is_removed(rng):
    nodes, inits = zero_add(rng, (1, 8, 1, 1), extra=[helper.make_node("Relu", ["y"], ["o"], name="o")])
    model = make_model(nodes, [tensor("x", F32, [1, 8, 6, 6])], [tensor("o", F32, None)], inits)
    assert removed(model)


@pytest.mark.parametrize("case", ["input-is-output-data", "data-read-twice", "data-is-output"])
def test_a_zero_add_writing_a_graph_output_that_cannot_be_handed_over_stays(rng, case):
    z = numpy_helper.from_array(np.zeros((1, 8, 1, 1), F32), "z")
    outputs = [tensor("y", F32, None)]
    if case == "input-is-output-data":
        nodes = [helper.make_node("Add", ["x", "z"], ["y"], name="add")]
    else:
        nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["r", "z"], ["y"], name="add")]
        if case == "data-read-twice":
            nodes.append(helper.make_node("Neg", ["r"], ["other"], name="other"))
            outputs.append(tensor("other", F32, None))
        else:
            outputs.append(tensor("r", F32, None))
    model = make_model(nodes, [tensor("x", F32, [1, 8, 6, 6])], outputs, [z])
    assert not removed(model)


def test_a_zero_added_to_a_constant_stays(rng):
    inits = [numpy_helper.from_array(np.ones((1, 8, 6, 6), F32), "c"), numpy_helper.from_array(np.zeros(1, F32), "z")]
    nodes = [helper.make_node("Add", ["c", "z"], ["s"], name="add"), helper.make_node("Add", ["x", "s"], ["y"], name="out")]
    model = make_model(nodes, [tensor("x", F32, [1, 8, 6, 6])], [tensor("y", F32, None)], inits)
    folded, report, sums = merged(model)
    assert "zero-add-removed" not in [d.reason for d in sums]
