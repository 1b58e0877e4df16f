"""The public Python API documents and types itself, and stays that way when it changes: each public
function's docstring has Args, Returns and Raises sections and describes exactly the parameters of its
signature; each parameter and return is annotated; each exported dataclass names its fields; and the
package ships the py.typed marker that tells type checkers to trust those annotations."""

import builtins
import dataclasses
import importlib.resources
import inspect
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bnfold

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_FUNCTIONS = ("fold_model", "fold_file", "fold_graph", "verify_models", "verify_against_reference",
                    "bench_models", "export_model")
PUBLIC_DATACLASSES = ("FoldReport", "Decision", "VerifyOptions", "VerifyReport", "BenchOptions", "BenchReport",
                      "Tolerance")
SECTIONS = ("Args", "Returns", "Raises")


def sections(doc: str) -> dict[str, str]:
    """Google-style sections of a cleaned docstring: header ("Args") -> its indented body."""
    found: dict[str, str] = {}
    header = None
    for line in doc.splitlines():
        match = re.fullmatch(r"(\w+):", line)
        if match:
            header = match.group(1)
            found[header] = ""
        elif header is not None and (line.startswith(" ") or not line):
            found[header] += line + "\n"
        else:
            header = None
    return found


def entries(body: str) -> list[str]:
    """The names a section describes: its lines `    name: ...` (continuations are indented deeper)."""
    return re.findall(r"^ {4}(\w+)(?: \([^)]*\))?:", body, re.MULTILINE)


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_docstring_has_every_section_and_describes_every_parameter(name):
    function = getattr(bnfold, name)
    doc = inspect.getdoc(function)
    assert doc, f"bnfold.{name} has no docstring"
    summary, _, rest = doc.partition("\n")
    assert summary.strip() and rest.startswith("\n"), f"bnfold.{name}: a one-line summary, then a blank line"
    found = sections(doc)
    assert [s for s in SECTIONS if s not in found] == [], f"bnfold.{name} lacks sections"
    assert entries(found["Args"]) == list(inspect.signature(function).parameters), \
        f"bnfold.{name}: Args must describe each parameter, in the signature's order, and nothing else"
    assert found["Returns"].strip(), f"bnfold.{name}: Returns is empty"
    raised = entries(found["Raises"])
    assert raised, f"bnfold.{name}: Raises names no exception"
    for exception in raised:
        cls = getattr(bnfold, exception, None) or getattr(builtins, exception, None)
        assert isinstance(cls, type) and issubclass(cls, BaseException), \
            f"bnfold.{name}: Raises names {exception}, which is not an exception bnfold exports"


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_signature_is_fully_annotated(name):
    """py.typed promises types: an unannotated parameter would be Any to a type checker."""
    signature = inspect.signature(getattr(bnfold, name))
    missing = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert missing == [], f"bnfold.{name}: parameters without a type annotation"
    assert signature.return_annotation is not inspect.Signature.empty, f"bnfold.{name}: no return annotation"


@pytest.mark.parametrize("name", PUBLIC_DATACLASSES)
def test_dataclass_docstring_names_every_field(name):
    cls = getattr(bnfold, name)
    doc = inspect.getdoc(cls) or ""
    missing = [f.name for f in dataclasses.fields(cls) if not re.search(rf"\b{f.name}\b", doc)]
    assert missing == [], f"bnfold.{name}: fields its docstring does not describe"


def test_package_has_the_py_typed_marker():
    assert importlib.resources.files("bnfold").joinpath("py.typed").is_file()


def test_wheel_ships_the_py_typed_marker(tmp_path):
    """What pip installs, not the checkout: a wheel built from the package's sources holds the marker
    (pyproject's package-data). Built with the installed setuptools, from a copy, so the checkout gets
    no build folder."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    shutil.copytree(ROOT / "bnfold", source / "bnfold", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path / "dist"
    build = (f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))")
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    wheel = out / result.stdout.strip().splitlines()[-1]
    assert "bnfold/py.typed" in zipfile.ZipFile(wheel).namelist()
