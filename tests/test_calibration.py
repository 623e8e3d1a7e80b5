"""Temperature scaling: fitted on an over-confident case it lowers ECE, and folded into the Dense
layer it gives softmax(z / T) exactly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from pipeline.lib.model.classifier import Head
from pipeline.lib.reporting.metrics import expected_calibration_error
from pipeline.lib.training.calibration import (
    calibrate,
    fit_temperature,
    log_probabilities,
    nll,
)


def overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 4-class model that is right 70 % of the time but ~99 % sure."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + rng.integers(1, 4, n)) % 4)
    logits = rng.normal(0, 0.3, (n, 4))
    logits[np.arange(n), pred] += 6.0
    return logits, y


def test_temperature_lowers_ece_on_an_overconfident_model():
    logits, y = overconfident()
    before = expected_calibration_error(softmax(logits, axis=1), y)
    t = fit_temperature(logits[:1000], y[:1000])  # fitted on "validation", checked on the rest
    after = expected_calibration_error(softmax(logits[1000:] / t, axis=1), y[1000:])
    assert t > 1.5  # an over-confident model is softened
    assert before > 0.2 and after < 0.05
    assert nll(logits, y, t) < nll(logits, y)


def test_fitted_temperature_is_the_nll_minimum():
    logits, y = overconfident(500, seed=1)
    t = fit_temperature(logits, y)
    for other in (t * 0.9, t * 1.1):
        assert nll(logits, y, t) <= nll(logits, y, other)


def test_temperature_folded_into_the_head_is_exact():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 5)).astype("float32")
    head = Head(rng.normal(size=(5, 3)).astype("float32"), np.array([0.5, -1.0, 0.2], "float32"))
    z = head.logits(x)
    np.testing.assert_allclose(
        head.scaled(2.5).probabilities(x), softmax(z / 2.5, axis=1), atol=1e-6
    )


def test_calibrate_keeps_t_1_when_validation_has_no_mistake(caplog):
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    with caplog.at_level("INFO", logger="pipeline.lib.training.calibration"):
        info = calibrate(probs, np.array([0, 1]))
    assert info["temperature"] == 1.0
    assert info["val_nll_before"] == info["val_nll_after"]
    # one console line says T and why (issue 25: "T = 1" was said twice)
    (line,) = [r.getMessage() for r in caplog.records if "Temperature" in r.getMessage()]
    assert "T = 1 on 2 validation images" in line and "no validation mistake" in line


def test_calibrate_softens_an_over_confident_model():
    # confident and wrong on one of three: the NLL-optimal temperature is above 1
    probs = np.array([[0.99, 0.01], [0.02, 0.98], [0.97, 0.03]])
    info = calibrate(probs, np.array([0, 1, 1]))
    assert info["temperature"] > 1.0
    assert info["val_nll_after"] < info["val_nll_before"]


def test_log_probabilities_recover_logits_up_to_a_constant():
    z = np.array([[1.0, 2.0, 3.0]])
    assert softmax(log_probabilities(softmax(z, axis=1)) / 2, axis=1) == pytest.approx(
        softmax(z / 2, axis=1)
    )
