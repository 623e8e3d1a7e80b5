"""MLflow: one place for the store, the experiment, the run and what goes into it.

One pipeline run is one MLflow run: `train` starts it and records its id as a DVC output;
`evaluate` reopens that run to add test metrics and artifacts. A step that fails or is stopped
ends its run as FAILED or KILLED, never leaves it RUNNING.

The store is a local SQLite file (`tracking=local`) or a shared MLflow tracking server
(`tracking=server tracking.uri=http://host:5000`). With a server, MLflow's HTTP client would retry
a dead server for minutes; `setup` bounds that with `tracking.http_retries`,
`tracking.http_backoff_factor` and `tracking.timeout_s` (through MLflow's environment variables),
and a server that fails during a run stops the step with a `TrackingError` naming its URI.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipeline.lib.config.schema import to_flat_dict
from pipeline.lib.errors import UserError

log = logging.getLogger(__name__)

#: The file in the trained-model folder naming the MLflow run that trained it.
RUN_FILE = "mlflow_run.json"

MAX_PARAM_LENGTH = 6000


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be used."""


def is_remote(uri: str) -> bool:
    """An MLflow tracking server (REST over HTTP), as opposed to a local store."""
    return uri.startswith(("http://", "https://"))


def artifact_uri(location: str) -> str:
    """A local folder (relative to the working directory) as a file URI; URIs pass through."""
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    return Path(location).expanduser().resolve().as_uri()


def experiment_artifact_location(tracking: Any) -> str | None:
    """The artifact location a new experiment is created with; None leaves it to the store.

    With a tracking server, a local folder would be a path on each client's disk, not on the
    server: it is ignored, so the server's default applies (`mlflow-artifacts:/`, i.e. uploads and
    downloads go through the server to its `--artifacts-destination`). URIs (`s3://...`,
    `mlflow-artifacts:/...`) are kept.
    """
    location = tracking.artifact_location
    if not location:
        return None
    if is_remote(tracking.uri):
        if "://" in location or location.startswith("mlflow-artifacts:"):
            return location
        log.info(
            "tracking.artifact_location=%s is a local folder: ignored with the tracking "
            "server %s, which stores the artifacts itself",
            location,
            tracking.uri,
        )
        return None
    return artifact_uri(location)


