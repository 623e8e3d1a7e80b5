"""MLflow: one pipeline run is one MLflow run; what goes into it.

`stage_run(cfg, stage, ...)` is the run of a DVC stage (see README, "How runs are recorded"):

- `train` starts the pipeline run's MLflow run (named and tagged by `lineage`); its id is
  recorded in `paths.run_file` (with the model's md5, `pipeline.lib.model.saving`) and the run is
  tagged `pipeline.model_md5`. With `train.resume=true` it reopens the run its checkpoint belongs
  to (tag `pipeline.checkpoint`), not a new one.
- `evaluate` and `export` reopen that run: the one `paths.run_file` names for this very model,
  else the newest run tagged with the model's md5 (DVC restored `models/` from its run cache),
  in `tracking.experiment` and, inside `dvc exp run`, made by the same DVC experiment. When there
  is none (a clone after `dvc pull`, a moved or new `mlflow.db`, a run removed for good, a model
  DVC kept from another experiment) the first of them creates a run tagged `recovered` (with the
  model's md5 and `pipeline.model_run_id`, the run that trained it if known), logs the config
  and what train wrote to disk, and the next stage finds it by the md5. A run in MLflow's trash
  is an error (restore it or remove it for good), never silently replaced.
- `evaluate` registers the run's model (`tracking.registered_model`) once it has test metrics;
  train and sweep jobs never register.
- Every step first ends KILLED the runs whose process died (`orphans`).

A step that fails or is stopped ends its run FAILED or KILLED, never leaves it RUNNING. Store
failures are `TrackingError`s (one line naming `tracking.uri`, exit status 2), see `store`.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.lib.config.schema import to_flat_dict
from pipeline.lib.files import md5_file, read_json
from pipeline.lib.model.saving import MODEL_FILE, trained_run_id
from pipeline.lib.tracking import lineage, orphans
from pipeline.lib.tracking.store import (
    TrackingError,
    apply_http_settings,
    check_reachable,
    failure_error,
    is_remote,
    open_store,
    store_error,
    tracking_failure,
)
from pipeline.lib.tracking.sweep import sweep_job

__all__ = [
    "TrackingError",
    "active_run",
    "apply_http_settings",
    "check_reachable",
    "stage_run",
]

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000

TAG_RECOVERED = "recovered"
TAG_RECOVERED_REASON = "pipeline.recovered_reason"
TAG_MODEL_RUN = "pipeline.model_run_id"
TAG_MODEL_MD5 = "pipeline.model_md5"
TAG_CHECKPOINT = "pipeline.checkpoint"
TAG_PARENT = "mlflow.parentRunId"
#: The metric whose presence makes a run a registry candidate.
TEST_METRIC = "test_accuracy"


def setup(tracking: Any) -> str:
    """Open the configured store (see `store.open_store`) and return the experiment id."""
    return open_store(tracking)[1]


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _body_store_error(exc: BaseException) -> bool:
    """An error of the store raised while the run was active (not one of the step's own)."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, MlflowException | SQLAlchemyError | sqlite3.Error)


def _as_tracking_error(tracking: Any, exc: BaseException, what: str) -> TrackingError | None:
    if is_remote(tracking.uri) and tracking_failure(exc):
        return failure_error(tracking, exc, what)
    if _body_store_error(exc):
        return store_error(tracking.uri, exc, what)
    return None


@contextmanager
def active_run(
    tracking: Any,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    experiment_id: str | None = None,
) -> Iterator[Any]:
    """Start (or, with `run_id`, reopen) a run; end it FINISHED, FAILED or KILLED.

    SIGTERM (how DVC and schedulers stop a job) is turned into KeyboardInterrupt while the run is
    active, so the run is closed as KILLED instead of being left RUNNING. A failure of the store
    (server down, file read-only or damaged) becomes a `TrackingError` naming `tracking.uri`;
    the run is then marked FAILED if the store still takes it.
    """
    import mlflow
    from mlflow.entities import RunStatus

    if experiment_id is None:
        experiment_id = setup(tracking)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        try:
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=None if run_id else experiment_id,
                run_name=run_name,
                tags=tags,
            )
        except Exception as exc:
            error = _as_tracking_error(tracking, exc, "starting the run")
            if error is not None:
                _end_run(RunStatus.to_string(RunStatus.FAILED))
                raise error from None
            raise
        yield from _run_body(tracking, run)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_body(tracking: Any, run: Any) -> Iterator[Any]:
    """Yield the active `run` and end it by how the body ended (see `active_run`)."""
    import mlflow
    from mlflow.entities import RunStatus

    run_id = run.info.run_id
    try:
        yield run
    except KeyboardInterrupt:
        _end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        _end_run(RunStatus.to_string(RunStatus.FAILED))
        error = _as_tracking_error(tracking, exc, f"during run {run_id}")
        if error is not None:
            raise error from None
        raise
    try:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    except Exception as exc:
        error = _as_tracking_error(tracking, exc, f"ending run {run_id}")
        if error is not None:
            _end_run(RunStatus.to_string(RunStatus.FAILED))
            raise error from None
        raise


