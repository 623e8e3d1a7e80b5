"""The default head's training: the L2 penalty of LogisticRegression's C=1, the refit on train +
val, the underfitting warning (pipeline.lib.training.head)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5
from pipeline.lib.training import head
from pipeline.lib.training.fit import fit
from pipeline.prepare import prepare
from tests.conftest import tiny_config


def test_l2_auto_is_logistic_regressions_default_penalty():
    assert head.l2_strength("auto", 60) == pytest.approx(1 / 120)
    assert head.l2_strength(0.0, 60) == 0.0 and head.l2_strength(0.01, 60) == 0.01


def test_best_epoch_is_the_lowest_monitored_value():
    assert head.best_epoch({"loss": [3, 2, 1, 1.5], "val_loss": [3, 1, 2, 2]}, "val_loss") == 2
    assert head.best_epoch({"loss": [3, 2]}, "val_loss") == 2


def test_underfit_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert head.warn_if_underfit({"accuracy": [0.5, 0.83]}, 18, 8)
        assert not head.warn_if_underfit({"accuracy": [1.0]}, 18, 80)
    assert "training accuracy 0.830 on 18 images after 8" in caplog.text


def test_refit_uses_train_and_val(tmp_path):
    cfg = tiny_config(
        tmp_path,
        **{"train.refit_on_train_val": "true", "train.epochs": 3, "train.calibrate": "true"},
    )
    prepare(cfg)
    featurize(cfg)
    ds = PreparedDataset(cfg.paths.prepared)
    result = fit(cfg, ds, dvc_md5(cfg.paths.prepared))
    info = result["head"]
    assert info["refit_images"] == ds.size("train") + ds.size("val") == 36
    assert info["refit_epochs"] == info["best_epoch"] <= 3
    assert info["temperature"] is not None and info["temperature"] > 0
    # the L2 factor follows the larger set: 1 / (2 * 36) on the refit's kernel
    from pipeline.lib.training.calibration import head_dense

    assert head_dense(result["model"]).kernel_regularizer.l2 == pytest.approx(1 / 72)
    assert np.isfinite(result["model"].predict(ds.images("test")[:2], verbose=0)).all()
