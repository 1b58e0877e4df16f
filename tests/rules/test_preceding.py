"""BN before Conv / Gemm / MatMul (pre-activation): fold forward when no output reads padding."""

import itertools
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.fold import fold_model
from tests.builders import (assert_close, assert_same_function, at_least, bn_initializers, bn_node, bn_stats,
                            make_model, op_types, random_feeds, run_ort, run_reference, tensor)


def bn_conv(rng, *, groups=1, pads=None, auto_pad=None, kernel=3, strides=None, bias=True, c=4, m=6,
            dilations=None, size=(7, 7)):
    """x [2, c, *size] -> BN -> Conv (kernel: an int for a square kernel, or one size per axis)."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    inits = bn_initializers(bn_stats(rng, c), np.float32)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (m, c // groups, *kernel)).astype(np.float32), "W"))
    inputs = ["bn_out", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, m).astype(np.float32), "b"))
        inputs.append("b")
    attrs = {"group": groups}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if strides is not None:
        attrs["strides"] = strides
    if dilations is not None:
        attrs["dilations"] = dilations
    nodes = [bn_node("x", "bn_out"), helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)]
    return make_model(nodes, [tensor("x", np.float32, [2, c, *size])], [tensor("y", np.float32, None)], inits)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strides", [None, [2, 2]])
def test_bn_conv_without_padding(rng, groups, bias, strides):
    model = bn_conv(rng, groups=groups, bias=bias, strides=strides, m=8)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].rule == "bn-conv"
    assert op_types(folded) == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}], ids=str)
def test_bn_conv_with_padding_is_refused(rng, kwargs):
    model = bn_conv(rng, **kwargs)
    folded, report = fold_model(model)
    assert report.decisions[0].reason == "padding-prevents-fold"
    assert op_types(folded) == op_types(model)


def test_bn_conv_same_padding_with_1x1_kernel_folds(rng):
    model = bn_conv(rng, auto_pad="SAME_UPPER", kernel=1)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


# ------------------------------------------------------ SAME: folded exactly when it pads nothing
# SAME pads an axis of size n by max(0, (ceil(n/s) - 1) * s + (k - 1) * d + 1 - n) (ONNX Conv).
@pytest.mark.parametrize("kwargs", [
    {"kernel": 1, "strides": [2, 2], "auto_pad": "SAME_UPPER"},                  # 1x1 never pads
    {"kernel": 1, "strides": [2, 3], "auto_pad": "SAME_LOWER"},
    {"kernel": 3, "strides": [3, 3], "auto_pad": "SAME_UPPER", "size": (9, 6)},  # (3-1)*3 + 3 = 9, (2-1)*3 + 3 = 6
    {"kernel": 3, "strides": [3, 3], "auto_pad": "SAME_LOWER", "size": (6, 9)},
    {"kernel": 2, "strides": [2, 2], "auto_pad": "SAME_UPPER", "size": (8, 4)},  # 2x2 stride 2 on even sizes
    {"kernel": (1, 2), "strides": [3, 2], "auto_pad": "SAME_LOWER", "size": (7, 6)},
], ids=str)
def test_bn_conv_same_padding_that_pads_nothing_folds(rng, kwargs):
    model = bn_conv(rng, **kwargs)
    folded, report = fold_model(model)
    assert report.folded == 1 and report.decisions[0].rule == "bn-conv"
    assert op_types(folded) == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, atol=1e-4)  # onnxruntime (optimizations off) and the reference


@pytest.mark.parametrize("kwargs,detail", [
    ({"kernel": 3, "strides": [3, 3], "size": (7, 9)}, "pads spatial axis 0 (size 7) by 2"),
    ({"kernel": 3, "strides": [3, 3], "size": (9, 8)}, "pads spatial axis 1 (size 8) by 1"),
    ({"kernel": 3, "strides": [2, 2], "size": (9, 9)}, "pads spatial axis 0 (size 9) by 2"),  # k=3, s=2 always pads
    ({"kernel": 2, "strides": [2, 2], "size": (8, 7)}, "pads spatial axis 1 (size 7) by 1"),
    ({"kernel": (1, 3), "size": (5, 5)}, "pads spatial axis 1 (size 5) by 2"),  # axis 0 (1) skipped, not the end
    ({"kernel": 2, "size": (8, 8)}, "pads spatial axis 0 (size 8) by 1"),  # default stride 1 (2 would pad nothing)
], ids=str)
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_bn_conv_same_padding_that_pads_is_refused(rng, kwargs, detail, auto_pad):
    model = bn_conv(rng, auto_pad=auto_pad, **kwargs)
    folded, report = fold_model(model)
    assert (report.decisions[0].reason, report.decisions[0].detail) == (
        "padding-prevents-fold", f"auto_pad={auto_pad} {detail}: the border would see 0, not the BN's shift")
    assert op_types(folded) == op_types(model)


def _symbolic_size(model, dims):
    """The model with x's spatial sizes replaced by `dims` (names for unknown sizes, ints for known)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    shape = model.graph.input[0].type.tensor_type.shape
    for dim, value in zip(shape.dim[2:], dims):
        dim.Clear()
        if isinstance(value, int):
            dim.dim_value = value
        else:
            dim.dim_param = value
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    return model


