"""bnfold.fold_graph: an onnx-graphsurgeon Graph folded in place, as the same model is folded from a file.

Also run on the lowest supported onnx-graphsurgeon (constraints-lowest.txt), whose Graph has no
ir_version and whose export writes onnx's newest IR version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.io import check_weightless
from bnfold.report import op_counts
from tests.builders import assert_same_function, at_least, conv_bn, if_model, random_feeds, run_ort

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
REPVGG_BN = "node__native_batch_norm_legit_no_training_3__0"  # one of repvgg_small's


def imported(name: str) -> gs.Graph:
    return gs.import_onnx(onnx.load(SAMPLES / f"{name}.onnx"))


def reported(report: bnfold.FoldReport) -> dict:
    """Everything a report says but the model's path, which only a file fold has."""
    return {key: value for key, value in report.to_dict().items() if key != "model"}


def initializers(model: onnx.ModelProto) -> dict[str, tuple]:
    """Every initializer of every graph: name -> (type, dims, bytes of its values)."""
    found = {}
    for graph in _graphs(model.graph):
        for t in graph.initializer:
            found[t.name] = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
    return found


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def assert_same_fold(folded: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    """Same ops, same initializers bit for bit, the same outputs bit for bit."""
    assert op_counts(folded) == op_counts(expected)
    assert initializers(folded) == initializers(expected)
    feeds = random_feeds(expected)
    for name, values in run_ort(expected, feeds).items():
        np.testing.assert_array_equal(run_ort(folded, feeds)[name], values, err_msg=name)


def graph_state(graph: gs.Graph) -> tuple:
    """What the caller sees: the graph's attributes, its lists' members by identity, and its export."""
    lists = tuple(tuple(map(id, getattr(graph, key))) for key in ("nodes", "inputs", "outputs", "functions"))
    return dict(vars(graph)), lists, gs.export_onnx(graph, do_type_check=False).SerializeToString()


# resnet_small: Conv + BN; repvgg_small: branches merged first; resnet_qat: BN folded into Q/DQ scales;
# levit_block: MatMul + BN across Reshapes.
@pytest.mark.parametrize("name, options", [
    ("resnet_small", {}),
    ("repvgg_small", {}),
    ("repvgg_small", {"reparameterize": False, "lower_standalone": "mul-add", "exclude_nodes": [REPVGG_BN]}),
    ("resnet_qat", {}),
    ("levit_block", {}),
])
def test_fold_graph_folds_as_the_file_fold(name, options, tmp_path):
    source = SAMPLES / f"{name}.onnx"
    by_file = bnfold.fold_file(source, tmp_path / "folded.onnx", **options)
    graph = imported(name)
    report = bnfold.fold_graph(graph, **options)
    folded = gs.export_onnx(graph)
    onnx.checker.check_model(folded, full_check=True)
    assert report.folded > 0 and reported(report) == reported(by_file)
    assert_same_fold(folded, onnx.load(tmp_path / "folded.onnx"))
    if name != "resnet_qat":  # quantized models are verified layer by layer: README, "Quantized"
        assert bnfold.verify_models(source, folded)


def test_options_reach_the_pipeline(rng):
    """assume_inference, which no sample needs: a training-mode BN folds only with it."""
    graph = gs.import_onnx(conv_bn(rng))
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    bn.attrs["training_mode"] = 1
    bn.outputs += [gs.Variable("running_mean"), gs.Variable("running_var")]  # as the operator requires then
    assert bnfold.fold_graph(graph).left_by_reason == {"training-mode": 1}
    report = bnfold.fold_graph(graph, assume_inference=True)
    assert report.folded == 1
    assert [n.op for n in graph.nodes] == ["Conv"]


def test_bn_in_a_subgraph(rng):
    """graphsurgeon exports an outer initializer read in a branch as an initializer of that branch, so
    the initializers are compared with the fold of graphsurgeon's own export; the decisions and ops
    with the fold of the original model."""
    model = if_model(rng)
    graph = gs.import_onnx(model)
    exported = gs.export_onnx(graph)
    report = bnfold.fold_graph(graph)
    folded = gs.export_onnx(graph)
    by_model, expected = bnfold.fold_model(model)
    assert report.folded == 1 and report.decisions[0].graph == "if:then_branch"
    assert [(d.graph, d.node, d.reason) for d in report.decisions] == \
           [(d.graph, d.node, d.reason) for d in expected.decisions]
    assert op_counts(folded) == op_counts(by_model)
    by_export, expected = bnfold.fold_model(exported)
    assert reported(report) == reported(expected)
    assert_same_fold(folded, by_export)
    assert_same_function(model, folded)


def test_the_callers_graph_object_is_folded_and_keeps_what_a_fold_keeps():
    source = onnx.load(SAMPLES / "resnet_small.onnx")
    graph = gs.import_onnx(source)
    gs.export_onnx(graph)  # graphsurgeon's own export marks a few fields of the tensors it imported
    before = source.SerializeToString()
    graph.doc_string = "edited"
    pipeline = {"graph": graph}  # another holder of the same object
    returned = bnfold.fold_graph(graph)
    assert isinstance(returned, bnfold.FoldReport) and returned.folded == 20
    assert pipeline["graph"] is graph and not [n for n in graph.nodes if n.op == "BatchNormalization"]
    model = gs.export_onnx(graph)
    assert (graph.name, graph.doc_string, graph.opset, graph.producer_name, graph.producer_version) == \
           (source.graph.name, "edited", 18, source.producer_name, source.producer_version)
    assert model.opset_import == source.opset_import
    if "ir_version" in vars(graph):  # onnx-graphsurgeon 0.5 has none: it exports onnx's newest
        assert model.ir_version == source.ir_version
    assert source.SerializeToString() == before  # the graph's constants pointed into it: never folded in place


def test_a_graph_built_with_graphsurgeon_keeps_its_unset_fields(rng):
    """An export sets import_domains, an import also ir_version (from onnx-graphsurgeon 0.6) and
    restarts the counter of the names graph.layer() generates; a fold, failed or not, leaves them."""
    model = conv_bn(rng)
    weights = {t.name: gs.Constant(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer}
    x = gs.Variable("x", np.float32, (2, 4, 7, 7))
    graph = gs.Graph(inputs=[x], opset=17)
    conv = graph.layer(op="Conv", inputs=[x, weights["W"], weights["b"]], outputs=["conv_out"])
    statistics = [weights[f"bn_{k}"] for k in ("scale", "B", "mean", "var")]
    y = graph.layer(op="BatchNormalization", inputs=[*conv, *statistics],
                    outputs=[gs.Variable("y", np.float32, (2, 6, 5, 5))])
    graph.outputs = y
    unset = {key: value for key, value in vars(graph).items() if key in ("import_domains", "ir_version")}
    assert set(unset.values()) == {None}
    counter = graph.name_idx
    with pytest.raises(bnfold.BnfoldError, match="no_such_bn"):  # refused by the pipeline, after the export
        bnfold.fold_graph(graph, exclude_nodes=["no_such_bn"])
    assert {key: vars(graph)[key] for key in unset} == unset
    assert bnfold.fold_graph(graph).folded == 1
    assert {key: vars(graph)[key] for key in unset} == unset
    assert graph.name_idx == counter > 0
    assert [n.op for n in graph.nodes] == ["Conv"]
    assert_same_function(model, gs.export_onnx(graph))


def test_a_graph_edited_with_graphsurgeon():
    """An Identity inserted between a Conv and its BN, the classifier head removed and cleaned up."""
    graph = imported("resnet_small")
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    conv_out = bn.inputs[0]
    moved = gs.Variable(f"{conv_out.name}_moved", conv_out.dtype, conv_out.shape)
    graph.nodes.append(gs.Node("Identity", name="inserted", inputs=[conv_out], outputs=[moved]))
    bn.inputs[0] = moved
    graph.outputs = [next(n for n in graph.nodes if n.op == "ReduceMean").outputs[0]]
    graph.cleanup().toposort()
    edited = gs.export_onnx(graph)
    report = bnfold.fold_graph(graph)
    assert report.folded == 20 and "Gemm" not in op_counts(edited)
    folded = gs.export_onnx(graph)
    onnx.checker.check_model(folded, full_check=True)
    assert op_counts(edited)["Identity"] == 1 and "Identity" not in op_counts(folded)
    by_model, expected = bnfold.fold_model(edited)
    assert reported(report) == reported(expected)
    assert_same_fold(folded, by_model)
    assert bnfold.verify_models(edited, folded)


def test_a_tensorrt_plugin_node_in_its_own_domain():
    """onnx's checker lets a node of an unknown domain pass; the export adds that domain to the graph's
    import list, which is the imported model's own: undone."""
    source = onnx.load(SAMPLES / "resnet_small.onnx")
    graph = gs.import_onnx(source)
    scores = gs.Variable("scores", np.float32, [1, 10])
    graph.nodes.append(gs.Node("Scores_TRT", domain="trt.plugins", inputs=graph.outputs, outputs=[scores]))
    graph.outputs = [scores]
    assert bnfold.fold_graph(graph).folded == 20
    assert [n.op for n in graph.nodes][-2:] == ["Gemm", "Scores_TRT"]
    assert [(d.domain, d.version) for d in graph.import_domains] == [("", 18)] == \
           [(d.domain, d.version) for d in source.opset_import]
    assert {d.domain for d in gs.export_onnx(graph).opset_import} == {"", "trt.plugins"}


def test_nodes_out_of_order_are_refused_and_the_graph_is_unchanged():
    graph = imported("resnet_small")
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    moved = gs.Variable("moved", np.float32)
    graph.nodes.append(gs.Node("Identity", name="inserted", inputs=[bn.inputs[0]], outputs=[moved]))
    bn.inputs[0] = moved  # without toposort(): the Identity comes after its reader
    state = graph_state(graph)
    with pytest.raises(bnfold.BnfoldError, match="^graph 'main_graph': the ONNX checker rejects") as caught:
        bnfold.fold_graph(graph)
    assert "toposort()" in caught.value.one_line() and "\n" not in caught.value.one_line()
    assert graph_state(graph) == state


@pytest.mark.parametrize("options, option, message", [
    ({"lower_standalone": "mul_add"}, "lower_standalone", "unknown value 'mul_add'"),
    ({"exclude_nodes": ["no_such_bn"]}, "exclude_nodes", "no_such_bn: no BatchNormalization node has that name"),
])
def test_a_bad_option_is_refused_and_the_graph_is_unchanged(options, option, message):
    graph = imported("resnet_small")
    state = graph_state(graph)
    with pytest.raises(bnfold.BnfoldError, match=message) as caught:
        bnfold.fold_graph(graph, **options)
    assert caught.value.option == option
    assert graph_state(graph) == state


def test_a_graph_graphsurgeon_cannot_export_is_refused_and_unchanged():
    graph = imported("resnet_small")
    graph.outputs[0].dtype = None  # graphsurgeon's export requires output dtypes
    state = graph_state(graph)
    with pytest.raises(bnfold.BnfoldError, match="^graph 'main_graph': onnx_graphsurgeon cannot export it: "):
        bnfold.fold_graph(graph)
    assert graph_state(graph) == state


@pytest.mark.parametrize("kind, named", [("inputs", "input 'input'"), ("outputs", "output 'output'")])
def test_a_shapeless_input_or_output_is_named_and_the_graph_is_unchanged(kind, named):
    graph = imported("resnet_small")
    getattr(graph, kind)[0].shape = None
    state = graph_state(graph)
    with pytest.raises(bnfold.BnfoldError, match=f"^graph 'main_graph': {named} has no shape"):
        bnfold.fold_graph(graph)
    assert graph_state(graph) == state


# The checker runs on a copy without the large weights, as for a file (bnfold.io.check_weightless):
# bnfold checks those itself. graphsurgeon exports an imported weight as the TensorProto it was.
STEM = "stem.0.0.weight"  # resnet_small's first Conv weight: 4704 bytes, left out of the checker's copy


def _float_data(tensor: onnx.TensorProto) -> None:
    """The same values in float_data, one short."""
    values = numpy_helper.to_array(tensor).ravel()[:-1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())


@pytest.mark.parametrize("change, message", [
    (lambda t: setattr(t, "raw_data", t.raw_data[:-4]), "raw_data size (4700 bytes) does not match the declared "
                                                        "shape and type (4704 bytes)"),
    (lambda t: setattr(t, "raw_data", t.raw_data + bytes(4)), "raw_data size (4708 bytes) does not match"),
    (lambda t: t.float_data.append(1.0), "should contain one and only one value field"),
    (_float_data, "float_data size (1175) is too small for the declared shape"),
], ids=["raw-data-short", "raw-data-long", "raw-data-and-float-data", "float-data-short"])
def test_weights_whose_values_do_not_match_their_shape_are_refused(change, message):
    """onnx's own checker refuses each but raw_data too long, which bnfold refuses in a file too."""
    model = onnx.load(SAMPLES / "resnet_small.onnx")
    change(next(t for t in model.graph.initializer if t.name == STEM))
    if "4708" not in message and at_least(onnx, "1.23"):  # onnx's checker checks sizes since 1.23; bnfold always
        with pytest.raises(onnx.checker.ValidationError):
            onnx.checker.check_model(model, full_check=True)
    graph = gs.import_onnx(model)
    state = graph_state(graph)
    with pytest.raises(bnfold.BnfoldError) as caught:
        bnfold.fold_graph(graph)
    line = caught.value.one_line()
    assert line.startswith("graph 'main_graph': bnfold's check of the weights rejects this model: "
                           f"TensorProto (tensor name: {STEM})"), line
    counted = "does not hold one value per element"  # bnfold's words where onnx's checker does not count
    assert message in line or (counted in line and "float_data" in message and not at_least(onnx, "1.23")), line
    assert "\n" not in line and graph_state(graph) == state


@pytest.mark.parametrize("declared_in", ["value_info", "output", "input"])
def test_a_type_declared_for_a_weight_is_compared_with_it(declared_in):
    """graphsurgeon declares a weight with its own type, so this is the check on a model: a value_info,
    graph output or graph input (IR 4+) of a weight's name, as float16 where the weight is float32."""
    model = onnx.load(SAMPLES / "resnet_small.onnx")
    getattr(model.graph, declared_in).append(helper.make_tensor_value_info(STEM, onnx.TensorProto.FLOAT16,
                                                                           [8, 3, 7, 7]))
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(model, full_check=True)
    with pytest.raises(bnfold.BnfoldError, match="^bnfold's check of the weights rejects this model: "
                       r"\[TypeInferenceError\] Inferred elem type differs from existing elem type: \(1\) vs "
                       rf"\(10\) for {STEM}$"):
        check_weightless(model)


@pytest.mark.parametrize("argument, expected", [
    (onnx.ModelProto(), "not ModelProto Note: bnfold.fold_model folds a ModelProto"),
    (gs.Function("f"), "not Function"),
    ("model.onnx", "not str"),
])
def test_only_a_graph_is_folded(argument, expected):
    with pytest.raises(bnfold.BnfoldError) as caught:
        bnfold.fold_graph(argument)
    assert caught.value.one_line().startswith(f"fold_graph takes an onnx_graphsurgeon Graph, {expected}")


def test_without_graphsurgeon_the_error_says_how_to_install_it(monkeypatch):
    """bnfold.fold_graph itself imports without graphsurgeon; calling it names the extra to install."""
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)
    monkeypatch.delitem(sys.modules, "bnfold.graphsurgeon", raising=False)
    with pytest.raises(bnfold.BnfoldError) as caught:
        bnfold.fold_graph(object())
    line = caught.value.one_line()
    assert line.startswith("fold_graph needs onnx-graphsurgeon, which is not installed")
    assert line.endswith("Note: pip install 'bnfold[graphsurgeon]'") and "\n" not in line
