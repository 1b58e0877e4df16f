"""`bnfold check`: a gate for CI jobs and commits that fails while `bnfold fold` would still change a model.

Each model goes through the fold pipeline without writing anything, as in `bnfold inspect`; folders,
--exclude-node and --jobs work as in `bnfold fold` (bnfold.foldcmd). A model fails when the pipeline
would fold a BatchNormalization or lower it to Mul + Add (`--lower-standalone mul-add`): `bnfold fold`
would change it. With `strict` it also fails when a BN is left for any reason other than
--exclude-node, the one way to say that leaving it is intended. A model that cannot be read is its own
error (exit 2) and the others are still checked; the exit code is the worst of all models.
"""

from __future__ import annotations

import shlex
import time
from collections import Counter
from dataclasses import dataclass

from .errors import EXIT_CHECK_FAILED, EXIT_OK
from .foldcmd import FoldJob, FoldOutcome, exclusions_per_model, find_models, models_document, run_fold_jobs
from .passes.base import Decision
from .reasons import EXCLUDED_BY_USER, LOWERED, MEANINGS
from .report import LOWER_PASS, FoldReport


COUNTS = ("foldable", "lowered", "excluded", "unfoldable", "failing")  # the JSON "check" object's BN counts


@dataclass(frozen=True)
class CheckOptions:
    """What `bnfold check` runs the pipeline with (FoldOptions' flags), and whether it is strict."""
    exclude_nodes: tuple[str, ...] = ()
    assume_inference: bool = False
    lower_standalone: str = "keep"
    reparameterize: bool = True
    strict: bool = False

    def fold_command(self, jobs: list[FoldJob]) -> list[str]:
        """The `bnfold fold` command that makes the changes this check predicts in these models (with the
        --exclude-node names they have: fold refuses a name that none of its inputs has)."""
        flags = ["--assume-inference"] if self.assume_inference else []
        flags += ["--no-reparameterize"] if not self.reparameterize else []
        flags += ["--lower-standalone", self.lower_standalone] if self.lower_standalone != "keep" else []
        for name in self.exclude_nodes:
            flags += ["--exclude-node", name] if any(name in job.exclude_nodes for job in jobs) else []
        return ["bnfold", "fold", "--in-place", "--verify", *flags, *(job.source for job in jobs)]


@dataclass(frozen=True)
class ModelCheck:
    """One model's verdict: each BatchNormalization fold would fold, lower, or leave (by --exclude-node,
    or for another reason)."""
    folds: tuple[Decision, ...]
    lowers: tuple[Decision, ...]
    excluded: tuple[Decision, ...]
    unfoldable: tuple[Decision, ...]
    strict: bool

    @classmethod
    def of(cls, report: FoldReport, strict: bool) -> ModelCheck:
        """With lowering on, the lower pass decides every BN the fold left (lowered, or why not);
        otherwise the fold pass's decisions say why each BN stays."""
        lowering = next((p.decisions for p in report.passes if p.name == LOWER_PASS and p.decisions), None)
        remaining = lowering if lowering is not None else [d for d in report.decisions if not d.folded]
        left = [d for d in remaining if d.reason != LOWERED]
        return cls(folds=tuple(d for d in report.decisions if d.folded),
                   lowers=tuple(d for d in remaining if d.reason == LOWERED),
                   excluded=tuple(d for d in left if d.reason == EXCLUDED_BY_USER),
                   unfoldable=tuple(d for d in left if d.reason != EXCLUDED_BY_USER), strict=strict)

    @property
    def failing(self) -> tuple[Decision, ...]:
        return self.folds + self.lowers + (self.unfoldable if self.strict else ())

    @property
    def passed(self) -> bool:
        return not self.failing

    def to_dict(self) -> dict:
        counts = (self.folds, self.lowers, self.excluded, self.unfoldable, self.failing)
        return {"passed": self.passed, "strict": self.strict, **dict(zip(COUNTS, map(len, counts)))}


@dataclass
class CheckRun:
    """Every model's outcome (its report, or the error that stopped it) and verdict, in input order."""
    outcomes: list[FoldOutcome]
    checks: list[ModelCheck | None]  # None where the model could not be read
    options: CheckOptions
    seconds: float
    jobs: int

    @property
    def exit_code(self) -> int:
        failed = any(check is not None and not check.passed for check in self.checks)
        return max([EXIT_CHECK_FAILED if failed else EXIT_OK] + [o.exit_code for o in self.outcomes])

    def document(self, several: bool) -> dict:
        """The JSON document: `inspect --json`'s for one model file, `fold --json`'s for several, with
        the verdict added as "check" (at the top, and per model for several)."""
        if not several:
            return {**self.outcomes[0].report.to_dict(), "check": self._verdict()}
        document = models_document(self.outcomes, self.seconds, self.jobs)
        for entry, check in zip(document["models"], self.checks):
            if check is not None:
                entry["check"] = check.to_dict()
        document["summary"]["exit_code"] = self.exit_code
        document["check"] = {**self._verdict(),
                             "models_failing": sum(c is not None and not c.passed for c in self.checks),
                             "models_unreadable": self.checks.count(None)}
        return document

    def _verdict(self) -> dict:
        """The whole run's verdict: ModelCheck.to_dict's counts summed over the models read."""
        models = [check.to_dict() for check in self.checks if check is not None]
        return {"passed": self.exit_code == EXIT_OK, "strict": self.options.strict,
                **{key: sum(m[key] for m in models) for key in COUNTS}, "exit_code": self.exit_code}


