"""Hydra multirun sweeps as MLflow parent/child runs.

A Hydra callback (wired in `conf/config.yaml`) opens one parent run before the sweep's jobs start
(which also creates the SQLite store and the experiment once, so parallel jobs never race to
create them) and records its id in the sweep folder; each job's run is tagged as its child
(`pipeline.lib.tracking.runs.stage_run`). When the sweep ends the callback finds the best child by
a metric, prints it and tags it on the parent. A sweep that stops early (a job failed, the
tracking server went away) ends its parent run FAILED at exit instead of leaving it RUNNING.

Jobs may run in parallel (`hydra/launcher=joblib hydra.launcher.n_jobs=4`) and report to a shared
tracking server (`tracking=server tracking.uri=http://host:5000`): the parent run's id travels to
the jobs through the sweep folder, so they need the same file system, not the same process.

    python -m pipeline.train -m train.C=0.1,1,10 train.label_smoothing=0,0.1
    python -m pipeline.train hparams_search=optuna
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.lib.config.schema import (
    AUTO,
    DEFAULT_EXPERIMENT,
    DEFAULT_REGISTERED_MODEL,
    TrackingConfig,
    tracking_names,
)
from pipeline.lib.tracking.lineage import TAG_PARENT, end_dead_runs, process_tags
from pipeline.lib.tracking.store import TrackingError, first_line, open_client, open_store

PARENT_FILE = "mlflow_parent.json"

log = logging.getLogger(__name__)


def read_parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run id recorded in `sweep_dir`, None when there is none."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def sweep_job() -> tuple[str | None, str | None]:
    """In a Hydra multirun: the sweep's parent run id and a run name made of the job's
    overrides (`job N: key=value ...`); (None, None) otherwise."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, None
    hydra_cfg = HydraConfig.get()
    name = f"job {hydra_cfg.job.num}: " + " ".join(hydra_cfg.overrides.task)
    return read_parent_run_id(hydra_cfg.sweep.dir), name[:250]


def tracking_config(config: DictConfig) -> TrackingConfig:
    """The sweep's `tracking` node with the schema's defaults for the keys it leaves out, its
    `auto` names resolved from the sweep's `data` (`schema.tracking_names`)."""
    tracking = OmegaConf.merge(OmegaConf.structured(TrackingConfig), config.tracking)
    experiment, registered = tracking_names(config.data) if "data" in config else (None, None)
    if tracking.experiment == AUTO:
        tracking.experiment = experiment or DEFAULT_EXPERIMENT
    if tracking.registered_model == AUTO:
        tracking.registered_model = registered or DEFAULT_REGISTERED_MODEL
    return tracking  # type: ignore[return-value]  (a structured DictConfig of TrackingConfig)


class MlflowSweepCallback(Callback):
    """Parent run per sweep; best child reported at the end."""

    def __init__(self, metric: str = "final_val_accuracy", maximize: bool = True) -> None:
        self.metric = metric
        self.maximize = maximize
        self._open_parent: tuple[str, str] | None = None  # (run id, tracking URI)

    def _close_if_open(self) -> None:
        """At exit: a parent run the sweep did not close (it stopped on an error) ends FAILED."""
        if self._open_parent is None:
            return
        (parent_id, uri), self._open_parent = self._open_parent, None
        try:
            open_client(uri).set_terminated(parent_id, "FAILED")
            log.info("Sweep parent MLflow run %s ended FAILED (the sweep stopped early)", parent_id)
        except Exception as exc:  # noqa: BLE001  (the store may be what stopped the sweep)
            log.warning(
                "Could not end the sweep parent MLflow run %s: %s", parent_id, first_line(exc)
            )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the store (creating it once for all jobs), start the parent run and record it in
        the sweep folder. A folder whose recorded parent has ended (a sweep run again into it) is
        taken over; one whose parent is still RUNNING belongs to a live sweep: an error."""
        tracking = tracking_config(config)
        client, experiment_id = open_store(tracking)
        end_dead_runs(client, [experiment_id])
        sweep_dir = Path(config.hydra.sweep.dir)
        if previous := read_parent_run_id(sweep_dir):
            try:
                status = client.get_run(previous).info.status
            except Exception:  # noqa: BLE001  (a run deleted or in another store)
                status = "UNKNOWN"
            if status == "RUNNING":
                raise TrackingError(
                    f"hydra.sweep.dir={sweep_dir} belongs to a sweep that is still running (parent "
                    f"run {previous}): give each sweep its own folder (the default has microseconds)"
                )
            (sweep_dir / PARENT_FILE).unlink()
        overrides = " ".join(OmegaConf.select(config, "hydra.overrides.task") or [])
        tags = {"sweep": "parent", "sweep_dir": str(sweep_dir.resolve())}
        tags |= {"sweep_overrides": overrides[:5000], "sweep_metric": self.metric}
        run = client.create_run(
            experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags | process_tags()
        )
        self._open_parent = (run.info.run_id, tracking.uri)
        atexit.register(self._close_if_open)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            with (sweep_dir / PARENT_FILE).open("x") as fh:  # exclusive: one sweep per folder
                json.dump({"run_id": run.info.run_id, "experiment_id": experiment_id}, fh)
        except FileExistsError:
            raise TrackingError(
                f"hydra.sweep.dir={sweep_dir} was taken by another sweep started at the same "
                "time: give each sweep its own folder"
            ) from None
        log.info(
            "Sweep parent MLflow run %s (experiment %s, %s)",
            run.info.run_id,
            tracking.experiment,
            tracking.uri,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Tag the best finished child (by `metric`) on the parent run and end it (FAILED when a
        child did not finish or none has the metric)."""
        parent_id = read_parent_run_id(config.hydra.sweep.dir)
        if parent_id is None or self._open_parent is None or self._open_parent[0] != parent_id:
            return  # not this sweep's parent
        client, experiment_id = open_store(tracking_config(config))
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'"
        )
        client.set_tag(parent_id, "children", str(len(children)))
        scored = [
            r for r in children if r.info.status == "FINISHED" and self.metric in r.data.metrics
        ]
        sign = 1 if self.maximize else -1
        best = max(scored, key=lambda r: sign * r.data.metrics[self.metric], default=None)
        if best is not None:
            value = best.data.metrics[self.metric]
            client.set_tag(parent_id, "best_run_id", best.info.run_id)
            client.set_tag(parent_id, "best_run_name", best.info.run_name)
            client.log_metric(parent_id, f"best_{self.metric}", value)
            message = (
                f"Best job of {len(children)}: run {best.info.run_name} "
                f"({best.info.run_id}) {self.metric}={value:.4f}"
            )
            log.info(message)
            print(message)
        failed = any(r.info.status != "FINISHED" for r in children)
        client.set_terminated(parent_id, "FAILED" if failed or best is None else "FINISHED")
        self._open_parent = None
