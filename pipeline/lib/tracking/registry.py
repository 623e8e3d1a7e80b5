"""Model Registry: promote the version whose run has the best metric to an alias; list versions
(evaluate registers them, `runs.register_model`).

    python -m pipeline.registry promote                       # best test_accuracy -> @champion
    python -m pipeline.registry promote --metric final_val_accuracy --alias challenger
    python -m pipeline.registry list

The model and store default to params.yaml's `tracking` (as the stages resolve it);
`mlflow.pyfunc.load_model("models:/<model>@champion")` serves the champion."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.lib.config.schema import ConfigError
from pipeline.lib.tracking.compare import (
    FORMATS,
    FROM_PARAMS,
    StoreError,
    all_pages,
    fill_from_params,
    open_client,
    render,
)
from pipeline.lib.tracking.store import TrackingError

#: Run tag of the prepared data's DVC hash: versions compete only with the same data's.
DATA_TAG = "dvc_prepared_md5"
DEFAULT_METRIC = "test_accuracy"
DEFAULT_ALIAS = "champion"


@dataclass(frozen=True)
class Candidate:
    """A registered version, the run that logged it (None when gone) and the metric compared."""

    version: ModelVersion
    run: Run | None
    metric: str

    @property
    def number(self) -> int:
        return int(self.version.version)

    @property
    def value(self) -> float | None:
        value = self.run.data.metrics.get(self.metric, math.nan) if self.run else math.nan
        return None if math.isnan(value) else float(value)

    def origin(self) -> tuple[str, str | None]:  # (experiment id, data tag) of its run
        run = self.run
        return (run.info.experiment_id, run.data.tags.get(DATA_TAG)) if run else ("", None)


def candidates(
    client: mlflow.MlflowClient, model_name: str, metric: str
) -> tuple[dict[str, str], list[Candidate]]:
    """A registered model's aliases ({alias: version}) and every version (newest first) with its
    run and the run's `metric`; StoreError naming the registered models there if none."""
    try:  # search results carry no aliases (MLflow 3.17); the registered model has them all
        aliases = client.get_registered_model(model_name).aliases
    except MlflowException:
        names = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
        raise StoreError(
            f"No registered model named {model_name!r} in {client.tracking_uri} (registered "
            f"models there: {names})."
        ) from None
    quoted = model_name.replace("'", "\\'")
    versions = all_pages(client.search_model_versions, filter_string=f"name = '{quoted}'")
    runs = {v.run_id: _run_or_none(client, v.run_id) for v in versions}
    found = [Candidate(v, runs[v.run_id], metric) for v in versions]
    return aliases, sorted(found, key=lambda c: c.number, reverse=True)


def _run_or_none(client: mlflow.MlflowClient, run_id: str | None) -> Run | None:
    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException:  # a run that no longer exists
        return None


