"""Hydra multirun sweeps: one MLflow parent run per sweep, one child per job, the best job tagged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT, prepared_overrides, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return prepared_overrides(tmp_path_factory.mktemp("sweep-data"))


def sweep(
    tmp: Path, data: dict, *args: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            *flags,
            "-m",
            "pipeline.train",
            "-m",
            *tiny_overrides(tmp, **data),
            "tracking.log_model=false",
            f"hydra.sweep.dir={tmp}/sweep",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def family(tmp: Path) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("toy-trucks")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every job is a child of the sweep"
    return parent, children


def check_best(parent, children) -> None:
    best = max(children, key=lambda r: r.data.metrics["final_val_accuracy"])
    assert parent.data.metrics["best_final_val_accuracy"] == best.data.metrics["final_val_accuracy"]
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    tagged = next(c for c in children if c.info.run_id == parent.data.tags["best_run_id"])
    assert tagged.data.metrics["final_val_accuracy"] == best.data.metrics["final_val_accuracy"]
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)


def test_parallel_grid_sweep_is_a_parent_with_a_child_per_job(tmp_path, data):
    """A 2 x 2 grid, two jobs at a time (joblib launcher) on one SQLite store: a parent run, a
    child per job with all its metrics (nothing lost to concurrent writes), the best job tagged;
    no learning-curve PNGs in the jobs (their curves are MLflow metric histories)."""
    proc = sweep(
        tmp_path,
        data,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "train.C=0.1,10",
        "train.label_smoothing=0,0.1",
    )
    parent, children = family(tmp_path)
    assert len(children) == 4
    combos = {(c.data.params["train.C"], c.data.params["train.label_smoothing"]) for c in children}
    assert combos == {("0.1", "0.0"), ("0.1", "0.1"), ("10", "0.0"), ("10", "0.1")}
    for child in children:  # nothing lost: every job logged all its metrics
        assert {"final_val_accuracy", "val_accuracy", "head_iterations"} <= set(child.data.metrics)
    check_best(parent, children)
    assert "Best job of 4" in proc.stdout
    for job in range(4):  # sweep outputs stay in the sweep folder; jobs train the head only
        assert (tmp_path / "sweep" / str(job) / "reports" / "train_metrics.json").is_file()
        assert not (tmp_path / "sweep" / str(job) / "models").exists()
        assert not (tmp_path / "sweep" / str(job) / "reports" / "train_figures").exists()
    assert not (tmp_path / "models").exists()


def test_optuna_search_maximises_validation_accuracy(tmp_path, data):
    sweep(
        tmp_path,
        data,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
    )
    parent, children = family(tmp_path)
    assert len(children) == 3
    assert len({c.data.params["train.C"] for c in children}) == 3  # sampled
    check_best(parent, children)
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()


def test_two_sweeps_started_together_get_their_own_folders_and_parents(tmp_path, data):
    """Two sweeps started in the same second (the default hydra.sweep.dir, which has
    microseconds): separate folders, separate parents, each child under its own parent."""
    outputs = tmp_path / "sweeps"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                "-m",
                *tiny_overrides(tmp_path, **data),
                "tracking.log_model=false",
                f"hydra.sweep.dir={outputs}/" + "${now:%H-%M-%S-%f}",
                f"train.C={rate}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rate in ("1e-3,1e-2", "1e-4,1e-1")
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    folders = sorted(outputs.iterdir())
    assert len(folders) == 2 and all((f / "mlflow_parent.json").is_file() for f in folders)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("toy-trucks").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        rates = {c.data.params["train.C"] for c in children}
        assert rates in ({"0.001", "0.01"}, {"0.0001", "0.1"})


def test_a_sweep_job_saves_and_logs_the_whole_model_only_when_asked(tmp_path, data):
    """train.save_model=auto: a sweep job fits the head, logs its curves and metrics, saves no
    model; =always: the model folder is saved."""
    proc = sweep(tmp_path, data, "train.save_model=auto,always")
    _, children = family(tmp_path)
    assert len(children) == 2
    assert all("final_val_accuracy" in c.data.metrics for c in children)
    jobs = {c.data.params["train.save_model"]: c for c in children}
    assert "train.save_model=auto: no model saved or logged" in proc.stdout + proc.stderr
    saved = {
        job: (tmp_path / "sweep" / str(job) / "models" / "head.npy").is_file() for job in (0, 1)
    }
    assert saved == {0: False, 1: True}
    finals = {k: c.data.metrics["final_val_loss"] for k, c in jobs.items()}
    assert finals["auto"] == finals["always"]  # the same head, saved or not


def test_a_head_only_sweep_never_imports_tensorflow(tmp_path, data):
    """The default sweep job fits the head on the cached features: no TensorFlow or Keras in
    the process, yet every job logs its curves and metrics."""
    proc = sweep(tmp_path, data, "train.C=0.1,10", flags=("-X", "importtime"))
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "tensorflow" not in imported and "keras" not in imported
    _, children = family(tmp_path)
    assert len(children) == 2
    assert {c.data.tags["train_solver"] for c in children} == {"lbfgs"}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) >= 1
        assert len(client.get_metric_history(child.info.run_id, "loss")) >= 1
