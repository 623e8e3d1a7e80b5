"""MLflow: one pipeline run is one MLflow run (docs/tracking.md). `stage_run`: train starts it
(`train.resume` reopens its checkpoint's run), evaluate and export reopen it (`lineage`), and
evaluate registers the model. A step that fails or is stopped ends its run FAILED or KILLED,
never RUNNING; store failures are one-line `TrackingError`s (`store`)."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Map, Schema
from omegaconf import OmegaConf

from pipeline.lib.config.schema import Config, TrackingConfig, to_flat_dict
from pipeline.lib.files import read_json
from pipeline.lib.model.classifier import ModelCard
from pipeline.lib.tracking import lineage
from pipeline.lib.tracking.pyfunc_model import ARTIFACTS, ClassifierModel
from pipeline.lib.tracking.store import (
    TrackingError,
    as_tracking_error,
    check_reachable,
    open_store,
)
from pipeline.lib.tracking.sweep import sweep_job

__all__ = ["TrackingError", "active_run", "check_reachable", "stage_run"]
log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
#: The metric whose presence makes a run a registry candidate.
TEST_METRIC = "test_accuracy"
#: What the logged model takes (its signature states only the outputs: MLflow enforces an input
#: tensor's dtype exactly, which is what made uint8 and float64 images fail).
MODEL_INPUT = (
    "images: an array (N, H, W, 3) or (H, W, 3) of any numeric dtype, RGB 0..255 (resized as in "
    "training when H, W differ from image_size), or encoded image files (JPEG, PNG, ...) as bytes "
    "or base64 text: a one-column DataFrame, a list, or {'inputs': [...]} over HTTP"
)


def _end_run(status: str) -> str:
    """End the active run (if any) with `status`; '' or why it could not be."""
    if (run := mlflow.active_run()) is None:
        return ""
    try:
        mlflow.end_run(status)  # leaves no active run behind, even when it raises
    except Exception:  # noqa: BLE001  (the store's failure is what the caller reports)
        run_id = run.info.run_id
        return f"run {run_id} could not be marked {status}: the next step on this store ends it"
    return ""


@contextmanager
def _run_ends_on_error(tracking: TrackingConfig, what: str) -> Iterator[None]:
    """An error ends the run KILLED or FAILED; a store failure becomes a `TrackingError`."""
    try:
        yield
    except KeyboardInterrupt:
        if note := _end_run("KILLED"):
            log.warning("%s", note)
        raise
    except BaseException as exc:
        note = _end_run("FAILED")
        if error := as_tracking_error(tracking, exc, what):
            raise TrackingError(f"{error} ({note})" if note else str(error)) from None
        if note:
            log.warning("%s", note)
        raise


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def active_run(
    tracking: TrackingConfig,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    experiment_id: str | None = None,
) -> Iterator[Run]:
    """Start (or, with `run_id`, reopen) a run tagged with this process; end it FINISHED, FAILED
    or KILLED (SIGTERM, how DVC and schedulers stop a job, raises KeyboardInterrupt inside). A
    store failure becomes a `TrackingError` naming `tracking.uri`."""
    if experiment_id is None:
        experiment_id = open_store(tracking)[1]
    previous = None
    with suppress(ValueError):  # not the main thread
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with _run_ends_on_error(tracking, "starting the run"):
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=None if run_id else experiment_id,
                run_name=run_name,
                tags=lineage.process_tags() | (tags or {}),
            )
        with _run_ends_on_error(tracking, f"during run {run.info.run_id}"):
            yield run
        with _run_ends_on_error(tracking, f"ending run {run.info.run_id}"):
            mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def stage_run(
    cfg: Config,
    stage: str,
    checkpoint: str | Path | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Run]:
    """The MLflow run of DVC stage `stage` ("train", "evaluate", "export"), active in the body.
    `checkpoint`: train's checkpoint folder (`train.resume` reopens the run that wrote it);
    `tags`: more tags for a run this stage starts. Raises `TrackingError` on store failures."""
    client, experiment_id = open_store(cfg.tracking)
    with _run_ends_on_error(cfg.tracking, "ending runs whose process died"):
        lineage.end_dead_runs(client, [experiment_id])
    recovery = None
    run_tags: dict[str, str] = {}  # a reopened run keeps its own tags
    if stage == "train":
        parent, job_name = sweep_job()
        name = cfg.tracking.run_name or job_name or lineage.run_name(cfg)
        run_tags = lineage.run_tags(cfg, stage) | ({lineage.TAG_PARENT: parent} if parent else {})
        run_id = None
        if checkpoint is not None:
            run_tags[lineage.TAG_CHECKPOINT] = Path(checkpoint).name
            run_id = lineage.interrupted_run(client, experiment_id, cfg, Path(checkpoint))
        run_tags |= tags or {}
    else:
        run_id, recovery = lineage.later_stage_run(client, experiment_id, cfg)
        name = lineage.run_name(cfg)
        if recovery is not None:
            run_tags = lineage.run_tags(cfg, stage) | recovery.tags(cfg) | (tags or {})
            say = log.info if recovery.reused else log.warning
            say("MLflow: %s; logging into a new run %r (tagged recovered)", recovery.reason, name)
    with active_run(cfg.tracking, run_id, None if run_id else name, run_tags, experiment_id) as run:
        if recovery is not None:
            log_recovered(cfg)
        yield run
        if stage == "train" and (md5 := lineage.model_md5(cfg.paths.models)):
            mlflow.set_tag(lineage.TAG_MODEL_MD5, md5)  # how later stages find it without run_file
        elif stage == "evaluate":
            register_model(client, cfg, run.info.run_id, experiment_id)


def log_recovered(cfg: Config) -> None:
    """Into a recovered run: the config and train's metrics (`paths.reports`, restored by DVC)."""
    log_config(cfg)
    train_metrics = Path(cfg.paths.reports) / "train_metrics.json"
    try:
        saved = read_json(train_metrics)
    except (OSError, ValueError):
        return
    log_batch(metrics=final_metrics(saved))
    mlflow.log_artifact(str(train_metrics), artifact_path="reports")


