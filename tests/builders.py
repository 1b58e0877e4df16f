"""Tiny ONNX graphs for the fold rules, and the oracles they are checked against."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from packaging.version import Version

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.float64): TensorProto.DOUBLE}


def bn_stats(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    """Non-trivial BN statistics: a fresh BN (0, 1, 1, 0) would hide a wrong fold."""
    return {"scale": rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),
            "B": rng.normal(0, 1, channels), "mean": rng.normal(0, 1, channels),
            "var": rng.uniform(0.05, 3.0, channels)}


def bn_node(x: str, y: str, prefix: str = "bn", epsilon: float = 1e-5, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_B", f"{prefix}_mean",
                                                   f"{prefix}_var"], [y], name=prefix, epsilon=epsilon, **attrs)


def bn_initializers(stats: dict[str, np.ndarray], dtype, prefix: str = "bn") -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}_{k}") for k, v in stats.items()]


def make_model(nodes, inputs, outputs, initializers, opset: int = 17, ir_version: int | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(onnx.IR_VERSION, 10)
    _complete_output_types(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _complete_output_types(model: onnx.ModelProto) -> None:
    """Fill in output shapes left as None from shape inference (the full checker requires them)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape") and output.name in known:
            output.type.CopyFrom(known[output.name].type)


def tensor(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], shape)


def conv_bn(rng, *, rank=2, groups=1, bias=True, transposed=False, dtype=np.float32, channels_in=4,
            channels_out=6, kernel=3, opset=17, conv_attrs=None, spatial_size=7, batch=2) -> onnx.ModelProto:
    """x -> Conv/ConvTranspose(groups, any attrs) -> BN -> y."""
    op = "ConvTranspose" if transposed else "Conv"
    k = (kernel,) * rank
    if transposed:
        w_shape = (channels_in, channels_out // groups, *k)
    else:
        w_shape = (channels_out, channels_in // groups, *k)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(dtype), "W")]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, channels_out).astype(dtype), "b"))
        conv_inputs.append("b")
    inits += bn_initializers(bn_stats(rng, channels_out), dtype)
    nodes = [helper.make_node(op, conv_inputs, ["conv_out"], name="conv", group=groups, **(conv_attrs or {})),
             bn_node("conv_out", "y")]
    x_shape = [batch, channels_in] + [spatial_size] * rank
    return make_model(nodes, [tensor("x", dtype, x_shape)], [tensor("y", dtype, None)], inits, opset)


def gemm_bn(rng, *, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(6,), m=5, k=4, n=6,
            dtype=np.float32, opset=17) -> onnx.ModelProto:
    """x -> Gemm(transA, transB, alpha, beta, C of c_shape or None) -> BN -> y."""
    b_shape = (n, k) if trans_b else (k, n)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, b_shape).astype(dtype), "B")]
    inputs = ["x", "B"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, c_shape).astype(dtype), "C"))
        inputs.append("C")
    inits += bn_initializers(bn_stats(rng, n), dtype)
    nodes = [helper.make_node("Gemm", inputs, ["gemm_out"], name="gemm", transA=trans_a, transB=trans_b,
                              alpha=alpha, beta=beta), bn_node("gemm_out", "y")]
    x_shape = [k, m] if trans_a else [m, k]
    return make_model(nodes, [tensor("x", dtype, x_shape)], [tensor("y", dtype, [m, n])], inits, opset)


def matmul_bn(rng, *, bias_shape=None, bias_first=False, m=5, k=4, n=6, dtype=np.float32,
              x_shape=None, opset=17) -> onnx.ModelProto:
    """x -> MatMul(W) [-> Add(bias)] -> BN -> y."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (k, n)).astype(dtype), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="matmul")]
    bn_input = "mm_out"
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, bias_shape).astype(dtype), "bias"))
        operands = ["bias", "mm_out"] if bias_first else ["mm_out", "bias"]
        nodes.append(helper.make_node("Add", operands, ["add_out"], name="add"))
        bn_input = "add_out"
    inits += bn_initializers(bn_stats(rng, n), dtype)
    nodes.append(bn_node(bn_input, "y"))
    return make_model(nodes, [tensor("x", dtype, x_shape or [m, k])], [tensor("y", dtype, None)], inits, opset)


def at_least(module, version: str) -> bool:
    """True if `module` (onnx, onnxruntime...) is `version` or newer: for the gaps of older releases."""
    return Version(module.__version__.split("+")[0]) >= Version(version)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        feeds[value.name] = rng.normal(0, 1, shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


def run_ort(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    """onnxruntime with graph optimizations off: it would otherwise fuse BN itself and hide a bad fold."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def run_reference(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    evaluator = ReferenceEvaluator(model)
    return dict(zip(evaluator.output_names, evaluator.run(None, feeds)))


