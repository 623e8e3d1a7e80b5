"""Which MLflow run a stage belongs to, and what links it to git, DVC and its process (a RUNNING
run of this host whose process is gone is ended KILLED)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.lib.config.schema import Config, to_flat_dict
from pipeline.lib.files import process_alive
from pipeline.lib.model.classifier import model_md5
from pipeline.lib.model.saving import trained_run_id
from pipeline.lib.tracking.store import TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

# set by DVC: for every command of a `dvc exp run`; for every stage command
DVC_EXP_NAME, DVC_EXP_BASELINE_REV, DVC_STAGE = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"

TAG_EXP_NAME = "dvc.exp_name"
TAG_PARENT = "mlflow.parentRunId"
TAG_PID = "pipeline.pid"
TAG_PID_START = "pipeline.pid_start"
TAG_HOST = "pipeline.host"
TAG_MODEL_MD5 = "pipeline.model_md5"
TAG_CHECKPOINT = "pipeline.checkpoint"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """A DVC experiment's baseline commit, else `HEAD`; None outside git."""
    return os.environ.get(DVC_EXP_BASELINE_REV) or (_git("rev-parse", "HEAD") or "").strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files other than the stages' outputs and what DVC or the pipeline rewrite
    in a clean checkout (dvc.lock, params.yaml) differ from the commit; None outside git."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    if out is None:
        return None
    try:  # the stages' outputs, metrics and plots; libyaml's safe loader: 2 ms, not 20
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        document = yaml.load(Path("dvc.yaml").read_text(), loader)  # noqa: S506 (a safe one)
        stages = (document or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        stages = {}
    ignored = ["dvc.lock", "params.yaml"] + [
        str(path).rstrip("/")
        for stage in stages.values()
        for kind in ("outs", "metrics", "plots")
        for entry in (stage or {}).get(kind) or []
        for path in (entry.keys() if isinstance(entry, dict) else [entry])
    ]
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in out.splitlines()]
    return any(not any(p == i or p.startswith(i + "/") for i in ignored) for p in paths)


def config_hash(cfg: Config) -> str:
    """8 hex digits of the SHA-256 of the resolved config, `tracking.run_name` left out."""
    flat = {k: v for k, v in to_flat_dict(cfg).items() if k != "tracking.run_name"}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(cfg: Config) -> str:
    """`tracking.run_name`, else the DVC experiment's name, else `repro-`/`run-<commit>-<hash>`."""
    if name := cfg.tracking.run_name or os.environ.get(DVC_EXP_NAME):
        return str(name)
    prefix = "repro" if os.environ.get(DVC_STAGE) else "run"
    return f"{prefix}-{(git_commit() or 'nogit')[:7]}-{config_hash(cfg)}"