def final_metrics(train_metrics: dict) -> dict[str, float]:
    """`final_[val_]loss`/`accuracy` of a `train_metrics.json` dict (None values left out)."""
    return {
        f"final_{'val_' if split == 'val' else ''}{k}": float(v)
        for split in ("train", "val")
        for k, v in (train_metrics.get(split) or {}).items()
        if k in ("loss", "accuracy") and isinstance(v, int | float)
    }


def register_model(
    client: mlflow.MlflowClient, cfg: Config, run_id: str, experiment_id: str
) -> ModelVersion | None:
    """Register run `run_id`'s logged model as a version of `tracking.registered_model` once the
    run has `TEST_METRIC`, tagged with its md5 and described (data, test accuracy, run). None
    when there is nothing new: no name, metric or model, or the run or bytes registered already."""
    name, run = cfg.tracking.registered_model, client.get_run(run_id)
    metrics, md5 = run.data.metrics, lineage.model_md5(cfg.paths.models)
    if not name or TEST_METRIC not in metrics:
        return None
    quoted = name.replace("'", "\\'")
    query = f"name = '{quoted}' and "
    if client.search_model_versions(query + f"run_id = '{run_id}'"):
        return None
    same_bytes = f"tags.`{lineage.TAG_MODEL_MD5}` = '{md5}'"
    if md5 and (same := client.search_model_versions(query + same_bytes)):
        version, other = same[0].version, same[0].run_id
        log.info(
            "Same model bytes as %s version %s (run %s): not registered again", name, version, other
        )
        return None
    logged = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if not logged:
        log.info("MLflow run %s logged no model: not registered as %r", run_id, name)
        return None
    with suppress(MlflowException):
        client.create_registered_model(name)  # it may exist
    data = "synthetic toy trucks" if cfg.data.source == "synthetic" else f"photos {cfg.data.path}"
    if prepared := run.data.tags.get("dvc_prepared_md5"):
        data += f" (prepared md5 {prepared})"
    low, high = metrics.get("test_ci_low", math.nan), metrics.get("test_ci_high", math.nan)
    version = client.create_model_version(
        name,
        f"models:/{logged[0].model_id}",
        run_id,
        tags={lineage.TAG_MODEL_MD5: md5} if md5 else None,
        description=f"Data: {data}. "
        f"Test accuracy {metrics[TEST_METRIC]:.4f} (95 % interval {low:.4f}-{high:.4f}). "
        f"Run {run.info.run_name} ({run_id}).",
        model_id=logged[0].model_id,
    )
    log.info("Registered the model of run %s as %s version %s", run_id, name, version.version)
    return version


