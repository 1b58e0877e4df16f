"""`bnfold verify --quantized`: quantizers compared layer by layer, each fed the original's codes, on
hand-built QuantizeLinear/DequantizeLinear chains (opset 13; int8 and uint8; per-tensor and per-axis)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.verify import VerifyOptions, verify_models
from bnfold.verify_render import render_report

from .test_verify import _two_convs

ROWS, WIDTH = 8, 16  # 128 codes per activation quantizer: one flipped code is 0.78%, under the 1% default
QUANTIZED = VerifyOptions(quantized=True)
NUDGE = 1 + 2.0 ** -20  # a relative change of the size a correct fold's float rounding makes


# ------------------------------------------------------------------------------------------ builders
def _f32(name, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _qdq(src, codes, scale, zero, **attrs) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [src, scale, zero], [codes], name=f"{codes}_quantize", **attrs),
            helper.make_node("DequantizeLinear", [codes, scale, zero], [f"{codes}_dq"], name=f"{codes}_dequantize",
                             **attrs)]


class Chain:
    """x -> Mul(gain) -> [Q -> DQ -> MatMul(DQ(Q(W))) (-> Mul(column gain)) -> Add(b)] x depth -> Q -> DQ
    -> Mul(tail) -> y.

    Every tensor a quantizer reads gets its own QuantizeLinear/DequantizeLinear pair, named by its codes:
    activations a0..a{depth} (int8 with zero point 0, or uint8 with 128), weights w0..w{depth-1} (int8,
    one scale per output column or one per tensor). Scales are calibrated in float64 on a seeded input;
    a0's is 1/32, so that inputs can sit exactly on a rounding boundary.
    """

    def __init__(self, depth=2, act=np.int8, per_axis=True, seed=0, rows=ROWS):
        rng = np.random.default_rng(seed)
        self.depth, self.act, self.rows = depth, np.dtype(act), rows
        self.weights = [rng.normal(0, 1 / np.sqrt(WIDTH), (WIDTH, WIDTH)) for _ in range(depth)]
        self.biases = [rng.normal(0, 0.1, WIDTH) for _ in range(depth)]
        self.weight_scales = [np.abs(w).max(axis=0 if per_axis else None) / 127 for w in self.weights]
        self.column_gains = [None] * depth
        self.act_scales = [2.0 ** -5]
        h = rng.normal(0, 1, (rows, WIDTH))
        for w, b in zip(self.weights, self.biases):
            h = h @ w + b
            self.act_scales.append(1.25 * np.abs(h).max() / 127)
        self.gain, self.tail = 1.0, 1.0

    def model(self) -> onnx.ModelProto:
        zero = np.array(128 if self.act == np.uint8 else 0, self.act)
        nodes = [helper.make_node("Mul", ["x", "gain"], ["h0"], name="gain")]
        inits = [_f32("gain", self.gain), _f32("tail", self.tail)]
        for i in range(self.depth):
            nodes += _qdq(f"h{i}", f"a{i}", f"as{i}", f"az{i}") + _qdq(f"W{i}", f"w{i}", f"ws{i}", f"wz{i}", axis=1)
            product = f"mm{i}"
            nodes.append(helper.make_node("MatMul", [f"a{i}_dq", f"w{i}_dq"], [product], name=f"matmul{i}"))
            if self.column_gains[i] is not None:
                nodes.append(helper.make_node("Mul", [product, f"g{i}"], [f"scaled{i}"], name=f"column_gain{i}"))
                inits.append(_f32(f"g{i}", self.column_gains[i]))
                product = f"scaled{i}"
            nodes.append(helper.make_node("Add", [product, f"b{i}"], [f"h{i + 1}"], name=f"add{i}"))
            scale = np.asarray(self.weight_scales[i])
            inits += [_f32(f"as{i}", self.act_scales[i]), numpy_helper.from_array(zero, f"az{i}"),
                      _f32(f"W{i}", self.weights[i]), _f32(f"b{i}", self.biases[i]), _f32(f"ws{i}", scale),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"wz{i}")]
        last = self.depth
        nodes += _qdq(f"h{last}", f"a{last}", f"as{last}", f"az{last}")
        nodes.append(helper.make_node("Mul", [f"a{last}_dq", "tail"], ["y"], name="tail"))
        inits += [_f32(f"as{last}", self.act_scales[last]), numpy_helper.from_array(zero, f"az{last}")]
        shape = [self.rows, WIDTH]
        graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def _boundary_inputs(tmp_path, on_boundary=((0, 0),), rows=ROWS) -> str:
    """x/scale of a0 is k + 1/4 everywhere but at `on_boundary`, where it is an even k + 1/2: the
    reference rounds those down (half to even), a candidate a hair above rounds them up."""
    rng = np.random.default_rng(7)
    steps = rng.integers(-50, 50, (rows, WIDTH)) + 0.25
    for index in on_boundary:
        steps[index] = 2 * rng.integers(1, 25) + 0.5
    path = tmp_path / "x.npz"
    np.savez(path, x=(steps / 32).astype(np.float32))
    return str(path)


def _rows(report, sample=0) -> dict:
    return {q.codes: q for q in report.quantized.samples[sample].quantizers}


def _failing(report) -> list[str]:
    return list(dict.fromkeys(q.codes for s in report.quantized.samples for q in s.quantizers if not q))


# ---------------------------------------------------------------------------------------- the check
@pytest.mark.parametrize("act", [np.int8, np.uint8])
@pytest.mark.parametrize("per_axis", [True, False])
def test_identical_models_pass_with_every_quantizer_compared(act, per_axis):
    reference = Chain(act=act, per_axis=per_axis).model()
    report = verify_models(reference, reference, QUANTIZED)
    assert report.passed
    rows = _rows(report)
    assert list(rows) == ["a0", "w0", "a1", "w1", "a2"]
    assert [rows[n].dtype for n in ("a0", "w0")] == [np.dtype(act).name, "int8"]
    assert rows["w0"].granularity == ("axis 1" if per_axis else "tensor")
    assert all(q.max_steps == 0 and q.flipped == 0 and q.elements == q_size for q, q_size in
               zip(rows.values(), [ROWS * WIDTH, WIDTH * WIDTH] * 2 + [ROWS * WIDTH]))


@pytest.mark.parametrize("act", [np.int8, np.uint8])
@pytest.mark.parametrize("per_axis", [True, False])
def test_a_weight_moved_by_more_than_half_a_step_fails_with_its_layer_named(act, per_axis):
    chain = Chain(act=act, per_axis=per_axis)
    reference = chain.model()
    column = 3
    step = np.asarray(chain.weight_scales[1]).flat[column if per_axis else 0]
    chain.weights[1][5, column] += 0.6 * step  # one weight of layer 1; its scale stays
    report = verify_models(reference, chain.model(), QUANTIZED)
    assert not report.passed
    assert _failing(report) == ["w1"]  # downstream quantizers got the original's codes: they match
    row = _rows(report)["w1"]
    assert 0.59 < row.max_steps < 0.61 and row.flipped <= 1
    assert "input moved by up to 0.6 quantization steps (limit 0.5)" in row.reason()
    assert "first 'w1'" in report.quantized.summary()


def test_a_move_under_the_step_limit_passes_when_few_codes_flip():
    chain = Chain()
    reference = chain.model()
    chain.weights[1][5, 3] += 0.4 * chain.weight_scales[1][3]  # at most 1 of 256 codes flips
    assert verify_models(reference, chain.model(), QUANTIZED).passed
    assert not verify_models(reference, chain.model(), VerifyOptions(quantized=True, max_steps=0.3)).passed


def test_many_codes_flipping_fail_even_under_the_step_limit():
    """A bias off by 0.3 steps of the next quantizer everywhere: no input moves by half a step, but
    about a third of a1's codes flip."""
    chain = Chain()
    reference = chain.model()
    chain.biases[0] += 0.3 * chain.act_scales[1]
    report = verify_models(reference, chain.model(), QUANTIZED)
    assert _failing(report) == ["a1"]
    row = _rows(report)["a1"]
    assert row.max_steps < 0.31 and row.flipped_fraction > 0.1 and row.max_code_change == 1
    assert "codes flipped" in row.reason() and "limit 1.00%" in row.reason()
    assert verify_models(reference, chain.model(), VerifyOptions(quantized=True, max_flipped=0.9)).passed


