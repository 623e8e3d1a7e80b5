"""One pipeline run is one MLflow run (pipeline.lib.tracking.runs): names, recovery when the run
is not in the store, registration at evaluate, runs of dead processes ended, resume continues
the interrupted run. In-process on tiny data with a real SQLite store, and (slow) real DVC
repositories: queued experiments and models restored from DVC's run cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.evaluate import evaluate
from pipeline.lib.tracking.runs import TrackingError, stage_run
from pipeline.train import train
from tests.conftest import ROOT, prepared_overrides, seeded_store, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return prepared_overrides(tmp_path_factory.mktemp("runs-data"))


def runs_of(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy-trucks")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_dvc_experiment_names_its_run_and_evaluate_registers_it(data, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "awing-gyms")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    cfg = tiny_config(tmp_path, **data)
    train(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    assert client.search_model_versions() == [], "train does not register: no test metrics yet"
    evaluate(cfg)
    evaluate(cfg)  # again: same run, still one version
    [run] = runs_of(cfg.tracking.uri)
    assert run.info.run_name == "awing-gyms" and run.info.status == "FINISHED"
    assert run.data.tags["dvc.exp_name"] == "awing-gyms"
    assert (
        run.data.tags["dvc.exp_baseline_rev"] == run.data.tags["git_commit"] == "0123456789abcdef"
    )
    assert {"final_val_accuracy", "test_accuracy"} <= set(run.data.metrics)
    [version] = client.search_model_versions()
    assert version.run_id == run.info.run_id


def test_repro_run_is_named_after_commit_and_config(data, tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_STAGE", "train")
    cfg = tiny_config(tmp_path, **data, **{"tracking.log_model": False})
    train(cfg)
    [run] = runs_of(cfg.tracking.uri)
    name = run.info.run_name
    assert name.startswith("repro-") and name.endswith(run.data.tags["pipeline.config_hash"])
    assert run.data.tags["git_commit"][:7] in name


def test_a_store_without_the_run_gets_one_recovered_run(data, tmp_path):
    """A clone after `dvc pull`, a moved mlflow.db: evaluate and export log into one new run,
    tagged recovered, holding train's metrics from disk; never a traceback."""
    cfg = tiny_config(tmp_path, **data, **{"train.C": 0.5})
    train(cfg)
    [trained] = runs_of(cfg.tracking.uri)
    other = seeded_store(tmp_path / "other")
    moved = tiny_config(tmp_path, **data, **{"tracking.uri": other, "train.C": 0.5})
    evaluate(moved)
    with stage_run(moved, "export") as run:
        mlflow.log_metric("export_float32_agreement", 1.0)
    [recovered] = runs_of(other)
    assert recovered.info.run_id == run.info.run_id and recovered.info.status == "FINISHED"
    assert recovered.data.tags["recovered"] == "true"
    assert trained.info.run_id in recovered.data.tags["pipeline.recovered_reason"]
    expected = {"final_val_accuracy", "test_accuracy", "export_float32_agreement"}
    assert expected <= set(recovered.data.metrics)
    assert recovered.data.params["train.C"] == "0.5"
    assert mlflow.MlflowClient(other).search_model_versions() == [], "no model in that run"


def test_models_restored_without_run_file_find_their_run_by_md5(data, tmp_path):
    cfg = tiny_config(tmp_path, **data, **{"tracking.log_model": False})
    train(cfg)
    Path(cfg.paths.run_file).unlink()  # as after DVC restored models/ from its run cache
    evaluate(cfg)
    [run] = runs_of(cfg.tracking.uri)
    assert "test_accuracy" in run.data.metrics and "recovered" not in run.data.tags


def test_a_deleted_run_is_a_one_line_error(data, tmp_path):
    cfg = tiny_config(tmp_path, **data, **{"tracking.log_model": False})
    train(cfg)
    [run] = runs_of(cfg.tracking.uri)
    mlflow.MlflowClient(cfg.tracking.uri).delete_run(run.info.run_id)
    with pytest.raises(TrackingError, match=r"is deleted: restore it") as info:
        evaluate(cfg)
    assert "\n" not in str(info.value) and "tracking.uri=" in str(info.value)
    assert mlflow.active_run() is None


