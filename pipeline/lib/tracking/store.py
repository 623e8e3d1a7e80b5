"""The MLflow store: where it is, opening it safely, and what its failures mean to a user.

One store per project, wherever DVC runs a stage: a relative `sqlite:///mlflow.db` (and a relative
artifact folder such as `mlartifacts`) is resolved against the project's main working tree, not
the current directory. `dvc exp run --queue` / `--temp` run the stages in a temporary copy of the
workspace (under `.dvc/tmp/exps/...`); DVC gives their commands `DVC_ROOT`, the root of the
*original* repository (`dvc.repo.experiments.queue.base`, `dvc.stage.run.prepare_kwargs`), so
queued and temporary experiments log into the user's `mlflow.db`. Outside DVC the current
directory is the project.

A SQLite store is created and migrated by MLflow on first use; two processes doing that at once
corrupt each other's migration. `open_store` holds a file lock (`<db>-lock`, beside the file)
while it opens the store, so concurrent first use is safe. Every store failure becomes a
`TrackingError`: one line naming `tracking.uri` (or the file) and what to do.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.lib.errors import UserError

log = logging.getLogger(__name__)

#: Set by DVC for every stage command: the root of the repository the user runs DVC in (for
#: queued and temporary experiments, the original workspace, not the temporary copy).
DVC_ROOT = "DVC_ROOT"
#: Seconds to wait for another process that is creating or migrating the same SQLite store.
LOCK_TIMEOUT_S = 300.0

#: MLflow's HTTP client settings (read at every request), set from the tracking config.
HTTP_ENV = {
    "http_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be used (one line: the store, the cause, what to do)."""


def is_remote(uri: str) -> bool:
    """An MLflow tracking server (REST over HTTP), as opposed to a local store."""
    return uri.startswith(("http://", "https://"))


def project_root() -> Path:
    """The project's main working tree: `$DVC_ROOT` under DVC (the original workspace even for a
    queued or temporary experiment), else the current directory. An absolute path."""
    root = os.environ.get(DVC_ROOT)
    if root and Path(root).is_dir():
        return Path(root).resolve()
    return Path.cwd().resolve()


def resolve_uri(uri: str) -> str:
    """`uri` with a relative SQLite file made absolute against `project_root()`; other URIs
    (absolute files, servers, `:memory:`) unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    rest = uri[len(prefix) :]
    path, sep, query = rest.partition("?")
    if not path or path.startswith(("/", "file:")) or path == ":memory:":
        return uri
    return f"{prefix}{project_root() / path}{sep}{query}"


def store_file(uri: str) -> Path | None:
    """The database file of a SQLite URI (resolved), None for any other store."""
    resolved = resolve_uri(uri)
    if not resolved.startswith("sqlite:///"):
        return None
    path = resolved[len("sqlite:///") :].partition("?")[0].removeprefix("file:")
    return None if not path or path == ":memory:" else Path(path)


def artifact_uri(location: str) -> str:
    """A local folder (relative to the project, see `project_root`) as a file URI; URIs pass."""
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    path = Path(location).expanduser()
    return (path if path.is_absolute() else project_root() / path).resolve().as_uri()


def experiment_artifact_location(tracking: Any) -> str | None:
    """The artifact location a new experiment is created with; None leaves it to the store.

    With a tracking server, a local folder would be a path on each client's disk, not on the
    server: it is ignored, so the server's default applies (`mlflow-artifacts:/`). URIs
    (`s3://...`, `mlflow-artifacts:/...`) are kept.
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
    """A tracking server that failed `what` (e.g. "starting the run"), as one line."""
    detail = _first_line(exc)
    return TrackingError(
        f"tracking.uri={tracking.uri}: the MLflow tracking server failed {what} "
        f"(gave up after tracking.http_retries={tracking.http_retries} retries, "
        f"tracking.timeout_s={tracking.timeout_s} s per request): {detail}. Check that the "
        "server is up (its /health answers), then rerun; finished runs are kept."
    )


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail in seconds, before any training, when an HTTP tracking server does not answer."""
    if not is_remote(uri):
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


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", exc)).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def is_store_error(exc: BaseException) -> bool:
    """An error raised by the store itself (SQL, SQLite, MLflow, the file system under it)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, MlflowException | SQLAlchemyError | sqlite3.Error | OSError)


def store_error(uri: str, exc: BaseException, what: str = "") -> TrackingError:
    """A store failure as one line: which store (`tracking.uri` and its file), the cause, the fix."""
    text = str(getattr(exc, "message", exc)).lower()
    file = store_file(uri)
    where = f"tracking.uri={uri}" + (f" ({file})" if file and resolve_uri(uri) != uri else "")
    doing = f" {what}" if what else ""
    target = file or "the store"
    if "readonly" in text or "read-only" in text or isinstance(exc, PermissionError):
        fix = f"the store is read-only{doing}: make {target} and its folder writable, or point "
        return TrackingError(f"{where}: {fix}tracking.uri at another file")
    if "malformed" in text or "not a database" in text or "no such table" in text:
        return TrackingError(
            f"{where}: not a valid MLflow database ({_first_line(exc)}): restore {target} from a "
            "backup, or move it away (a new store is created), or point tracking.uri at another file"
        )
    if "disk is full" in text or "no space left" in text:
        return TrackingError(
            f"{where}: the disk holding {target} is full{doing}: free some space, then rerun"
        )
    if "database is locked" in text:
        return TrackingError(
            f"{where}: the store stayed locked by another process{doing}: rerun when it is done"
        )
    return TrackingError(f"{where}: the MLflow store failed{doing}: {_first_line(exc)}")


