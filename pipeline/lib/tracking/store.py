"""The MLflow store: where it is (a relative SQLite file or artifact folder against `$DVC_ROOT`,
where queued and `--temp` experiments run in copies), opening it (created or migrated under a file
lock), and its failures as one-line `TrackingError`s naming `tracking.uri` and the fix. MLflow is
imported lazily (~2 s): every stage's Hydra sweep callback loads this."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig

from pipeline.lib.config.schema import TrackingConfig
from pipeline.lib.config.step import in_multirun
from pipeline.lib.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

DVC_ROOT = "DVC_ROOT"  # set by DVC for every stage command
#: Seconds to wait for another process that is creating or migrating the same SQLite store.
LOCK_TIMEOUT_S = 300.0
SQLITE = "sqlite:///"
#: The experiment tag MLflow 3's UI opens an experiment by: the runs table, not GenAI traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be used (one line: the store, the cause, what to do)."""


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def is_remote(uri: str) -> bool:
    """An MLflow tracking server (HTTP), not a local store."""
    return uri.startswith(("http://", "https://"))


def project_root() -> Path:
    """The project's main working tree: `$DVC_ROOT` under DVC, else the current directory."""
    root = os.environ.get(DVC_ROOT)
    return Path(root).resolve() if root and Path(root).is_dir() else Path.cwd().resolve()


def resolve_uri(uri: str) -> str:
    """`uri` with a relative SQLite file made absolute against `project_root()`; others as given."""
    path, sep, query = uri.removeprefix(SQLITE).partition("?")
    if not uri.startswith(SQLITE) or not path or path.startswith(("/", "file:")):
        return uri
    return uri if path == ":memory:" else f"{SQLITE}{project_root() / path}{sep}{query}"


def store_file(uri: str) -> Path | None:
    """The database file of a SQLite URI (resolved); None for other stores and :memory:."""
    resolved = resolve_uri(uri)
    path = resolved.removeprefix(SQLITE).partition("?")[0].removeprefix("file:")
    ok = resolved.startswith(SQLITE) and path and path != ":memory:"
    return Path(path) if ok else None


def _is_uri(location: str) -> bool:
    return "://" in location or location.startswith("mlflow-artifacts:")


def artifact_uri(location: str) -> str:
    """A local folder (relative to the project, see `project_root`) as a file URI; URIs pass."""
    if _is_uri(location):
        return location
    path = Path(location).expanduser()
    return (path if path.is_absolute() else project_root() / path).resolve().as_uri()


def apply_http_settings(tracking: TrackingConfig) -> dict[str, str]:
    """Bound MLflow's HTTP retries (its defaults take minutes); return the variables set."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(tracking.http_retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(int(tracking.http_backoff_factor)),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(float(tracking.timeout_s)))),
    }
    os.environ.update(settings)
    return settings


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail in seconds, before any training, when an HTTP tracking server does not answer."""
    if not is_remote(uri):
        return
    health = uri.rstrip("/") + "/health"
    try:  # an HTTP error status raises HTTPError, a URLError
        urllib.request.urlopen(health, timeout=timeout_s).close()  # noqa: S310 (config URI)
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"tracking.uri={uri}: the MLflow tracking server does not answer ({exc}). Start it "
            "(see README, 'Running at scale') or use the local store: tracking.uri=sqlite:///mlflow.db"
        ) from None


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    text = str(getattr(exc, "message", exc)).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def tracking_failure(exc: BaseException) -> bool:
    """An error of the connection to a tracking server, not of what was sent to it."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, requests.exceptions.RequestException):
        return True
    return isinstance(exc, MlflowException) and str(exc.message).startswith("API request to ")


def is_store_error(exc: BaseException, os_errors: bool = True) -> bool:
    """An error of the store itself (SQL, SQLite, MLflow; with `os_errors` its file system too)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    kinds = (MlflowException, SQLAlchemyError, sqlite3.Error) + ((OSError,) if os_errors else ())
    return isinstance(exc, kinds)


def as_tracking_error(
    tracking: TrackingConfig, exc: BaseException, what: str, os_errors: bool = False
) -> TrackingError | None:
    """`exc` as one line when it is a failure of the store while `what`; else None."""
    if is_remote(tracking.uri) and tracking_failure(exc):
        return TrackingError(
            f"tracking.uri={tracking.uri}: the MLflow tracking server failed {what} "
            f"(gave up after tracking.http_retries={tracking.http_retries} retries, "
            f"tracking.timeout_s={tracking.timeout_s} s per request): {first_line(exc)}. Check "
            "that the server is up (its /health answers), then rerun; finished runs are kept."
        )
    return store_error(tracking.uri, exc, what) if is_store_error(exc, os_errors) else None


