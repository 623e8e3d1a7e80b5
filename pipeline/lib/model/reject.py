"""The reject option: a photo whose energy score (logsumexp of the calibrated head's logits, Liu
et al. 2020; as good as any score measured in docs/inference.md, from the head alone) is below a
threshold gets the label `unknown`. The threshold, stored in model.json, is chosen on the
validation split for `train.reject`: `accuracy` accepts the most photos whose accuracy stays >=
`value`; `coverage` accepts the `value` fraction with the highest scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import logsumexp

from pipeline.lib.files import metric_values

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNKNOWN = "unknown"


def energy(logits: np.ndarray) -> np.ndarray:
    """float64 (N,) of (N, C) logits: higher = more like the training classes."""
    return logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


@dataclass(frozen=True)
class RejectRule:
    """Accept a photo when its energy >= `threshold`; chosen for `target` (accuracy or
    coverage) = `value`, reaching `val_accuracy` on the `val_coverage` accepted fraction."""

    target: str
    value: float
    threshold: float
    val_coverage: float
    val_accuracy: float
    score: str = "energy"

    def accepts(self, scores: np.ndarray) -> np.ndarray:
        """bool (N,) of energy scores (N,)."""
        return np.asarray(scores) >= self.threshold

    @classmethod
    def from_card(cls, data: dict | None) -> RejectRule | None:
        """The rule in model.json's `reject` (None: none). Raises ValueError: malformed."""
        if data is None:
            return None
        rule = cls(**data)
        if rule.score != "energy" or not math.isfinite(rule.threshold):
            raise ValueError(f"unknown reject rule {data}")
        return rule


def fit_rule(
    target: str, value: float, scores: np.ndarray, correct: np.ndarray
) -> RejectRule | None:
    """The rule for `target` = `value` on validation energies `scores` (N,) and bool `correct`
    (N,); None for `none` or without validation photos."""
    if target == "none" or not len(scores):
        return None
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked, right = np.asarray(scores)[order], np.asarray(correct, dtype=bool)[order]
    if target == "coverage":
        keep = max(1, math.ceil(value * len(ranked) - 1e-9))
    else:
        reached = np.flatnonzero(np.cumsum(right) / np.arange(1, len(right) + 1) >= value)
        keep = int(reached[-1]) + 1 if len(reached) else 1
    threshold = float(ranked[keep - 1])
    accepted = ranked >= threshold
    return RejectRule(
        target, float(value), threshold, float(accepted.mean()), float(right[accepted].mean())
    )


def coverage_curve(scores: np.ndarray, correct: np.ndarray, points: int = 100) -> dict:
    """Accuracy on the accepted photos against coverage, accepting by descending score, at
    `points` coverages (1/points .. 1): {"coverage", "accuracy", "threshold"} lists."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    right = np.asarray(correct, dtype=float)[order]
    if not len(right):
        return {"coverage": [], "accuracy": [], "threshold": []}
    counts = sorted({max(1, math.ceil(q * len(right) / points)) for q in range(1, points + 1)})
    cum = np.cumsum(right)
    return {
        "coverage": [round(k / len(right), 6) for k in counts],
        "accuracy": [round(float(cum[k - 1] / k), 6) for k in counts],
        "threshold": [round(float(np.asarray(scores)[order][k - 1]), 6) for k in counts],
    }


def rule_metrics(rule: RejectRule, scores: np.ndarray, correct: np.ndarray) -> dict:
    """metrics.json's `reject`: the stored rule's coverage and accuracy on the accepted photos
    of a split (accuracy None when none is accepted), `metric_values`."""
    accepted = rule.accepts(scores)
    accuracy = float(np.asarray(correct)[accepted].mean()) if accepted.any() else None
    return metric_values(asdict(rule) | {"coverage": float(accepted.mean()), "accuracy": accuracy})


def coverage_figure(curve: dict, rule_coverage: float | None) -> Figure:
    """`coverage_curve` drawn, the stored rule's coverage (if any) marked."""
    from matplotlib.figure import Figure  # not for predict or serving

    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.plot(curve["coverage"], curve["accuracy"], label="accepting by energy score")
    if rule_coverage is not None:
        ax.axvline(rule_coverage, ls="--", c="gray", label="the model's reject rule")
    ax.set(xlabel="coverage (fraction accepted)", ylabel="accuracy on accepted", title="Reject")
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig
