"""Cross-validation on the cached features: k folds, every image tested once, one MLflow parent
run with k child runs."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from pipeline.featurize import featurize
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
    # two folds: one tests, the other validates, none is left to train on
    with pytest.raises(CrossvalError, match="nothing to train on"):
        fold_indices(y, 2, seed=0)


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
    assert result["folds"] == 3 and result["images"] == 36 and len(result["per_fold"]) == 3
    assert result["accuracy_ci_low"] <= result["accuracy_pooled"] <= result["accuracy_ci_high"]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    parent = client.get_run(result["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    assert len(children) == 3
    assert all("test_accuracy" in c.data.metrics for c in children)
    assert "cv_accuracy_mean" in parent.data.metrics