def store_error(uri: str, exc: BaseException, what: str = "") -> TrackingError:
    """A store failure as one line: `tracking.uri` (and its file), the cause, the fix."""
    text = str(getattr(exc, "message", exc)).lower()
    file = store_file(uri)
    where = f"tracking.uri={uri}" + (f" ({file})" if file and resolve_uri(uri) != uri else "")
    doing, target = f" {what}" if what else "", file or "the store"
    if "readonly" in text or "read-only" in text or isinstance(exc, PermissionError):
        fix = f"the store is read-only{doing}: make {target} and its folder writable, or point"
        message = f"{fix} tracking.uri at another file"
    elif "malformed" in text or "not a database" in text or "no such table" in text:
        message = (
            f"not a valid MLflow database ({first_line(exc)}): restore {target} from a backup, "
            "or move it away (a new store is created), or point tracking.uri at another file"
        )
    elif "disk is full" in text or "no space left" in text:
        message = f"the disk holding {target} is full{doing}: free some space, then rerun"
    elif "database is locked" in text:
        message = f"the store stayed locked by another process{doing}: rerun when it is done"
    else:
        message = f"the MLflow store failed{doing}: {first_line(exc)}"
    return TrackingError(f"{where}: {message}")


def _store_lock(file: Path | None) -> AbstractContextManager[object]:
    """Held while a SQLite store is created or migrated; none where its folder is read-only."""
    if file is None:
        return nullcontext()
    lock_file = file.with_name(file.name + "-lock")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(file.parent, os.W_OK) and not lock_file.exists():
            return nullcontext()
    except OSError:
        return nullcontext()
    return FileLock(str(lock_file), timeout=LOCK_TIMEOUT_S)


#: What the jobs of a Hydra multirun (one process) share, by (sweep folder, *key).
_SWEEP: dict[tuple[str, ...], Any] = {}


def once_per_sweep(key: tuple[str, ...], compute: Callable[[], T]) -> T:
    """`compute()`, kept under `key` for the later jobs of this multirun; else fresh."""
    if not in_multirun():
        return compute()
    key = (str(HydraConfig.get().sweep.dir), *key)
    return _SWEEP[key] if key in _SWEEP else _SWEEP.setdefault(key, compute())


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient (tracking and registry) on `uri` resolved, the store created/migrated,
    the fluent API pointed at it; shared by a multirun's jobs. TrackingError if unusable."""
    import mlflow

    # it logs a store failure's traceback before MLflow raises it (here: one TrackingError line)
    logging.getLogger("mlflow.store.db.utils").addFilter(_below_error)
    resolved = resolve_uri(uri)
    client = once_per_sweep(("client", resolved), lambda: _opened_client(uri, resolved))
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return client


def _opened_client(uri: str, resolved: str) -> MlflowClient:
    import mlflow

    if (file := store_file(uri)) is not None and file.is_dir():  # MLflow would retry for minutes
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
            f"tracking.uri={uri}: another process has held {file}-lock for {LOCK_TIMEOUT_S:.0f} s "
            "while opening the store; if none is running, delete the lock file"
        ) from None
    except Exception as exc:
        if (is_remote(resolved) and tracking_failure(exc)) or not is_store_error(exc):
            raise
        raise store_error(uri, exc, "opening the store") from None
    return client


def experiment_id(client: MlflowClient, tracking: TrackingConfig) -> str:
    """The id of `tracking.experiment`, created when missing (even by a parallel job) and tagged
    `EXPERIMENT_KIND` unless it has a kind. TrackingError when it is deleted."""
    from mlflow.exceptions import MlflowException

    name, location = tracking.experiment, tracking.artifact_location
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if location and is_remote(tracking.uri) and not _is_uri(location):
            log.info("tracking.artifact_location=%s ignored: the server stores artifacts", location)
            location = None
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_uri(location) if location else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException as exc:  # created meanwhile by a parallel job?
            if is_remote(tracking.uri) and tracking_failure(exc):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    found = experiment.experiment_id
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.uri={tracking.uri}: experiment tracking.experiment={name!r} (id {found}) "
            f"is deleted: restore it (`mlflow experiments restore --experiment-id {found}`), "
            "remove it for good (`mlflow gc`), or choose another tracking.experiment"
        )
    where = experiment.artifact_location
    if is_remote(tracking.uri) and artifact_uri(where).startswith("file:"):
        log.warning("Experiment %r keeps its artifacts on each client's disk (%s)", name, where)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(found, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found


def open_store(tracking: TrackingConfig) -> tuple[MlflowClient, str]:
    """(client, experiment id): server checked, store opened, experiment found or created."""
    if is_remote(tracking.uri):  # before the check: it bounds that too
        apply_http_settings(tracking)
    check_reachable(tracking.uri, tracking.timeout_s)
    try:
        client, uri = open_client(tracking.uri), resolve_uri(tracking.uri)
        key = ("experiment", uri, tracking.experiment)
        return client, once_per_sweep(key, lambda: experiment_id(client, tracking))
    except Exception as exc:  # a TrackingError is no store error: raised as it is
        if error := as_tracking_error(tracking, exc, "opening the store", os_errors=True):
            raise error from None
        raise
