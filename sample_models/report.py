"""Fold every committed sample model and measure both versions against the float64 PyTorch reference.

    python sample_models/report.py            # markdown table on stdout
    python sample_models/report.py --json     # the same rows as JSON

For each ``X.onnx`` with its ``X.npz`` (see bnfold/export.py for the layout): fold it with
``bnfold.fold_model``, run the original and the folded model in onnxruntime (CPU, graph
optimizations disabled, so onnxruntime does no fusing of its own) on the reference inputs, and compare
each with the float64 reference output. Errors are over all outputs: max abs = max |y - ref|,
max rel = max |y - ref| / max |ref| (relative to the output's magnitude; an elementwise ratio would
blow up on outputs near zero). No torch needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's bnfold, even when it is not installed

from bnfold.fold import fold_model  # noqa: E402
from bnfold.io import load_model  # noqa: E402
from bnfold.runtime import create_session  # noqa: E402


@dataclass
class Row:
    """One sample: what the fold did and how far each model is from the float64 reference."""

    model: str
    bn: int
    folded: int
    left: dict[str, int]
    original_abs: float
    original_rel: float
    folded_abs: float
    folded_rel: float


def load_reference(npz_path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs by ONNX input name, float64 outputs by ONNX output name) from a reference .npz."""
    with np.load(npz_path) as data:
        inputs = {key.split(":", 1)[1]: data[key] for key in data.files if key.startswith("input:")}
        outputs = {key.split(":", 1)[1]: data[key] for key in data.files if key.startswith("output:")}
    return inputs, outputs


def run(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from onnxruntime on CPU with every graph optimization disabled."""
    return create_session(model, label="sample").run(inputs)


def errors(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|) over all reference outputs."""
    worst_abs = worst_rel = 0.0
    for name, expected in reference.items():
        diff = float(np.max(np.abs(got[name].astype(np.float64) - expected)))
        scale = float(np.max(np.abs(expected)))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    return worst_abs, worst_rel


def measure(onnx_path: str | Path) -> Row:
    """Fold one model and measure original and folded against its reference (same stem, .npz)."""
    onnx_path = Path(onnx_path)
    original = load_model(onnx_path)
    folded, report = fold_model(original)
    inputs, reference = load_reference(onnx_path.with_suffix(".npz"))
    left = Counter(d.reason for d in report.decisions if not d.folded)
    return Row(onnx_path.stem, report.total, report.folded, dict(sorted(left.items())),
               *errors(run(original, inputs), reference), *errors(run(folded, inputs), reference))


def committed_models(folder: Path = HERE) -> list[Path]:
    """Every .onnx file in the folder that has its reference .npz."""
    return sorted(p for p in folder.glob("*.onnx") if p.with_suffix(".npz").is_file())


def markdown(rows: list[Row]) -> str:
    """The table: one row per model."""
    lines = ["| model | BN | folded | left (reason: count) | original max abs | original max rel "
             "| folded max abs | folded max rel |",
             "|---|--:|--:|---|--:|--:|--:|--:|"]
    for r in rows:
        left = ", ".join(f"{reason}: {count}" for reason, count in r.left.items()) or "-"
        lines.append(f"| {r.model} | {r.bn} | {r.folded} | {left} | {r.original_abs:.2e} | {r.original_rel:.2e} "
                     f"| {r.folded_abs:.2e} | {r.folded_rel:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="models to measure (default: the committed ones)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON document")
    args = parser.parse_args(argv)
    paths = args.models or committed_models()
    missing = [str(p.with_suffix(".npz")) for p in paths if not p.with_suffix(".npz").is_file()]
    if missing:
        print(f"report: error: no reference file {', '.join(missing)} (make one with bnfold export --reference)",
              file=sys.stderr)
        return 2
    rows = [measure(path) for path in paths]
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
