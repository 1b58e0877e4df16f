"""Regenerate the committed QAT-style sample resnet_qat.onnx and its reference resnet_qat.npz.

    python sample_models/make_qat.py                  # both files, into sample_models/ (needs torch)
    python sample_models/make_qat.py --out-dir DIR    # the same files into DIR (to compare)

Quantization-aware training tools (pytorch-quantization, TensorRT Model Optimizer) export the float
network with QuantizeLinear -> DequantizeLinear in front of each quantized input, DequantizeLinear on
int8 weights, and every BatchNorm still after its Conv. This script writes that layout from a float
ONNX export of `resnet_small` (bnfold.zoo, seed 0, randomized BN statistics: the weights of
resnet_small.onnx), by rewriting its graph with onnx.helper, not with onnxruntime.quantization (whose
quantizer folds the BNs itself):

- activations: uint8, one scale and zero point per tensor, calibrated on the float model; each input
  of a Conv, Gemm, Add or MaxPool gets its own QuantizeLinear -> DequantizeLinear pair, every node its
  own constants (a tensor read by two layers gets two pairs, as each layer's input quantizer does);
- weights: DequantizeLinear(int8 initializer, float32 scale [C], int8 zero point 0 [C], axis 0),
  symmetric per output channel, scale max |W[c]| / 127; a bias (the Gemm's) is int32 with scale
  input scale x weight scale, zero point 0;
- the BN after each Conv stays: Conv -> BN [-> Relu] -> Q -> DQ -> next layer. Opset 17 (per-axis
  DequantizeLinear needs 13).

onnxruntime on CPU fuses DQ(x), DQ(w) [, DQ(int32 b)] -> Conv [-> Relu] -> Q into QLinearConv only
when the Conv's output goes to that Q alone (qdq_selectors.cc, ConvNodeGroupSelector; on x86 it takes
uint8 activations, int8 ones only after onnxruntime rewrote them to uint8): the BNs block it.
`fold_bn=True` builds the same model with the BNs folded into the float weights before quantizing,
with the same activation ranges: what an exact fold of the BNs into the quantized weights reaches.

Calibration: 256 seeded N(0, 1) inputs through the float model (onnxruntime, optimizations off); each
quantized tensor's range is [min(0, min), max(0, max)] over them, so zero is exact and a ReLU output
gets zero point 0. The reference .npz holds the float32 input of resnet_small.npz (`input:input`) and
the Q/DQ model's own output in float64 (`output:output`), from onnxruntime with optimizations off:
there is no float64 torch reference of a quantized graph.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's bnfold, even when it is not installed

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.export import write_npz  # noqa: E402
from bnfold.io import save_model  # noqa: E402
from bnfold.runtime import create_session  # noqa: E402

SEED = 0
OPSET = 17
CALIBRATION_SAMPLES = 256
STEM = "resnet_qat"
QUANTIZED_INPUTS = {"Conv": (0,), "Gemm": (0,), "Add": (0, 1), "MaxPool": (0,)}  # op -> activation inputs
WEIGHTS = ("Conv", "Gemm")
UINT8_LEVELS = 255
INT8_MAX = 127


@dataclass(frozen=True)
class Quantizer:
    """One activation tensor's uint8 quantization: real = scale * (code - zero_point)."""

    scale: np.float32
    zero_point: np.uint8


# ------------------------------------------------------------------------------------- float model
def export_float(model, out_path: Path, input_shapes=None, reference: Path | None = None) -> onnx.ModelProto:
    """The float ONNX model (TorchScript exporter, as QAT tools use, opset 17, every BN kept)."""
    from bnfold.export import export_model

    export_model(model, out_path, input_shapes=input_shapes, exporter="torchscript", opset=OPSET,
                 randomize_bn=True, seed=SEED, reference=reference)
    return onnx.load(str(out_path))


