"""Compare runs: an experiment's runs (or a sweep's children) with key params and metrics, sorted
by a metric; nothing is written to the store, a missing store is reported.

    python -m pipeline.compare --parent <sweep run id> --sort final_val_accuracy --limit 5
    python -m pipeline.compare --mcnemar RUN_A RUN_B      # do two runs really differ?
    python -m pipeline.compare --photos A B   # which photos changed (runs, revisions, experiments)
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import pandas as pd
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.store.entities.paged_list import PagedList
from mlflow.utils import get_results_from_paginated_fn
from omegaconf import OmegaConf

from pipeline.lib.config.compose import load_params
from pipeline.lib.config.schema import ConfigError, TrackingConfig, validate
from pipeline.lib.files import read_json
from pipeline.lib.reporting.metrics import significance_text
from pipeline.lib.reporting.photo_changes import (
    DEFAULT_PREDICTIONS,
    diff_predictions,
    read_at_revision,
    write_outputs,
)
from pipeline.lib.tracking import store
from pipeline.lib.tracking.lineage import TAG_PARENT
from pipeline.lib.tracking.store import TrackingError, check_reachable, resolve_uri, store_file
from pipeline.lib.tracking.sweep import tracking_config

DEFAULT_PARAMS = (
    "model.alpha",
    "model.weights",
    "train.solver",
    "train.C",
    "train.label_smoothing",
    "train.class_weight",
)
#: The metric columns, always shown (empty where a run lacks them).
METRICS = ("final_val_accuracy", "test_accuracy", "test_macro_f1")
DEFAULT_SORT = "test_accuracy"
FORMATS = ("markdown", "csv")
SHORT_ID = 8
T = TypeVar("T")
_RUN_ID = re.compile(r"[0-9A-Za-z_-]+")


class StoreError(TrackingError):
    """The tracking store, experiment, run or model asked for does not exist or cannot be read."""


#: Option -> the `tracking` key it defaults to in the project's params.yaml.
TRACKING_KEYS = {"tracking_uri": "uri", "experiment": "experiment", "model": "registered_model"}
FROM_PARAMS = "default: params.yaml's tracking.{}, as the stages resolve it"


def project_tracking() -> TrackingConfig:
    """The `tracking` node of the project's params.yaml as the stages resolve it (`auto`: named
    after the data); the schema's (toy trucks) without the file. ConfigError when invalid."""
    path = store.project_root() / "params.yaml"
    if not path.is_file():
        return tracking_config(OmegaConf.create({"tracking": {}}))
    try:
        return validate(OmegaConf.create(load_params(path)[0])).tracking
    except ConfigError as exc:
        raise ConfigError(
            f"{path}: {exc} (or pass the store, experiment, model as options)"
        ) from None


def fill_from_params(args: argparse.Namespace) -> None:
    """The options of `TRACKING_KEYS` left out (None) from `project_tracking`."""
    if missing := [o for o in TRACKING_KEYS if getattr(args, o, "") is None]:
        tracking = project_tracking()
        for option in missing:
            setattr(args, option, tracking[TRACKING_KEYS[option]])


def check_store(tracking_uri: str) -> None:
    """Fail (creating nothing) when a local store does not exist; a dead server fails in seconds."""
    check_reachable(tracking_uri, timeout_s=10.0)  # servers only
    if (database := store_file(tracking_uri)) is not None:
        if not database.is_file():
            raise StoreError(
                f"No MLflow store at {tracking_uri}: {database.resolve()} does not exist. "
                "Run the pipeline first (`dvc repro`) or point --tracking-uri at an existing store."
            )
    elif "://" not in tracking_uri or tracking_uri.startswith("file:"):
        is_file_uri = tracking_uri.startswith("file:")
        path = Path(url2pathname(urlparse(tracking_uri).path) if is_file_uri else tracking_uri)
        if not path.is_dir():
            raise StoreError(f"No MLflow store at {tracking_uri}: {path.resolve()} does not exist.")


def open_client(tracking_uri: str) -> mlflow.MlflowClient:
    """An MlflowClient on an existing store (read-only files are fine); TrackingError else."""
    check_store(resolve_uri(tracking_uri))
    return store.open_client(tracking_uri)