def log_config(cfg: Config) -> None:
    """Every resolved config value as a param, and `config.yaml`. A resumed run keeps its params;
    the ones that differ are named in the tag `pipeline.params_changed_on_resume`."""
    params = {}
    for key, value in to_flat_dict(cfg).items():
        text = "null" if value is None else str(value)
        cut = len(text) > MAX_PARAM_LENGTH
        params[key] = text[: MAX_PARAM_LENGTH - 3] + "..." if cut else text
    logged = mlflow.active_run().data.params  # as start_run read it (MLflow keeps the first)
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    tags = {"pipeline.params_changed_on_resume": ",".join(changed)[:5000]} if changed else {}
    log_batch(params={k: v for k, v in params.items() if k not in logged}, tags=tags)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def log_batch(
    history: dict[str, list[float]] | None = None,
    batches: dict[str, list[float]] | None = None,
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """One `log_batch` into the active run: curves (at the history's `step`, else 1, 2, ...),
    per-batch ones as `batch_<name>` (at the batches' `step`), `metrics` (step 0), params, tags."""
    history, batches, now = history or {}, batches or {}, int(time.time() * 1000)
    at = history.get("step") or range(1, 1 + max(map(len, history.values()), default=0))
    batch_at = batches.get("step", [])
    rows = [
        Metric(prefix + name, float(v), now, int(step))
        for prefix, series, steps in (("", history, at), ("batch_", batches, batch_at))
        for name, values in series.items()
        if name not in ("step", "epoch")
        for step, v in zip(steps, values, strict=False)
    ]
    rows += [Metric(name, float(v), now, 0) for name, v in (metrics or {}).items()]
    mlflow.MlflowClient().log_batch(
        mlflow.active_run().info.run_id,
        metrics=rows,
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        synchronous=True,
    )


def log_dataset(manifest_csv: Path, digest: str, name: str, source: str) -> None:
    """The prepared dataset as an MLflow input (context `training`), its DVC hash as digest."""
    frame = pd.read_csv(manifest_csv)
    dataset = mlflow.data.from_pandas(frame, source, targets="label", name=name, digest=digest)
    mlflow.log_input(dataset, context="training")


def log_files(paths: list[Path], artifact_path: str | None = None) -> None:
    """Each existing file of `paths` as an artifact of the active run (under `artifact_path`)."""
    for path in paths:
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_model(models: str | os.PathLike[str], name: str = "model") -> str:
    """The model folder as an MLflow pyfunc model on raw images (`pyfunc_model`): its files as
    artifacts, the `pipeline` package as code, the outputs' signature, pinned requirements; no
    input example (MLflow would predict in a subprocess to check it). Returns its model URI."""
    folder = Path(models)
    card = ModelCard.load(folder / ARTIFACTS["card"])
    columns = {"label": DataType.string, "probability": DataType.double}
    columns["scores"] = Map(DataType.double)
    outputs = Schema([ColSpec(kind, name) for name, kind in columns.items()])

    # the class is pickled by reference to the module code_paths carry: MLflow's CloudPickle
    # notice does not apply, nor its warning about the deliberately missing input example
    logging.getLogger("mlflow.pyfunc").addFilter(_not_cloudpickle_notice)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ClassifierModel(),
            artifacts={key: str(folder / file) for key, file in ARTIFACTS.items()},
            code_paths=[str(Path(__file__).resolve().parents[2])],  # the pipeline package
            signature=ModelSignature(inputs=None, outputs=outputs),
            pip_requirements=model_requirements(),  # stated: inferring re-imports the model
            metadata={"input": MODEL_INPUT, "classes": card.classes}
            | {"image_size": card.image_size, "resize": card.resize},
        )
    return info.model_uri


def _not_cloudpickle_notice(record: logging.LogRecord) -> bool:
    return "serialized using CloudPickle" not in record.getMessage()


def model_requirements() -> list[str]:
    """The packages a logged model needs to be loaded back, pinned to what trained it."""
    pins = []
    for dist in ("ai-edge-litert", "mlflow", "numpy", "scipy", "pandas", "pillow", "pillow-heif"):
        with suppress(PackageNotFoundError):
            pins.append(f"{dist}=={version(dist)}")
    return pins
