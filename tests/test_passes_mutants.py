"""Pass and rewrite behaviour that mutation testing found unchecked (docs/mutation.md): the JSON form of a
pass result, the words for a BN with no foldable neighbour, and dtype-only readers of a removed BN."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import assert_same_function, bn_initializers, bn_node, bn_stats, conv_bn, make_model, tensor


def test_pass_result_to_dict_is_the_documented_json(rng):
    _, report = fold_model(conv_bn(rng))
    result = next(p for p in report.passes if p.name == "fold-batchnorm")
    assert result.to_dict() == {"name": "fold-batchnorm", "modified": True,
                                "decisions": [dataclasses.asdict(d) for d in result.decisions]}
    assert result.to_dict()["decisions"][0]["reason"] == "folded"


@pytest.mark.parametrize("case,detail", [
    ("input-to-output", "fed by input 'x', read by graph output"),
    ("relu-to-two", "fed by Relu 'relu', read by Sigmoid, Tanh"),
])
def test_no_foldable_neighbour_says_what_surrounds_the_bn(rng, case, detail):
    nodes, outputs = [], []
    source = "x"
    if case == "relu-to-two":
        nodes.append(helper.make_node("Relu", ["x"], ["r"], name="relu"))
        source = "r"
    nodes.append(bn_node(source, "h"))
    if case == "relu-to-two":
        nodes += [helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
                  helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid")]
        outputs = [tensor("t", np.float32, None), tensor("s", np.float32, None)]
    else:
        outputs = [tensor("h", np.float32, None)]
    model = make_model(nodes, [tensor("x", np.float32, [2, 4, 3, 3])], outputs,
                       bn_initializers(bn_stats(rng, 4), np.float32))
    _, report = fold_model(model)
    decision = report.decisions[0]
    assert (decision.reason, decision.detail) == ("no-foldable-neighbour", detail)


def test_dtype_only_reader_of_a_bn_folded_forward_reads_the_bn_input(rng):
    """A CastLike that reads the BN's output only for its dtype must read the BN's input after the BN
    is folded into the Conv behind it (same dtype), or the model would read a removed tensor."""
    inits = bn_initializers(bn_stats(rng, 4), np.float32)
    inits += [numpy_helper.from_array(rng.normal(size=(6, 4, 1, 1)).astype(np.float32), "W"),
              numpy_helper.from_array(np.arange(3, dtype=np.float64), "v")]
    nodes = [bn_node("x", "bn_out"), helper.make_node("CastLike", ["v", "bn_out"], ["z"], name="castlike"),
             helper.make_node("Conv", ["bn_out", "W"], ["y"], name="conv")]
    model = make_model(nodes, [tensor("x", np.float32, [2, 4, 5, 5])],
                       [tensor("y", np.float32, None), tensor("z", np.float32, [3])], inits)
    folded, report = fold_model(model)
    assert report.folded == 1
    castlike = next(n for n in folded.graph.node if n.op_type == "CastLike")
    assert list(castlike.input) == ["v", "x"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded)


def test_dtype_only_reader_of_a_conv_output_reads_the_bn_output_after_the_fold(rng):
    """Conv -> BN: the Conv now produces the BN's output name, so a CastLike that read the Conv's output
    for its dtype reads the BN's output name instead."""
    model = conv_bn(rng)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.float64), "v"))
    graph.node.append(helper.make_node("CastLike", ["v", "conv_out"], ["z"], name="castlike"))
    graph.output.append(tensor("z", np.float32, [3]))
    model = make_model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    folded, report = fold_model(model)
    assert report.folded == 1
    castlike = next(n for n in folded.graph.node if n.op_type == "CastLike")
    assert list(castlike.input) == ["v", "y"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded)


def test_refusal_and_not_constant_print_their_detail():
    from bnfold.constants import NotConstant
    from bnfold.rules.base import Refusal
    assert str(Refusal("rank-unknown", "the rank of x is unknown")) == "rank-unknown: the rank of x is unknown"
    assert str(NotConstant("weights-not-constant", "x is a graph input")) == "x is a graph input"
