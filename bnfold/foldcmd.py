"""Folding several files for the CLI, optionally in parallel processes."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .errors import BnfoldError
from .fold import fold_file
from .report import FoldReport


@dataclass(frozen=True)
class FoldJob:
    source: str
    target: str | None
    exclude_nodes: tuple[str, ...] = ()
    dry_run: bool = False
    external_data: bool = False
    verify: object | None = None  # bnfold.verify.VerifyOptions


def run_fold_job(job: FoldJob) -> FoldReport:
    return fold_file(job.source, job.target, exclude_nodes=job.exclude_nodes, dry_run=job.dry_run,
                     external_data=job.external_data, verify=job.verify)


def run_fold_jobs(jobs: list[FoldJob], workers: int) -> list[FoldReport | BnfoldError]:
    """Fold every job, in `workers` processes; a job's BnfoldError is returned in its place, so one
    bad file does not stop the others (each write is atomic)."""
    if workers < 1:
        raise BnfoldError(f"must be at least 1, not {workers}", option="jobs")
    if workers == 1 or len(jobs) == 1:
        return [_attempt(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(_attempt, jobs))


def _attempt(job: FoldJob) -> FoldReport | BnfoldError:
    try:
        return run_fold_job(job)
    except BnfoldError as error:
        return error
