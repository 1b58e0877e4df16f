"""The re-parameterizable samples (bnfold/zoo.py) and their deploy twins, merged in torch as the papers'
code merges them: the torch merge is exact, the committed twins hold the train forms' weights, and
bnfold's fold of a train form reaches its twin's graph with outputs as accurate as the original's.

The torch tests build the small models (no export, but one torchscript export pair for the twin's
weights); the others read the committed files in sample_models/.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bnfold.export import export_model, randomize_batchnorm
from bnfold.fold import fold_model
from bnfold.io import load_model
from bnfold.zoo import SAMPLES, RepBlock, deploy
from sample_models.report import errors, load_reference, run

COMMITTED = Path(__file__).resolve().parent.parent / "sample_models"
EPS32 = float(np.finfo(np.float32).eps)
SLACK_ULPS = 8  # as tests/test_samples.py: a fold may be off the original by float32 rounding, no more

# name: (train BN, train Conv, deploy Conv), from the definitions in bnfold/zoo.py.
# repvgg_small: 8 blocks x (3x3 + 1x1 Conv+BN), 4 of them (stride 1, in == out) with an identity BN.
# mobileone_small: 7 blocks x 3 kxk Conv+BN; the 4 blocks with k = 3 (stem, 3 depthwise) add a 1x1
# scale Conv+BN; the stride-1 depthwise block and the 48 -> 48 pointwise one add an identity BN.
# repghost_small: 17 Conv+BN (stem, 6 ghost modules x (primary 1x1 + cheap depthwise 3x3), a strided
# depthwise, a 2-Conv shortcut, the 1x1 head) and 6 identity BNs: the merge removes BNs, no Convs.
# acnet_small: 4 blocks x (3x3 + 1x3 + 3x1 Conv+BN). repvit_block: 5 Conv+BN, the mixer's 1x1
# depthwise Conv (bias, no BN) and its BN after the sum; the mixer's two Convs become one.
COUNTS = {"repvgg_small": (20, 16, 8), "mobileone_small": (27, 25, 7), "repghost_small": (23, 17, 17),
          "acnet_small": (12, 12, 4), "repvit_block": (6, 6, 5)}
NAMES = list(COUNTS)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _train_and_deploy(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The float64 eval-mode train form (seeded weights, randomized BNs) and its torch deploy form."""
    torch.manual_seed(seed)
    model = SAMPLES[name].factory().eval()
    randomize_batchnorm(model, seed)
    model = model.double()
    return model, deploy(copy.deepcopy(model))


