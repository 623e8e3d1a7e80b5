"""Classification metrics of a split's predictions (scikit-learn), and which images to show."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Predictions:
    """A model's predictions on one split.

    Attributes:
        probs: float32 (N, C) class probabilities.
        y_true: int (N,) true label indices into `classes`.
        classes: the C class names, in label-index order.
    """

    probs: np.ndarray
    y_true: np.ndarray
    classes: list[str]

    @property
    def y_pred(self) -> np.ndarray:
        """int64 (N,): the predicted label index (argmax of `probs`)."""
        if not len(self.probs):
            return np.zeros(0, dtype=np.int64)
        return self.probs.argmax(axis=1).astype(np.int64)

    @property
    def labels(self) -> list[int]:
        """0..C-1: every class, also those absent from the split."""
        return list(range(len(self.classes)))


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, weighted F1 (floats in 0..1) and per-class precision/recall/F1/support
    (dicts by class name): the `dvc metrics show` file. Classes absent from both count as 0."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "precision": {c: float(p) for c, p in zip(classes, precision, strict=True)},
        "recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "f1": {c: float(v) for c, v in zip(classes, f1, strict=True)},
        "support": {c: int(s) for c, s in zip(classes, support, strict=True)},
    }


def classification_reports(p: Predictions) -> tuple[str, dict[str, Any]]:
    """scikit-learn's classification report as text (4 digits) and as a dict."""
    from sklearn.metrics import classification_report

    kwargs = {"labels": p.labels, "target_names": p.classes, "zero_division": 0}
    text = classification_report(p.y_true, p.y_pred, digits=4, **kwargs)
    return text, classification_report(p.y_true, p.y_pred, output_dict=True, **kwargs)


def confusion(p: Predictions) -> np.ndarray:
    """int64 (C, C) confusion matrix: rows true class, columns predicted class."""
    from sklearn.metrics import confusion_matrix

    if not len(p.y_true):
        return np.zeros((len(p.classes), len(p.classes)), dtype=np.int64)
    return confusion_matrix(p.y_true, p.y_pred, labels=p.labels).astype(np.int64)


def gallery_indices(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Which `n` images the gallery shows, as sorted int64 indices: up to n/2 mistakes first,
    then a round-robin over classes so every class appears (dataset order within a class)."""
    wrong = [int(i) for i in np.flatnonzero(y_true != y_pred)]
    by_class = [list(np.flatnonzero(y_true == c)) for c in np.unique(y_true)]
    chosen = wrong[: max(n // 2, 1)] if n else []
    rounds = max((len(b) for b in by_class), default=0)
    for r in range(rounds):
        for members in by_class:
            if len(chosen) >= n:
                return np.array(sorted(chosen), dtype=np.int64)
            if r < len(members) and int(members[r]) not in chosen:
                chosen.append(int(members[r]))
    return np.array(sorted(chosen[:n]), dtype=np.int64)