def test_a_run_of_a_dead_process_is_ended_killed_by_the_next_step(data, tmp_path):
    cfg = tiny_config(tmp_path, **data, **{"tracking.log_model": False})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client = mlflow.MlflowClient(cfg.tracking.uri)
    with stage_run(cfg, "train") as first:
        pass
    orphan = client.create_run(
        first.info.experiment_id,
        tags={"pipeline.pid": str(gone.pid), "pipeline.host": os.uname().nodename},
    )
    alive = client.create_run(
        first.info.experiment_id,
        tags={"pipeline.pid": str(os.getpid()), "pipeline.host": os.uname().nodename},
    )
    with stage_run(cfg, "train"):
        pass
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "is gone" in client.get_run(orphan.info.run_id).data.tags["pipeline.ended_by"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_sigkilled_train_is_ended_and_resume_continues_its_run(data, tmp_path):
    keras = {"train.solver": "keras", "train.epochs": 400, "tracking.log_model": False}
    overrides = tiny_overrides(tmp_path, **data, **keras)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *overrides, f"hydra.run.dir={tmp_path}/hydra"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob("train-*/latest.weights.h5")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    uri = overrides[[o.split("=")[0] for o in overrides].index("tracking.uri")].split("=", 1)[1]
    [killed] = runs_of(uri)
    assert killed.info.status == "RUNNING"
    cfg = tiny_config(tmp_path, **data, **keras)
    resumed = tiny_config(tmp_path, **data, **keras, **{"train.resume": True})
    assert cfg.tracking.uri == resumed.tracking.uri == uri
    train(resumed)
    [run] = runs_of(uri)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "is gone" in run.data.tags["pipeline.ended_by"]
    assert int(run.data.tags["resumed_from_epoch"]) >= 1
    assert run.data.tags["pipeline.params_changed_on_resume"] == "train.resume"


def store_runs(repo: Path) -> list:
    return runs_of(f"sqlite:///{repo}/mlflow.db")


@pytest.mark.slow
def test_queued_experiments_log_into_the_projects_store(tmp_path):
    """`dvc exp run --queue` x3 + `dvc queue start -j 2`: the stages run in temporary copies
    under .dvc/tmp; every experiment is one FINISHED run in the project's mlflow.db, named after
    it, with train and test metrics."""
    from tests.project_repo import attempt, dvc, git_project

    repo = git_project(tmp_path / "repo", "experiment=smoke")
    for c in ("0.1", "1", "10"):
        dvc(
            repo,
            "exp",
            "run",
            "--queue",
            "-S",
            "experiment=smoke",
            "-S",
            f"train.C={c}",
        )
    dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 1500
    while True:
        status = dvc(repo, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    assert status.count("Success") == 3, status + "".join(
        attempt([sys.executable, "-m", "dvc", "queue", "logs", task], repo).stdout
        for task in failed
    )
    names = {line.split()[1] for line in status.splitlines() if "Success" in line}
    runs = store_runs(repo)
    assert {r.info.run_name for r in runs} == names and len(runs) == 3
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc.exp_name"] == run.info.run_name
        assert {"final_val_accuracy", "test_accuracy"} <= set(run.data.metrics)
    assert {r.data.params["train.C"] for r in runs} == {"0.1", "1", "10"}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_the_same_model_bytes_are_registered_once_and_described(data, tmp_path, caplog):
    """Two runs that train the same bytes (L-BFGS is deterministic): one version, said once;
    the version says which data, test accuracy with its interval, and run."""
    cfg = tiny_config(tmp_path, **data)
    train(cfg)
    evaluate(cfg)
    again = tiny_config(tmp_path, **data, **{"tracking.run_name": "again"})
    train(again)
    with caplog.at_level("INFO"):
        evaluate(again)
    client = mlflow.MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    [version] = client.search_model_versions()
    first, second = sorted(runs_of(cfg.tracking.uri), key=lambda r: r.info.start_time)
    assert version.run_id == first.info.run_id and second.info.run_name == "again"
    said = [r.getMessage() for r in caplog.records if "not registered again" in r.getMessage()]
    assert len(said) == 1 and f"version {version.version} (run {first.info.run_id})" in said[0]
    metrics = first.data.metrics
    assert version.description == (
        f"Data: synthetic toy trucks (prepared md5 {first.data.tags['dvc_prepared_md5']}). "
        f"Test accuracy {metrics['test_accuracy']:.4f} (95 % interval "
        f"{metrics['test_ci_low']:.4f}-{metrics['test_ci_high']:.4f}). "
        f"Run {first.info.run_name} ({first.info.run_id})."
    )


def test_each_job_of_a_sweep_records_its_own_git_dirtiness(tmp_path, monkeypatch):
    """A mid-sweep edit of a tracked file (conf/) shows in the later jobs' git_dirty tag."""
    from types import SimpleNamespace

    from pipeline.lib.tracking import lineage, store

    cfg = tiny_config(tmp_path)
    sweep = SimpleNamespace(sweep=SimpleNamespace(dir=str(tmp_path / "multirun")))
    monkeypatch.setattr(store, "in_multirun", lambda: True)
    monkeypatch.setattr(store.HydraConfig, "get", lambda: sweep)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    Path("config.yaml").write_text("a: 1\n")
    for args in (["init", "-q"], ["add", "config.yaml"], ["commit", "-qm", "c"]):
        subprocess.run([*git, *args], check=True)
    assert lineage.run_tags(cfg, "train")["git_dirty"] == "False"
    Path("config.yaml").write_text("a: 2\n")
    assert lineage.run_tags(cfg, "train")["git_dirty"] == "True"