def _store_lock(file: Path | None) -> Any:
    """A lock held while a SQLite store is opened (created, migrated); a no-op lock where there
    is no file or its folder cannot hold one (a read-only store: nothing can migrate it)."""
    from contextlib import nullcontext

    from filelock import FileLock

    if file is None:
        return nullcontext()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock_file = file.with_name(file.name + "-lock")
        if not os.access(file.parent, os.W_OK) and not lock_file.exists():
            return nullcontext()
    except OSError:
        return nullcontext()
    return FileLock(str(lock_file), timeout=LOCK_TIMEOUT_S)


#: The clients a Hydra multirun's jobs share (one process, one store): opened once per sweep.
_SWEEP_CLIENTS: dict[str, Any] = {}


def open_client(uri: str) -> Any:
    """An MlflowClient (tracking and registry) on `uri` (resolved, see `resolve_uri`), with the
    store created/migrated under a lock and MLflow's fluent API pointed at it. The jobs of one
    Hydra multirun (one process) share the client the first job opened.

    Raises `TrackingError` when the store cannot be opened (read-only, not a database, ...).
    """
    import mlflow
    from filelock import Timeout

    from pipeline.lib.config.step import in_multirun

    resolved = resolve_uri(uri)
    if in_multirun() and resolved in _SWEEP_CLIENTS:  # checked and migrated by the first job
        mlflow.set_tracking_uri(resolved)
        mlflow.set_registry_uri(resolved)
        return _SWEEP_CLIENTS[resolved]
    file = store_file(uri)
    if file is not None and file.is_dir():  # MLflow would retry for minutes, then say little
        raise TrackingError(
            f"tracking.uri={uri}: {file} is a folder, not an SQLite file: move it away, or point "
            "tracking.uri at another file (sqlite:///path/to/mlflow.db)"
        )
    try:
        with _store_lock(file):
            client = mlflow.MlflowClient(tracking_uri=resolved, registry_uri=resolved)
            client.search_experiments(max_results=1)  # creates/migrates the tracking tables
            if not is_remote(resolved):
                client.search_registered_models(max_results=1)  # the registry's, same file
    except Timeout:
        raise TrackingError(
            f"tracking.uri={uri}: another process has held {store_file(uri)}-lock for "
            f"{LOCK_TIMEOUT_S:.0f} s while opening the store; if none is running, delete the lock file"
        ) from None
    except Exception as exc:
        if is_remote(resolved) and tracking_failure(exc):
            raise
        if is_store_error(exc):
            raise store_error(uri, exc, "opening the store") from None
        raise
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    if in_multirun():
        _SWEEP_CLIENTS[resolved] = client
    return client


#: The experiment tag MLflow's 3.x UI reads to choose an experiment's landing page (its JS bundle,
#: `mlflow.experimentKind`); `custom_model_development` ("Machine learning") opens on the runs
#: table, not on the GenAI traces overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client: Any, tracking: Any) -> str:
    """The id of `tracking.experiment` in the store, created when missing (a parallel creation is
    tolerated) and tagged `EXPERIMENT_KIND` (set too on an existing experiment that has no kind; a
    kind the user chose is kept). Raises `TrackingError` when the experiment is deleted (in
    MLflow's trash)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        try:
            return client.create_experiment(
                tracking.experiment,
                artifact_location=experiment_artifact_location(tracking),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException as exc:  # created meanwhile by a parallel job
            if is_remote(tracking.uri) and tracking_failure(exc):
                raise
            experiment = client.get_experiment_by_name(tracking.experiment)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.uri={tracking.uri}: experiment tracking.experiment={tracking.experiment!r} "
            f"(id {experiment.experiment_id}) is deleted: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`), remove it for good (`mlflow gc`), or "
            "choose another tracking.experiment"
        )
    if is_remote(tracking.uri) and artifact_uri(experiment.artifact_location).startswith("file:"):
        log.warning(
            "Experiment %r on %s keeps its artifacts at %s, a folder on each client's disk, not "
            "on the server: choose a new tracking.experiment to have them uploaded through it",
            tracking.experiment,
            tracking.uri,
            experiment.artifact_location,
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag, or by another tool
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def open_store(tracking: Any) -> tuple[Any, str]:
    """(MlflowClient, experiment id) for the `tracking` config: the server checked, the store
    opened (see `open_client`), the experiment found or created. Raises `TrackingError`."""
    from mlflow.exceptions import MlflowException

    remote = is_remote(tracking.uri)
    if remote:
        apply_http_settings(tracking)
    check_reachable(tracking.uri, tracking.timeout_s)
    try:
        client = open_client(tracking.uri)
        return client, experiment_id(client, tracking)
    except MlflowException as exc:
        if remote and tracking_failure(exc):
            what = f"opening experiment {tracking.experiment!r}"
            raise failure_error(tracking, exc, what) from None
        raise store_error(
            tracking.uri, exc, f"opening experiment {tracking.experiment!r}"
        ) from None
    except TrackingError:
        raise
    except Exception as exc:
        if remote and tracking_failure(exc):
            raise failure_error(tracking, exc, "opening the store") from None
        if is_store_error(exc):
            raise store_error(tracking.uri, exc, "opening the store") from None
        raise
