"""`bnfold export`: every sample exports with all its BatchNorms kept, under both exporters and
several opsets; a fold of each export is checked against the float64 PyTorch reference.

The default run covers every sample with the TorchScript exporter (fast) and a few with dynamo
(several seconds each); ``pytest -m slow`` runs the whole matrix: every sample x both exporters x
opsets 9, 13, 17, the newest TorchScript writes, and the newest onnx defines. Combinations torch
cannot export are skipped with the reason (see UNSUPPORTED).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxscript  # noqa: F401  (a declared test dependency: missing, it must fail, not skip)
import pytest
import torch

import bnfold
from bnfold.cli import main
from bnfold.errors import EXIT_CHECK_FAILED, EXIT_USAGE, BnfoldError
from bnfold.export import count_batchnorm_nodes, export_model, sample_names
from bnfold.inputs import parse_dims
from bnfold.zoo import SAMPLES
from sample_models.report import load_reference, measure
from tests.builders import at_least

ROOT = Path(__file__).resolve().parent.parent
SMALL = [name for name in sample_names() if name != "resnet50"]
TORCHSCRIPT_MAX = torch.onnx._constants.ONNX_MAX_OPSET
ONNX_NEWEST = onnx.defs.onnx_opset_version()
OPSETS = sorted({9, 13, 17, TORCHSCRIPT_MAX, ONNX_NEWEST})
# Same slack as tests/test_samples.py, measured there: 8 float32 ulps of the output's magnitude.
SLACK = 8 * float(np.finfo(np.float32).eps)


def _unsupported(name: str, exporter: str, opset: int) -> str | None:
    """Why torch cannot export this combination, or None."""
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX:
        return f"the TorchScript exporter of torch {torch.__version__} writes at most opset {TORCHSCRIPT_MAX}"
    if exporter == "dynamo" and name == "video_conv3d":
        return ("the dynamo exporter writes a 2-D zero bias for a bias-free Conv3d, which onnxruntime "
                "refuses (onnxscript issue 2931); bnfold export reports it")
    return None


def _bn_modules(name: str) -> int:
    """BatchNorm modules of a sample, counted on the torch model (each is called once in forward)."""
    model = SAMPLES[name].factory()
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _export_and_check(tmp_path, name: str, exporter: str, opset: int) -> None:
    """Export with all BNs kept, then fold: the fold must be as accurate as the original."""
    reason = _unsupported(name, exporter, opset)
    if reason:
        pytest.skip(reason)
    out = tmp_path / f"{name}.onnx"
    try:
        result = export_model(name, out, exporter=exporter, opset=opset, randomize_bn=True,
                              reference=out.with_suffix(".npz"))
    except BnfoldError as exc:
        if exporter == "dynamo" and opset != 18 and "cannot write opset" in exc.message:
            assert not out.exists()  # bnfold export refuses what the converter could not do, and writes nothing
            pytest.skip(f"the dynamo exporter's version converter cannot bring this model from opset 18 to "
                        f"{opset} (GELU, for one, above 18): {exc.message}")
        raise
    model = onnx.load(str(out))
    assert count_batchnorm_nodes(model) == result.bn_nodes == _bn_modules(name)
    assert next(o.version for o in model.opset_import if o.domain == "") == opset
    onnx.checker.check_model(model, full_check=True)
    row = measure(out)
    _, reference = load_reference(out.with_suffix(".npz"))
    scale = max(float(np.max(np.abs(v))) for v in reference.values())
    assert row.original_rel < 1e-5
    assert row.folded_abs <= row.original_abs + SLACK * scale


# ------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("name", SMALL)
def test_every_sample_exports_with_torchscript(tmp_path, name):
    _export_and_check(tmp_path, name, "torchscript", 18)


@pytest.mark.parametrize("name,opset", [("mlp_bn1d", 18), ("shared_conv", 18), ("unet_small", 17)])
def test_some_samples_export_with_dynamo(tmp_path, name, opset):
    _export_and_check(tmp_path, name, "dynamo", opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_torchscript_opsets(tmp_path, opset):
    _export_and_check(tmp_path, "resnet_small", "torchscript", opset)


@pytest.mark.slow
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", SMALL)
def test_full_matrix(tmp_path, name, exporter, opset):
    _export_and_check(tmp_path, name, exporter, opset)


def test_dynamo_below_its_native_opset_is_refused(tmp_path):
    """torch silently writes opset 18 when its converter fails; bnfold must refuse, not mislabel.

    The converter of torch 2.13 (constraints.txt) fails on resnet_small at opset 13; a torch that
    converts it makes this test fail, and then the test should check the opset written instead.
    """
    out = tmp_path / "m.onnx"
    with pytest.raises(BnfoldError, match="cannot write opset 13 \\(it wrote opset 18\\)") as info:
        export_model("resnet_small", out, exporter="dynamo", opset=13)
    assert info.value.exit_code == EXIT_USAGE and info.value.option == "opset"
    assert not out.exists()


@pytest.mark.skipif(not at_least(onnxruntime, "1.30"), reason="onnxruntime before 1.30 runs a 2-D Conv bias")
def test_exporter_bug_is_reported_not_written(tmp_path):
    """A model onnxruntime cannot run (dynamo's bias-free Conv3d, onnxscript issue 2931, in torch 2.13
    of constraints.txt) fails the export with exit 1 and writes nothing."""
    out = tmp_path / "v.onnx"
    with pytest.raises(BnfoldError, match="onnxruntime cannot run: .*bias must be a 1D tensor") as info:
        export_model("video_conv3d", out, exporter="dynamo")
    assert info.value.exit_code == EXIT_CHECK_FAILED
    assert not out.exists()


# ------------------------------------------------------------------------------------ the BN check
def test_export_fails_if_the_exporter_folds_batchnorms(tmp_path, monkeypatch):
    """With torch's eval-mode fusion switched back on, the count check must catch the lost BNs."""
    real_export = torch.onnx.export

    def fusing_export(*args, **kwargs):
        kwargs.update(training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fusing_export)
    out = tmp_path / "r.onnx"
    with pytest.raises(BnfoldError, match="kept 0 of 20 BatchNorms") as info:
        export_model("resnet_small", out, exporter="torchscript", reference=tmp_path / "r.npz")
    assert info.value.exit_code == EXIT_CHECK_FAILED
    assert list(tmp_path.iterdir()) == []