def _end_run(status: str) -> None:
    """End the active run with `status`; if the store cannot take it, say so and go on (the
    error that ended the run is the one to report)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    try:
        mlflow.end_run(status)  # leaves no active run behind, even when it raises
    except Exception as exc:  # noqa: BLE001
        log.warning(
            "Could not mark the MLflow run %s: %s",
            status,
            str(getattr(exc, "message", exc)).splitlines()[0][:300],
        )


@dataclass(frozen=True)
class Recovery:
    """Why a later stage starts the pipeline run's MLflow run itself; the run that trained the
    model, when the store has it (`pipeline.model_run_id`)."""

    reason: str
    model_run_id: str | None
    #: A DVC experiment that did not rerun train (e.g. only `export.*` changed): its model is the
    #: baseline's, as expected, so this is said as information, not as a warning.
    reused: bool = False


@contextmanager
def stage_run(
    cfg: Any,
    stage: str,
    checkpoint: str | Path | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """The MLflow run of the DVC stage `stage` ("train", "evaluate", "export") of `cfg`'s
    pipeline run, active while the body runs (see the module docstring).

    `checkpoint`: train's checkpoint folder (`train.resume` reopens the run that wrote it);
    `tags`: more tags for a run this stage starts (or resumes). Raises `TrackingError` on any store failure, before or during the run.
    """
    client, experiment_id = open_store(cfg.tracking)
    _end_orphans(cfg.tracking, client, experiment_id)
    recovery, extra = None, dict(tags or {})
    if stage == "train":
        run_id, name, tags = _train_run(client, experiment_id, cfg, checkpoint)
        tags |= extra
    else:
        run_id, recovery = _later_stage_run(client, experiment_id, cfg)
        name, tags = lineage.run_name(cfg), lineage.run_tags(cfg, stage)
        if run_id is not None:
            tags = lineage.process_tags()  # a reopened run keeps its own tags
        else:
            tags |= extra | _recovered_tags(cfg, recovery)
            reason = recovery.reason if recovery else "no run found"
            say = log.info if recovery is not None and recovery.reused else log.warning
            say("MLflow: %s; logging into a new run %r (tagged recovered)", reason, name)
    with active_run(
        cfg.tracking,
        run_id=run_id,
        run_name=None if run_id else name,
        tags=tags,
        experiment_id=experiment_id,
    ) as run:
        if recovery is not None:
            log_recovered(cfg)
        yield run
        if stage == "train":
            _tag_model(cfg)
        elif stage == "evaluate":
            register_model(client, cfg.tracking, run.info.run_id, experiment_id)


def _model_md5(cfg: Any) -> str | None:
    """The md5 of the trained model file (`paths.models`/model.keras), None when there is none."""
    model = Path(cfg.paths.models) / MODEL_FILE
    return md5_file(model) if model.is_file() else None


def _tag_model(cfg: Any) -> None:
    """Tag the active run with the md5 of the model it saved: later stages find the run by it
    when `paths.run_file` does not name it (models/ restored from DVC's run cache)."""
    import mlflow

    md5 = _model_md5(cfg)
    if md5:
        mlflow.set_tag(TAG_MODEL_MD5, md5)


def _recovered_tags(cfg: Any, recovery: Recovery | None) -> dict[str, str]:
    reason = recovery.reason if recovery else "no run found"
    tags = {TAG_RECOVERED: "true", TAG_RECOVERED_REASON: reason[:5000]}
    md5 = _model_md5(cfg)
    if md5:
        tags[TAG_MODEL_MD5] = md5
    if recovery is not None and recovery.model_run_id:
        tags[TAG_MODEL_RUN] = recovery.model_run_id
    return tags


def _end_orphans(tracking: Any, client: Any, experiment_id: str) -> None:
    try:
        orphans.end_dead_runs(client, [experiment_id])
    except Exception as exc:
        error = _as_tracking_error(tracking, exc, "ending runs whose process died")
        if error is not None:
            raise error from None
        raise


def _train_run(
    client: Any, experiment_id: str, cfg: Any, checkpoint: str | Path | None
) -> tuple[str | None, str, dict[str, str]]:
    """(run id to reopen or None, run name, tags) of train's run: a sweep job is a child of its
    sweep's parent run; `train.resume` with a checkpoint reopens the run that wrote it."""
    tags = lineage.run_tags(cfg, "train")
    parent_id, job_name = sweep_job()
    if parent_id:
        tags[TAG_PARENT] = parent_id
    name = cfg.tracking.run_name or job_name or lineage.run_name(cfg)
    run_id = None
    if checkpoint is not None:
        tags[TAG_CHECKPOINT] = Path(checkpoint).name
        if cfg.train.resume and Path(checkpoint).exists():
            run_id = interrupted_run(client, experiment_id, Path(checkpoint).name)
            if run_id:
                log.info("train.resume=true: continuing MLflow run %s", run_id)
    return run_id, name, tags


def interrupted_run(client: Any, experiment_id: str, checkpoint_name: str) -> str | None:
    """The newest KILLED or FAILED run that trained into checkpoint folder `checkpoint_name`."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_CHECKPOINT}` = '{checkpoint_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if run.info.status in ("KILLED", "FAILED"):
            return run.info.run_id
    return None


def _get_run(client: Any, run_id: str) -> Any | None:
    """The run, or None when the store has no such run (other store errors propagate)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def _later_stage_run(
    client: Any, experiment_id: str, cfg: Any
) -> tuple[str | None, Recovery | None]:
    """(run id to reopen, None) or (None, why a recovered run is started); see `stage_run`.

    The run is the one `paths.run_file` names for this model, else the newest run tagged with
    the model's md5 (in a DVC experiment: one of the same experiment).
    """
    recorded = trained_run_id(cfg)
    exp_name = lineage.dvc_experiment()
    run = _get_run(client, recorded) if recorded else None
    if run is not None and run.info.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.uri={cfg.tracking.uri}: run {recorded} that trained {cfg.paths.models} "
            f"is deleted: restore it (`mlflow runs restore --run-id {recorded}`) or remove it "
            "for good (`mlflow gc`) to have a new run recorded, then rerun"
        )
    if run is not None and _same_pipeline_run(run, experiment_id, exp_name):
        return recorded, None
    md5 = _model_md5(cfg)
    found = _runs_of_model(client, experiment_id, md5) if md5 else []
    for candidate in found:
        if exp_name is None or candidate.data.tags.get(lineage.TAG_EXP_NAME) == exp_name:
            return candidate.info.run_id, None
    trained_by = found[-1].info.run_id if found else (recorded if run is not None else None)
    models, store = cfg.paths.models, f"tracking.uri={cfg.tracking.uri}"
    if exp_name and trained_by:
        reason = f"DVC experiment {exp_name!r} did not rerun train: {models} is run {trained_by}'s"
        return None, Recovery(reason, trained_by, reused=True)
    elif recorded:
        reason = f"run {recorded} that trained {models} is not in {store}"
    else:
        reason = f"no run in {store} is known to have trained {models}"
    return None, Recovery(reason, trained_by)


