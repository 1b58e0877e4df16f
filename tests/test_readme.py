"""The README's two commands: the first runs here; the second is exactly what CI runs."""

import re
import subprocess
from pathlib import Path

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


def test_main_command_runs_verbatim(tmp_path):
    """Runs the README's first command in the checkout (pip install -e . is idempotent), then removes
    the files it wrote."""
    command = readme_commands()[0]
    written = [ROOT / w for w in re.findall(r"-o (\S+)", command)]
    try:
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert all(path.exists() for path in written)
        assert "folded" in result.stdout
    finally:
        for path in written:
            path.unlink(missing_ok=True)
