"""Model Registry: promote the best registered version (by a metric of the run that logged it) to
an alias, and list the versions.

    python -m pipeline.registry promote                       # best test_accuracy -> @champion
    python -m pipeline.registry promote --metric final_val_accuracy --alias challenger
    python -m pipeline.registry list

Then `mlflow.pyfunc.load_model("models:/toy-truck-classifier@champion")` serves the champion.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.lib.config.schema import DEFAULT_REGISTERED_MODEL as DEFAULT_MODEL
from pipeline.lib.tracking.compare import DEFAULT_URI, FORMATS, StoreError, open_client, render

#: Run tag naming the prepared data a run trained on (its DVC hash): versions compete only with
#: versions trained on the same data, in the same experiment.
DATA_TAG = "dvc_prepared_md5"
DEFAULT_METRIC = "test_accuracy"
DEFAULT_ALIAS = "champion"
_PAGE = 1000


def _check_name(client: Any, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise StoreError(
            f"No registered model named {model_name!r} in {client.tracking_uri} "
            f"(registered models there: {', '.join(names) or 'none'})."
        ) from None


def model_versions(client: Any, model_name: str) -> list[Any]:
    """Every version of a registered model, newest first."""
    name = model_name.replace("'", "\\'")
    versions: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=_PAGE, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def version_runs(client: Any, versions: list[Any]) -> dict[str, Any]:
    """Each version's source run (by run id); runs that no longer exist are left out."""
    from mlflow.exceptions import MlflowException

    runs: dict[str, Any] = {}
    for version in versions:
        if version.run_id and version.run_id not in runs:
            try:
                runs[version.run_id] = client.get_run(version.run_id)
            except MlflowException:
                continue
    return runs


def _metric(run: Any, metric: str) -> float | None:
    value = run.data.metrics.get(metric) if run is not None else None
    return None if value is None or math.isnan(value) else float(value)