@pytest.mark.parametrize("rows, on_boundary, max_flipped, passes", [
    (ROWS, [(0, 0)], None, True),  # 1 of 128 codes: under 1%
    (2, [(0, 0)], None, True),  # 1 of 32 codes: over 1%, but one flip is always allowed
    (2, [(0, 0), (1, 5)], None, False),  # 2 of 32 codes
    (ROWS, [(0, 0)], 0.0, False),  # no flip allowed
])
def test_codes_flipped_at_a_rounding_boundary(tmp_path, rows, on_boundary, max_flipped, passes):
    chain = Chain(rows=rows)
    reference = chain.model()
    chain.gain = NUDGE
    inputs = _boundary_inputs(tmp_path, on_boundary, rows)
    report = verify_models(reference, chain.model(), VerifyOptions(inputs=inputs, quantized=True,
                                                                   max_flipped=max_flipped))
    row = _rows(report)["a0"]
    assert (row.flipped, row.max_code_change) == (len(on_boundary), 1) and row.max_steps < 1e-4
    assert report.passed == passes


def test_small_differences_do_not_accumulate_layer_by_layer(tmp_path):
    """Six layers, each a hair off (as a fold's float rounding is), inputs on a rounding boundary: the
    one code a0 flips moves everything after it, so the final outputs differ; fed the original's codes,
    every quantizer still matches."""
    chain = Chain(depth=6)
    reference = chain.model()
    chain.gain = NUDGE
    chain.weights = [w * NUDGE for w in chain.weights]
    report = verify_models(reference, chain.model(), VerifyOptions(inputs=_boundary_inputs(tmp_path),
                                                                   quantized=True))
    end_to_end = report.samples[0].outputs[0]
    assert not end_to_end and end_to_end.max_abs > 100 * end_to_end.tolerance.atol
    assert report.passed
    assert max(q.max_steps for q in _rows(report).values()) < 1e-3


