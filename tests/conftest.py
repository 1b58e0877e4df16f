import functools
import json
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------ report schema check
# Every JSON document bnfold builds in this process while the tests run is validated, as json.dumps
# writes it, against bnfold/report.schema.json; one that does not match fails the test that built it
# (docs/report.md, "Validating"). A document built inside another (a verification inside a fold
# report, the model entries of a run over several, the report `bnfold check` adds its verdict to) is
# checked as part of the outer one.
class SchemaCheck:
    """Wraps the functions that build bnfold's JSON documents and validates what they return."""

    CHECK = "check"  # CheckRun.document's kind: a fold_report or a models_document, with a "check" verdict

    def __init__(self):
        self.counts: Counter = Counter()  # documents validated, by kind
        self.failures: list[str] = []
        self._nesting = threading.local()
        self._wrapped: list[tuple[object, str, object]] = []

    def builders(self):
        from bnfold import bench, checkcmd, foldcmd, report, verify
        return ((report.FoldReport, "to_dict", "fold_report"), (foldcmd, "models_document", "models_document"),
                (verify.VerifyReport, "to_dict", "verify_report"), (bench.BenchReport, "to_dict", "bench_report"),
                (checkcmd.CheckRun, "document", self.CHECK))

    def install(self) -> None:
        for owner, name, kind in self.builders():
            original = getattr(owner, name)
            self._wrapped.append((owner, name, original))
            setattr(owner, name, self._checked(original, kind))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._wrapped):
            setattr(owner, name, original)
        self._wrapped.clear()

    def _checked(self, build, kind: str):
        @functools.wraps(build)
        def checked(*args, **kwargs):
            depth = getattr(self._nesting, "depth", 0)
            self._nesting.depth = depth + 1
            try:
                document = build(*args, **kwargs)
            finally:
                self._nesting.depth = depth
            if depth == 0:
                self.check(document, kind)
            return document
        return checked

    def check(self, document: dict, kind: str) -> None:
        from bnfold.errors import BnfoldError
        from bnfold.schema import validate
        self.counts[kind] += 1
        try:
            written = json.loads(json.dumps(document, allow_nan=False))
        except (TypeError, ValueError) as error:  # not JSON, or NaN/Infinity, which JSON does not have
            self.failures.append(f"{kind}: cannot be written as JSON: {error}")
            return
        try:
            validate(written, self._schema_kind(written, kind))
        except BnfoldError as error:
            self.failures.append(str(error))

    def _schema_kind(self, document: dict, kind: str) -> str:
        """The schema definition a document of `kind` must meet. The schema cannot tell a check document
        from the report it extends, where "check" is optional: here it is required."""
        from bnfold.errors import BnfoldError
        if kind != self.CHECK:
            return kind
        if "check" not in document:
            raise BnfoldError('bnfold check\'s document has no "check" verdict')
        return "models_document" if "models" in document else "fold_report"

    def take_failures(self) -> list[str]:
        failures, self.failures = self.failures, []
        return failures

    def fail_on_failures(self, phase: str) -> None:
        failures = self.take_failures()
        if failures:
            pytest.fail(f"{len(failures)} JSON document(s) built during {phase} do not match "
                        f"bnfold/report.schema.json: " + " | ".join(failures), pytrace=False)


schema_check = SchemaCheck()


def pytest_configure(config):
    schema_check.install()


def pytest_unconfigure(config):
    schema_check.uninstall()


@pytest.hookimpl(trylast=True)
def pytest_runtest_call(item):
    schema_check.fail_on_failures("the test")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    schema_check.fail_on_failures("its setup or teardown, or a test that failed anyway")


def pytest_terminal_summary(terminalreporter):
    counts = schema_check.counts
    kinds = ", ".join(f"{kind} {counts[kind]}" for _, _, kind in schema_check.builders())
    terminalreporter.write_line(f"report schema: {sum(counts.values())} JSON documents validated ({kinds})")


@pytest.fixture
def report_schema_check():
    """The session's SchemaCheck, for tests of the check itself."""
    return schema_check