def _alias_version(client: Any, model_name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def promote(
    client: Any,
    model_name: str,
    metric: str = DEFAULT_METRIC,
    alias: str = DEFAULT_ALIAS,
    ascending: bool = False,
    echo: Callable[[str], None] | None = print,
    same_data: bool = True,
) -> Any:
    """Point `alias` at the version whose source run has the best `metric` (highest; with
    `ascending` lowest; ties: the newest version) and return that ModelVersion. Only READY
    versions whose run still exists and has the metric compete and, with `same_data`, only those
    whose run is in the experiment of the newest such version and trained on the same data (tag
    `dvc_prepared_md5`): like with like. `echo` (None: silent) gets what was done, with the
    previous holder of the alias."""
    _check_name(client, model_name)
    versions = [v for v in model_versions(client, model_name) if v.status == "READY"]
    runs = version_runs(client, versions)
    scored = [
        (value, v) for v in versions if (value := _metric(runs.get(v.run_id), metric)) is not None
    ]
    if not scored:
        raise StoreError(
            f"No version of {model_name!r} ({len(versions)} ready) comes from a run "
            f"with the metric {metric!r}: nothing to promote."
        )
    scored, left_out = like_with_like(scored, runs) if same_data else (scored, 0)
    value, best = max(scored, key=lambda sv: (-sv[0] if ascending else sv[0], int(sv[1].version)))
    previous = _alias_version(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, best.version)
    promoted = client.get_model_version(model_name, best.version)
    if echo is not None:
        run_name = runs[best.run_id].info.run_name
        echo(
            f"{model_name} version {best.version} (run {best.run_id} {run_name!r}, "
            f"{metric}={value:.6g}, best of {len(scored)}"
            f"{', lowest' if ascending else ''}) is now @{alias}."
        )
        if left_out:
            echo(
                f"{left_out} version(s) with {metric} left out: another experiment or other "
                f"data ({DATA_TAG}) than the newest version (--any-data to compare them all)."
            )
        if previous is None:
            echo(f"There was no @{alias} before.")
        elif previous.version == best.version:
            echo(f"It already was @{alias}: unchanged.")
        else:
            before = _metric(runs.get(previous.run_id), metric)
            shown = "not recorded" if before is None else f"{before:.6g}"
            echo(
                f"Previous @{alias}: version {previous.version} (run {previous.run_id}, "
                f"{metric}={shown})."
            )
    return promoted


def like_with_like(
    scored: list[tuple[float, Any]], runs: dict[str, Any]
) -> tuple[list[tuple[float, Any]], int]:
    """The (metric, version) pairs whose run shares the experiment and the data tag of the newest
    version's run, and how many others were left out."""
    newest = max(scored, key=lambda sv: int(sv[1].version))[1]

    def key(version: Any) -> tuple[str, str | None]:
        """(experiment id, data tag) of the run that produced `version`."""
        run = runs[version.run_id]
        return run.info.experiment_id, run.data.tags.get(DATA_TAG)

    same = [sv for sv in scored if key(sv[1]) == key(newest)]
    return same, len(scored) - len(same)


def versions_table(client: Any, model_name: str, metric: str = DEFAULT_METRIC) -> Any:
    """The versions of a registered model (newest first) with their aliases, their source run and
    its `metric` (NaN where missing)."""
    import pandas as pd

    _check_name(client, model_name)
    versions = model_versions(client, model_name)
    runs = version_runs(client, versions)
    # search results carry no aliases (MLflow 3.17); the registered model has them all
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(model_name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        run = runs.get(v.run_id)
        value = _metric(run, metric)
        rows.append(
            {
                "version": int(v.version),
                "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                "status": v.status,
                "run": run.info.run_name if run else None,
                "run_id": v.run_id,
                metric: math.nan if value is None else value,
                "created": pd.Timestamp(v.creation_timestamp, unit="ms").strftime(
                    "%Y-%m-%d %H:%M:%S"
                ),
            }
        )
    columns = ["version", "aliases", "status", "run", "run_id", metric, "created"]
    df = pd.DataFrame(rows, columns=columns)
    df[metric] = df[metric].astype(float)
    return df


def parser() -> argparse.ArgumentParser:
    """The command-line parser of `python -m pipeline.registry` (`promote`, `list`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default=DEFAULT_URI,
        help=f"MLflow store, also the registry (default {DEFAULT_URI})",
    )
    common.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"registered model name (default {DEFAULT_MODEL})"
    )
    common.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help=f"run metric to rank versions by (default {DEFAULT_METRIC})",
    )

    p = argparse.ArgumentParser(
        prog="python -m pipeline.registry",
        description="Promote the best registered model version; list them.",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="{promote,list}")
    promote_cmd = commands.add_parser(
        "promote",
        parents=[common],
        help="set an alias on the version whose run has the best metric",
        description="Set an alias (default champion) on the version whose source run has the "
        "best metric (highest; ties: newest version).",
    )
    promote_cmd.add_argument(
        "--alias", default=DEFAULT_ALIAS, help=f"alias to set (default {DEFAULT_ALIAS})"
    )
    promote_cmd.add_argument(
        "--ascending", action="store_true", help="lowest metric is best (e.g. a loss)"
    )
    promote_cmd.add_argument(
        "--any-data",
        action="store_true",
        help="compare versions across experiments and data (default: only those trained on "
        "the data of the newest version, in its experiment)",
    )
    list_cmd = commands.add_parser(
        "list", parents=[common], help="versions with their metric and aliases"
    )
    list_cmd.add_argument("--format", choices=FORMATS, default="markdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: promote the best version or list the versions; return the exit status (0, or
    2 after a store or MLflow error, printed as one line).
    """
    args = parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        client = open_client(args.tracking_uri)
        if args.command == "promote":
            promote(
                client,
                args.model,
                metric=args.metric,
                alias=args.alias,
                ascending=args.ascending,
                same_data=not args.any_data,
            )
        else:
            df = versions_table(client, args.model, metric=args.metric)
            sys.stdout.write(render(df, args.format))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: {args.tracking_uri}: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
