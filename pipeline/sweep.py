"""Hydra multirun sweeps as MLflow parent/child runs.

A Hydra callback (wired in `conf/config.yaml`) opens one parent run before the sweep's jobs start
(which also creates the SQLite store and the experiment once, so parallel jobs never race to
create them), records its id in the sweep folder, and each job's run is tagged as its child
(`pipeline.tracking.active_run`). When the sweep ends the callback finds the best child by a
metric, prints it and tags it on the parent.

    python -m pipeline.train -m train.learning_rate=1e-4,1e-3,1e-2 model.dropout=0,0.2
    python -m pipeline.train hparams_search=optuna
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

PARENT_FILE = "mlflow_parent.json"

log = logging.getLogger(__name__)


def parent_file(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / PARENT_FILE


def read_parent_run_id(sweep_dir: str | Path) -> str | None:
    path = parent_file(sweep_dir)
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def best_child(client: Any, experiment_id: str, parent_id: str, metric: str,
               maximize: bool = True) -> Any | None:
    """The finished child run with the best value of `metric`, or None."""
    order = "DESC" if maximize else "ASC"
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{metric}` {order}"],
    )
    runs = [r for r in runs if metric in r.data.metrics]
    return runs[0] if runs else None


class MlflowSweepCallback(Callback):
    """Parent run per sweep; best child reported at the end."""

    def __init__(self, metric: str = "final_val_accuracy", maximize: bool = True) -> None:
        self.metric = metric
        self.maximize = maximize

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from pipeline.tracking import setup

        tracking = config.tracking
        experiment_id = setup(tracking)
        client = mlflow.MlflowClient()
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags={"sweep": "parent", "sweep_dir": str(sweep_dir.resolve()),
                  "sweep_overrides": " ".join(overrides)[:5000], "sweep_metric": self.metric},
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent_file(sweep_dir).write_text(json.dumps({"run_id": run.info.run_id,
                                                      "experiment_id": experiment_id}))
        log.info("Sweep parent MLflow run %s (experiment %s)", run.info.run_id, tracking.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from pipeline.tracking import setup

        sweep_dir = Path(config.hydra.sweep.dir)
        parent_id = read_parent_run_id(sweep_dir)
        if parent_id is None:
            return
        experiment_id = setup(config.tracking)
        client = mlflow.MlflowClient()
        best = best_child(client, experiment_id, parent_id, self.metric, self.maximize)
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
        )
        client.set_tag(parent_id, "children", str(len(children)))
        if best is not None:
            value = best.data.metrics[self.metric]
            client.set_tag(parent_id, "best_run_id", best.info.run_id)
            client.set_tag(parent_id, "best_run_name", best.info.run_name)
            client.log_metric(parent_id, f"best_{self.metric}", value)
            message = (f"Best job of {len(children)}: run {best.info.run_name} "
                       f"({best.info.run_id}) {self.metric}={value:.4f}")
            log.info(message)
            print(message)
        failed = [r for r in children if r.info.status != "FINISHED"]
        client.set_terminated(parent_id, "FAILED" if failed or best is None else "FINISHED")
