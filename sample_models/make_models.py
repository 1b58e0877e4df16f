"""Regenerate the committed sample ONNX models (bit for bit) and their float64 references (to 1e-6 of their magnitude:
torch's float64 sums depend on the CPU's vector width).

    python sample_models/make_models.py                 # every committed file, into sample_models/
    python sample_models/make_models.py --out-dir DIR   # the same files into DIR (to compare)
    python sample_models/make_models.py --large OUT.onnx [--reference OUT.npz]
                                                        # full-width ResNet-50 (~100 MB), never committed

Every file comes from ``bnfold export`` with randomized BatchNorm statistics and seed 0, so the same
torch version writes the same bytes. Each model ``X.onnx`` has its reference ``X.npz`` next to it
(keys ``input:<name>`` float32 and ``output:<name>`` float64, see bnfold/export.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's bnfold, even when it is not installed

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.export import export_model  # noqa: E402

SEED = 0


@dataclass(frozen=True)
class Committed:
    """One committed file, ``<stem>.onnx`` with ``<stem>.npz``: which sample, exported how."""

    stem: str
    sample: str
    exporter: str = "dynamo"
    opset: int = 18


# Most files use torch's default (dynamo) exporter at opset 18. video_conv3d uses TorchScript:
# dynamo in torch 2.13 / onnxscript 0.7 writes a 2-D zero bias for a bias-free Conv3d (onnxscript
# issue 2931), a model onnxruntime refuses. The TorchScript variants at opsets 9 and 13 keep the
# older BatchNormalization versions (no training_mode attribute) covered on a machine without torch.
# Each re-parameterizable sample X has its deploy twin X_deploy: the same weights and BN statistics,
# merged in torch into one Conv per block (bnfold.zoo.deploy), as the model's authors would export it.
COMMITTED = (
    Committed("resnet_small", "resnet_small"),
    Committed("resnet50_small", "resnet50_small"),
    Committed("mobilenetv2_small", "mobilenetv2_small"),
    Committed("efficientnet_block", "efficientnet_block"),
    Committed("densenet_small", "densenet_small"),
    Committed("unet_small", "unet_small"),
    Committed("audio_conv1d", "audio_conv1d"),
    Committed("video_conv3d", "video_conv3d", "torchscript"),
    Committed("mlp_bn1d", "mlp_bn1d"),
    Committed("preact_block", "preact_block"),
    Committed("shared_conv", "shared_conv"),
    Committed("levit_block", "levit_block"),
    Committed("iresnet_head", "iresnet_head"),
    Committed("tf_conv_bias", "tf_conv_bias"),
    Committed("channels_last_mlp", "channels_last_mlp"),
    *(Committed(name, name) for name in ("repvgg_small", "repvgg_small_deploy", "mobileone_small",
                                          "mobileone_small_deploy", "repghost_small", "repghost_small_deploy",
                                          "acnet_small", "acnet_small_deploy", "repvit_block",
                                          "repvit_block_deploy")),
    Committed("resnet_small_opset9", "resnet_small", "torchscript", 9),
    Committed("mlp_bn1d_opset13", "mlp_bn1d", "torchscript", 13),
    Committed("shared_conv_opset13", "shared_conv", "torchscript", 13),
)


def make(entries, out_dir: Path) -> None:
    """Export each entry (model and reference) into out_dir, printing one line per file."""
    for entry in entries:
        start = time.perf_counter()
        result = export_model(entry.sample, out_dir / f"{entry.stem}.onnx", exporter=entry.exporter,
                              opset=entry.opset, randomize_bn=True, seed=SEED,
                              reference=out_dir / f"{entry.stem}.npz")
        print(f"{entry.stem + '.onnx':42s} {result.bn_nodes:3d} BN  {time.perf_counter() - start:5.1f} s",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write (default: this folder)")
    parser.add_argument("--only", nargs="+", metavar="STEM", help="only these files (stems, e.g. resnet_small)")
    parser.add_argument("--large", type=Path, metavar="OUT.onnx",
                        help="write only the full-width ResNet-50 (~100 MB) to OUT.onnx")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="exporter for --large (default dynamo)")
    parser.add_argument("--reference", type=Path, metavar="FILE.npz",
                        help="with --large: also write the float64 reference")
    args = parser.parse_args(argv)
    try:
        if args.large:
            result = export_model("resnet50", args.large, exporter=args.exporter, randomize_bn=True, seed=SEED,
                                  reference=args.reference)
            print(result.summary())
            return 0
        entries = [e for e in COMMITTED if not args.only or e.stem in args.only]
        unknown = set(args.only or ()) - {e.stem for e in COMMITTED}
        if unknown:
            raise BnfoldError(f"no committed file named {', '.join(sorted(unknown))}",
                              note=f"choose from {', '.join(e.stem for e in COMMITTED)}")
        make(entries, args.out_dir)
    except BnfoldError as exc:
        print(f"make_models: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