def check_models(inputs: list[str], options: CheckOptions, *, jobs: int = 1, raise_bugs: bool = False) -> CheckRun:
    """Run the pipeline over every model below `inputs`, writing nothing, and judge each report."""
    found = [source for source, _ in find_models(inputs)]
    shares = exclusions_per_model(found, list(options.exclude_nodes))
    fold_jobs = [FoldJob(source, None, shares[source], dry_run=True, assume_inference=options.assume_inference,
                         lower_standalone=options.lower_standalone, reparameterize=options.reparameterize)
                 for source in found]
    start = time.perf_counter()
    outcomes = run_fold_jobs(fold_jobs, jobs, raise_bugs=raise_bugs)
    checks = [None if o.error is not None else ModelCheck.of(o.report, options.strict) for o in outcomes]
    return CheckRun(outcomes, checks, options, time.perf_counter() - start, jobs)


# ------------------------------------------------------------------------------------------- output
def print_check(run: CheckRun, console) -> None:
    """Per model that fails: a line and a table of the BNs that make it fail; nothing for the others."""
    for outcome, check in zip(run.outcomes, run.checks):
        if check is None or check.passed:
            continue
        console.print(f"{outcome.job.source}: {len(check.failing)} of {outcome.report.total} "
                      "BatchNormalization fail the check", highlight=False, soft_wrap=True)
        console.print(failing_table(check))


def failing_table(check: ModelCheck):
    """A rich table, one row per BN that fails the check: its neighbour, and what fold would do with it
    (rule and detail) or, with --strict, why it stays."""
    from rich.table import Table
    table = Table()
    for column in ("BatchNormalization", "neighbour", "fold would", "rule", "detail"):
        table.add_column(column, overflow="fold")
    for d, action in ([(d, "fold") for d in check.folds] + [(d, "lower to Mul + Add") for d in check.lowers]
                      + [(d, f"leave: {d.reason}") for d in (check.unfoldable if check.strict else ())]):
        table.add_row(f"{d.graph}/{d.node}" if d.graph else d.node,
                      f"{d.neighbour_op} {d.neighbour}" if d.neighbour_op else "-", action, d.rule or "-",
                      d.detail or MEANINGS[d.reason])
    return table


def summary_line(run: CheckRun) -> str:
    """The last line: the verdict, what fails in how many models, and how to fix it."""
    read = [(o, c) for o, c in zip(run.outcomes, run.checks) if c is not None]
    total = len(run.outcomes)
    failures = _failures(run, read, total)
    if failures:
        return "check failed: " + "; ".join(failures)
    left = Counter(d.reason for _, c in read for d in c.excluded + c.unfoldable)
    return (f"check passed: {total} model{'s' if total > 1 else ''}, {_bns(sum(o.report.total for o, _ in read))}, "
            "none that bnfold fold would change" + (f" (left: {_listed(left)})" if left else ""))


def _failures(run: CheckRun, read: list, total: int) -> list[str]:
    """What fails, each with its fix: BNs fold would change, BNs --strict refuses, unreadable models."""
    def within(models: int) -> str:  # one model is named by the table above and by the fix
        return f" in {models} of {total} models" if total > 1 else ""
    failures = []
    changed = [(o, c) for o, c in read if c.folds or c.lowers]
    if changed:
        fix = shlex.join(run.options.fold_command([o.job for o, _ in changed]))
        failures.append(f"{_would_change(changed)}{within(len(changed))}: run {fix}")
    stuck = [c for _, c in read if c.unfoldable] if run.options.strict else []
    if stuck:
        reasons = Counter(d.reason for c in stuck for d in c.unfoldable)
        failures.append(f"{_bns(sum(reasons.values()))}{within(len(stuck))} cannot be folded ({_listed(reasons)}): "
                        "accept each with --exclude-node NAME, or change the model")
    unreadable = run.checks.count(None)
    if unreadable:
        failures.append(f"{unreadable} of {total} models could not be read (see the errors above)" if total > 1
                        else "the model could not be read (see the error above)")
    return failures


def _would_change(changed) -> str:
    folds, lowers = (sum(len(getattr(c, kind)) for _, c in changed) for kind in ("folds", "lowers"))
    if not lowers:
        return f"{_bns(folds)} can be folded"
    if not folds:
        return f"{_bns(lowers)} can be lowered to Mul + Add"
    return f"{_bns(folds)} can be folded and {lowers} lowered to Mul + Add"


def _bns(count: int) -> str:
    return f"{count} BatchNormalization"


def _listed(counts: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
