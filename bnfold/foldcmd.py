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


def run_fold_job(job: FoldJob) -> FoldReport:
    return fold_file(job.source, job.target, exclude_nodes=job.exclude_nodes, dry_run=job.dry_run,
                     external_data=job.external_data)


def run_fold_jobs(jobs: list[FoldJob], workers: int) -> list[FoldReport]:
    """Fold every job; the first failure is raised after the others finished (each write is atomic)."""
    if workers < 1:
        raise BnfoldError(f"--jobs must be at least 1, not {workers}")
    if workers == 1 or len(jobs) == 1:
        outcomes = [_attempt(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(run_fold_job, job) for job in jobs]
            outcomes = [f.exception() or f.result() for f in futures]
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def _attempt(job: FoldJob) -> FoldReport | BaseException:
    try:
        return run_fold_job(job)
    except BnfoldError as error:
        return error