def test_bn_conv_same_1x1_with_unknown_size_folds(rng):
    """A kernel extent of 1 pads nothing at any size: the size need not be known."""
    model = _symbolic_size(bn_conv(rng, kernel=1, strides=[2, 2], auto_pad="SAME_UPPER"), ["h", "w"])
    folded, report = fold_model(model)
    assert report.folded == 1
    assert_same_function(model, folded)


@pytest.mark.parametrize("dims,axis", [(["h", "w"], 0), ([9, "w"], 1)])
def test_bn_conv_same_with_unknown_size_is_refused(rng, dims, axis):
    """3x3 stride 3 pads nothing at size 9 but pads at 7: an unknown size cannot be proven padding-free."""
    model = _symbolic_size(bn_conv(rng, kernel=3, strides=[3, 3], auto_pad="SAME_UPPER", size=(9, 9)), dims)
    _, report = fold_model(model)
    assert (report.decisions[0].reason, report.decisions[0].detail) == (
        "padding-prevents-fold", f"auto_pad=SAME_UPPER may pad spatial axis {axis}: its size is unknown")


_OLD_REFERENCE_CONV = "onnx's reference Conv before 1.23 pads some auto_pad SAME cases wrongly"
_DILATIONS = range(1, 3) if at_least(onnx, "1.23") else (1,)  # then only onnxruntime measures, undilated


# onnxruntime refuses SAME with a dilation other than 1 ("Dilation not supported for AutoPadType::SAME_UPPER
# or AutoPadType::SAME_LOWER"), so dilated cases are checked against onnx's reference evaluator alone.
def _assert_same_reference_outputs(model, folded):
    if not at_least(onnx, "1.23"):
        pytest.skip(_OLD_REFERENCE_CONV)
    feeds = random_feeds(model, seed=0)
    assert_close(run_reference(model, feeds), run_reference(folded, feeds), 1e-4, 1e-4)


@pytest.mark.parametrize("kwargs", [
    {"kernel": 2, "strides": [3, 3], "dilations": [2, 2], "size": (6, 9)},  # extent 3: (2-1)*3 + 3 = 6
    {"kernel": 1, "strides": [2, 2], "dilations": [3, 2]},                    # extent 1 at any dilation
], ids=str)
def test_bn_conv_same_dilated_that_pads_nothing_folds(rng, kwargs):
    model = bn_conv(rng, auto_pad="SAME_LOWER", **kwargs)
    folded, report = fold_model(model)
    assert report.folded == 1
    _assert_same_reference_outputs(model, folded)


def test_bn_conv_same_dilation_widens_the_kernel(rng):
    """2x2 stride 2 on 8x8 pads nothing, but dilated by 2 (extent 3) it pads 1: refused."""
    _, report = fold_model(bn_conv(rng, kernel=2, strides=[2, 2], auto_pad="SAME_UPPER", size=(8, 8)))
    assert report.folded == 1
    _, report = fold_model(bn_conv(rng, kernel=2, strides=[2, 2], dilations=[1, 2], auto_pad="SAME_UPPER",
                                   size=(8, 8)))
    assert report.decisions[0].detail == ("auto_pad=SAME_UPPER pads spatial axis 1 (size 8) by 1: the border "
                                          "would see 0, not the BN's shift")


def _reads_padding(n, kernel, stride, dilation, auto_pad) -> bool:
    """Whether a 1-D SAME Conv reads padding, measured: with x and W all ones, every output that reads
    only real elements is exactly `kernel`. onnx's reference evaluator and (undilated) onnxruntime."""
    node = helper.make_node("Conv", ["x", "W"], ["y"], auto_pad=auto_pad, strides=[stride], dilations=[dilation])
    model = make_model([node], [tensor("x", np.float32, [1, 1, n])], [tensor("y", np.float32, None)],
                       [numpy_helper.from_array(np.ones((1, 1, kernel), np.float32), "W")])
    feeds = {"x": np.ones((1, 1, n), np.float32)}
    runs = ([run_reference] if at_least(onnx, "1.23") else []) + ([run_ort] if dilation == 1 else [])
    reads = {bool((run(model, feeds)["y"] != kernel).any()) for run in runs}
    assert len(reads) == 1
    return reads.pop()


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_bn_conv_same_folds_exactly_when_no_output_reads_padding(rng, auto_pad):
    """Every size 1-8, kernel 1-3, stride 1-3, dilation 1-2: the rule folds iff the runtimes read no padding."""
    for n, kernel, stride, dilation in itertools.product(range(1, 9), range(1, 4), range(1, 4), _DILATIONS):
        inits = bn_initializers(bn_stats(rng, 2), np.float32)
        inits.append(numpy_helper.from_array(np.ones((3, 2, kernel), np.float32), "W"))
        nodes = [bn_node("x", "bn_out"), helper.make_node("Conv", ["bn_out", "W"], ["y"], name="conv",
                                                          auto_pad=auto_pad, strides=[stride], dilations=[dilation])]
        model = make_model(nodes, [tensor("x", np.float32, [1, 2, n])], [tensor("y", np.float32, None)], inits)
        _, report = fold_model(model)
        case = (n, kernel, stride, dilation)
        assert (report.folded == 1) == (not _reads_padding(n, kernel, stride, dilation, auto_pad)), case


