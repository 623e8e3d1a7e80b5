"""Stratified k-fold cross-validation of the head on the cached features (the `crossval` tool,
`pipeline/crossval.py`, documents the protocol)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import mlflow
import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from pipeline.lib.config.schema import ConfigError, solver
from pipeline.lib.data.prepared import SPLITS, open_prepared
from pipeline.lib.errors import UserError
from pipeline.lib.files import dvc_md5
from pipeline.lib.model.features import load_cached_features
from pipeline.lib.reporting.metrics import Predictions, accuracy_interval, headline_metrics
from pipeline.lib.tracking import lineage, runs
from pipeline.lib.tracking.store import open_store
from pipeline.lib.training.head import train_head

log = logging.getLogger(__name__)


class CrossvalError(UserError):
    """Cross-validation cannot run on this data (no cached features, too few images)."""


def fold_indices(labels: np.ndarray, k: int, seed: int) -> list[dict[str, np.ndarray]]:
    """k >= 3 (the schema's bound) folds of `labels` (N,): per fold {"train", "val", "test": int64
    indices}, test = fold i, val = fold i+1 (mod k), train = the rest; stratified when a class can
    be, else KFold. Raises CrossvalError: fewer images than folds."""
    if len(labels) < k:
        raise CrossvalError(
            f"{len(labels)} images cannot make {k} folds: set train.crossval_folds <= {len(labels)}"
        )
    stratifiable = np.bincount(labels).max() >= k  # else no class has k images
    splitter = (StratifiedKFold if stratifiable else KFold)(k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only n members": expected
        warnings.simplefilter("ignore", UserWarning)
        tests = [test for _, test in splitter.split(np.zeros(len(labels)), labels)]
    every = np.arange(len(labels))
    return [
        {"train": np.setdiff1d(every, np.concatenate([test, val])), "val": val, "test": test}
        for test, val in zip(tests, tests[1:] + tests[:1], strict=True)
    ]


def summarize(folds: list[dict[str, Any]], correct: int, n: int) -> dict[str, Any]:
    """The parent run's numbers: mean and std over folds of accuracy / macro F1 / ECE, and the
    pooled accuracy (`correct` of `n`) with its 95 % Wilson interval."""
    out: dict[str, Any] = {"folds": len(folds), "images": n}
    for key in ("accuracy", "macro_f1", "ece"):
        values = np.array([f[key] for f in folds], dtype=float)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1))
    out["accuracy_pooled"] = correct / n
    out["accuracy_ci_low"], out["accuracy_ci_high"] = accuracy_interval(correct, n)
    return out


def crossval(cfg: Any) -> dict[str, Any]:
    """Cross-validate, logged to MLflow; `summarize`'s dict + "per_fold" headline metrics.
    Raises CrossvalError (no cached features) or StageInputError (no usable prepared data)."""
    if solver(cfg) != "lbfgs":
        raise ConfigError(
            "pipeline.crossval fits the default head (train.solver=lbfgs) on the cached "
            "features: drop the Keras settings (train.solver=keras, augment, fine_tune)"
        )
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    features = load_cached_features(cfg, dvc_md5(cfg.paths.prepared))
    if features is None:
        raise CrossvalError(
            f"{cfg.paths.features} holds no features of {cfg.paths.prepared}: run "
            "`dvc repro featurize` (or `python -m pipeline.featurize`) first."
        )
    x = np.concatenate([features[s] for s in SPLITS]).astype(np.float32)
    y = np.concatenate([dataset.labels(s) for s in SPLITS]).astype(np.int64)
    k, c = cfg.train.crossval_folds, dataset.num_classes
    folds = fold_indices(y, k, cfg.train.seed)
    client, experiment_id = open_store(cfg.tracking)
    lineage.end_dead_runs(client, [experiment_id])  # a killed crossval's runs, ended KILLED
    tags = lineage.process_tags()
    per_fold, correct = [], 0
    parent_tags = tags | {"crossval": "parent"}
    name = f"crossval {k} folds"
    with runs.active_run(cfg.tracking, None, name, parent_tags, experiment_id) as parent:
        runs.log_config(cfg)
        for i, fold in enumerate(folds):
            absent = sorted(set(y[fold["test"]]) - set(y[fold["train"]]))
            if absent:  # a class with too few photos: this fold cannot learn it
                names = ", ".join(dataset.classes[a] for a in absent)
                log.warning("Fold %d/%d trains on no photo of %s: add photos", i + 1, k, names)
            # a head fitted as train fits it, on the fold's train and val photos
            split = {s: x[fold[s]] for s in ("train", "val")}
            labels = {s: y[fold[s]] for s in ("train", "val")}
            probs = train_head(cfg.train, split, labels, c).head.probabilities(x[fold["test"]])
            m = headline_metrics(Predictions(probs, y[fold["test"]], dataset.classes))
            m["images"] = len(fold["test"])
            correct += int(round(m["accuracy"] * m["images"]))
            per_fold.append(m)
            fold_tags = tags | {"crossval": "fold", "fold": str(i + 1)}
            fold_name = f"fold {i + 1}/{k}"
            with mlflow.start_run(None, experiment_id, fold_name, nested=True, tags=fold_tags):
                mlflow.log_metrics({f"test_{key}": float(v) for key, v in m.items()})
            log.info("Fold %d/%d: accuracy %.4f on %d images", i + 1, k, m["accuracy"], m["images"])
        summary = summarize(per_fold, correct, len(y))
        mlflow.log_metrics({f"cv_{key}": float(v) for key, v in summary.items()})
        summary["run_id"] = parent.info.run_id
    shown = "accuracy_mean accuracy_std accuracy_pooled accuracy_ci_low accuracy_ci_high ece_mean"
    log.info(
        "Cross-validation (%d folds, %d images): accuracy %.4f ± %.4f (pooled %.4f, 95%% "
        "interval [%.4f, %.4f]), ECE %.4f",
        *(k, len(y), *(summary[key] for key in shown.split())),
    )
    return {**summary, "per_fold": per_fold}