def _same_pipeline_run(run: Any, experiment_id: str, exp_name: str | None) -> bool:
    """Whether `run` may be reopened: in the configured experiment, active, and (inside a DVC
    experiment) made by that experiment."""
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return False
    return exp_name is None or run.data.tags.get(lineage.TAG_EXP_NAME) == exp_name


def _runs_of_model(client: Any, experiment_id: str, md5: str) -> list[Any]:
    """The active runs of the experiment tagged with model md5 `md5`, newest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_MODEL_MD5}` = '{md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )


def log_recovered(cfg: Any) -> None:
    """Into a recovered run: the config, and train's metrics as it wrote them to disk
    (`<paths.reports>/train_metrics.json`, restored by DVC with `models/`)."""
    import mlflow

    log_config(cfg)
    train_metrics = Path(cfg.paths.reports) / "train_metrics.json"
    try:
        saved = read_json(train_metrics)
    except (OSError, ValueError):
        return
    values = {
        "final_loss": (saved.get("train") or {}).get("loss"),
        "final_accuracy": (saved.get("train") or {}).get("accuracy"),
        "final_val_loss": (saved.get("val") or {}).get("loss"),
        "final_val_accuracy": (saved.get("val") or {}).get("accuracy"),
    }
    mlflow.log_metrics({k: float(v) for k, v in values.items() if isinstance(v, int | float)})
    mlflow.log_artifact(str(train_metrics), artifact_path="reports")


def register_model(client: Any, tracking: Any, run_id: str, experiment_id: str) -> Any | None:
    """Register the model logged by run `run_id` as a new version of `tracking.registered_model`
    once the run has test metrics (`TEST_METRIC`); once per run. Returns the ModelVersion, or
    None (nothing to register: no name, no test metrics, no logged model, already registered)."""
    import mlflow

    name = tracking.registered_model
    if not name or TEST_METRIC not in client.get_run(run_id).data.metrics:
        return None
    quoted = name.replace("'", "\\'")
    if client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'"):
        return None
    logged = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if not logged:
        log.info("MLflow run %s logged no model: not registered as %r", run_id, name)
        return None
    version = mlflow.register_model(f"models:/{logged[0].model_id}", name)
    log.info("Registered the model of run %s as %s version %s", run_id, name, version.version)
    return version


def log_config(cfg: Any) -> None:
    """Every resolved config value as a param, and the config itself as `config.yaml`. Into a
    reopened (resumed) run only the params it does not have yet: the values that differ (such
    as `train.resume`) are named in the tag `pipeline.params_changed_on_resume`."""
    import mlflow

    params = {k: _param_value(v) for k, v in to_flat_dict(cfg).items()}
    run_id = mlflow.active_run().info.run_id
    logged = mlflow.MlflowClient().get_run(run_id).data.params  # a resumed run has them
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:  # MLflow keeps a param's first value (e.g. train.resume=false)
        mlflow.set_tag("pipeline.params_changed_on_resume", ",".join(changed)[:5000])
    items = [(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(items), 100):  # MLflow's per-request limit
        mlflow.log_params(dict(items[start : start + 100]))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def log_history(history: dict[str, list[float]], batches: dict[str, list[float]]) -> None:
    """Per-epoch metrics (`loss`, `val_accuracy`, ..., step = epoch) and per-batch metrics
    (`batch_loss`, `batch_accuracy`, step = global batch number), sent in bulk."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key=name, value=float(v), timestamp=now, step=i)
        for name, values in history.items()
        if name != "epoch"
        for i, v in enumerate(values, start=1)
    ]
    steps = batches.get("step", [])
    metrics += [  # the batch's epoch is in train_batches.csv: its step already places it
        Metric(key=f"batch_{name}", value=float(v), timestamp=now, step=int(step))
        for name, values in batches.items()
        if name not in ("step", "epoch")
        for step, v in zip(steps, values, strict=False)
    ]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)