def test_a_weight_quantizer_rescaled_with_its_weights_compares_in_code_units():
    """A per-column gain folded into fake-quantized weights (W*g with scale*g, as a BatchNormalization
    folds): the quantizer's float input changes a lot, its codes do not."""
    chain = Chain()
    gains = np.random.default_rng(3).uniform(0.5, 2.0, WIDTH)
    chain.column_gains[0] = gains
    reference = chain.model()
    chain.column_gains[0] = None
    chain.weights[0] = chain.weights[0] * gains
    chain.weight_scales[0] = chain.weight_scales[0] * gains
    report = verify_models(reference, chain.model(), QUANTIZED)
    assert report.passed
    assert _rows(report)["w0"].max_steps < 1e-4


def test_a_float_layer_after_the_last_quantizer_is_compared_on_the_original_codes():
    chain = Chain()
    chain.tail = 2.0
    reference = chain.model()
    chain.tail = 2.0 * (1 + 1e-3)
    report = verify_models(reference, chain.model(), QUANTIZED)
    assert not _failing(report) and not report.passed
    (output,) = report.quantized.samples[0].outputs
    assert output.name == "y" and not output
    assert "1 of 1 output(s) computed from the original's codes differ" in report.quantized.summary()


@pytest.mark.parametrize("act", [np.int8, np.uint8])
@pytest.mark.parametrize("inside", [False, True])
def test_differences_beyond_the_code_range_do_not_count(tmp_path, act, inside):
    """Values far beyond the range saturate alike in both models, however far apart; a value inside it
    (below the uint8 zero point) still counts."""
    chain = Chain(depth=0, act=act)
    reference = chain.model()
    chain.gain = 1.2
    x = np.full((ROWS, WIDTH), -1000 / 32, np.float32)
    x[0, 0] = -3.25 / 32 if inside else x[0, 0]
    np.savez(tmp_path / "x.npz", x=x)
    report = verify_models(reference, chain.model(), VerifyOptions(inputs=tmp_path / "x.npz", quantized=True))
    row = _rows(report)["a0"]
    assert (report.passed, row.flipped) == (not inside, int(inside))
    assert row.max_steps == pytest.approx(0.65 if inside else 0.0)


