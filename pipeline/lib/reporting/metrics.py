"""Classification metrics of a split's predictions (scikit-learn), and which images to show."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ECE_BINS = 15  # of the expected calibration error: equal width over [0, 1] (Guo et al. 2017)


@dataclass(frozen=True)
class Predictions:
    """One split's predictions: `probs` float32 (N, C), `y_true` int (N,) label indices, and the
    C class names in label-index order."""

    probs: np.ndarray
    y_true: np.ndarray
    classes: list[str]

    @property
    def y_pred(self) -> np.ndarray:
        """int64 (N,): argmax of `probs`."""
        return self.probs.argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width confidence bin over [0, 1]: `count` int, mean `confidence` and `accuracy`
    float64 (NaN when empty), all (bins,)."""

    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on `n` paired images: `only_a` right in A only, `only_b` in B only,
    two-sided exact binomial `p_value` of only_a of only_a + only_b at 1/2."""

    n: int
    only_a: int
    only_b: int
    p_value: float


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray) -> float:
    """ECE (Guo et al. 2017) of `probs` (N, C): |accuracy - mean confidence| per equal-width
    confidence bin, weighted by the bin's share of the images; 0 = calibrated, 0.0 for N = 0."""
    r = reliability_bins(probs, y_true)
    return float(np.nansum(r.count * np.abs(r.accuracy - r.confidence)) / max(r.count.sum(), 1))


def reliability_bins(probs: np.ndarray, y_true: np.ndarray) -> ReliabilityBins:
    """The bins of `expected_calibration_error`, for a reliability diagram: bin b holds the top-1
    confidences in (b/ECE_BINS, (b+1)/ECE_BINS], a confidence of 0 goes to bin 0."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1, initial=0.0)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    index = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    count = np.bincount(index, minlength=ECE_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, weights=confidence, minlength=ECE_BINS) / count
        acc = np.bincount(index, weights=correct.astype(float), minlength=ECE_BINS) / count
    return ReliabilityBins(count, conf, acc)


def accuracy_interval(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval (no continuity correction) of `correct` out of `n`; (0, 1) for n=0."""
    from scipy.stats import binomtest

    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's exact test of two classifiers on the same images (`correct_*` bool (N,), paired);
    p = 1.0 without discordant pairs. Raises ValueError when the lengths differ."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions differ in length: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return McNemar(int(len(a)), only_a, only_b, p)


def headline_metrics(p: Predictions) -> dict[str, float]:
    """A split's `metrics.json` section (kept to what `dvc metrics show` fits in 120 columns):
    accuracy, its 95 % Wilson interval `ci_low`/`ci_high`, `macro_f1`, `ece`."""
    m = classification_metrics(p)
    low, high = accuracy_interval(int(np.sum(p.y_true == p.y_pred)), len(p.y_true))
    ece = expected_calibration_error(p.probs, p.y_true)
    return dict(accuracy=m["accuracy"], ci_low=low, ci_high=high, macro_f1=m["macro_f1"], ece=ece)


def classification_metrics(p: Predictions) -> dict[str, Any]:
    """`accuracy`, `macro_f1`, `weighted_f1` (floats) and `precision`, `recall`, `f1`, `support`
    ({class name: value}); a class absent from both counts as 0."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    y_true, y_pred, classes = p.y_true, p.y_pred, p.classes
    kwargs = {"labels": list(range(len(classes))), "zero_division": 0}
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, **kwargs)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", **kwargs)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", **kwargs)),
        "precision": dict(zip(classes, map(float, precision), strict=True)),
        "recall": dict(zip(classes, map(float, recall), strict=True)),
        "f1": dict(zip(classes, map(float, f1), strict=True)),
        "support": dict(zip(classes, map(int, support), strict=True)),
    }


def classification_reports(p: Predictions) -> tuple[str, dict[str, Any]]:
    """scikit-learn's classification report as text (4 digits) and as a dict."""
    from sklearn.metrics import classification_report

    kwargs = {"labels": range(len(p.classes)), "target_names": p.classes, "zero_division": 0}
    text = classification_report(p.y_true, p.y_pred, digits=4, **kwargs)
    return text, classification_report(p.y_true, p.y_pred, output_dict=True, **kwargs)


def confusion(p: Predictions) -> np.ndarray:
    """int64 (C, C) confusion matrix: rows true class, columns predicted class."""
    n = len(p.classes)
    cells = n * np.asarray(p.y_true, dtype=np.int64) + p.y_pred
    return np.bincount(cells, minlength=n * n).reshape(n, n).astype(np.int64)


def gallery_indices(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """The `n` images the gallery shows, sorted int64 indices: up to n/2 mistakes, then a
    round-robin over classes so every class appears (dataset order within a class)."""
    wrong = np.flatnonzero(y_true != y_pred)[: max(n // 2, 1) if n else 0]
    rank = np.zeros(len(y_true), dtype=np.int64)  # each image's place within its class
    for c in np.unique(y_true):
        rank[y_true == c] = np.arange(np.sum(y_true == c))
    rest = [i for i in np.lexsort((y_true, rank)) if i not in wrong]
    return np.sort(np.concatenate([wrong, rest])[:n]).astype(np.int64)


def gallery_heading(y_true: np.ndarray, y_pred: np.ndarray, shown: np.ndarray) -> str:
    """The gallery's title: how many of the split's images it shows and how many of them are
    mistakes (`gallery_indices` takes mistakes first, so not an accuracy), then the accuracy."""
    wrong = np.asarray(y_true) != np.asarray(y_pred)
    n, total = len(shown), len(wrong)
    of = f"{n} of {total} test images" if n < total else f"{n} test images"
    first = f" (mistakes chosen first: {int(wrong.sum())} in all)" if n < total else ""
    accuracy = f"{1 - wrong.mean():.1%}".replace("%", " %") if total else "n/a"
    return f"{of}, {int(wrong[shown].sum())} of them mistakes{first}; test accuracy {accuracy}"


def significance_text(result: McNemar, a: str = "base", b: str = "head") -> str:
    """One sentence on `result`: discordant counts, p, significant at the 5 % level or not."""
    if not result.n:
        return "No test images in common: the two runs cannot be compared image by image."
    verdict = "differ significantly" if result.p_value < 0.05 else "do not differ significantly"
    return (
        f"McNemar's exact test on {result.n} paired test images: {result.only_a} right only "
        f"in {a}, {result.only_b} right only in {b}, p = {result.p_value:.3g}: the "
        f"accuracies {verdict} (5 % level)."
    )