def log_dataset(manifest_csv: Path, digest: str, name: str, source: str) -> None:
    """The prepared dataset as an MLflow input (context `training`), with its DVC hash as digest."""
    import mlflow
    import pandas as pd

    frame = pd.read_csv(manifest_csv)
    dataset = mlflow.data.from_pandas(
        frame, source=source, name=name, targets="label", digest=digest
    )
    mlflow.log_input(dataset, context="training")


#: What the logged model takes (its signature states only the outputs: MLflow enforces an input
#: tensor's dtype exactly, which is what made uint8 and float64 images fail).
MODEL_INPUT = (
    "images: an array (N, H, W, 3) or (H, W, 3) of any numeric dtype, RGB 0..255 (resized as in "
    "training when H, W differ from image_size), or encoded image files (JPEG, PNG, ...) as bytes "
    "or base64 text: a one-column DataFrame, a list, or {'inputs': [...]} over HTTP"
)


def log_model(models: str | os.PathLike[str], name: str = "model") -> str:
    """The model folder as an MLflow pyfunc model that takes raw images (see
    `pipeline.lib.tracking.pyfunc_model`): its three files (backbone.tflite, head.npy,
    model.json) as the artifacts, the `pipeline` package as its code, a signature of its outputs
    (label, probability, scores) and pinned requirements. No input example, so MLflow runs no
    validation prediction in a subprocess. Returns its model URI."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    import pipeline
    from pipeline.lib.model.classifier import ModelCard
    from pipeline.lib.tracking.pyfunc_model import ARTIFACTS, ClassifierModel

    folder = Path(models)
    card = ModelCard.load(folder / ARTIFACTS["card"])
    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "probability"),
            ColSpec(Map(DataType.double), "scores"),
        ]
    )
    with warnings.catch_warnings(), _log_filtered("mlflow.pyfunc", "serialized using CloudPickle"):
        # deliberate: no input example (see above); the class is pickled by reference to the
        # module its code_paths carry, which is what MLflow's CloudPickle warning is about
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ClassifierModel(),
            artifacts={key: str(folder / file) for key, file in ARTIFACTS.items()},
            code_paths=[str(Path(pipeline.__file__).parent)],
            signature=ModelSignature(inputs=None, outputs=outputs),
            pip_requirements=model_requirements(),  # stated: inferring re-imports the model
            metadata={
                "input": MODEL_INPUT,
                "classes": card.classes,
                "image_size": card.image_size,
                "resize": card.resize,
            },
        )
    return info.model_uri


@contextmanager
def _log_filtered(logger: str, text: str) -> Iterator[None]:
    """Records of `logger` whose message contains `text` are dropped inside the block."""

    def keep(record: logging.LogRecord) -> bool:
        """Logging filter: False (drop) for records whose message contains `text`."""
        return text not in record.getMessage()

    target = logging.getLogger(logger)
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def model_requirements() -> list[str]:
    """The packages a logged model needs to be loaded back, pinned to what trained it."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("ai-edge-litert", "mlflow", "numpy", "scipy", "pandas", "pillow"):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return pins


def log_files(paths: list[Path], artifact_path: str | None = None) -> None:
    """Each existing file of `paths` as an artifact of the active run (under `artifact_path`)."""
    import mlflow

    for path in paths:
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
