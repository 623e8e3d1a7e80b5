"""The MLflow store (pipeline.lib.tracking.store): one store per project wherever DVC runs a
stage, safe concurrent first use, and one-line errors for a store that cannot be used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from pipeline.lib.config.schema import TrackingConfig
from pipeline.lib.tracking import store
from pipeline.lib.tracking.store import TrackingError
from tests.conftest import ROOT, seeded_store


def tracking(uri: str, experiment: str = "toy-trucks"):
    return OmegaConf.structured(TrackingConfig(uri=uri, experiment=experiment))


def test_relative_store_resolves_against_dvc_root_not_cwd(tmp_path, monkeypatch):
    project, temp_copy = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmp1"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)  # where DVC runs a queued experiment's stages
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets: the original workspace
    assert store.resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{project}/mlflow.db"
    assert store.artifact_uri("mlartifacts") == (project / "mlartifacts").as_uri()
    client, _ = store.open_store(tracking("sqlite:///mlflow.db"))
    assert (project / "mlflow.db").is_file() and not (temp_copy / "mlflow.db").exists()
    assert client.get_experiment_by_name("toy-trucks").artifact_location.startswith(
        (project / "mlartifacts").as_uri()
    )
    # absolute stores and servers are left alone; outside DVC the current folder is the project
    assert store.resolve_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert store.resolve_uri("http://h:5000") == "http://h:5000"
    monkeypatch.delenv("DVC_ROOT")
    assert store.resolve_uri("sqlite:///m.db") == f"sqlite:///{temp_copy}/m.db"


RACE = """
import sys
from omegaconf import OmegaConf
from pipeline.lib.config.schema import TrackingConfig
from pipeline.lib.tracking.runs import active_run
import mlflow
with active_run(OmegaConf.structured(TrackingConfig(uri=sys.argv[1], experiment="toy-trucks"))):
    mlflow.log_metric("x", 1.0)
"""


def test_two_processes_on_a_fresh_store_both_finish(tmp_path):
    """MLflow migrates a new SQLite file on first use; without the lock two processes doing
    that together crash one of them (2 of 2 tries before)."""
    for attempt in range(4):
        uri = f"sqlite:///{tmp_path}/try{attempt}/mlflow.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACE, uri],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("toy-trucks").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]


def test_truncated_store_is_a_one_line_error(tmp_path):
    good = Path(seeded_store(tmp_path / "good").removeprefix("sqlite:///"))
    bad = tmp_path / "bad.db"
    bad.write_bytes(good.read_bytes()[:50_000])
    with pytest.raises(TrackingError) as info:
        store.open_store(tracking(f"sqlite:///{bad}"))
    message = str(info.value)
    assert "\n" not in message and f"tracking.uri=sqlite:///{bad}" in message
    assert "not a valid MLflow database" in message and "backup" in message


def test_read_only_store_is_a_one_line_error_and_leaves_no_run(tmp_path, monkeypatch):
    from pipeline.lib.tracking.runs import active_run

    uri = seeded_store(tmp_path)
    store.open_store(tracking(uri))  # the experiment exists
    monkeypatch.chdir(tmp_path)  # MLflow makes a folder named after such a URI's "file:" part
    db = uri.removeprefix("sqlite:///")
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"  # SQLite's read-only mode, even for root
    with pytest.raises(TrackingError, match="read-only") as info, active_run(tracking(read_only)):
        pytest.fail("no run can start in a read-only store")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"tracking.uri={read_only}")
    assert mlflow.active_run() is None
    assert mlflow.MlflowClient(uri).search_runs(["1"]) == []


def test_deleted_experiment_is_a_one_line_error(tmp_path):
    uri = seeded_store(tmp_path)
    client, experiment_id = store.open_store(tracking(uri))
    client.delete_experiment(experiment_id)
    with pytest.raises(TrackingError, match=r"toy-trucks.*is deleted: restore it") as info:
        store.open_store(tracking(uri))
    assert "\n" not in str(info.value)


def test_store_error_messages_say_what_to_do():
    uri = "sqlite:////data/mlflow.db"
    full = store.store_error(uri, OSError(28, "database or disk is full"), "logging")
    assert str(full).startswith(f"tracking.uri={uri}: the disk holding /data/mlflow.db is full")
    locked = store.store_error(uri, RuntimeError("database is locked"))
    assert "locked by another process" in str(locked)


def test_compare_on_a_truncated_store_exits_2(tmp_path, capsys):
    from pipeline.lib.tracking.compare import main

    good = Path(seeded_store(tmp_path / "good").removeprefix("sqlite:///"))
    bad = tmp_path / "bad.db"
    shutil.copyfile(good, bad)
    bad.write_bytes(bad.read_bytes()[:50_000])
    assert main(["--tracking-uri", f"sqlite:///{bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a valid MLflow database" in err


def test_a_folder_where_the_store_file_should_be_is_one_line_at_once(tmp_path):
    """`mlflow.db` is a directory: one line naming it, without MLflow's minutes of retries."""
    import time

    from pipeline.lib.tracking.store import open_client

    (tmp_path / "mlflow.db").mkdir()
    start = time.monotonic()
    with pytest.raises(TrackingError, match="is a folder, not an SQLite file"):
        open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert time.monotonic() - start < 10


