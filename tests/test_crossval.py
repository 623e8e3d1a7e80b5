"""Cross-validation on the cached features: k folds, every image tested once, one MLflow parent
run with k child runs."""

from __future__ import annotations

import socket
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.tracking.compare import runs_table
from pipeline.lib.tracking.lineage import TAG_HOST, TAG_PID
from pipeline.lib.training.crossval import CrossvalError, crossval, fold_indices
from pipeline.prepare import prepare
from tests.conftest import tiny_config


def test_folds_cover_every_image_once():
    y = np.repeat(np.arange(3), 6)
    folds = fold_indices(y, 3, seed=0)
    tests = np.sort(np.concatenate([f["test"] for f in folds]))
    assert tests.tolist() == list(range(18))
    for f in folds:
        parts = [set(f[s].tolist()) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert sum(map(len, parts)) == 18
    with pytest.raises(CrossvalError, match="cannot make 30 folds"):
        fold_indices(y, 30, seed=0)
    # leave-one-out: as many folds as images (no class can be stratified into 18)
    loo = fold_indices(y, 18, seed=0)
    assert sorted(int(f["test"][0]) for f in loo) == list(range(18))
    assert all(len(f["test"]) == 1 and len(f["train"]) == 16 for f in loo)


def test_two_folds_are_refused_by_the_schema():
    from pipeline.lib.config.schema import ConfigError, validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match="train.crossval_folds"):
        validate(compose(["train.crossval_folds=2"]))


def test_kfold_logs_k_children(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.crossval_folds": 3, "train.C": 1.0})
    prepare(cfg)
    featurize(cfg)
    result = crossval(cfg)
    # every photo (train + val + test, 6 classes x 8) is tested once
    assert result["folds"] == 3 and result["images"] == 48 and len(result["per_fold"]) == 3
    assert result["accuracy_ci_low"] <= result["accuracy_pooled"] <= result["accuracy_ci_high"]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    parent = client.get_run(result["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    assert len(children) == 3
    assert all("test_accuracy" in c.data.metrics for c in children)
    assert "cv_accuracy_mean" in parent.data.metrics
    # the project's experiment (not MLflow's Default), tagged with the process like every step
    assert client.get_experiment(parent.info.experiment_id).name == "toy-trucks"
    for run in [parent, *children]:
        assert run.data.tags[TAG_PID] and run.data.tags[TAG_HOST] == socket.gethostname()
    # `pipeline.compare` lists the crossval run, not its folds (--parent lists those)
    for limit in (None, 1):  # a fold would sort first: it has test_accuracy, the parent cv_*
        assert list(runs_table(client, "toy-trucks", limit=limit).run_id) == [result["run_id"]]
    assert len(runs_table(client, "toy-trucks", parent=result["run_id"])) == 3


def test_a_killed_crossvals_runs_are_ended_by_the_next(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.crossval_folds": 3, "train.C": 1.0})
    prepare(cfg)
    featurize(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment_id = client.create_experiment("toy-trucks")
    tags = {"crossval": "parent", TAG_PID: str(dead.pid), TAG_HOST: socket.gethostname()}
    orphan = client.create_run(experiment_id, tags=tags, run_name="crossval 3 folds")
    crossval(cfg)
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