def experiment_id(client: mlflow.MlflowClient, experiment: str) -> str:
    """The id of experiment `experiment`; a `StoreError` listing the experiments there if none."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise StoreError(
            f"No experiment named {experiment!r} in {client.tracking_uri} (experiments there: "
            f"{names})."
        )
    return found.experiment_id


def resolve_run_id(client: mlflow.MlflowClient, experiment_ids: list[str], run_id: str) -> str:
    """A full run id from a full id or a unique prefix of one (as the table shows them)."""
    if not _RUN_ID.fullmatch(run_id):
        raise StoreError(f"Not a run id: {run_id!r}")
    try:
        return client.get_run(run_id).info.run_id
    except MlflowException:
        pass
    runs = all_pages(client.search_runs, experiment_ids=experiment_ids)
    matches = [r.info.run_id for r in runs if r.info.run_id.startswith(run_id)]
    if len(matches) != 1:
        what = "ambiguous: " + ", ".join(matches) if matches else f"not in {client.tracking_uri}"
        raise StoreError(f"Run id {run_id!r} is {what}.")
    return matches[0]


def all_pages(
    search: Callable[..., PagedList[T]], limit: int | None = None, **query: Any
) -> list[T]:
    """Every result (at most `limit`) of an MlflowClient `search_*` method, page by page."""
    return get_results_from_paginated_fn(
        lambda size, token: search(max_results=size, page_token=token, **query), 1000, limit
    )


def runs_table(
    client: mlflow.MlflowClient,
    experiment: str,
    parent: str | None = None,
    params: Sequence[str] = DEFAULT_PARAMS,
    sort: str | None = DEFAULT_SORT,
    ascending: bool = False,
    limit: int | None = None,
) -> pd.DataFrame:
    """One row per active run of `experiment` (with `parent`: its child runs; without, no
    crossval folds, parts of their crossval run), best `sort` first (missing last; ties: newest
    first), at most `limit`. Columns: run, run_id, status, the `params`, METRICS (and `sort`),
    duration_s; missing values NaN/None."""
    exp_ids = [experiment_id(client, experiment)]
    where = f"tags.`{TAG_PARENT}` = '{resolve_run_id(client, exp_ids, parent)}'" if parent else ""
    order_by = ["attributes.start_time DESC"]
    if sort:
        if "`" in sort:
            raise ValueError(f"Not a metric name: {sort!r}")
        order_by.insert(0, f"metrics.`{sort}` {'ASC' if ascending else 'DESC'}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    metrics = list(METRICS) + ([sort] if sort and sort not in METRICS else [])
    rows = []
    query = {"experiment_ids": exp_ids, "filter_string": where, "order_by": order_by}
    found = all_pages(client.search_runs, limit if parent else None, **query)
    kept = [r for r in found if parent or r.data.tags.get("crossval") != "fold"][:limit]
    for run in kept:
        info, data = run.info, run.data
        ended = info.end_time and info.start_time
        rows.append(
            [info.run_name, info.run_id, info.status]
            + [data.params.get(p) for p in params]
            + [data.metrics.get(m, math.nan) for m in metrics]
            + [(info.end_time - info.start_time) / 1000 if ended else math.nan]
        )
    df = pd.DataFrame(rows, columns=["run", "run_id", "status", *params, *metrics, "duration_s"])
    df = df.astype({m: float for m in [*metrics, "duration_s"]})
    if sort and len(df):  # stable: the store's order kept, missing values last whatever it did
        df = df.sort_values(sort, ascending=ascending, na_position="last", kind="stable")
    return df.reset_index(drop=True)


def _cell(value: object, number_format: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if number_format and isinstance(value, int | float):
        return format(value, number_format)
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """GitHub markdown (short run ids, metrics to 4 decimals) or CSV; empty where missing."""
    if fmt == "csv":
        return df.to_csv(index=False, na_rep="", lineterminator="\n")
    if fmt != "markdown":
        raise ValueError(f"Unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    shown = df.copy()
    for column in shown.columns:
        number_format = ".1f" if column == "duration_s" else ".4f"
        number_format = number_format if shown[column].dtype.kind == "f" else None
        shown[column] = [_cell(v, number_format) for v in shown[column]]
    shown["run_id"] = [v[:SHORT_ID] for v in shown["run_id"]]
    # strings as they are: tabulate would otherwise reformat numeric-looking params
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def run_predictions(client: mlflow.MlflowClient, experiment: str, given: str) -> tuple[str, str]:
    """(run id, its `DEFAULT_PREDICTIONS` text) of an id (prefix); ValueError if it has none."""
    run_id = resolve_run_id(client, [experiment_id(client, experiment)], given)
    with tempfile.TemporaryDirectory() as tmp:
        where = {"run_id": run_id, "dst_path": tmp, "tracking_uri": client.tracking_uri}
        try:
            local = download_artifacts(artifact_path=DEFAULT_PREDICTIONS, **where)
        except Exception:  # noqa: BLE001 (MLflow raises several kinds for a missing file)
            raise ValueError(f"run {run_id} has no {DEFAULT_PREDICTIONS} (evaluated?)") from None
        return run_id, Path(local).read_text(encoding="utf-8")


def predictions_at(given: str, args: argparse.Namespace) -> tuple[str, str]:
    """(name, predictions.csv text) of 'workspace', a git revision, a DVC experiment (the newest
    exp ref of that name) or an MLflow run id (prefix), tried in that order."""
    if not given.strip():
        raise ValueError(
            "an empty run reference: give 'workspace', a git revision, an experiment or a run id"
        )
    refs = ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"]
    listed = subprocess.run(refs, capture_output=True, text=True).stdout.split()
    for rev in [given, *(r for r in listed if r.rsplit("/", 1)[-1] == given)]:
        if (text := read_at_revision(".", DEFAULT_PREDICTIONS, rev)) is not None:
            return given, text
    fill_from_params(args)
    try:
        run_id, text = run_predictions(open_client(args.tracking_uri), args.experiment, given)
    except TrackingError as exc:
        raise StoreError(f"{given!r}: no git revision or DVC experiment, and {exc}") from None
    return run_id[:SHORT_ID], text


def photo_changes(args: argparse.Namespace) -> str:
    """McNemar's test on the two runs of `--mcnemar`, or `--photos` (also written as CSV + HTML)."""
    pair = [predictions_at(given, args) for given in args.photos or args.mcnemar]
    (name_a, text_a), (name_b, text_b) = pair
    diff = diff_predictions(text_a, text_b)
    result = significance_text(diff.mcnemar, name_a, name_b)
    if args.mcnemar:
        return result
    output = Path(args.output or "outputs/photo_changes.csv")  # outputs/: ignored by git
    output.parent.mkdir(parents=True, exist_ok=True)
    report = Path("data/prepared/report.json")  # its root: the data folder, where paths start
    root = args.photos_root or Path(read_json(report)["root"] if report.is_file() else ".")
    page = write_outputs(diff, output, root, (name_a, name_b))
    print(f"Wrote {output} and {page}", file=sys.stderr)
    return f"A = {name_a}, B = {name_b}: {diff.counts()}.\n{result}"