def test_functional_and_reused_batchnorms_are_counted(tmp_path):
    """A BN module called twice and a direct F.batch_norm call are three BN nodes, all expected."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            y = self.bn(self.conv(x)) + self.bn(self.conv(x * 2))
            return torch.nn.functional.batch_norm(y, self.mean, self.var)

    result = export_model(Net, tmp_path / "n.onnx", input_shapes=[(1, 2, 4, 4)], exporter="torchscript")
    assert result.bn_calls == result.bn_nodes == 3


# --------------------------------------------------------------------------------- options and files
def test_randomize_bn_is_seeded_and_non_trivial():
    from bnfold.export import randomize_batchnorm

    def stats(seed):
        model = torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.BatchNorm1d(64))
        randomize_batchnorm(model, seed)
        return torch.cat([t.flatten() for t in model.state_dict().values() if t.is_floating_point()])

    first = stats(3)
    assert torch.equal(first, stats(3)) and not torch.equal(first, stats(4))
    model = torch.nn.BatchNorm2d(256)
    randomize_batchnorm(model, 0)
    var = model.running_var
    assert var.min() > 0 and var.max() / var.min() > 100  # spans orders of magnitude
    assert model.running_mean.abs().max() > 0.1 and model.bias.abs().max() > 0.1
    assert (model.weight < 0).any() and (model.weight.abs() >= 0.5).all()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_same_command_gives_identical_bytes(tmp_path, exporter):
    paths = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.onnx"
        export_model("shared_conv", out, exporter=exporter, randomize_bn=True, seed=5,
                     reference=tmp_path / f"{run}.npz")
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert b"stack_trace" not in paths[0].read_bytes()  # they hold this machine's paths


def test_reference_holds_inputs_and_float64_outputs(tmp_path):
    out = tmp_path / "s.onnx"
    result = export_model("shared_conv", out, exporter="torchscript", randomize_bn=True,
                          reference=tmp_path / "s.npz")
    data = np.load(tmp_path / "s.npz")
    assert sorted(data.files) == ["input:input_0", "input:input_1", "output:output"]
    assert result.input_names == ("input_0", "input_1") and result.output_names == ("output",)
    assert data["input:input_0"].dtype == np.float32 and data["output:output"].dtype == np.float64
    torch.manual_seed(0)  # what export_model does before building the sample
    model = SAMPLES["shared_conv"].factory().double().eval()
    from bnfold.export import randomize_batchnorm
    randomize_batchnorm(model, 0)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(data[f"input:input_{i}"]).double() for i in range(2)))
    np.testing.assert_array_equal(data["output:output"], expected.numpy())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_batch(tmp_path, exporter):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    export_model("mlp_bn1d", out, exporter=exporter, dynamic_batch=True)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": np.ones((3, 64), np.float32)})
    assert y.shape == (3, 10)


def test_committed_models_regenerate(tmp_path):
    """make_models.py writes the committed files again (with the torch version that wrote them)."""
    stems = ["mlp_bn1d", "shared_conv_opset13"]
    producer = onnx.load(str(ROOT / "sample_models" / "mlp_bn1d.onnx")).producer_version
    if producer.split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"committed files come from torch {producer}, this is {torch.__version__}")
    make = importlib.import_module("sample_models.make_models")
    assert make.main(["--out-dir", str(tmp_path), "--only", *stems]) == 0
    for stem in stems:
        assert_regenerated(tmp_path, stem)


@pytest.mark.slow
def test_all_committed_models_regenerate(tmp_path):
    producer = onnx.load(str(ROOT / "sample_models" / "mlp_bn1d.onnx")).producer_version
    if producer.split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"committed files come from torch {producer}, this is {torch.__version__}")
    make = importlib.import_module("sample_models.make_models")
    assert make.main(["--out-dir", str(tmp_path)]) == 0
    for entry in make.COMMITTED:
        assert_regenerated(tmp_path, entry.stem)


def assert_regenerated(folder, stem: str) -> None:
    """The .onnx and the reference inputs bit for bit; the float64 reference outputs to 1e-6 of their
    largest magnitude.

    torch's float64 kernels sum in an order that depends on the CPU (its vector width), and the
    randomized BN statistics (scales up to ~6 per layer) amplify those last-bit differences through a
    deep network: between two machines with the same torch build, the references differed by up to
    9e-9 of max|output| (resnet50_small) and 4e-14 on the shallow mlp_bn1d. The references measure
    float32 errors of ~1e-7 of max|output|, so a bound of 1e-6 catches a wrong reference (a changed
    model, input or seed moves them by orders of magnitude more) while bit equality is required only
    where the CPU cannot matter."""
    committed = ROOT / "sample_models"
    assert (folder / f"{stem}.onnx").read_bytes() == (committed / f"{stem}.onnx").read_bytes(), stem
    with np.load(folder / f"{stem}.npz") as new, np.load(committed / f"{stem}.npz") as old:
        assert sorted(new.files) == sorted(old.files), stem
        for key in old.files:
            if key.startswith("output:"):
                scale = float(np.abs(old[key]).max())
                np.testing.assert_allclose(new[key], old[key], rtol=0, atol=1e-6 * scale, err_msg=key)
                assert new[key].dtype == old[key].dtype == np.float64
            else:
                assert new[key].tobytes() == old[key].tobytes() and new[key].dtype == old[key].dtype, key


@pytest.mark.slow
def test_large_resnet50(tmp_path):
    make = importlib.import_module("sample_models.make_models")
    out = tmp_path / "resnet50.onnx"
    assert make.main(["--large", str(out), "--exporter", "torchscript"]) == 0
    model = onnx.load(str(out))
    weights = sum(np.prod(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert 25_000_000 < weights < 26_000_000  # ResNet-50's 25.6M parameters (BN statistics included)
    assert count_batchnorm_nodes(model) == 53


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_exports_a_sample_with_two_inputs(tmp_path, capsys):
    out = tmp_path / "s.onnx"
    code = main(["export", "shared_conv", "-o", str(out), "--exporter", "torchscript", "--input-shape", "2x3x8x8",
                 "--input-shape", "2x3x8x8", "--randomize-bn", "--seed", "3", "--reference", str(tmp_path / "s.npz")])
    assert code == 0
    assert "2 BatchNormalization nodes kept" in capsys.readouterr().out
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(out)).graph.input]
    assert dims == [[2, 3, 8, 8], [2, 3, 8, 8]]


def test_cli_exports_module_callable(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_models_for_bnfold.py").write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "u.onnx"
    assert main(["export", "user_models_for_bnfold:build", "-o", str(out), "--input-shape", "2x4",
                 "--exporter", "torchscript"]) == 0
    assert count_batchnorm_nodes(onnx.load(str(out))) == 1


@pytest.mark.parametrize("argv,message", [
    (["no_such_sample"], "unknown sample model 'no_such_sample'"),
    (["no_such_module_for_bnfold:build"], "cannot import 'no_such_module_for_bnfold'"),
    (["json:no_such_factory"], "has no attribute"),
    (["json:__name__"], "is not callable"),
    (["json:dumps", "--input-shape", "1x2"], "building json:dumps failed"),
    (["collections:OrderedDict", "--input-shape", "1x2"], "not a torch.nn.Module"),
    (["collections:OrderedDict"], "--input-shape: collections:OrderedDict has no default input shape"),
    ([":build"], "bad model spec"),
    (["resnet_small", "--input-shape", "1x3xax64"], "--input-shape: bad shape '1x3xax64'"),
    (["resnet_small", "--input-shape", "0x3x64x64"], "--input-shape: bad shape"),
    (["resnet_small", "--input-shape", ""], "--input-shape: bad shape"),
    (["resnet_small", "--input-shape", "1x3x64"], "--input-shape: the model's forward pass failed"),
    (["resnet_small", "--opset", "99", "--exporter", "torchscript"], "--opset: the torchscript exporter"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out.onnx"
    code = main(["export", *argv, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and err.startswith("bnfold: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_output_folder(tmp_path, capsys):
    code = main(["export", "mlp_bn1d", "-o", str(tmp_path / "no" / "m.onnx")])
    assert code == EXIT_USAGE and "does not exist" in capsys.readouterr().err


def test_without_torch_export_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    code = main(["export", "resnet_small", "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and err.count("\n") == 1 and "pip install 'bnfold[torch]'" in err


def test_bnfold_never_imports_torch_outside_export():
    """fold, inspect, verify and bench must work on a machine without torch."""
    # bnfold.zoo is export's: the sample architectures are torch modules
    modules = [m.name for m in pkgutil.walk_packages(bnfold.__path__, "bnfold.")
               if m.name not in ("bnfold.__main__", "bnfold.zoo")]
    code = ("import importlib, sys\n"
            "sys.modules['torch'] = None\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "from bnfold.cli import main\n"
            f"sys.exit(main(['inspect', {str(ROOT / 'sample_models' / 'resnet_small.onnx')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_input_shapes_use_the_dims_of_the_shape_grammar():
    assert parse_dims("1x3x224x224") == (1, 3, 224, 224) == parse_dims("1X3x224X224")
    assert parse_dims(" 8 ") == (8,)
    for bad in ("", "x", "1x", "1xx2", "-1x3", "1.5x2", "0"):
        with pytest.raises(BnfoldError):
            parse_dims(bad)
