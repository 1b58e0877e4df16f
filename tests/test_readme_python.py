"""Every ```python block of the README runs as written, so no example can rot (a renamed function, a
changed return value). Each block runs alone, in a fresh interpreter, in a folder that holds a copy of
sample_models/ and nothing else: a block must be self-contained and read only the shipped samples."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PYTHON = ("python", "py")


def python_blocks() -> list[tuple[int, str]]:
    """(line of the opening fence, code) of each ```python block, in README order."""
    text = README.read_text()
    return [(text.count("\n", 0, match.start()) + 1, match.group(2))
            for match in FENCE.finditer(text) if match.group(1) in PYTHON]


def test_every_python_block_is_found():
    """The parser misses no block: as many blocks as ```python fences (an empty list would make the
    test below pass on nothing)."""
    fences = re.findall(r"^```(\w+)", README.read_text(), re.MULTILINE)
    blocks = python_blocks()
    assert blocks
    assert len(blocks) == sum(lang in PYTHON for lang in fences)


BLOCKS = python_blocks()


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_written(line, code, tmp_path):
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models",
                    ignore=shutil.ignore_patterns("__pycache__"))
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    failed = result.returncode != 0
    assert not failed, f"README.md line {line} fails:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
