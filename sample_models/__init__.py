"""Sample torch architectures for bnfold (zoo.py), and the small ONNX exports committed with them.

``python sample_models/make_models.py`` regenerates the committed .onnx and .npz files bit for bit;
``python sample_models/report.py`` folds each of them and prints the accuracy table. Only zoo.py
needs torch: it is imported on first use of ``SAMPLES``, so the report runs without torch.
"""


def __getattr__(name: str):
    if name in ("SAMPLES", "Sample"):
        from . import zoo
        return getattr(zoo, name)
    raise AttributeError(f"module 'sample_models' has no attribute {name!r}")