def assert_close(expected: dict, actual: dict, atol: float, rtol: float, label: str = "") -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        a = np.asarray(expected[name], dtype=np.float64)
        b = np.asarray(actual[name], dtype=np.float64)
        assert a.shape == b.shape, f"{label}{name}: shape {a.shape} vs {b.shape}"
        error = np.abs(a - b)
        assert (error <= atol + rtol * np.abs(a)).all(), \
            f"{label}{name}: max abs error {error.max():.3g}, max rel {(error / (np.abs(a) + 1e-30)).max():.3g}"


def assert_same_function(original: onnx.ModelProto, folded: onnx.ModelProto, atol=1e-5, rtol=1e-4, seed=0):
    """The folded model computes what the original does on the same seeded inputs, by every oracle that
    can run the original: onnxruntime (optimizations off) and onnx's reference evaluator."""
    feeds = random_feeds(original, seed)
    oracles = oracles_for(original)
    assert oracles, "no oracle can run this model"
    for name, run in oracles:
        assert_close(run(original, feeds), run(folded, feeds), atol, rtol, f"{name}: ")


def oracles_for(model: onnx.ModelProto) -> list:
    """The oracles able to run `model`, with the known gaps of each spelled out."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    oracles = []
    if opset >= 7:  # onnxruntime has no BatchNormalization kernel before opset 7
        oracles.append(("onnxruntime", run_ort))
    grouped_transpose = any(n.op_type == "ConvTranspose" and any(a.name == "group" and a.i > 1 for a in n.attribute)
                            for n in model.graph.node)
    # onnx's reference evaluator fails on ConvTranspose with group > 1 (a reshape error); it runs opset
    # 7-8 BatchNormalization with its opset-6 class, which returns a tuple and raises; and its opset 9-13
    # class normalizes with batch statistics whenever momentum is set, which the schema default does.
    # Before onnx 1.23 its Conv computes negative pads for some auto_pad SAME cases (np.pad raises) and
    # pads a VALID Conv as if it were SAME (a 3x3 keeps a 6x6 input 6x6).
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    same_conv = any(n.op_type == "Conv" and any(a.name == "auto_pad" and a.s in (b"SAME_UPPER", b"SAME_LOWER", b"VALID")
                                                for a in n.attribute) for n in model.graph.node)
    old_same_conv = same_conv and not at_least(onnx, "1.23")
    if not grouped_transpose and not (has_bn and 7 <= opset <= 13) and not old_same_conv:
        oracles.append(("reference", run_reference))
    return oracles


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module: benchmarks/ is a folder of scripts, not a package, so the file is
    loaded by path under a private name, with the folder on sys.path as a script run has it (the
    scripts import machine.py and tools.py by name)."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def if_model(rng) -> onnx.ModelProto:
    """A BN inside an If branch, reading a Conv weight of the outer graph."""
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(True), "cond")]
    inits += bn_initializers(bn_stats(rng, 4), np.float32)
    then_nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv_then"), bn_node("c", "t_out")]
    then_graph = helper.make_graph(then_nodes, "then", [], [tensor("t_out", np.float32, [1, 4, 5, 5])])
    else_graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["e_out"], name="conv_else")], "else",
                                   [], [tensor("e_out", np.float32, [1, 4, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    return make_model(nodes, [tensor("x", np.float32, [1, 3, 5, 5])], [tensor("y", np.float32, [1, 4, 5, 5])],
                      inits)