def process_start(pid: int) -> str | None:
    """When process `pid` started (ticks since boot, /proc; None where unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def process_tags() -> dict[str, str]:
    """This process, as tags: `pipeline.pid`, `pipeline.pid_start`, `pipeline.host`."""
    start = process_start(os.getpid())
    tags = {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    return tags | ({TAG_PID_START: start} if start else {})


def run_tags(cfg: Config, stage: str) -> dict[str, str]:
    """Tags of a new run: git commit and dirtiness, DVC experiment, config hash, stage, process."""
    commit, dirty = git_commit(), git_dirty()  # per job: conf/ may be edited mid-sweep
    tags = {
        "git_commit": commit or "unknown",
        "git_dirty": str(dirty),
        "pipeline.config_hash": config_hash(cfg),
        "stage": stage,
        **process_tags(),
    }
    if experiment := os.environ.get(DVC_EXP_NAME):
        baseline = os.environ.get(DVC_EXP_BASELINE_REV, "")
        tags |= {TAG_EXP_NAME: experiment, "dvc.exp_baseline_rev": baseline}
    return tags


def _still_running(pid: int, started: str | None) -> bool:
    if pid <= 0 or not process_alive(pid):
        return False
    now = process_start(pid) if started is not None else None
    return now is None or now == started


def end_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """End KILLED (tagged why) the RUNNING runs of this host whose process is gone; their ids."""
    host = socket.gethostname()
    quoted = host.replace("'", "")
    where = f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{quoted}'"
    ended = []
    for run in client.search_runs(experiment_ids, filter_string=where, max_results=1000):
        pid = run.data.tags.get(TAG_PID, "")
        if not pid.isdigit() or _still_running(int(pid), run.data.tags.get(TAG_PID_START)):
            continue
        client.set_tag(run.info.run_id, "pipeline.ended_by", f"its process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s left RUNNING by process %s: ended KILLED", run.info.run_id, pid)
        ended.append(run.info.run_id)
    return ended


def _newest_tagged(
    client: MlflowClient, experiment_id: str, tag: str, value: str, limit: int
) -> list[Run]:
    where, newest = f"tags.`{tag}` = '{value}'", ["attributes.start_time DESC"]
    return client.search_runs([experiment_id], where, order_by=newest, max_results=limit)


def interrupted_run(
    client: MlflowClient, experiment_id: str, cfg: Config, checkpoint: Path
) -> str | None:
    """With `train.resume`: the newest KILLED or FAILED run tagged with this checkpoint folder."""
    if not (cfg.train.resume and checkpoint.exists()):
        return None
    runs = _newest_tagged(client, experiment_id, TAG_CHECKPOINT, checkpoint.name, 50)
    run_id = next((r.info.run_id for r in runs if r.info.status in ("KILLED", "FAILED")), None)
    if run_id:
        log.info("train.resume=true: continuing MLflow run %s", run_id)
    return run_id


@dataclass(frozen=True)
class Recovery:
    """Why a later stage starts the run itself; the run that trained the model, if known."""

    reason: str
    model_run_id: str | None
    #: A DVC experiment that did not rerun train: its model is the baseline's, as expected.
    reused: bool = False

    def tags(self, cfg: Config) -> dict[str, str]:
        """`recovered`, why, the model's md5 and its run."""
        tags = {"recovered": "true", "pipeline.recovered_reason": self.reason[:5000]}
        if md5 := model_md5(cfg.paths.models):
            tags[TAG_MODEL_MD5] = md5
        if self.model_run_id:
            tags["pipeline.model_run_id"] = self.model_run_id
        return tags


def later_stage_run(
    client: MlflowClient, experiment_id: str, cfg: Config
) -> tuple[str, None] | tuple[None, Recovery]:
    """(run id to reopen, None) or (None, why a recovered run is started) for evaluate/export:
    the run `paths.run_file` names, else the newest run tagged with the model's md5 (in a DVC
    experiment: of that experiment). TrackingError when the recorded run is deleted."""
    from mlflow.exceptions import MlflowException  # lazily: see `pipeline.lib.tracking.store`

    recorded, exp_name = trained_run_id(cfg), os.environ.get(DVC_EXP_NAME) or None
    try:
        run = client.get_run(recorded) if recorded else None
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is not None and run.info.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.uri={cfg.tracking.uri}: run {recorded} that trained {cfg.paths.models} "
            f"is deleted: restore it (`mlflow runs restore --run-id {recorded}`) or remove it "
            "for good (`mlflow gc`) to have a new run recorded, then rerun"
        )
    found = [run] if run is not None and run.info.experiment_id == experiment_id else []
    if md5 := model_md5(cfg.paths.models):
        found += _newest_tagged(client, experiment_id, TAG_MODEL_MD5, md5, 100)
    for candidate in found:
        same_experiment = exp_name is None or candidate.data.tags.get(TAG_EXP_NAME) == exp_name
        if candidate.info.lifecycle_stage == "active" and same_experiment:
            return candidate.info.run_id, None
    trained_by = found[-1].info.run_id if found else (recorded if run is not None else None)
    models, store = cfg.paths.models, f"tracking.uri={cfg.tracking.uri}"
    if exp_name and trained_by:
        reason = f"DVC experiment {exp_name!r} did not rerun train: {models} is run {trained_by}'s"
        return None, Recovery(reason, trained_by, reused=True)
    if recorded:
        return None, Recovery(f"run {recorded} that trained {models} is not in {store}", trained_by)
    return None, Recovery(f"no run in {store} is known to have trained {models}", trained_by)
