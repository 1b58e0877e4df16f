"""The README's two commands: the first runs verbatim in a fresh environment; the second is exactly
what CI runs."""

import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", head)


def test_readme_has_two_commands_near_the_top():
    commands = readme_commands()
    assert len(commands) == 2
    assert "pip install" in commands[0] and "bnfold fold" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def _copy_of_the_repo(target: Path) -> Path:
    """The checkout without its git data, build leftovers and caches: what a fresh clone holds."""
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", "__pycache__", "*.pyc", ".pytest_cache", ".venv", "venv"))
    return target


def _fresh_venv(folder: Path) -> dict[str, str]:
    """A new virtual environment with pip and nothing else; the environment variables that put its
    pip and bnfold first on PATH, as `activate` would."""
    venv.EnvBuilder(with_pip=True).create(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(VIRTUAL_ENV=str(folder), PATH=f"{folder / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.mark.slow
def test_main_command_runs_verbatim_in_a_fresh_environment(tmp_path):
    """The README's first command, in a copy of the repo and a new venv (core dependencies from the
    package index, no torch, no test extras), with that venv's pip and bnfold first on PATH."""
    command = readme_commands()[0]
    repo = _copy_of_the_repo(tmp_path / "repo")
    env = _fresh_venv(tmp_path / "venv")
    result = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    def in_venv(code: str) -> str:
        return subprocess.run(["bash", "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert Path(in_venv("command -v bnfold")).parent == Path(env["VIRTUAL_ENV"]) / "bin"
    assert Path(in_venv("python -c 'import bnfold; print(bnfold.__file__)'")).parent == repo / "bnfold"
    assert in_venv("python -c 'import importlib.util as u; print(u.find_spec(\"torch\"))'") == "None"
    for written in re.findall(r"-o (\S+)", command):
        folded = onnx.load(repo / written)
        onnx.checker.check_model(folded, full_check=True)
        assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert "folded" in result.stdout and "PASS" in result.stdout
