"""Conditions of bnfold.rules.path pinned by reason code and detail text."""

import numpy as np
import pytest
from onnx import helper

from bnfold.graph import GraphIndex, ModelContext
from bnfold.rules.base import Refusal
from bnfold.rules.path import Channels, channels_along, flat_form, transparency_refusal


def index_at(opset):
    graph = helper.make_graph([], "g", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return GraphIndex(model.graph, ModelContext(model))


def refusal(call):
    with pytest.raises(Refusal) as info:
        call()
    return info.value.reason, info.value.detail


def test_identity_is_transparent_at_any_opset():
    """Before opset 7 a Dropout without is_test drops values; an Identity never does."""
    identity = helper.make_node("Identity", ["a"], ["b"], name="id")
    assert transparency_refusal(identity, index_at(6)) is None
    dropout = helper.make_node("Dropout", ["a"], ["b"], name="d")
    found = transparency_refusal(dropout, index_at(6))
    assert (found.reason, found.detail) == ("dropout-in-training-mode", "Dropout 'd' has is_test=0 (opset 6): it drops values")


def test_one_channel_along_an_axis_of_unknown_size():
    one = Channels(np.array([0]), 1, 1)
    assert refusal(lambda: channels_along(one, [2, 3, None], 2, "T")) == (
        "shape-unknown", "T has shape [2, 3, ?]: the size of axis 2 is unknown")
    np.testing.assert_array_equal(channels_along(one, [2, 3, 4], 2, "T"), [0, 0, 0, 0])


def test_channels_along_another_axis():
    labels = np.arange(3)
    assert refusal(lambda: channels_along(Channels(labels, 1, 1), [2, 3, 4], 2, "T")) == (
        "channel-axis-mismatch", "the BN's channels lie along axis 1 of T, not axis 2")


def test_flat_channels_regrouped():
    labels = np.arange(3)
    flat = flat_form(Channels(labels, 1, 1), [2, 3, 4], "T")
    assert (flat.axis, flat.inner) == (None, 4)
    np.testing.assert_array_equal(channels_along(flat, [2, 12], 1, "T"), np.repeat(labels, 4))
    assert refusal(lambda: channels_along(flat, [2, 4, 3], 1, "T")) == (
        "channel-axis-mismatch", "axis 1 of T (shape [2, 4, 3]) does not carry one of the BN's 3 channels per index")
    assert refusal(lambda: channels_along(flat, [2, None], 1, "T")) == (
        "shape-unknown", "T has shape [2, ?]: the size of axis 1 is unknown")


def test_flat_form_of_one_channel():
    flat = flat_form(Channels(np.array([5]), 1, 1), [2, None], "T")
    assert (flat.axis, flat.inner) == (None, 1)


def test_flat_form_needs_the_sizes_after_the_channel_axis():
    reason, detail = refusal(lambda: flat_form(Channels(np.arange(3), 1, 1), [2, 3, None], "T"))
    assert reason == "shape-unknown" and detail.startswith("T "), detail
