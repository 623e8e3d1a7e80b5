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
    m = classification_metrics(Predictions(np.eye(3, dtype=np.float32)[y_pred], y_true, CLASSES))
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


def test_wilson_interval_against_known_values():
    from pipeline.lib.reporting.metrics import accuracy_interval

    # Wilson score interval, z = 1.96 (e.g. Newcombe 1998, table I: 81/263 -> 0.2553, 0.3662)
    assert accuracy_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert accuracy_interval(6, 6) == pytest.approx((0.6097, 1.0), abs=1e-4)
    assert accuracy_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert accuracy_interval(0, 0) == (0.0, 1.0)


def test_ece_of_calibrated_and_overconfident_predictions():
    from pipeline.lib.reporting.metrics import expected_calibration_error

    # two images at 0.8 confidence, one right one wrong: |0.5 - 0.8| = 0.3
    probs = np.array([[0.8, 0.2], [0.8, 0.2]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.3)
    # bins of their own: 0.6 right (gap 0.4), 0.95 right (gap 0.05): mean 0.225
    probs = np.array([[0.6, 0.4], [0.05, 0.95]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.225)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_mcnemar_against_a_hand_computed_table():
    from pipeline.lib.reporting.metrics import mcnemar_exact

    # 10 images: both right 5, only A right 4, only B right 0, both wrong 1.
    a = np.array([1] * 5 + [1] * 4 + [0] + [0], dtype=bool)[:10]
    b = np.array([1] * 5 + [0] * 4 + [0], dtype=bool)
    r = mcnemar_exact(a, b)
    assert (r.only_a, r.only_b, r.n) == (4, 0, 10)
    assert r.p_value == pytest.approx(2 * 0.5**4)  # two-sided exact: 0.125
    # 12 discordant pairs split 10 / 2: p = 2 * sum_{k<=2} C(12,k) / 2^12 = 0.03857
    a = np.array([True] * 10 + [False] * 2)
    r = mcnemar_exact(a, ~a)
    assert r.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(a, a).p_value == 1.0


def test_gallery_heading_says_mistakes_are_chosen_first():
    """The case gallery-title-misleading: 12 of 153 shown, 6 of them mistakes, 95.4 %."""
    from pipeline.lib.reporting.metrics import gallery_heading, gallery_indices

    y_true = np.zeros(153, dtype=int)
    y_pred = y_true.copy()
    y_pred[10:150:20] = 1  # 7 mistakes
    shown = gallery_indices(y_true, y_pred, 12)
    assert gallery_heading(y_true, y_pred, shown) == (
        "12 of 153 test images, 6 of them mistakes (mistakes chosen first: 7 in all); "
        "test accuracy 95.4 %"
    )
    every = np.arange(4)
    assert gallery_heading(y_true[8:12], y_pred[8:12], every) == (
        "4 test images, 1 of them mistakes; test accuracy 75.0 %"
    )
