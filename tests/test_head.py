"""The default head (pipeline.lib.training.head): the exact optimum of scikit-learn's
multinomial logistic regression objective, C chosen by cross-validation (cached), temperature
scaling and the refit on train + val; settings the solver does not read are refused."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from pipeline.lib.config.schema import ConfigError, solver, validate
from pipeline.lib.model.classifier import dot64
from pipeline.lib.training import head
from tests.conftest import compose


def blobs(n: int = 240, d: int = 64, k: int = 4, seed: int = 0, spread: float = 1.5):
    """Non-negative, overlapping class clusters (like pooled ReLU features)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(size=(k, d))
    x = np.maximum(centers[y] + spread * rng.normal(size=(n, d)), 0).astype(np.float32)
    return x, y


@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_the_fit_is_scikit_learns_optimum(c):
    x, y = blobs()
    fit = head.fit_head(x, y, 4, c, tol=1e-8, track=False)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
    assert fit.converged
    np.testing.assert_allclose(fit.head.probabilities(x), reference.predict_proba(x), atol=2e-4)


def test_class_weights_are_scikit_learns_balanced_weights():
    x, y = blobs()
    keep = (y != 0) | (np.arange(len(y)) < 20)  # class 0 rare
    x, y = x[keep], y[keep]
    fit = head.fit_head(x, y, 4, 1.0, class_weight="auto", tol=1e-8, track=False)
    reference = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=10_000)
    reference.fit(x, y)
    np.testing.assert_allclose(fit.head.probabilities(x), reference.predict_proba(x), atol=2e-4)
    plain = head.fit_head(x, y, 4, 1.0, tol=1e-8, track=False)
    assert not np.allclose(plain.head.probabilities(x), fit.head.probabilities(x), atol=1e-3)


def test_label_smoothing_is_optimal_for_its_own_objective():
    x, y = blobs()
    fit = head.fit_head(x, y, 4, 1.0, label_smoothing=0.1, tol=1e-9, track=False)
    theta = np.concatenate([fit.head.kernel.ravel(), fit.head.bias]).astype(np.float64)
    targets = head._targets(y, 4, 0.1)
    _, grad = head._objective(theta, x.astype(np.float64), None, targets, np.ones(len(y)), 1.0, {})
    assert np.abs(grad).max() < 1e-5  # a stationary point of a convex objective: the optimum
    plain = head.fit_head(x, y, 4, 1.0, tol=1e-9, track=False)
    # smoothing lowers the confidence
    assert fit.head.probabilities(x).max(1).mean() < plain.head.probabilities(x).max(1).mean()


