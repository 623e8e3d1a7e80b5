"""What links an MLflow run to git, DVC and the process that made it: names and tags.

- A run made by `dvc exp run` (queued, temporary or in place) is named after the DVC experiment
  (`DVC_EXP_NAME`, set by DVC for every experiment) and tagged `dvc.exp_name` and
  `dvc.exp_baseline_rev` (the commit the experiment is based on).
- A `dvc repro` run is named `repro-<short commit>-<config hash>`; a step run by hand
  `run-<short commit>-<config hash>` (the hash: the first 8 hex digits of the SHA-256 of the
  resolved config, so equal configs give equal names).
- `git_dirty` is true only when tracked files differ from the commit, not counting the files the
  pipeline itself rewrites: `dvc.lock`, `params.yaml` (DVC's Hydra composition) and the git-tracked
  outputs of the stages in `dvc.yaml` (metrics and plots with `cache: false`).
- `pipeline.pid`, `pipeline.pid_start`, `pipeline.host`: the process running the run, so a run
  whose process died can be found and ended (`pipeline.lib.tracking.orphans`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

#: Set by DVC for every command of a `dvc exp run` (dvc.env).
DVC_EXP_NAME = "DVC_EXP_NAME"
DVC_EXP_BASELINE_REV = "DVC_EXP_BASELINE_REV"
#: Set by DVC for every stage command (`dvc repro`, `dvc exp run`).
DVC_STAGE = "DVC_STAGE"
#: Files DVC or the pipeline rewrite in a clean checkout; never make the tree "dirty".
PIPELINE_WRITTEN = ("dvc.lock", "params.yaml")

TAG_EXP_NAME = "dvc.exp_name"
TAG_BASELINE = "dvc.exp_baseline_rev"
TAG_PID = "pipeline.pid"
TAG_PID_START = "pipeline.pid_start"
TAG_HOST = "pipeline.host"


def _git(*args: str, cwd: str | os.PathLike[str] = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(cwd: str | os.PathLike[str] = ".") -> str | None:
    """The commit the code was checked out at: for a DVC experiment its baseline commit, else
    `HEAD`; None outside git."""
    baseline = os.environ.get(DVC_EXP_BASELINE_REV)
    if baseline:
        return baseline
    out = _git("rev-parse", "HEAD", cwd=cwd)
    return out.strip() or None if out is not None else None


def dvc_outputs(dvc_yaml: Path) -> list[str]:
    """The output, metric and plot paths of every stage in `dvc_yaml` ([] when unreadable)."""
    import yaml

    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in (stage or {}).get(kind, []) or []:
                paths.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(p).rstrip("/") for p in paths]


def git_dirty(cwd: str | os.PathLike[str] = ".") -> bool | None:
    """Whether tracked files differ from the commit, the files the pipeline writes itself left
    out (`PIPELINE_WRITTEN`, DVC outputs); None outside git."""
    out = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    if out is None:
        return None
    ignored = [*PIPELINE_WRITTEN, *dvc_outputs(Path(cwd) / "dvc.yaml")]
    for line in out.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if not any(path == p or path.startswith(p + "/") for p in ignored):
            return True
    return False


def config_hash(cfg: Any) -> str:
    """The first 8 hex digits of the SHA-256 of the resolved config (`tracking.run_name` left
    out, so naming a run does not change its hash)."""
    from pipeline.lib.config.schema import to_flat_dict

    flat = {k: v for k, v in to_flat_dict(cfg).items() if k != "tracking.run_name"}
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def dvc_experiment() -> str | None:
    """The name of the DVC experiment being run (`dvc exp run`), None outside one."""
    return os.environ.get(DVC_EXP_NAME) or None


def run_name(cfg: Any) -> str:
    """The name of a pipeline run's MLflow run: `tracking.run_name` when set, else the DVC
    experiment's name, else `repro-<commit>-<hash>` under DVC / `run-<commit>-<hash>`."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    experiment = dvc_experiment()
    if experiment:
        return experiment
    prefix = "repro" if os.environ.get(DVC_STAGE) else "run"
    commit = (git_commit() or "nogit")[:7]
    return f"{prefix}-{commit}-{config_hash(cfg)}"


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc; None where unknown):
    tells a live process from a new one that reuses a dead one's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def process_tags() -> dict[str, str]:
    """This process, as tags: `pipeline.pid`, `pipeline.pid_start`, `pipeline.host`."""
    tags = {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    start = process_start(os.getpid())
    if start:
        tags[TAG_PID_START] = start
    return tags


def run_tags(cfg: Any, stage: str) -> dict[str, str]:
    """Tags of a new pipeline run: git commit and dirtiness, the DVC experiment and its
    baseline, the config hash, the stage that started it and this process."""
    tags = {
        "git_commit": git_commit() or "unknown",
        "git_dirty": str(git_dirty()),
        "pipeline.config_hash": config_hash(cfg),
        "stage": stage,
        **process_tags(),
    }
    experiment = dvc_experiment()
    if experiment:
        tags[TAG_EXP_NAME] = experiment
        tags[TAG_BASELINE] = os.environ.get(DVC_EXP_BASELINE_REV, "")
    return tags