def promote(
    client: mlflow.MlflowClient,
    model_name: str,
    metric: str = DEFAULT_METRIC,
    alias: str = DEFAULT_ALIAS,
    ascending: bool = False,
    echo: Callable[[str], None] | None = print,
    same_data: bool = True,
) -> ModelVersion:
    """Point `alias` at the READY version whose run has the best `metric` (highest, or lowest
    with `ascending`; ties: the alias' holder, else the newest) and return it. `same_data`: only
    versions of the newest one's experiment and data (`DATA_TAG`) compete. `echo` (None: silent)
    gets what was done and the alias' previous holder."""
    aliases, every = candidates(client, model_name, metric)
    ready = [c for c in every if c.version.status == "READY"]
    scored = [c for c in ready if c.value is not None]
    if not scored:
        raise StoreError(
            f"No version of {model_name!r} ({len(ready)} ready) comes from a run "
            f"with the metric {metric!r}: nothing to promote."
        )
    competing = len(scored)
    if same_data:  # newest first
        scored = [c for c in scored if c.origin() == scored[0].origin()]
    left_out = competing - len(scored)
    previous = int(aliases[alias]) if alias in aliases else None
    sign = -1 if ascending else 1
    top = max(sign * (c.value or 0.0) for c in scored)
    tied = [c for c in scored if sign * (c.value or 0.0) == top]  # newest first
    best = next((c for c in tied if c.number == previous), tied[0])  # a tie keeps the holder
    client.set_registered_model_alias(model_name, alias, best.version.version)
    promoted = client.get_model_version(model_name, best.version.version)
    if echo is None:
        return promoted
    run_name = best.run.info.run_name if best.run else None
    echo(
        f"{model_name} version {best.number} (run {best.version.run_id} {run_name!r}, "
        f"{metric}={best.value:.6g}, best of {len(scored)}{', lowest' * ascending}) is now @{alias}."
    )
    if left_out:
        echo(
            f"{left_out} version(s) with {metric} left out: another experiment or other "
            f"data ({DATA_TAG}) than the newest version (--any-data to compare them all)."
        )
    if previous is None:
        echo(f"There was no @{alias} before.")
    elif previous == best.number:
        ties = f" ({len(tied) - 1} other version(s) tie with it: kept)" if len(tied) > 1 else ""
        echo(f"It already was @{alias}{ties}.")
    else:
        holder = next(c for c in every if c.number == previous)
        shown = "not recorded" if holder.value is None else f"{holder.value:.6g}"
        echo(
            f"Previous @{alias}: version {previous} (run {holder.version.run_id}, {metric}={shown})."
        )
    return promoted


def versions_table(
    client: mlflow.MlflowClient, model_name: str, metric: str = DEFAULT_METRIC
) -> pd.DataFrame:
    """A registered model's versions (newest first): aliases, source run, its `metric` (or NaN)."""
    aliases, found = candidates(client, model_name, metric)
    rows = [
        [c.number, ",".join(sorted(a for a, v in aliases.items() if int(v) == c.number))]
        + [c.version.status]
        + [c.run.info.run_name if c.run else None, c.version.run_id]
        + [math.nan if c.value is None else c.value]
        + [pd.Timestamp(c.version.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M:%S")]
        for c in found
    ]
    columns = ["version", "aliases", "status", "run", "run_id", metric, "created"]
    return pd.DataFrame(rows, columns=columns).astype({metric: float})


def parser() -> argparse.ArgumentParser:
    """The command-line parser of `python -m pipeline.registry` (`promote`, `list`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help=f"MLflow store ({FROM_PARAMS.format('uri')})")
    common.add_argument("--model", help=f"model ({FROM_PARAMS.format('registered_model')})")
    common.add_argument("--metric", default=DEFAULT_METRIC, help="run metric (%(default)s)")
    p = argparse.ArgumentParser(
        prog="python -m pipeline.registry", description="Promote the best model version; list them."
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="{promote,list}")
    promote_cmd = commands.add_parser("promote", parents=[common], help="alias the best version")
    promote_cmd.add_argument("--alias", default=DEFAULT_ALIAS, help="alias to set (%(default)s)")
    promote_cmd.add_argument("--ascending", action="store_true", help="lowest metric is best")
    promote_cmd.add_argument("--any-data", action="store_true", help="other experiments, data too")
    list_cmd = commands.add_parser("list", parents=[common], help="versions, metric and aliases")
    list_cmd.add_argument("--format", choices=FORMATS, default="markdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Promote the best version or list them; exit status 0, or 2 after a one-line error."""
    args = parser().parse_args(argv)
    try:
        fill_from_params(args)
        if not args.model:
            raise StoreError("tracking.registered_model is null in params.yaml: pass --model")
        client = open_client(args.tracking_uri)
        if args.command == "promote":
            any_data, ascending = args.any_data, args.ascending
            promote(client, args.model, args.metric, args.alias, ascending, same_data=not any_data)
        else:
            sys.stdout.write(render(versions_table(client, args.model, args.metric), args.format))
    except (TrackingError, ConfigError, MlflowException) as exc:
        shown = f"{args.tracking_uri}: {exc.message}" if isinstance(exc, MlflowException) else exc
        print(f"error: {shown}", file=sys.stderr)
        return 2
    return 0