#: MLflow's HTTP client settings (read at every request), set from the tracking config.
HTTP_ENV = {
    "http_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


def apply_http_settings(tracking: Any) -> dict[str, str]:
    """Bound MLflow's retries against a tracking server: with its defaults (7 retries, backoff
    factor 2, 120 s timeout) a dead server takes minutes to be reported. The config wins over
    these variables when they are already set."""
    settings = {
        HTTP_ENV["http_retries"]: str(int(tracking.http_retries)),
        HTTP_ENV["http_backoff_factor"]: str(int(tracking.http_backoff_factor)),
        HTTP_ENV["timeout_s"]: str(max(1, math.ceil(float(tracking.timeout_s)))),
    }
    os.environ.update(settings)
    return settings


def tracking_failure(exc: BaseException) -> bool:
    """An error of the connection to a tracking server (not of what was sent to it)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.exceptions.RequestException):
        return True
    return isinstance(exc, MlflowException) and str(exc.message).startswith("API request to ")


def failure_error(tracking: Any, exc: BaseException, what: str) -> TrackingError:
    detail = str(getattr(exc, "message", exc)).strip().splitlines()[0]
    if len(detail) > 400:
        detail = detail[:400] + "..."
    return TrackingError(
        f"tracking.uri={tracking.uri}: the MLflow tracking server failed {what} "
        f"(gave up after tracking.http_retries={tracking.http_retries} retries, "
        f"tracking.timeout_s={tracking.timeout_s} s per request): {detail}. Check that the "
        "server is up (its /health answers), then rerun; finished runs are kept."
    )


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail in seconds, before any training, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:  # noqa: S310 (config URI)
            if response.status >= 400:
                raise TrackingError(f"tracking.uri={uri}: {health} answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"tracking.uri={uri}: the MLflow tracking server does not answer ({exc}). Start it "
            "(see README, 'Running at scale') or use the local store: tracking.uri=sqlite:///mlflow.db"
        ) from None


def setup(tracking: Any) -> str:
    """Point MLflow at the configured store and return the experiment id (created if missing)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    remote = is_remote(tracking.uri)
    if remote:
        apply_http_settings(tracking)
    check_reachable(tracking.uri, tracking.timeout_s)
    mlflow.set_tracking_uri(tracking.uri)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is not None:
            if remote and artifact_uri(experiment.artifact_location).startswith("file:"):
                log.warning(
                    "Experiment %r on %s keeps its artifacts at %s, a folder on each client's "
                    "disk, not on the server: choose a new tracking.experiment to have them "
                    "uploaded through the server",
                    tracking.experiment,
                    tracking.uri,
                    experiment.artifact_location,
                )
            return experiment.experiment_id
        try:
            return client.create_experiment(
                tracking.experiment, artifact_location=experiment_artifact_location(tracking)
            )
        except MlflowException as exc:  # created meanwhile by a parallel job
            if remote and tracking_failure(exc):
                raise
            experiment = client.get_experiment_by_name(tracking.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id
    except MlflowException as exc:
        if remote and tracking_failure(exc):
            what = f"opening experiment {tracking.experiment!r}"
            raise failure_error(tracking, exc, what) from None
        raise TrackingError(f"tracking.uri={tracking.uri}: {exc.message}") from None


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def active_run(
    tracking: Any,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Start (or, with `run_id`, reopen) a run; end it FINISHED, FAILED or KILLED.

    SIGTERM (how DVC and schedulers stop a job) is turned into KeyboardInterrupt while the run is
    active, so the run is closed as KILLED instead of being left RUNNING. With a tracking server,
    a failure of the server (down, not answering) becomes a `TrackingError` naming it; the run is
    then marked FAILED if the server still answers (else it stays RUNNING on the server).
    """
    import mlflow
    from mlflow.entities import RunStatus

    experiment_id = setup(tracking)
    remote = is_remote(tracking.uri)
    if run_id is None:
        parent_id, job_name = sweep_job()
        if parent_id:
            tags = {**(tags or {}), "mlflow.parentRunId": parent_id}
            run_name = run_name or job_name
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
            if remote and tracking_failure(exc):
                raise failure_error(tracking, exc, "starting the run") from None
            raise
        try:
            yield run
        except KeyboardInterrupt:
            _end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as exc:
            _end_run(RunStatus.to_string(RunStatus.FAILED))
            if remote and tracking_failure(exc):
                raise failure_error(tracking, exc, f"during run {run.info.run_id}") from None
            raise
        else:
            try:
                mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
            except Exception as exc:
                if remote and tracking_failure(exc):
                    raise failure_error(tracking, exc, f"ending run {run.info.run_id}") from None
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _end_run(status: str) -> None:
    """End the active run with `status`; if the store cannot be reached, say so and go on (the
    error that ended the run is the one to report)."""
    import mlflow

    try:
        mlflow.end_run(status)  # leaves no active run behind, even when it raises
    except Exception as exc:  # noqa: BLE001
        log.warning(
            "Could not mark the MLflow run %s: %s",
            status,
            str(getattr(exc, "message", exc)).splitlines()[0][:300],
        )


def sweep_job() -> tuple[str | None, str | None]:
    """In a Hydra multirun: the sweep's parent run id (see `pipeline.lib.tracking.sweep`) and a run name made
    of the job's overrides; (None, None) otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pipeline.lib.tracking.sweep import read_parent_run_id

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, None
    hydra_cfg = HydraConfig.get()
    name = f"job {hydra_cfg.job.num}: " + " ".join(hydra_cfg.overrides.task)
    return read_parent_run_id(hydra_cfg.sweep.dir), name[:250]


def log_config(cfg: Any) -> None:
    """Every resolved config value as a param, and the config itself as `config.yaml`."""
    import mlflow

    params = {k: _param_value(v) for k, v in to_flat_dict(cfg).items()}
    items = list(params.items())
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
    metrics += [
        Metric(key=f"batch_{name}", value=float(v), timestamp=now, step=int(step))
        for name, values in batches.items()
        if name != "step"
        for step, v in zip(steps, values, strict=False)
    ]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)


def git_commit(cwd: str | os.PathLike[str] = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_dirty(cwd: str | os.PathLike[str] = ".") -> bool | None:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def log_dataset(manifest_csv: Path, digest: str, name: str, source: str) -> None:
    """The prepared dataset as an MLflow input (context `training`), with its DVC hash as digest."""
    import mlflow
    import pandas as pd

    frame = pd.read_csv(manifest_csv)
    dataset = mlflow.data.from_pandas(
        frame, source=source, name=name, targets="label", digest=digest
    )
    mlflow.log_input(dataset, context="training")


def _keras_flavor_creating_its_folder() -> None:
    """MLflow 3.17's Keras flavor writes the input example before it creates the model folder
    (FileNotFoundError on `input_example.json`); make its `save_model` create the folder first."""
    import mlflow.keras

    original = mlflow.keras.save_model
    if getattr(original, "_creates_folder", False):
        return

    def save_model(model: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        os.makedirs(path, exist_ok=True)
        return original(model, path, *args, **kwargs)

    save_model._creates_folder = True  # type: ignore[attr-defined]
    mlflow.keras.save_model = save_model


def log_model(
    model: Any, example: Any, name: str = "model", registered_model: str | None = None
) -> str:
    """The Keras model with a signature and an input example, registered as a new version of
    `registered_model` when given; returns its model URI."""
    import mlflow
    from mlflow.models import infer_signature

    _keras_flavor_creating_its_folder()
    outputs = np.zeros((len(example), int(model.output.shape[-1])), dtype=np.float32)
    signature = infer_signature(example, outputs)
    info = mlflow.keras.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        # stated, not inferred: inference re-imports the model in a subprocess (~15 s)
        pip_requirements=model_requirements(),
        registered_model_name=registered_model,
    )
    return info.model_uri


def model_requirements() -> list[str]:
    """The packages a logged model needs to be loaded back, pinned to what trained it."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "mlflow", "numpy"):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return pins


def log_files(paths: list[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
