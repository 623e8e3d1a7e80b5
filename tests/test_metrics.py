"""pipeline.lib.reporting.metrics: the numbers evaluate reports, and which images it shows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.lib.reporting.metrics import (
    Predictions,
    classification_metrics,
    classification_reports,
    confusion,
    gallery_indices,
)

CLASSES = ["a", "b", "c"]


def test_gallery_shows_mistakes_first_and_every_class():
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 2, 1, 2, 2, 2])
    chosen = gallery_indices(y_true, y_pred, 4)
    assert 4 in chosen  # the mistake
    assert set(y_true[chosen]) == {0, 1, 2}
    assert len(gallery_indices(y_true, y_pred, 100)) == 9


def test_metrics_count_absent_classes_as_zero():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 0.0})
    assert m["recall"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.0})
    assert m["support"] == {"a": 2, "b": 2, "c": 0}
    # macro over all three classes, the absent one included
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)


def test_predictions_confusion_and_reports():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    p = Predictions(probs.astype(np.float32), np.array([0, 1, 2, 2]), CLASSES)
    assert list(p.y_pred) == [0, 1, 2, 0]
    assert confusion(p).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    text, as_dict = classification_reports(p)
    assert "macro avg" in text and "0.5000" in text  # 4 digits: recall of c
    assert as_dict["c"]["recall"] == pytest.approx(0.5) and as_dict["c"]["support"] == 2


def test_empty_predictions_have_empty_labels():
    p = Predictions(np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.int64), CLASSES)
    assert p.y_pred.shape == (0,) and p.y_pred.dtype == np.int64
    assert confusion(p).tolist() == [[0, 0, 0]] * 3
