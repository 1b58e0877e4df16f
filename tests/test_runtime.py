"""bnfold.runtime: what a Session returns is the caller's to keep."""

import gc

import numpy as np
from onnx import helper

from bnfold.runtime import create_session
from tests.builders import make_model, tensor


def test_an_output_that_is_also_an_input_outlives_the_feed():
    """onnxruntime hands such an output back as a view of the feed's memory: Session.run copies it."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x", np.float32, [64, 64])],
                       [tensor("x", np.float32, [64, 64]), tensor("y", np.float32, [64, 64])], [])
    session = create_session(model)
    feed = np.full((64, 64), 3.0, np.float32)
    out = session.run({"x": feed}, ["x"])["x"]
    assert not np.shares_memory(out, feed)
    del feed
    gc.collect()
    np.testing.assert_array_equal(out, np.full((64, 64), 3.0, np.float32))
