"""Fold and verify every ONNX model under a folder on a Dask cluster, one task per model.

    pip install "bnfold[dask]"
    python examples/dask_fold.py MODELS_DIR OUT_DIR [--scheduler ADDRESS] [--workers N]

Each task calls ``bnfold.fold_file`` with verification on: the folded model is compared with the
original in onnxruntime and written under OUT_DIR, at the same relative path, only if it matches.
bnfold needs no distribution layer of its own: ``fold_file`` maps a file to a file and returns a
picklable ``FoldReport`` (a refused model raises a picklable ``BnfoldError``), so Dask ships the call
and its result between machines.

Without --scheduler a LocalCluster of N single-threaded worker processes runs on this machine (N: the
CPU count). With --scheduler tcp://HOST:8786 the tasks go to that cluster: its workers need bnfold
installed and must see MODELS_DIR and OUT_DIR at the same paths (a shared file system).

One line per model as it finishes, then a total. Exit status: 0 when every model was folded and
verified, otherwise the worst of 1 (a folded model's outputs differed), 2 (a file was refused: not an
ONNX model, ...) and 3 (an internal error: a worker without bnfold or that died, a bnfold bug).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import bnfold

EXIT_INTERNAL = 3  # as the bnfold command line


def fold_one(source: str, target: str) -> bnfold.FoldReport | bnfold.BnfoldError:
    """The task, run on a worker. It takes strings and imports bnfold itself: on a worker without bnfold
    the task then fails with the ImportError, whereas a task that cannot even be unpickled breaks the
    worker's connection and the run hangs. A refused file or a mismatch is returned, not raised: it is a
    result like any other, and a raised one would make the worker log a traceback."""
    import bnfold
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        return bnfold.fold_file(source, target, verify=bnfold.VerifyOptions())
    except bnfold.BnfoldError as error:
        return error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dask_fold", description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path, metavar="MODELS_DIR", help="folder searched for *.onnx")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where folded models go")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (tcp://HOST:8786)")
    parser.add_argument("--workers", type=int, metavar="N", help="local worker processes (default: CPU count)")
    args = parser.parse_args(argv)
    models, out = args.models_dir.resolve(), args.out_dir.resolve()
    if not models.is_dir():
        parser.error(f"{args.models_dir}: not a folder")
    if models == out or models in out.parents or out in models.parents:
        parser.error("MODELS_DIR and OUT_DIR must not contain one another: an output could replace an "
                     "input, or be read as one on the next run")
    if args.scheduler and args.workers is not None:
        parser.error("--workers sizes the local cluster: it does not apply with --scheduler")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if importlib.util.find_spec("distributed") is None:
        parser.error('needs Dask\'s distributed scheduler: pip install "bnfold[dask]"')
    args.models_dir, args.out_dir = models, out
    args.models = sorted(p.relative_to(models) for p in models.rglob("*.onnx") if p.is_file())
    if not args.models:
        parser.error(f"{args.models_dir}: no .onnx file in it")
    return args


def connect(args):
    """A client of the given scheduler, or of a LocalCluster that closes with the client."""
    from distributed import Client
    if args.scheduler:
        return Client(args.scheduler)
    return Client(n_workers=args.workers or os.cpu_count(), threads_per_worker=1, processes=True,
                  dashboard_address=None)


def outcome(future):
    """The task's result, or the exception Dask carried back (a bnfold bug, a worker that died)."""
    try:
        return future.result()
    except Exception as error:
        return error


def describe(model: Path, result) -> str:
    """One line: what happened to `model`."""
    if isinstance(result, bnfold.FoldReport):
        samples = len(result.verification.samples)
        return (f"ok      {model}: folded {result.folded} of {result.total} BatchNormalization, "
                f"outputs match on {samples} sample(s)")
    if isinstance(result, bnfold.VerificationFailed):
        sample, comparison = next((s, c) for s in result.report.verification.samples for c in s.outputs
                                  if not c)
        return (f"failed  {model}: the folded model's outputs differ, nothing written: {comparison.name} "
                f"on {sample.label}: {comparison.reason()}")
    if isinstance(result, bnfold.BnfoldError):
        return f"failed  {model}: {result.one_line()}"
    return f"failed  {model}: internal error: {type(result).__name__}: {result}"


def exit_code(result) -> int:
    if isinstance(result, bnfold.FoldReport):
        return 0
    return result.exit_code if isinstance(result, bnfold.BnfoldError) else EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distributed import as_completed
    results = {}
    with connect(args) as client:
        futures = {client.submit(fold_one, str(args.models_dir / model), str(args.out_dir / model), pure=False):
                   model for model in args.models}
        for future in as_completed(futures):
            model = futures[future]
            results[model] = outcome(future)
            print(describe(model, results[model]), flush=True)
    reports = [r for r in results.values() if isinstance(r, bnfold.FoldReport)]
    print(f"{len(reports)} of {len(results)} models folded and verified "
          f"({sum(r.folded for r in reports)} of {sum(r.total for r in reports)} BatchNormalization folded), "
          f"{len(results) - len(reports)} failed")
    return max(exit_code(r) for r in results.values())


if __name__ == "__main__":
    sys.exit(main())