def parser() -> argparse.ArgumentParser:
    """The command-line parser of `python -m pipeline.compare`."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="An experiment's MLflow runs (or a sweep's children): key params, accuracy, "
        "macro F1 and duration, sorted by a metric.",
    )
    add, pair = p.add_argument, {"nargs": 2, "metavar": ("A", "B")}
    add("--tracking-uri", help=f"MLflow store ({FROM_PARAMS.format('uri')})")
    add("--experiment", help=f"experiment ({FROM_PARAMS.format('experiment')})")
    add("--parent", metavar="RUN_ID", help="only this sweep run's children (id prefix)")
    add("--params", default=",".join(DEFAULT_PARAMS), help="comma-separated (%(default)s)")
    add("--sort", default=DEFAULT_SORT, metavar="METRIC", help="best first by this")
    add("--ascending", action="store_true", help="smallest first (e.g. for a loss)")
    add("--limit", type=int, metavar="N", help="at most N runs")
    add("--format", choices=FORMATS, default="markdown")
    add("--output", metavar="FILE", help="write the table here instead of stdout")
    add("--mcnemar", **pair, help="instead: McNemar's exact test on two runs (as --photos)")
    add(
        "--photos",
        **pair,
        help="instead: the photos whose prediction changed from A to B (each a run id, git "
        "revision, DVC experiment or 'workspace'), as --output CSV (default outputs/photo_changes.csv) "
        "and an HTML page beside it",
    )
    add("--photos-root", type=Path, help="where the CSV's paths start (default: the data)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the runs table (or a McNemar test); exit status 0, or 2 after a one-line error."""
    args = parser().parse_args(argv)
    params = [item.strip() for item in args.params.split(",") if item.strip()]
    try:
        if args.photos or args.mcnemar:
            print(photo_changes(args))
            return 0
        fill_from_params(args)
        client = open_client(args.tracking_uri)
        df = runs_table(
            client, args.experiment, args.parent, params, args.sort, args.ascending, args.limit
        )
    except (TrackingError, ValueError, MlflowException) as exc:  # ConfigError is a ValueError
        shown = f"{args.tracking_uri}: {exc.message}" if isinstance(exc, MlflowException) else exc
        print(f"error: {shown}", file=sys.stderr)
        return 2
    if df.empty:
        scope = f"child runs of {args.parent}" if args.parent else "runs"
        print(f"No {scope} in experiment {args.experiment!r}.", file=sys.stderr)
    elif args.sort and df[args.sort].isna().all():
        print(f"note: no run has the metric {args.sort!r}; not sorted by it.", file=sys.stderr)
    text = render(df, args.format)
    if not args.output:
        sys.stdout.write(text)
        return 0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"Wrote {len(df)} runs to {args.output}", file=sys.stderr)
    return 0
