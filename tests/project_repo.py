"""A copy of the project in a real temporary git + DVC repository, and the commands run in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PROJECT_FILES = ["conf", "pipeline", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore",
                 "pyproject.toml"]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cmd` with this interpreter's folder first on PATH (DVC stages call `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def git(repo: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
               repo).stdout


def dvc(repo: Path, *args: str, timeout: int = 900) -> str:
    proc = run([sys.executable, "-m", "dvc", *args], repo, timeout=timeout)
    return proc.stdout + proc.stderr


def compose_params(repo: Path, *overrides: str) -> None:
    run([sys.executable, "-m", "pipeline.params", *overrides], repo)


def copy_project(repo: Path, *overrides: str) -> Path:
    """The project's files in `repo` (not yet a git repository), params.yaml composed with
    `overrides`."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (repo / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    compose_params(repo, *overrides)
    return repo


def git_project(repo: Path, *overrides: str) -> Path:
    """`copy_project` in `repo`, made a git repository with everything committed (one commit on
    `main`): what a user's clone looks like before `dvc repro`."""
    copy_project(repo, *overrides)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    return repo


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` actually ran, in order, read from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]
