"""Label issues: each training and validation photo scored by a head that never saw it
(stratified k-fold on the cached features, `fit_head` at the model's C), then ranked by
cleanlab's confident learning: `get_label_quality_scores` orders every photo (lowest score: most
likely mislabelled), `find_label_issues` flags the ones it thinks are wrong."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from pipeline.lib.training.head import fit_head


@dataclass(frozen=True)
class LabelIssue:
    """One photo in the ranking (rank 1: the most likely mislabelled)."""

    rank: int
    path: str
    split: str
    given_label: str
    suggested_label: str
    score: float
    flagged: bool


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, num_classes: int, c: float, folds: int, seed: int, **fit_args
) -> np.ndarray:
    """float64 (N, num_classes): each row predicted by a head fitted on the other folds of
    features `x` (N, D), labels `y` (N,); `fit_args` as `fit_head` takes them."""
    probs = np.zeros((len(y), num_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(1):
        for fit_idx, held in splitter.split(x, y):
            fitted = fit_head(x, y[fit_idx], num_classes, c, track=False, rows=fit_idx, **fit_args)
            for rows in (held[q : q + 1024] for q in range(0, len(held), 1024)):  # bounded memory
                probs[rows] = fitted.head.probabilities(x[rows])
    return probs


def rank_label_issues(
    probs: np.ndarray, y: np.ndarray, paths: list[str], splits: list[str], classes: list[str]
) -> list[LabelIssue]:
    """Every photo, most likely mislabelled first (ties by path), from out-of-fold `probs`."""
    scores = get_label_quality_scores(y, probs)
    flagged = find_label_issues(y, probs, n_jobs=1)
    order = sorted(range(len(y)), key=lambda i: (scores[i], paths[i]))
    given, suggested = [classes[k] for k in y], [classes[k] for k in probs.argmax(axis=1)]
    score, flag = np.round(scores, 6).tolist(), np.asarray(flagged, bool).tolist()
    return [
        LabelIssue(n + 1, paths[i], splits[i], given[i], suggested[i], score[i], flag[i])
        for n, i in enumerate(order)
    ]
