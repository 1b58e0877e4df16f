"""Folding many models for the CLI: which files, where each goes, and running the folds, optionally
in parallel processes.

Everything that can be refused is refused before anything is written: two inputs that would write the
same output, an output that would replace another input, an --exclude-node name that no input has.
Then one model's failure is its own outcome and does not stop the others. An interrupt (SIGINT,
SIGTERM) becomes an exception in every process that is folding, so the atomic writers of bnfold.io
remove their temporary files on the way out and no output is half-written.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from google.protobuf.message import DecodeError

from .cli_options import with_flag
from .errors import EXIT_INTERNAL, EXIT_OK, BnfoldError, Terminated
from .fold import VerificationFailed, fold_file
from .report import FoldReport
from .schema import SCHEMA_VERSION

MODEL_SUFFIX = ".onnx"


@dataclass(frozen=True)
class FoldJob:
    source: str
    target: str | None
    exclude_nodes: tuple[str, ...] = ()
    dry_run: bool = False
    external_data: bool = False
    verify: object | None = None  # bnfold.verify.VerifyOptions
    assume_inference: bool = False
    lower_standalone: str = "keep"
    reparameterize: bool = True


@dataclass
class FoldOutcome:
    """One job's result: its report (also when --verify rejected the fold), or the error that stopped
    it, and its wall time in seconds."""
    job: FoldJob
    report: FoldReport | None = None
    error: BnfoldError | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.error is None else self.error.exit_code


def models_document(outcomes: list[FoldOutcome], seconds: float, jobs: int) -> dict:
    """The JSON document of a run over several models: one entry per model, in input order (never in
    the order they finished), then totals."""
    entries = [_entry(outcome) for outcome in outcomes]
    left: Counter = Counter()
    for entry in entries:
        left.update(entry.get("left_by_reason", {}))
    failed = sum(entry["status"] != "ok" for entry in entries)
    return {"schema_version": SCHEMA_VERSION, "models": entries, "summary": {
        "models": len(entries), "ok": len(entries) - failed, "failed": failed,
        "batchnorm_total": sum(entry.get("batchnorm_total", 0) for entry in entries),
        "folded": sum(entry.get("folded", 0) for entry in entries),
        "left_by_reason": dict(sorted(left.items())), "seconds": round(seconds, 3), "jobs": jobs,
        "exit_code": max(outcome.exit_code for outcome in outcomes)}}


def _entry(outcome: FoldOutcome) -> dict:
    """One model: where it went, whether it failed and why, its time, then its report's fields when
    it was read (also when --verify rejected the fold)."""
    entry = {"model": outcome.job.source, "output": outcome.job.target,
             "status": "ok" if outcome.error is None else "error", "exit_code": outcome.exit_code,
             "error": None if outcome.error is None else with_flag(outcome.error).one_line(),
             "seconds": round(outcome.seconds, 3)}
    if outcome.report is not None:
        entry.update((key, value) for key, value in outcome.report.to_dict().items()
                     if key not in ("schema_version", "model"))
    return entry


# ------------------------------------------------------------------------------------ which models
def find_models(inputs: list[str], skip: str | None = None) -> list[tuple[str, str]]:
    """(source, place) per model: a file as given, placed under its own name; every `*.onnx` below a
    folder, sorted, placed at its path relative to the folder. Links to folders are not followed (no
    loops, nothing outside the folder is searched); a folder that is `skip` (the --out-dir) is not
    searched either. A folder without a model is an error."""
    found = []
    for path in inputs:
        if not os.path.isdir(path):
            found.append((path, os.path.basename(path)))
            continue
        below = _models_below(path, skip)
        if not below:
            raise BnfoldError(f"{path}: no {MODEL_SUFFIX} file in this folder or below it")
        found += [(os.path.join(path, place), place) for place in below]
    return found


def _models_below(folder: str, skip: str | None) -> list[str]:
    places = []
    for current, dirs, files in os.walk(folder, onerror=_unreadable):
        dirs[:] = [d for d in dirs if not (skip and _same(os.path.join(current, d), skip))]
        relative = os.path.relpath(current, folder)
        places += [os.path.normpath(os.path.join(relative, name)) for name in files
                   if name.lower().endswith(MODEL_SUFFIX)]
    return sorted(places, key=lambda place: place.split(os.sep))


def _unreadable(error: OSError):
    raise BnfoldError(f"{error.filename}: cannot read this folder ({error.strerror or error})")


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------- where they go
def check_targets(jobs: list[FoldJob], in_place: bool) -> None:
    """Refuse, before anything is written, an output that two inputs would write, or that would
    replace an input (its own only with --in-place)."""
    read = {os.path.realpath(job.source): job.source for job in jobs}
    written: dict[str, str] = {}
    for job in jobs:
        if job.target is None:
            continue
        key = _written_path(job.target)
        if key in written and os.path.realpath(written[key]) == os.path.realpath(job.source):
            raise BnfoldError(f"{job.source}: given twice", note="give each input once")
        if key in written:
            raise BnfoldError(f"{job.target}: both {written[key]} and {job.source} would be written there",
                              note="fold models of the same name into different output folders")
        written[key] = job.source
        if key == os.path.realpath(job.source) and not in_place:
            raise BnfoldError(f"{job.target}: output is the input file", note="use --in-place to replace it")
        if key in read and key != os.path.realpath(job.source):
            raise BnfoldError(f"{job.target}: the output of {job.source} would replace input {read[key]}",
                              note="write the outputs to a folder outside the inputs")


def _written_path(target: str) -> str:
    """The file a write to `target` replaces: its folder resolved, its own name not (a rename
    replaces a link, not what it points to)."""
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(os.path.realpath(folder), name)


def make_folders(jobs: list[FoldJob]) -> list[str]:
    """Create the missing folders of the targets (subfolders of --out-dir, which exists); return
    them, parents first."""
    created = []
    for folder in sorted({os.path.dirname(job.target) for job in jobs}):
        missing = []
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            missing.append(folder)
            folder = os.path.dirname(folder)
        for path in reversed(missing):
            os.mkdir(path)
            created.append(path)
    return created


def remove_empty_folders(created: list[str]) -> None:
    """Remove the folders make_folders created that stayed empty (their models failed)."""
    for folder in reversed(created):
        try:
            os.rmdir(folder)
        except OSError:  # not empty: it holds an output
            pass


def exclusions_per_model(sources: list[str], excluded: list[str]) -> dict[str, tuple[str, ...]]:
    """Each source's share of the --exclude-node names: those it has. A name that no input has is an
    error, found from the models' skeletons (bnfold.mapped: no weights read) before anything is
    written. A file that cannot be scanned keeps every name; its fold will say what is wrong."""
    from .mapped import load_mapped
    from .passes.fold_batchnorm import batchnorm_names
    if not excluded:
        return {source: () for source in sources}
    shares, known = {}, set()
    for source in sources:
        try:
            model, mapped = load_mapped(source)
        except (OSError, ValueError, IndexError, DecodeError):
            shares[source] = tuple(excluded)
            continue
        names = batchnorm_names(model)
        mapped.close()
        known |= names
        shares[source] = tuple(name for name in excluded if name in names)
    unknown = [name for name in excluded if name not in known]
    if unknown:
        where = " in any INPUT" if len(sources) > 1 else ""
        raise BnfoldError(f"{unknown[0]}: no BatchNormalization node has that name{where}",
                          note="`bnfold inspect MODEL` lists their names", option="exclude_nodes")
    return shares


# ------------------------------------------------------------------------------------ folding them
def run_fold_job(job: FoldJob) -> FoldReport:
    return fold_file(job.source, job.target, exclude_nodes=job.exclude_nodes,
                     assume_inference=job.assume_inference, lower_standalone=job.lower_standalone,
                     reparameterize=job.reparameterize,
                     dry_run=job.dry_run, external_data=job.external_data, verify=job.verify)


def run_fold_jobs(jobs: list[FoldJob], workers: int, *, on_done: Callable[[FoldOutcome], None] | None = None,
                  raise_bugs: bool = False) -> list[FoldOutcome]:
    """Fold every job, in `workers` processes, and return the outcomes in job order (whatever order
    they finish in); `on_done` sees each as it finishes. A bug (an exception that is not a
    BnfoldError) is its model's outcome, unless `raise_bugs` (--debug, or a single model)."""
    report = on_done or (lambda outcome: None)
    if workers == 1 or len(jobs) == 1:
        outcomes = []
        for job in jobs:
            outcomes.append(_attempt(job, raise_bugs))
            report(outcomes[-1])
        return outcomes
    return _run_in_processes(jobs, min(workers, len(jobs)), report, raise_bugs)


