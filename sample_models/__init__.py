"""The small ONNX exports of bnfold's sample architectures, committed with their float64 references.

The architectures themselves live in the package (:mod:`bnfold.zoo`, which needs torch);
``python sample_models/make_models.py`` regenerates the committed .onnx and .npz files bit for bit;
``python sample_models/report.py`` folds each of them and prints the accuracy table (no torch).
``SAMPLES`` and ``Sample`` are bnfold.zoo's, imported on first use.
"""


def __getattr__(name: str):
    if name in ("SAMPLES", "Sample"):
        from bnfold import zoo
        return getattr(zoo, name)
    raise AttributeError(f"module 'sample_models' has no attribute {name!r}")