def test_history_has_one_row_per_iteration_on_train_and_val():
    x, y = blobs()
    fit = head.fit_head(x[:200], y[:200], 4, 1.0, val=(x[200:], y[200:]))
    assert fit.history["step"] == list(range(fit.iterations + 1)) and fit.iterations > 1
    assert set(fit.history) == {"step", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert fit.history["loss"][-1] < fit.history["loss"][0]


def test_non_finite_features_are_one_clear_error():
    x, y = blobs()
    x[3, 2] = np.nan
    with pytest.raises(head.FeatureError, match="featurize"):
        head.fit_head(x, y, 4, 1.0)


def test_c_is_cross_validated_once_per_feature_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUCK_CACHE_DIR", str(tmp_path))
    x, y = blobs(spread=3.0)
    c, choice = head.choose_c(x, y, 4, seed=0)
    assert c in head.C_GRID and choice["folds"] == 5
    # the best held-out accuracy, ties broken by the lowest held-out log loss
    accuracy, loss = np.array(choice["cv_accuracy"]), np.array(choice["cv_log_loss"])
    best = accuracy == accuracy.max()
    assert c == head.C_GRID[int(np.argmin(np.where(best, loss, np.inf)))]
    cached = list((tmp_path / "head").glob("*.json"))
    assert len(cached) == 1
    # a second call reads the cache: planting another value there proves it is read
    cached[0].write_text('{"C": 123.0}')
    assert head.choose_c(x, y, 4, seed=0)[0] == 123.0
    # other features or labels: another key
    assert head.choose_c(x, (y + 1) % 4, 4, seed=0)[0] in head.C_GRID


def test_too_few_images_per_class_use_the_documented_rule():
    x, y = blobs(n=8)  # 2 per class
    c, choice = head.choose_c(x, y, 4, seed=0)
    assert c == 1.0 and "C = 1" in choice["rule"]


def test_train_head_calibrates_and_refits(caplog):
    x, y = blobs(n=400, spread=3.0)
    xs = {"train": x[:240], "val": x[240:]}
    ys = {"train": y[:240], "val": y[240:]}
    cfg = validate(compose(["train.C=1", "train.refit_on_train_val=true"]))
    trained = head.train_head(cfg.train, xs, ys, 4)
    assert trained.refit_images == 400
    assert trained.temperature > 0 and trained.val_nll_after <= trained.val_nll_before
    refit = head.fit_head(x, y, 4, 1.0, track=False).head.scaled(trained.temperature)
    np.testing.assert_allclose(trained.head.kernel, refit.kernel, atol=1e-6)


def test_underfit_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert head.warn_if_underfit(0.83, 18)
        assert not head.warn_if_underfit(1.0, 18)
    assert "0.830 of its 18 training images" in caplog.text


def test_auto_solver_is_keras_only_where_images_must_flow():
    assert solver(validate(compose([]))) == "lbfgs"
    assert solver(validate(compose(["train.augment.enabled=true"]))) == "keras"
    assert solver(validate(compose(["experiment=study"]))) == "keras"


@pytest.mark.parametrize(
    "override",
    [
        "train.epochs=5",
        "train.learning_rate=0.01",
        "model.dropout=0.2",
        "train.resume=true",
        "train.augment.rotation=0.2",  # a sub-key of an option that is off
        "train.fine_tune.epochs=2",
    ],
)
def test_a_keras_setting_is_refused_under_lbfgs(override):
    with pytest.raises(ConfigError, match=".".join(override.split("=")[0].split(".")[:2])):
        validate(compose([override]))
    validate(compose(["train.solver=keras", override]))  # it matters there


def test_lbfgs_refuses_what_needs_images_and_keras_refuses_the_refit():
    with pytest.raises(ConfigError, match="train.augment.enabled=true needs images"):
        validate(compose(["train.solver=lbfgs", "train.augment.enabled=true"]))
    with pytest.raises(ConfigError, match="refit_on_train_val"):
        validate(compose(["train.solver=keras", "train.refit_on_train_val=true"]))
    for bad in ("-1", "0", "inf", "1e30", "abc"):
        with pytest.raises(ConfigError, match="train.C"):
            validate(compose([f"train.C={bad}"]))


def test_a_fold_fitted_on_row_indices_is_the_fit_on_its_copied_rows():
    """Cross-validation folds are fitted without copying their rows (`rows=`): the same bits."""
    x, y = blobs(n=300, d=700)
    rows = np.sort(np.random.default_rng(1).choice(len(x), 211, replace=False))
    by_index = head.fit_head(x, y[rows], 4, 3.0, rows=rows)
    copied = head.fit_head(x[rows], y[rows], 4, 3.0)
    np.testing.assert_array_equal(by_index.head.kernel, copied.head.kernel)
    assert by_index.history == copied.history


def test_products_in_blocks_are_one_product():
    """`dot64` casts the float32 features block by block (memory independent of N), with the
    bits of one float64 product on one BLAS thread, for rows, columns and row subsets."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 700)).astype(np.float32)
    w, g = rng.normal(size=(700, 5)), rng.normal(size=(3000, 5))
    rows = rng.choice(3000, 2500, replace=False)
    with threadpool_limits(1):
        np.testing.assert_array_equal(dot64(x, w), x.astype(np.float64) @ w)
        np.testing.assert_array_equal(dot64(x, g, transpose=True), x.astype(np.float64).T @ g)
        np.testing.assert_array_equal(dot64(x, w, index=rows), x[rows].astype(np.float64) @ w)
        np.testing.assert_array_equal(
            dot64(x, g[rows], transpose=True, index=rows),
            x[rows].astype(np.float64).T @ g[rows],
        )