def _run_in_processes(jobs, workers: int, report, raise_bugs: bool) -> list[FoldOutcome]:
    """On an interrupt of this process, the jobs not started are cancelled and every worker gets
    SIGTERM, which stops its fold cleanly (see _worker_signal); then the interrupt goes on."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker)
    futures = {}
    try:
        futures = {pool.submit(_attempt_in_worker, job, raise_bugs): job for job in jobs}
        outcomes = {}
        for future in as_completed(futures):
            outcomes[future] = _collect(future, futures[future])
            report(outcomes[future])
        return [outcomes[future] for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(future, job: FoldJob) -> FoldOutcome:
    try:
        return future.result()
    except BrokenProcessPool:
        return FoldOutcome(job, error=BnfoldError(
            f"{job.source}: the worker process folding it ended abruptly; nothing was written",
            note="it was killed, for example for lack of memory: try fewer --jobs", exit_code=EXIT_INTERNAL))


def _attempt(job: FoldJob, raise_bugs: bool = False) -> FoldOutcome:
    start = time.perf_counter()
    try:
        return FoldOutcome(job, run_fold_job(job), seconds=time.perf_counter() - start)
    except VerificationFailed as failed:
        return FoldOutcome(job, failed.report, failed, time.perf_counter() - start)
    except BnfoldError as error:
        return FoldOutcome(job, error=error, seconds=time.perf_counter() - start)
    except Exception as exc:  # a bug: this model's outcome, the others still run
        if raise_bugs:
            raise
        error = BnfoldError(f"{job.source}: internal error: {type(exc).__name__}: {exc}",
                            note="rerun this model with --debug for the traceback and report it",
                            exit_code=EXIT_INTERNAL)
        return FoldOutcome(job, error=error, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------- interrupts in workers
_worker = {"busy": False, "stopping": 0}  # this worker's state, for its signal handler


def _init_worker() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _worker_signal)


def _worker_signal(signum, frame) -> None:
    """Stop this worker: interrupt the fold it is running (once: a second signal must not cut short
    the cleanup of the first) and refuse the jobs it has not started."""
    first = not _worker["stopping"]
    _worker["stopping"] = _worker["stopping"] or signum
    if first and _worker["busy"]:
        raise Terminated(signum)


def _attempt_in_worker(job: FoldJob, raise_bugs: bool) -> FoldOutcome:
    """_attempt in a worker process, where an interrupt ends the job as an outcome rather than an
    exception that would cross back into the parent."""
    try:
        _worker["busy"] = True  # before the check: a signal from here on interrupts this job
        try:
            if _worker["stopping"]:
                raise Terminated(_worker["stopping"])
            return _attempt(job, raise_bugs)
        finally:
            _worker["busy"] = False
    except Terminated:
        name = signal.Signals(_worker["stopping"]).name
        return FoldOutcome(job, error=BnfoldError(f"{job.source}: interrupted by {name}; nothing was written",
                                                  exit_code=128 + _worker["stopping"]))


# --------------------------------------------------------------------------- interrupts in the CLI
@contextmanager
def interrupts_raise():
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, once: later
    signals are ignored so that they cannot cut short the cleanup the first one started. A signal
    that was ignored when the block began stays ignored (e.g. SIGINT of a background job); outside
    the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = {signum: old for signum, old in previous.items() if old not in (signal.SIG_IGN, None)}
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