# -- store failures print one line, no MLflow traceback; a run left RUNNING is ended later ---

FAILING_RUN = """
import sys
from omegaconf import OmegaConf
from sqlalchemy import event
from sqlalchemy.engine import Engine
import mlflow
from mlflow.tracking._tracking_service.utils import _get_store
from pipeline.lib.config.schema import TrackingConfig
from pipeline.lib.tracking.runs import TrackingError, active_run

uri, pragma = sys.argv[1], sys.argv[2]
failing = []

@event.listens_for(Engine, "connect")
def _fail(connection, record):  # every new connection: a full disk, or a read-only store
    if failing:
        cursor = connection.cursor()
        pages = cursor.execute("pragma page_count").fetchone()[0]
        cursor.execute(pragma.format(pages=pages))
        cursor.close()

try:
    with active_run(OmegaConf.structured(TrackingConfig(uri=uri, experiment="toy-trucks"))) as run:
        print(run.info.run_id, flush=True)
        failing.append(True)
        _get_store().engine.dispose()
        for i in range(100):
            mlflow.log_param(f"p{i}", "x" * 5000)
except TrackingError as exc:
    print(f"ERROR: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def failing_run(uri: str, pragma: str) -> tuple[str, str]:
    """(run id, stderr) of a process whose store fails in the middle of its run."""
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_RUN, uri, pragma],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stdout.strip(), proc.stderr.strip()


def test_a_full_disk_during_a_run_is_one_line_and_ends_the_run(tmp_path):
    """SQLite's own "database or disk is full" (max_page_count: the file cannot grow)."""
    uri = seeded_store(tmp_path)
    run_id, err = failing_run(uri, "pragma max_page_count = {pages}")
    assert err.splitlines() == [
        f"ERROR: tracking.uri={uri}: the disk holding {tmp_path / 'mlflow.db'} is full during run "
        f"{run_id}: free some space, then rerun"
    ]
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_a_run_that_cannot_be_ended_is_named_and_ended_by_the_next_step(tmp_path):
    """The store turns read-only mid-run: the run cannot be marked FAILED, the one line says so,
    and the next step's sweep of dead processes' runs ends it."""
    from pipeline.lib.tracking.lineage import end_dead_runs

    uri = seeded_store(tmp_path)
    run_id, err = failing_run(uri, "pragma query_only = 1")
    [line] = err.splitlines()
    assert line.startswith(f"ERROR: tracking.uri={uri}: the store is read-only during run")
    assert f"run {run_id} could not be marked FAILED" in line and "next step" in line
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    client_, experiment_id = store.open_store(tracking(uri))
    assert end_dead_runs(client_, [experiment_id]) == [run_id]
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_read_only_store_at_start_prints_one_line(tmp_path):
    uri = seeded_store(tmp_path)
    store.open_store(tracking(uri))
    read_only = f"sqlite:///file:{tmp_path / 'mlflow.db'}?mode=ro&uri=true"
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_RUN, read_only, "select 1"],
        cwd=tmp_path,  # MLflow makes a folder named after such a URI's "file:" part
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert "the store is read-only starting the run" in line