def _renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    return copy


def test_a_quantizer_missing_in_the_candidate_is_reported():
    reference = Chain().model()
    report = verify_models(reference, _renamed(reference, "a1", "a1_renamed"), QUANTIZED)
    rows = _rows(report)
    assert rows["a1"].problem == "missing in the candidate"
    assert rows["a1_renamed"].problem == "not in the reference"
    assert _failing(report) == ["a1", "a1_renamed"]


def test_codes_of_another_type_are_reported():
    reference = Chain().model()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    zero = next(t for t in candidate.graph.initializer if t.name == "az1")
    zero.CopyFrom(numpy_helper.from_array(np.array(128, np.uint8), "az1"))  # the same values as uint8 codes
    report = verify_models(reference, candidate, QUANTIZED)
    assert _rows(report)["a1"].problem == "codes are int8 in the reference, uint8 in the candidate"
    assert _failing(report) == ["a1"]


def test_a_quantizer_input_of_another_shape_is_reported():
    reference = Chain(depth=0).model()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    graph = candidate.graph
    graph.node.insert(1, helper.make_node("Reshape", ["h0", "flat"], ["h0_flat"], name="flatten"))
    next(n for n in graph.node if n.name == "a0_quantize").input[0] = "h0_flat"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
    report = verify_models(reference, candidate, QUANTIZED)
    assert _rows(report)["a0"].problem == f"input shape differs: reference ({ROWS}, {WIDTH}), candidate ({ROWS * WIDTH},)"
    assert not report.passed


def test_nan_in_a_quantizer_input_fails(tmp_path):
    x = np.zeros((ROWS, WIDTH), np.float32)
    x[2, 3] = np.nan
    np.savez(tmp_path / "x.npz", x=x)
    reference = Chain().model()
    report = verify_models(reference, reference, VerifyOptions(inputs=tmp_path / "x.npz", quantized=True))
    assert _rows(report)["a0"].nonfinite == 1
    assert "a0" in _failing(report) and not report.passed


def test_blocked_quantizers_compare_per_block():
    """QuantizeLinear opset 21: one scale per block of 4 weights along axis 1."""
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 1, (WIDTH, WIDTH)).astype(np.float32)
    scales = np.abs(weights).reshape(WIDTH, 4, 4).max(axis=2) / 127

    def model(w):
        nodes = _qdq("W", "w", "ws", "wz", axis=1, block_size=4)
        nodes.append(helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="matmul"))
        inits = [_f32("W", w), _f32("ws", scales), numpy_helper.from_array(np.zeros(scales.shape, np.int8), "wz")]
        graph = helper.make_graph(nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, WIDTH])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, WIDTH])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)

    spoiled = weights.copy()
    spoiled[1, 9] += 0.6 * scales[1, 2]  # column 9 is in block 2
    assert verify_models(model(weights), model(weights), QUANTIZED).passed
    report = verify_models(model(weights), model(spoiled), QUANTIZED)
    row = _rows(report)["w"]
    assert row.granularity == "blocks of 4 on axis 1" and 0.59 < row.max_steps < 0.61


# ------------------------------------------------------------------------------------ options, errors
def test_a_model_without_quantizers_is_refused():
    reference, folded = _two_convs()
    with pytest.raises(BnfoldError, match="the model has no QuantizeLinear node, so there is nothing to "
                                          "compare layer by layer"):
        verify_models(reference, folded, QUANTIZED)