def calibrate(model: onnx.ModelProto, samples: int = CALIBRATION_SAMPLES, seed: int = SEED) -> dict[str, Quantizer]:
    """Each quantized activation's Quantizer, from its min and max over `samples` seeded N(0, 1) inputs."""
    (spec,) = model.graph.input
    names = sorted({node.input[i] for node in model.graph.node for i in QUANTIZED_INPUTS.get(node.op_type, ())})
    computed = [n for n in names if n != spec.name]  # the model's input is read from the feeds
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in computed if n not in known)
    session = create_session(probe, label="float model")
    shape = [d.dim_value for d in spec.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    low = {n: 0.0 for n in names}
    high = {n: 0.0 for n in names}
    for _ in range(samples):
        feeds = {spec.name: rng.standard_normal(shape, dtype=np.float32)}
        values = session.run(feeds, computed)
        values.update((name, feeds[name]) for name in names if name in feeds)
        for name, value in values.items():
            low[name] = min(low[name], float(value.min()))
            high[name] = max(high[name], float(value.max()))
    return {n: activation_quantizer(low[n], high[n]) for n in names}


def activation_quantizer(low: float, high: float) -> Quantizer:
    """uint8 over [min(0, low), max(0, high)]: zero maps to a code exactly."""
    low, high = min(low, 0.0), max(high, 0.0)
    if not high > low:
        raise BnfoldError("a calibrated activation is zero on every input: it has no quantization range")
    scale = np.float32((high - low) / UINT8_LEVELS)
    return Quantizer(scale, np.uint8(np.clip(np.round(-low / float(scale)), 0, UINT8_LEVELS)))


def weight_quantizer(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scale per output channel): symmetric, zero point 0, scale max |W[c]| / 127."""
    amax = np.abs(weight.reshape(len(weight), -1)).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax, 1.0) / INT8_MAX
    codes = np.round(weight / scale.reshape(-1, *[1] * (weight.ndim - 1)))
    return np.clip(codes, -INT8_MAX, INT8_MAX).astype(np.int8), scale.astype(np.float32)


def bias_codes(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 codes of a bias whose per-channel scale is input scale x weight scale."""
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    info = np.iinfo(np.int32)
    if codes.min() < info.min or codes.max() > info.max:
        raise BnfoldError("a bias does not fit int32 at its quantization scale")
    return codes.astype(np.int32)


# ---------------------------------------------------------------------------------------- rewriting
class Rewriter:
    """Builds the Q/DQ graph node by node from a float graph; every new constant has its own name."""

    def __init__(self, model: onnx.ModelProto, quantizers: dict[str, Quantizer]):
        self.quantizers = quantizers
        self.weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def quantize_input(self, node: onnx.NodeProto, position: int) -> str:
        """A Q -> DQ pair on `node`'s input, with its own constants; the dequantized tensor's name."""
        tensor, prefix = node.input[position], f"{node.name}/input{position}"
        q = self.quantizers[tensor]
        self.nodes.append(helper.make_node(
            "QuantizeLinear", [tensor, self.constant(f"{prefix}/q_scale", q.scale),
                               self.constant(f"{prefix}/q_zero_point", q.zero_point)],
            [f"{prefix}/quantized"], name=f"{prefix}/QuantizeLinear"))
        self.nodes.append(helper.make_node(
            "DequantizeLinear", [f"{prefix}/quantized", self.constant(f"{prefix}/dq_scale", q.scale),
                                 self.constant(f"{prefix}/dq_zero_point", q.zero_point)],
            [f"{prefix}/dequantized"], name=f"{prefix}/DequantizeLinear"))
        return f"{prefix}/dequantized"

    def dequantize(self, prefix: str, codes: np.ndarray, scale: np.ndarray) -> str:
        """DequantizeLinear(codes, scale, zero point 0) along axis 0; the dequantized tensor's name."""
        inputs = [self.constant(f"{prefix}_quantized", codes), self.constant(f"{prefix}_scale", scale),
                  self.constant(f"{prefix}_zero_point", np.zeros(len(codes), codes.dtype))]
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [f"{prefix}_dequantized"],
                                           name=f"{prefix}/DequantizeLinear", axis=0))
        return f"{prefix}_dequantized"

    def linear(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None) -> onnx.NodeProto:
        """The Conv or Gemm with its input, int8 weight and int32 bias each behind a DequantizeLinear."""
        if node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transB"), 0) != 1:
            raise BnfoldError(f"{node.name}: a Gemm without transB=1 has its output channels on axis 1")
        x = self.quantize_input(node, 0)
        codes, scale = weight_quantizer(weight)
        inputs = [x, self.dequantize(node.input[1], codes, scale)]
        if bias is not None:
            bias_scale = (self.quantizers[node.input[0]].scale * scale).astype(np.float32)
            inputs.append(self.dequantize(f"{node.name}/bias", bias_codes(bias, bias_scale), bias_scale))
        rewritten = onnx.NodeProto()
        rewritten.CopyFrom(node)
        del rewritten.input[:]
        rewritten.input.extend(inputs)
        return rewritten

    def weight_and_bias(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
        bias = self.weights[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        return self.weights[node.input[1]], bias


def batchnorm_after(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv name -> the BN that alone reads its output."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    result = {}
    for node in model.graph.node:
        after = readers.get(node.output[0], []) if node.op_type == "Conv" else []
        if len(after) == 1 and after[0].op_type == "BatchNormalization":
            result[node.name] = after[0]
    return result


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, bn: onnx.NodeProto,
                   weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the inference BN after it folded in, in float64."""
    gamma, beta, mean, var = (weights[name].astype(np.float64) for name in bn.input[1:5])
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    factor = gamma / np.sqrt(var + epsilon)
    shift = beta - mean * factor
    base = np.zeros(len(weight)) if bias is None else bias.astype(np.float64)
    folded = weight.astype(np.float64) * factor.reshape(-1, *[1] * (weight.ndim - 1))
    return folded, base * factor + shift


def quantize(model: onnx.ModelProto, quantizers: dict[str, Quantizer], *, fold_bn: bool = False) -> onnx.ModelProto:
    """The Q/DQ model of a float model; with `fold_bn`, each Conv's BN folded in before quantizing."""
    rewriter = Rewriter(model, quantizers)
    folds = batchnorm_after(model) if fold_bn else {}
    dropped = {bn.name for bn in folds.values()}
    for node in model.graph.node:
        if node.name in dropped:
            continue
        if node.op_type in WEIGHTS:
            weight, bias = rewriter.weight_and_bias(node)
            if node.name in folds:
                weight, bias = fold_batchnorm(weight, bias, folds[node.name], rewriter.weights)
            rewritten = rewriter.linear(node, weight, bias)
            if node.name in folds:
                rewritten.output[0] = folds[node.name].output[0]
        else:
            rewritten = onnx.NodeProto()
            rewritten.CopyFrom(node)
            for position in QUANTIZED_INPUTS.get(node.op_type, ()):
                rewritten.input[position] = rewriter.quantize_input(node, position)
        rewriter.nodes.append(rewritten)
    return _model(model, rewriter, fold_bn)


def _model(model: onnx.ModelProto, rewriter: Rewriter, fold_bn: bool) -> onnx.ModelProto:
    """The rewritten graph with the float model's interface and the initializers still read."""
    read = {name for node in rewriter.nodes for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in read]
    graph = helper.make_graph(rewriter.nodes, f"{model.graph.name}_qdq", model.graph.input, model.graph.output,
                              kept + rewriter.initializers)
    doc = "QAT-style Q/DQ model" + (", BNs folded before quantizing" if fold_bn else "")
    result = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                               producer_name="bnfold sample_models/make_qat.py", doc_string=doc)
    result.ir_version = model.ir_version
    onnx.checker.check_model(result, full_check=True)
    return result


# --------------------------------------------------------------------------------------- the sample
def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """input:<name> float32 and output:<name> float64: the Q/DQ model's own output, optimizations off."""
    outputs = create_session(model, label="Q/DQ model").run(inputs)
    return {**{f"input:{k}": v for k, v in inputs.items()},
            **{f"output:{k}": v.astype(np.float64) for k, v in outputs.items()}}


@dataclass(frozen=True)
class Built:
    """A float model quantized twice from one calibration, and the input its export's reference holds."""

    qdq: onnx.ModelProto  # every BN kept after its Conv
    folded: onnx.ModelProto  # every BN folded into the float weights before quantizing
    inputs: dict[str, np.ndarray]


def build(model, work: Path, *, input_shapes=None, samples: int = CALIBRATION_SAMPLES) -> Built:
    """Export `model` (a bnfold.zoo sample name or a factory) into `work`, calibrate, quantize."""
    reference_path = work / "float.npz"
    float_model = export_float(model, work / "float.onnx", input_shapes, reference_path)
    with np.load(reference_path) as data:
        inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    quantizers = calibrate(float_model, samples)
    return Built(quantize(float_model, quantizers), quantize(float_model, quantizers, fold_bn=True), inputs)


def make_sample(out_dir: Path) -> None:
    """resnet_qat.onnx and resnet_qat.npz from resnet_small's float export."""
    with tempfile.TemporaryDirectory() as work:
        built = build("resnet_small", Path(work))
    write_npz(reference(built.qdq, built.inputs), out_dir / f"{STEM}.npz")
    save_model(built.qdq, out_dir / f"{STEM}.onnx")
    print(f"wrote {out_dir / STEM}.onnx and .npz", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write (default: this folder)")
    args = parser.parse_args(argv)
    try:
        make_sample(args.out_dir)
    except BnfoldError as exc:
        print(f"make_qat: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