# ----------------------------------------------------------------------------------- torch merge
@pytest.mark.parametrize("name", NAMES)
def test_torch_deploy_form_computes_the_train_form(name):
    train, deployed = _train_and_deploy(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected, got = train(x), deployed(x)
    relative = float((got - expected).abs().max() / expected.abs().max())
    assert relative < 1e-10, f"{name}: deploy form off the train form by {relative:.2e} (relative)"


@pytest.mark.parametrize("name", NAMES)
def test_torch_deploy_form_is_one_conv_per_block_without_bn(name):
    _, deployed = _train_and_deploy(name)
    modules = list(deployed.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in modules) == COUNTS[name][2]
    blocks = [m for m in modules if isinstance(m, RepBlock)]
    assert blocks and all(list(block.children()) == [block.fused] for block in blocks)


def test_a_branch_the_merge_does_not_know_is_refused():
    class Odd(RepBlock):
        branch_names = ("act",)

        def __init__(self):
            super().__init__(2, 2, (1, 1), 1, 1)
            self.act = torch.nn.ReLU()

    with pytest.raises(TypeError, match="cannot merge a ReLU branch"):
        Odd().reparameterize()


@pytest.mark.parametrize("randomize", [True, False])
def test_exported_twin_holds_the_train_form_weights(tmp_path, randomize):
    """`bnfold export NAME_deploy` merges the train form that `bnfold export NAME` writes, BN statistics
    as randomized (or not) and seed included: both float64 references agree to float32 rounding."""
    references = []
    for name in ("repvit_block", "repvit_block_deploy"):
        out = tmp_path / f"{name}.onnx"
        export_model(name, out, exporter="torchscript", randomize_bn=randomize, seed=5,
                     reference=out.with_suffix(".npz"))
        references.append(load_reference(out.with_suffix(".npz")))
    (train_inputs, train_outputs), (twin_inputs, twin_outputs) = references
    assert train_inputs["input"].tobytes() == twin_inputs["input"].tobytes()
    scale = float(np.abs(train_outputs["output"]).max())
    assert np.abs(twin_outputs["output"] - train_outputs["output"]).max() <= 4 * EPS32 * scale
    assert _ops(load_model(tmp_path / "repvit_block_deploy.onnx"))["BatchNormalization"] == 0


# ------------------------------------------------------------------------------- committed files
@pytest.mark.parametrize("name", NAMES)
def test_committed_train_form_keeps_every_branch(name):
    ops = _ops(load_model(COMMITTED / f"{name}.onnx"))
    assert (ops["BatchNormalization"], ops["Conv"]) == COUNTS[name][:2]


@pytest.mark.parametrize("name", NAMES)
def test_committed_deploy_form_has_one_conv_per_block_and_no_bn(name):
    ops = _ops(load_model(COMMITTED / f"{name}_deploy.onnx"))
    assert (ops["BatchNormalization"], ops["Conv"]) == (0, COUNTS[name][2])


@pytest.mark.parametrize("name", NAMES)
def test_committed_twin_is_made_from_the_train_form(name):
    """Same inputs; the twin's float64 reference is the train form's up to its kernels' float32 rounding
    (measured: at most 0.92 float32 ulps of max|output|; other weights would be off by far more)."""
    train_inputs, train_outputs = load_reference(COMMITTED / f"{name}.npz")
    twin_inputs, twin_outputs = load_reference(COMMITTED / f"{name}_deploy.npz")
    assert train_inputs["input"].tobytes() == twin_inputs["input"].tobytes()
    scale = float(np.abs(train_outputs["output"]).max())
    assert np.abs(twin_outputs["output"] - train_outputs["output"]).max() <= 4 * EPS32 * scale


# ------------------------------------------------------------------------ bnfold's merge vs torch's
@pytest.mark.parametrize("name", NAMES)
def test_fold_of_the_train_form_reaches_the_deploy_form(name):
    train = load_model(COMMITTED / f"{name}.onnx")
    twin = load_model(COMMITTED / f"{name}_deploy.onnx")
    folded, _ = fold_model(train)
    ops = _ops(folded)
    assert ops["BatchNormalization"] == 0
    assert ops["Conv"] == _ops(twin)["Conv"]
    assert ops == _ops(twin), "the folded train form and the deploy form differ in other ops"
    inputs, reference = load_reference(COMMITTED / f"{name}.npz")
    original_abs, _ = errors(run(train, inputs), reference)
    folded_abs, _ = errors(run(folded, inputs), reference)
    slack = SLACK_ULPS * EPS32 * max(float(np.max(np.abs(r))) for r in reference.values())
    assert folded_abs <= original_abs + slack, (
        f"{name}: folded max abs error {folded_abs:.3e} vs original {original_abs:.3e} (slack {slack:.2e})")


def _convs(model: onnx.ModelProto) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
    """Each Conv in graph order: (geometry with ONNX defaults filled in, kernel, bias)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = []
    for node in (n for n in model.graph.node if n.op_type == "Conv"):
        kernel, bias = weights[node.input[1]], weights[node.input[2]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        rank = kernel.ndim - 2
        geometry = (kernel.shape, tuple(attrs.get("strides", [1] * rank)), tuple(attrs.get("pads", [0] * 2 * rank)),
                    tuple(attrs.get("dilations", [1] * rank)), attrs.get("group", 1))
        convs.append((geometry, kernel, bias))
    return convs


@pytest.mark.parametrize("name", NAMES)
def test_merged_kernels_are_rounded_once(name):
    """Computed in float64 from the same float32 weights and rounded once, bnfold's merged kernels and
    biases are torch's deploy ones to 1 float32 ulp, element by element (the two sum in different orders);
    rounding each folded branch first is off by many ulps where branches cancel."""
    folded, _ = fold_model(load_model(COMMITTED / f"{name}.onnx"))
    ours, theirs = _convs(folded), _convs(load_model(COMMITTED / f"{name}_deploy.onnx"))
    assert [c[0] for c in ours] == [c[0] for c in theirs]
    for (_, *got), (geometry, *expected) in zip(ours, theirs):
        for a, b in zip(got, expected):
            ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)))
            assert np.all(np.abs(a.astype(np.float64) - b) <= ulp), f"{name}: Conv {geometry}"
