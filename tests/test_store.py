"""The MLflow store (pipeline.lib.tracking.store): one store per project wherever DVC runs a
stage, safe concurrent first use, and one-line errors for a store that cannot be used."""

from __future__ import annotations

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
