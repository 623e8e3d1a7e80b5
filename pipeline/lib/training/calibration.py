"""Temperature scaling (Guo et al. 2017): the T > 0 minimising the validation NLL of
softmax(z / T), z = log p (softmax is shift-invariant); only the confidence changes. Folded into
the head (W / T, b / T), so every runtime and export gives calibrated probabilities."""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

log = logging.getLogger(__name__)

LOG_T_BOUND = 5.0  # log T in [-5, 5]: T in about [0.007, 148]


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """float64 (N, C) log of `probs` (N, C), clipped at 1e-12 (a logit up to a per-row constant)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of int labels `y` (N,) under softmax(logits / T)."""
    z = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-z[np.arange(len(y)), np.asarray(y, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising `nll(logits, y, T)` (bounded Brent search over log T) of float (N, C)
    logits (or log-probabilities) and int (N,) labels, N >= 1. T < 1 sharpens."""
    result = minimize_scalar(
        lambda log_t: nll(logits, y, float(np.exp(log_t))),
        bounds=(-LOG_T_BOUND, LOG_T_BOUND),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


def calibrate(val_probs: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
    """T for a model's validation probabilities `val_probs` (N, C) and labels `y_val` (N,):
    {"temperature", "val_nll_before", "val_nll_after"} (nats per image)."""
    logits = log_probabilities(val_probs)
    # no validation mistake: the NLL falls as T -> 0, so T has no finite optimum; a T < 1 would
    # make every future mistake near-certain. Keep the model's own probabilities.
    no_mistake = bool((logits.argmax(axis=1) == np.asarray(y_val)).all())
    temperature = 1.0 if no_mistake else fit_temperature(logits, y_val)
    before, after = nll(logits, y_val), nll(logits, y_val, temperature)
    if abs(np.log(temperature)) >= LOG_T_BOUND - 1e-3:
        log.warning(
            "Temperature scaling: T = %.4g is at the edge of the range searched (log T in "
            "[-%g, %g]): the validation probabilities carry almost no information (too few "
            "images, or a head that did not train); the probabilities are not calibrated",
            *(temperature, LOG_T_BOUND, LOG_T_BOUND),
        )
    log.info(
        "Temperature scaling: T = %.4g on %d validation images (NLL %.4f -> %.4f)%s",
        *(temperature, len(y_val), before, after),
        " (no validation mistake: T is not identifiable, kept at 1)" if no_mistake else "",
    )
    return {"temperature": temperature, "val_nll_before": before, "val_nll_after": after}
