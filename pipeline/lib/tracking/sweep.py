"""Hydra multirun sweeps as MLflow parent/child runs (callback wired in conf/config.yaml): the
parent is opened before the jobs start (parallel jobs never race to create the store) and its id
written to the sweep folder, where each job finds it. At the end the best child is tagged on the
parent; a sweep that stops early ends its parent FAILED at exit, never RUNNING."""

from __future__ import annotations

import atexit
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.lib.config.schema import DataConfig, TrackingConfig, name_after_data
from pipeline.lib.config.step import in_multirun
from pipeline.lib.tracking.lineage import TAG_PARENT, end_dead_runs, process_tags
from pipeline.lib.tracking.store import TrackingError, first_line, open_client, open_store

if TYPE_CHECKING:
    from mlflow.entities import Run

PARENT_FILE = "mlflow_parent.json"
VAL_LOSS = "final_val_loss"
#: The Optuna sweeper's logger: its "Best parameters/value" lines repeat the callback's one line.
OPTUNA_LOGGER = "hydra_plugins.hydra_optuna_sweeper._impl"

log = logging.getLogger(__name__)


def read_parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run id recorded in `sweep_dir`, else None."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def sweep_job() -> tuple[str | None, str | None]:
    """In a Hydra multirun: (the parent run id, `job N: key=value ...`); else (None, None)."""
    if not in_multirun():
        return None, None
    hydra_cfg = HydraConfig.get()
    name = f"job {hydra_cfg.job.num}: " + " ".join(hydra_cfg.overrides.task)
    return read_parent_run_id(hydra_cfg.sweep.dir), name[:250]


def tracking_config(config: DictConfig) -> TrackingConfig:
    """The sweep's `tracking` node over the schema's defaults, `auto` names resolved from `data`."""
    tracking = OmegaConf.merge(OmegaConf.structured(TrackingConfig), config.tracking)
    name_after_data(tracking, config.data if "data" in config else DataConfig())
    return tracking  # type: ignore[return-value]  (a structured DictConfig of TrackingConfig)


def best_run(runs: list[Run], metric: str, maximize: bool = True) -> Run | None:
    """The best run by `metric` (all have it), ties by lowest `VAL_LOSS`, then first; or None."""
    sign = 1 if maximize else -1
    return max(
        runs,
        key=lambda r: (sign * r.data.metrics[metric], -r.data.metrics.get(VAL_LOSS, math.inf)),
        default=None,
    )


def _not_best(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Best ")


class MlflowSweepCallback(Callback):
    """Parent run per sweep; best child reported at the end."""

    def __init__(self, metric: str = "final_val_accuracy", maximize: bool = True) -> None:
        self.metric, self.maximize = metric, maximize
        self._open_parent: tuple[str, str] | None = None  # (run id, tracking URI)

    def _close_if_open(self) -> None:  # at exit: a sweep stopped by an error ends it FAILED
        if self._open_parent is None:
            return
        (parent_id, uri), self._open_parent = self._open_parent, None
        try:
            open_client(uri).set_terminated(parent_id, "FAILED")
            log.info("Sweep parent MLflow run %s ended FAILED (the sweep stopped early)", parent_id)
        except Exception as exc:  # noqa: BLE001  (the store may be what stopped the sweep)
            log.warning("Could not end sweep parent run %s: %s", parent_id, first_line(exc))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the store (once for all jobs), start the parent run, record it in the sweep
        folder: taken over when its recorded parent has ended, an error while it is RUNNING."""
        logging.getLogger(OPTUNA_LOGGER).addFilter(_not_best)
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
        tags = {"sweep": "parent", "sweep_dir": str(sweep_dir.resolve()), **process_tags()}
        tags |= {"sweep_overrides": overrides[:5000], "sweep_metric": self.metric}
        run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
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
        log.info("Sweep parent MLflow run %s (%s, %s)", *self._open_parent, tracking.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Tag the best finished child (`best_run`) on the parent and end it (FAILED when a child
        did not finish or none has the metric)."""
        parent_id = read_parent_run_id(config.hydra.sweep.dir)
        if parent_id is None or self._open_parent is None or self._open_parent[0] != parent_id:
            return  # not this sweep's parent
        client, experiment_id = open_store(tracking_config(config))
        where = f"tags.`{TAG_PARENT}` = '{parent_id}'"
        children = client.search_runs([experiment_id], filter_string=where)
        client.set_tag(parent_id, "children", str(len(children)))
        finished = [r for r in children if r.info.status == "FINISHED"]
        scored = [r for r in finished if self.metric in r.data.metrics]
        best = best_run(scored, self.metric, self.maximize)
        if best is not None:
            value = best.data.metrics[self.metric]
            run_id, name = best.info.run_id, best.info.run_name
            client.set_tag(parent_id, "best_run_id", run_id)
            client.set_tag(parent_id, "best_run_name", name)
            client.log_metric(parent_id, f"best_{self.metric}", value)
            print(f"Best job of {len(children)}: run {name} ({run_id}) {self.metric}={value:.4f}")
        failed = len(finished) < len(children) or best is None
        client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
        self._open_parent = None
