"""The pre-commit hooks of .pre-commit-hooks.yaml: bnfold-check refuses a model with a BatchNormalization
bnfold can fold, bnfold-fold folds it in place (verified) and leaves a model with nothing to fold
untouched, byte for byte and with its mtime. The slow case runs both through the real pre-commit
(`pre-commit try-repo`), which installs bnfold into its own environment from the package index."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from bnfold.cli import build_parser, main
from bnfold.fold import fold_file
from bnfold.verify import verify_models
from tests.builders import conv_bn
from tests.test_readme import _copy_of_the_repo

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_models" / "preact_block.onnx"  # 3 BNs: 2 fold, 1 stays (padding-prevents-fold)


def hooks() -> dict[str, dict]:
    return {hook["id"]: hook for hook in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}


def entry(hook_id: str) -> list[str]:
    """The hook's command after `bnfold`, as pre-commit runs it (the file names follow)."""
    command = shlex.split(hooks()[hook_id]["entry"])
    assert command[0] == "bnfold"
    return command[1:]


def state(path: Path) -> tuple[bytes, int, int]:
    """What a rewrite changes even when the bytes are the same: inode and mtime."""
    found = path.stat()
    return path.read_bytes(), found.st_ino, found.st_mtime_ns


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    """(unfolded, folded): a sample model and its fold."""
    unfolded, folded = tmp_path / "unfolded.onnx", tmp_path / "folded.onnx"
    shutil.copyfile(SAMPLE, unfolded)
    fold_file(unfolded, folded)
    return unfolded, folded


def test_the_hooks_run_bnfold_on_onnx_files_only():
    found = hooks()
    assert set(found) == {"bnfold-check", "bnfold-fold"}
    for hook in found.values():
        assert hook["language"] == "python" and hook["description"]
        assert re.search(hook["files"], "models/m.onnx") and not re.search(hook["files"], "m.onnx.data")
        build_parser().parse_args([*entry(hook["id"]), "m.onnx"])  # a usage error would exit
    assert entry("bnfold-check") == ["check"]
    assert entry("bnfold-fold") == ["fold", "--in-place", "--verify"]


def test_the_fold_hook_folds_a_model_and_leaves_a_folded_one_untouched(pair, capsys):
    unfolded, folded = pair
    before_unfolded, before_folded = state(unfolded), state(folded)
    assert main([*entry("bnfold-fold"), str(unfolded), str(folded)]) == 0
    assert state(folded) == before_folded
    assert state(unfolded)[0] != before_unfolded[0]
    notes = [line for line in capsys.readouterr().err.splitlines() if "left as it was" in line]
    assert notes == [f"bnfold: note: {folded}: nothing to change; the file was left as it was"]
    assert main([*entry("bnfold-check"), str(unfolded), str(folded)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("check passed: 2 models")


# ----------------------------------------------------------- fold --in-place of an unchanged model
def test_external_data_asked_for_still_rewrites_an_unchanged_model(tmp_path, rng):
    """--external-data asks for another layout: the model is written even though nothing folds."""
    path = tmp_path / "m.onnx"
    fold_file(_saved(conv_bn(rng, channels_in=16, channels_out=32), tmp_path / "unfolded.onnx"), path)
    assert main(["fold", str(path), "--in-place"]) == 0 and not (tmp_path / "m.onnx.data").exists()
    assert main(["fold", str(path), "--in-place", "--external-data"]) == 0
    assert (tmp_path / "m.onnx.data").stat().st_size > 0


def test_an_output_link_to_the_input_is_replaced_even_when_nothing_changes(pair):
    """A link at the output is replaced, never written through (README, File safety): only the input's
    own path counts as writing in place."""
    _, folded = pair
    link = folded.with_name("link.onnx")
    link.symlink_to(folded.name)
    before = state(folded)
    assert main(["fold", str(folded), "-o", str(link)]) == 0
    assert not link.is_symlink() and link.read_bytes() == before[0]
    assert state(folded) == before


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------------ through pre-commit itself
def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=bnfold tests", "-c", "user.email=tests@bnfold.invalid",
                           "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _config(repo: Path, rev: str) -> str:
    """The README's .pre-commit-config.yaml, with this checkout's copy as the repository, and the fold
    hook beside the check hook (the README's comment offers either)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## CI gate and pre-commit", 1)[1].split("\n## ", 1)[0]
    config = yaml.safe_load(re.search(r"```yaml\n(.+?)\n```", section, re.S).group(1))
    (entry,) = config["repos"]
    assert entry["hooks"] == [{"id": "bnfold-check"}]
    entry.update(repo=str(repo), rev=rev, hooks=[{"id": "bnfold-check"}, {"id": "bnfold-fold"}])
    return yaml.safe_dump(config)


def test_the_readme_configuration_names_the_hooks_this_repository_defines():
    hooks = {hook["id"] for hook in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert "bnfold-check" in hooks and "bnfold-fold" in hooks
    assert "repos:" in _config(ROOT, "HEAD")


@pytest.mark.slow
def test_pre_commit_runs_the_hooks(tmp_path):
    """A committed copy of this checkout as the hooks' repository, and another repository with a model
    to fold and a folded one staged. pre-commit installs bnfold into its own environment (from the
    package index; once: `pre-commit try-repo` would install it again for every run) and runs each hook
    on given files."""
    hooks_repo = _copy_of_the_repo(tmp_path / "bnfold")
    _git("init", "-q", cwd=hooks_repo)
    _git("add", "-A", cwd=hooks_repo)
    _git("commit", "-q", "-m", "bnfold", cwd=hooks_repo)
    work = tmp_path / "work"
    work.mkdir()
    _git("init", "-q", cwd=work)
    (work / ".pre-commit-config.yaml").write_text(_config(hooks_repo, _git("rev-parse", "HEAD", cwd=hooks_repo)))
    shutil.copyfile(SAMPLE, work / "unfolded.onnx")
    fold_file(work / "unfolded.onnx", work / "folded.onnx")
    _git("add", ".pre-commit-config.yaml", "unfolded.onnx", "folded.onnx", cwd=work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PRE_COMMIT_HOME=str(tmp_path / "pre-commit-home"), PRE_COMMIT_COLOR="never")

    def hook(hook_id: str, *files: str) -> int:
        result = subprocess.run([sys.executable, "-m", "pre_commit", "run", hook_id, "--verbose", "--files", *files],
                                cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        print(result.stdout[-4000:], result.stderr[-4000:])
        return result.returncode

    original = onnx.load(work / "unfolded.onnx")
    before = state(work / "folded.onnx")
    assert hook("bnfold-check", "unfolded.onnx") == 1
    assert hook("bnfold-check", "folded.onnx") == 0
    assert hook("bnfold-fold", "folded.onnx") == 0
    assert state(work / "folded.onnx") == before
    assert hook("bnfold-fold", "unfolded.onnx", "folded.onnx") == 1  # it modified a file: pre-commit fails
    assert state(work / "folded.onnx") == before
    assert hook("bnfold-check", "unfolded.onnx", "folded.onnx") == 0
    assert verify_models(original, onnx.load(work / "unfolded.onnx"))