# ---------------------------------------------------------------- no float64 copy of the weight
@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_bn_fold_forward_holds_no_float64_copy_of_the_weight(op):
    """The rule has math.py round each block into the weight's dtype: folding a BN into a 4 MiB float32
    weight peaks at the weight, its folded copy and a few blocks (measured 9 MiB), where a float64
    result (8 MiB more) would be cast afterwards."""
    rng = np.random.default_rng(5)
    c = 1024
    inits = bn_initializers(bn_stats(rng, c), np.float32)
    w_shape = (1024, c, 1, 1) if op == "Conv" else (c, 1024)
    inits.append(numpy_helper.from_array(rng.normal(0, 1, w_shape).astype(np.float32), "W"))
    x = tensor("x", np.float32, [1, c, 2, 2] if op == "Conv" else [1, c])
    nodes = [bn_node("x", "h"), helper.make_node(op, ["h", "W"], ["y"], name="op",
                                                 **({"transB": 1} if op == "Gemm" else {}))]
    model = make_model(nodes, [x], [tensor("y", np.float32, None)], inits)
    tracemalloc.start()
    try:
        _, report = fold_model(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.folded == 1
    assert peak < 3 * 4 * 2 ** 20


def _bn_linear(rng, op, trans_b=0, with_c=True, k=4, n=6):
    inits = bn_initializers(bn_stats(rng, k), np.float32)
    w_shape = (n, k) if trans_b else (k, n)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W"))
    inputs = ["bn_out", "W"]
    attrs = {}
    if op == "Gemm":
        attrs = {"transB": trans_b, "alpha": 0.5, "beta": 2.0}
        if with_c:
            inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (n,)).astype(np.float32), "C"))
            inputs.append("C")
    nodes = [bn_node("x", "bn_out"), helper.make_node(op, inputs, ["y"], name="linear", **attrs)]
    return make_model(nodes, [tensor("x", np.float32, [3, k])], [tensor("y", np.float32, [3, n])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_bn_gemm(rng, trans_b, with_c):
    model = _bn_linear(rng, "Gemm", trans_b, with_c)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["Gemm"]
    assert_same_function(model, folded)


def test_bn_matmul(rng):
    model = _bn_linear(rng, "MatMul")
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["MatMul", "Add"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert_same_function(model, folded)


def test_bn_with_two_consumers_stays(rng):
    model = bn_conv(rng)
    model.graph.node.append(helper.make_node("Relu", ["bn_out"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", np.float32, [2, 4, 7, 7]))
    _, report = fold_model(model)
    assert report.decisions[0].reason == "no-foldable-neighbour"


def _bn_matmul_add(rng, bias_shape, bias_dtype=np.float32, extra_reader=False, n=6):
    """x -> BN -> MatMul -> Add(bias) -> y (a Linear layer after a BN)."""
    model = _bn_linear(rng, "MatMul", n=n)
    model.graph.node[1].output[0] = "mm"
    bias = numpy_helper.from_array(rng.normal(0, 0.5, bias_shape).astype(bias_dtype), "b")
    nodes = list(model.graph.node) + [helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
    outputs = [tensor("y", np.float32, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["mm"], ["r"], name="relu"))
        outputs.append(tensor("r", np.float32, [3, n]))
    return make_model(nodes, list(model.graph.input), outputs, list(model.graph.initializer) + [bias])


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (3, 6), (3, 1), (), (1,)], ids=str)
def test_bn_matmul_merges_its_shift_into_the_following_bias_add(rng, bias_shape):
    model = _bn_matmul_add(rng, bias_shape)
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded) == ["MatMul", "Add"]
    assert_same_function(model, folded)


@pytest.mark.parametrize("case", ["bias-of-rank-3", "bias-of-7-columns", "bias-read-elsewhere"])
def test_bn_matmul_adds_its_own_bias_when_the_following_add_cannot_take_it(rng, case):
    """A bias that broadcasts the output larger or is not per column (the checker cannot see
    [7] + [3, 6] without shapes), or a MatMul output read by another node: the fold adds an Add of
    its own and leaves the old one alone."""
    model = _bn_matmul_add(rng, {"bias-of-rank-3": (2, 1, 6), "bias-of-7-columns": (6,)}.get(case, (6,)),
                           extra_reader=case == "bias-read-elsewhere")
    if case == "bias-of-7-columns":
        model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(rng.normal(size=7).astype(np.float32), "b"))
    folded, report = fold_model(model)
    assert report.folded == 1
    assert op_types(folded).count("Add") == 2
    if case != "bias-of-7-columns":  # not a model onnxruntime can run
        assert_same_function(model, folded)