def test_float8_codes_are_refused():
    """QuantizeLinear opset 19 to float8: its steps are not uniform, so steps and flips mean nothing."""
    zero = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])
    graph = helper.make_graph(_qdq("x", "q", "s", "z"), "float8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("q_dq", TensorProto.FLOAT, [4])], [_f32("s", 0.5), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    with pytest.raises(BnfoldError, match="^quantizer 'q' writes float8_e4m3fn codes: only integer codes are "
                                          "compared layer by layer$"):
        verify_models(model, model, QUANTIZED)


@pytest.mark.parametrize("options, option, message", [
    ({"max_steps": 1.0}, "max_steps", "applies only to the layer-by-layer check of quantized models"),
    ({"max_flipped": 0.1}, "max_flipped", "applies only to the layer-by-layer check of quantized models"),
    ({"quantized": True, "bisect": True}, "bisect", "does not apply to the layer-by-layer check"),
    ({"quantized": True, "max_flipped": 1.5}, "max_flipped", "must be a share between 0 and 1, got 1.5"),
    ({"quantized": True, "max_steps": -1.0}, "max_steps", "must be a finite number >= 0, got -1.0"),
])
def test_limits_are_refused_without_the_check_or_out_of_range(options, option, message):
    with pytest.raises(BnfoldError) as info:
        VerifyOptions(**options)
    assert info.value.option == option and info.value.message.startswith(message)


