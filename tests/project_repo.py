"""A copy of the project in a real temporary git + DVC repository, and the commands run in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PROJECT_FILES = [
    "conf",
    "pipeline",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
]


def attempt(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cmd` with this interpreter's folder first on PATH (DVC stages call `python`); the
    finished process, whatever its exit status."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`attempt(cmd)`, which must succeed (else an AssertionError with its output)."""
    proc = attempt(cmd, cwd, timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def git(repo: Path, *args: str) -> str:
    return run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo
    ).stdout


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


def reproduced_smoke_project(base: Path) -> tuple[Path, str]:
    """`git_project(experiment=smoke)` in `base` after its first `dvc repro`, and that repro's
    output: what every test of a reproduced project starts from (see `copy_reproduced`)."""
    repo = git_project(base, "experiment=smoke")
    return repo, dvc(repo, "repro")


def smoke_experiment_history(template: Path, repo: Path) -> dict[str, str]:
    """`template` (the reproduced smoke project) copied to `repo` and committed; then `dvc exp
    run` with another penalty and label smoothing, committed: {"first", "second", "output"}."""
    copy_reproduced(template, repo)
    git(repo, "add", "-A")  # dvc.lock and the git-tracked reports; DVC-cached outputs are ignored
    git(repo, "commit", "-qm", "smoke run")
    first = git(repo, "rev-parse", "HEAD").strip()
    output = dvc(
        repo,
        "exp",
        "run",
        "-S",
        "experiment=smoke",
        "-S",
        "train.C=0.01",
        "-S",
        "train.label_smoothing=0.1",
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stronger penalty, label smoothing")
    second = git(repo, "rev-parse", "HEAD").strip()
    return {"first": first, "second": second, "output": output}


def copy_reproduced(template: Path, dest: Path) -> Path:
    """A copy of the reproduced project `template` at `dest`: git history, DVC cache and outputs
    (file times kept), the MLflow store with its absolute paths moved to `dest`. DVC's own
    temporary state is left behind, so DVC re-hashes the copied outputs against dvc.lock."""
    shutil.copytree(
        template,
        dest,
        symlinks=True,
        ignore=lambda folder, names: names if Path(folder) == template / ".dvc" / "tmp" else [],
    )
    relocate_mlflow_store(dest, template)
    return dest


def relocate_mlflow_store(repo: Path, old: Path) -> None:
    """Rewrite the absolute paths MLflow recorded while the project lived at `old` (artifact
    locations of experiments, runs and logged models, model-version sources, dataset sources) to
    `repo`: in every text column of mlflow.db and in the logged models' MLmodel files."""
    import sqlite3
    from contextlib import closing

    before, after = f"{old}/", f"{repo}/"
    db = repo / "mlflow.db"
    if db.is_file():
        with closing(sqlite3.connect(db)) as con:
            tables = [
                name
                for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            for table in tables:
                for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if "CHAR" in kind.upper() or "TEXT" in kind.upper():
                        con.execute(
                            f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '  # noqa: S608
                            f'WHERE instr("{column}", ?) > 0',  # names from the schema
                            (before, after, before),
                        )
            con.commit()
    for mlmodel in (repo / "mlartifacts").rglob("MLmodel"):
        text = mlmodel.read_text()
        if before in text:
            mlmodel.write_text(text.replace(before, after))