# -- compare and registry follow the project's params.yaml; the registry's rules ------------


def registered(client, experiment: str, model: str, accuracies: list[float]) -> list[str]:
    """Runs with `test_accuracy` in `experiment`, each registered as a version of `model`."""
    experiment_id = client.get_experiment_by_name(experiment)
    experiment_id = (
        experiment_id.experiment_id if experiment_id else client.create_experiment(experiment)
    )
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    run_ids = []
    for value in accuracies:
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "test_accuracy", value)
        client.set_terminated(run.info.run_id)
        client.create_model_version(model, "file:///nowhere", run.info.run_id)
        run_ids.append(run.info.run_id)
    return run_ids


def test_tools_default_to_the_projects_experiment_and_model(tmp_path, monkeypatch, capsys):
    """After `--use-folder .../my_photos`: compare lists that experiment's runs, promote moves
    `my_photos-classifier`'s @champion, never the toy trucks'."""
    from pipeline import compare, registry
    from pipeline.lib.tracking.registry import parser as registry_parser

    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = seeded_store(tmp_path)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    registered(client, "toy-trucks", "toy-truck-classifier", [0.5, 0.9])
    client.set_registered_model_alias("toy-truck-classifier", "champion", "1")
    [photo_run] = registered(client, "my_photos", "my_photos-classifier", [0.7])
    photos = tmp_path / "my_photos"
    (tmp_path / "params.yaml").write_text(f"data:\n  source: folder\n  path: {photos}\n")

    assert compare.main([]) == 0
    out = capsys.readouterr().out
    assert photo_run[:8] in out and len(out.strip().splitlines()) == 3  # header, rule, 1 run
    assert registry.main(["promote"]) == 0
    assert "my_photos-classifier version 1" in capsys.readouterr().out
    assert int(client.get_model_version_by_alias("my_photos-classifier", "champion").version) == 1
    assert int(client.get_model_version_by_alias("toy-truck-classifier", "champion").version) == 1
    assert "toy-truck" not in registry_parser().format_help()

    (tmp_path / "params.yaml").write_text(
        f"data:\n  source: folder\n  path: {photos}\ntrain:\n  C: -1\n"
    )
    assert registry.main(["list"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "params.yaml" in line and "train.C" in line


def test_promote_on_a_tie_keeps_the_champion(tmp_path):
    from pipeline.lib.tracking.registry import promote

    uri = seeded_store(tmp_path)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    registered(client, "toy-trucks", "m", [0.9, 0.8, 0.9])
    client.set_registered_model_alias("m", "champion", "1")
    lines: list[str] = []
    assert int(promote(client, "m", echo=lines.append).version) == 1
    assert lines[-1] == "It already was @champion (1 other version(s) tie with it: kept)."
    client.delete_registered_model_alias("m", "champion")
    assert int(promote(client, "m", echo=None).version) == 3  # no holder: the newest of the tie


def test_sweep_best_job_breaks_ties_on_validation_loss(tmp_path):
    from pipeline.lib.tracking.sweep import best_run

    client = mlflow.MlflowClient(seeded_store(tmp_path))
    experiment_id = client.create_experiment("sweep")
    runs = []
    for accuracy, loss in [(0.9, None), (0.9, 0.3), (0.9, 0.2), (0.8, 0.1)]:
        run_id = client.create_run(experiment_id).info.run_id
        client.log_metric(run_id, "final_val_accuracy", accuracy)
        if loss is not None:
            client.log_metric(run_id, "final_val_loss", loss)
        runs.append(client.get_run(run_id))
    assert best_run(runs, "final_val_accuracy") is runs[2]
    assert best_run(runs, "final_val_accuracy", maximize=False) is runs[3]
    assert best_run([], "final_val_accuracy") is None