# ------------------------------------------------------------------------------------ command line
def _save(tmp_path, **models) -> dict[str, str]:
    paths = {}
    for name, model in models.items():
        paths[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(model, paths[name])
    return paths


def _cli(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_quantized_table_verdict_and_exit_codes(tmp_path, capsys):
    chain = Chain()
    reference = chain.model()
    chain.weights[1][5, 3] += 0.6 * chain.weight_scales[1][3]
    paths = _save(tmp_path, reference=reference, wrong=chain.model())
    code, out, err = _cli(capsys, "verify", paths["reference"], paths["reference"], "--quantized")
    assert (code, err) == (0, "")
    assert out.startswith("PASS") and "layer by layer: all 5 quantizer(s) match" in out
    code, out, _ = _cli(capsys, "verify", paths["reference"], paths["wrong"], "--quantized")
    assert code == 1 and out.startswith("FAIL")
    assert "w1 on seed 0 sample 0: input moved by up to 0.6 quantization steps" in out


def test_cli_quantized_json(tmp_path, capsys):
    paths = _save(tmp_path, reference=Chain().model())
    code, out, _ = _cli(capsys, "verify", paths["reference"], paths["reference"], "--quantized", "--json",
                        "--max-steps", "0.25", "--max-flipped", "0.02")
    document = json.loads(out)
    quantized = document["quantized"]
    assert code == 0 and document["passed"] and quantized["passed"]
    assert quantized["limits"] == {"max_steps": 0.25, "max_flipped_fraction": 0.02}
    assert quantized["summary"].startswith("layer by layer: all 5 quantizer(s) match")
    row = quantized["samples"][0]["quantizers"][0]
    assert set(row) == {"codes", "node", "passed", "problem", "dtype", "granularity", "elements", "max_steps",
                        "flipped_codes", "flipped_fraction", "max_code_change", "nonfinite_elements"}
    assert (row["codes"], row["node"], row["max_steps"], row["flipped_codes"]) == ("a0", "a0_quantize", 0.0, 0)
    assert quantized["samples"][0]["outputs"][0]["name"] == "y"


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "1"], "--max-steps: applies only to the layer-by-layer check of quantized models"),
    (["--quantized", "--bisect"], "--bisect: does not apply to the layer-by-layer check"),
    (["--quantized", "--max-flipped", "2"], "--max-flipped: must be a share between 0 and 1, got 2.0"),
])
def test_cli_refuses_limits_without_the_check(tmp_path, capsys, argv, message):
    paths = _save(tmp_path, reference=Chain().model())
    code, out, err = _cli(capsys, "verify", paths["reference"], paths["reference"], *argv)
    assert code == 2 and out == "" and err.startswith(f"bnfold: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["verify", "fold"])
def test_help_describes_the_quantized_flags(capsys, command):
    code, out, _ = _cli(capsys, command, "--help")
    assert code == 0 and "--quantized" in out and "--max-steps S" in out and "--max-flipped F" in out


def test_cli_model_without_quantizers_is_one_line_exit_2(tmp_path, capsys):
    reference, folded = _two_convs()
    paths = _save(tmp_path, reference=reference, folded=folded)
    code, out, err = _cli(capsys, "verify", paths["reference"], paths["folded"], "--quantized")
    assert (code, out) == (2, "")
    assert err == (f"bnfold: error: {paths['reference']}: the model has no QuantizeLinear node, so there is "
                   "nothing to compare layer by layer\n")


def test_cli_quantized_does_not_apply_to_saved_outputs(tmp_path, capsys):
    paths = _save(tmp_path, reference=Chain().model())
    np.savez(tmp_path / "saved.npz", **{"input:x": np.zeros((ROWS, WIDTH), np.float32),
                                        "output:y": np.zeros((ROWS, WIDTH))})
    code, _, err = _cli(capsys, "verify", "--against-reference", tmp_path / "saved.npz", paths["reference"],
                        "--quantized")
    assert code == 2 and err.startswith("bnfold: error: --quantized: does not apply when comparing with saved")


def _conv_bn_between_quantizers() -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(float weights) -> BatchNormalization -> Q -> DQ -> y: a BN fold leaves
    both quantizers as they are."""
    rng = np.random.default_rng(0)
    stats = {"scale": rng.uniform(0.5, 2, 4), "B": rng.normal(0, 1, 4), "mean": rng.normal(0, 1, 4),
             "var": rng.uniform(0.5, 2, 4)}
    nodes = _qdq("x", "xq", "xs", "xz") + [
        helper.make_node("Conv", ["xq_dq", "W"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", *(f"bn_{k}" for k in stats)], ["bn"], name="bn"),
    ] + _qdq("bn", "yq", "ys", "yz")
    nodes[-1].output[0] = "y"
    inits = [_f32("W", rng.normal(0, 0.3, (4, 3, 3, 3))), _f32("xs", 4 / 127), _f32("ys", 16 / 127),
             numpy_helper.from_array(np.array(0, np.int8), "xz"), numpy_helper.from_array(np.array(0, np.int8), "yz")]
    inits += [_f32(f"bn_{k}", v) for k, v in stats.items()]
    graph = helper.make_graph(nodes, "conv_bn_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_fold_verify_quantized(tmp_path, capsys):
    paths = _save(tmp_path, model=_conv_bn_between_quantizers())
    out_path = tmp_path / "folded.onnx"
    code, out, err = _cli(capsys, "fold", paths["model"], "-o", out_path, "--verify", "--quantized", "--json")
    document = json.loads(out)
    assert (code, err, document["folded"]) == (0, "", 1)
    quantized = document["verification"]["quantized"]
    assert quantized["passed"] and [q["codes"] for q in quantized["samples"][0]["quantizers"]] == ["xq", "yq"]
    code, _, err = _cli(capsys, "fold", paths["model"], "-o", tmp_path / "other.onnx", "--quantized")
    assert code == 2 and err.startswith("bnfold: error: --quantized applies only with --verify")


def test_render_shows_the_quantizer_table_and_the_outputs_for_information():
    chain = Chain()
    reference = chain.model()
    chain.biases[0] += 0.3 * chain.act_scales[1]
    text = render_report(verify_models(reference, chain.model(), QUANTIZED), width=160)
    assert "final outputs end to end, for information" in text
    assert "quantizer (codes)" in text and "graph outputs computed from the original's codes" in text
    assert "a1 on seed 0 sample 0:" in text and text.rstrip().splitlines()[-1].startswith("layer by layer: 1 of 5")
