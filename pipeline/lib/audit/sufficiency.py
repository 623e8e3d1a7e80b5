"""Data sufficiency, "do I need more photos?": accuracy against training images per class. The
head (`training.head.fit_head`) is refitted on nested class-stratified subsets (1, 2, 5, 10, 20,
50, ... images per class, then all; several seeds) at the full split's C: choosing C per subset
costs 65 fits a point and fails below 3 images per class, and the penalty ||W||^2 / 2C is not
divided by the image count, so one C regularises small subsets more. Point: mean over seeds, se^2
= var(seeds) / seeds + p(1-p) / m (m evaluation images, p Agresti-Coull). 1 - accuracy (or recall)
is fitted by the power law a n^-b + c (Cortes et al. 1994, NIPS 6; Hestness et al. 2017,
arXiv:1712.00409) with `curve_fit`, weights 1 / se; 95 % intervals at 2x the largest n: delta
method (covariance times the reduced chi-square if > 1), plus the largest point's se (accuracy)."""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import curve_fit
from threadpoolctl import threadpool_limits

from pipeline.lib.errors import UserError
from pipeline.lib.files import atomic_file
from pipeline.lib.training.head import fit_head

#: A gain (accuracy, 0..1) whose 95 % interval stays below this is reported as a flat curve.
FLAT_GAIN = 0.01


def _error(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.power(n, -b) + c


def _mean_se(values: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.nanmean(values, axis=1)
    p = (mean * m + 2) / (m + 4)
    return mean, np.sqrt(np.nanvar(values, axis=1) / values.shape[1] + p * (1 - p) / (m + 4))


@dataclass(frozen=True)
class Extrapolation:
    """A fitted curve: the largest size `n`, the power law's (a, b, c), accuracy (0..1) expected
    at 2n and the gain from n to 2n, each as (expected, 95 % low, 95 % high)."""

    n: int
    params: tuple[float, float, float]
    at_double: tuple[float, float, float]
    gain: tuple[float, float, float]


def extrapolate(n: np.ndarray, acc: np.ndarray, se: np.ndarray) -> Extrapolation | None:
    """The power law fitted to mean accuracies `acc` at sizes `n` (ascending) with standard
    errors `se` (float (S,) each); None: fewer than 4 sizes, or no fit."""
    n, err = np.asarray(n, float), 1 - acc
    if len(n) < 4:
        return None
    start, bounds = (max(err[0] - err[-1], 1e-3), 0.5, err[-1] / 2), ([0, 0, 0], [2, 3, 1])
    try:
        p, cov = curve_fit(_error, n, err, start, se, absolute_sigma=True, bounds=bounds)
    except (RuntimeError, ValueError):
        return None
    cov *= max(1.0, float((((_error(n, *p) - err) / se) ** 2).sum()) / max(len(n) - 3, 1))
    x = n[-1] * np.array([1.0, 2.0])
    jac = np.stack([x ** -p[1], -p[0] * x ** -p[1] * np.log(x), np.ones(2)], 1)  # d err / d a, b, c
    err_at, g, dg = _error(x, *p), jac[1], jac[0] - jac[1]
    at, gain = 1 - err_at[1], err_at[0] - err_at[1]
    spread = 1.96 * np.sqrt([g @ cov @ g + se[-1] ** 2, dg @ cov @ dg])  # accuracy, gain
    expected = (at, max(at - spread[0], 0), min(at + spread[0], 1))
    gained = (gain, max(gain - spread[1], 0), gain + spread[1])
    return Extrapolation(int(x[0]), *(tuple(float(v) for v in t) for t in (p, expected, gained)))


def sentence(name: str, fit: Extrapolation | None) -> str:
    """The plain answer for curve `name` ('all' or a class) in accuracy points."""
    whose = "every class" if name == "all" else f"class {name}"
    if fit is None:
        return f"{whose}: too few sizes to fit a curve; add photos."
    gain, low, high = (100 * v for v in fit.gain)
    interval = f"95 % interval {low:+.1f} to {high:+.1f}"
    if fit.gain[2] < FLAT_GAIN:
        return f"{whose}: flat, 2x the photos should not add 1 point ({gain:+.1f}, {interval})."
    more = f"twice as many photos of every class ({fit.n} -> {2 * fit.n} per class)"
    what = "" if name == "all" else f"{whose}: its recall "  # class curves: all classes grew
    return f"{what}about {gain:+.1f} points ({interval}) expected from {more}."


@dataclass(frozen=True)
class SufficiencyCurve:
    """`scores` float (sizes, seeds, curves) at `sizes` images per class: curve 0 the accuracy,
    1 + k class k's recall (NaN: none in the evaluation split); `names` ('all', classes) and
    `eval_counts` per curve; `fits` (None: no fit; words: `sentence`) of the evaluated curves."""

    sizes: tuple[int, ...]
    names: tuple[str, ...]
    scores: np.ndarray
    eval_counts: np.ndarray
    fits: dict[str, Extrapolation | None]

    def write_csv(self, path: str | Path) -> None:
        """A long table for `dvc plots`: images_per_class, seed, class ('all' or a name), accuracy
        (a class's recall; 6 decimals, so the same inputs give the same bytes)."""
        with atomic_file(path, "w") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(["images_per_class", "seed", "class", "accuracy"])
            seeds, present = range(self.scores.shape[1]), np.flatnonzero(self.eval_counts)
            for (i, n), s, j in itertools.product(enumerate(self.sizes), seeds, present):
                out.writerow([n, s, self.names[j], f"{self.scores[i, s, j]:.6f}"])

    def figure(self, path: str | Path) -> None:
        """PNG at `path` (atomically): mean accuracy (95 % intervals), its fit and 2x expectation,
        class recalls in grey, log x."""
        fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
        ax, n = fig.add_subplot(ylabel="accuracy"), np.array(self.sizes, float)
        ax.plot(n, np.nanmean(self.scores[:, :, 1:], axis=1), color="0.85", lw=0.8)
        mean, se = _mean_se(self.scores[:, :, 0], int(self.eval_counts[0]))
        ax.errorbar(n, mean, 1.96 * se, fmt="o", capsize=3, label="measured (95 % interval)")
        if fit := self.fits["all"]:
            grid, (at, low, high) = np.geomspace(1, 2 * fit.n, 100), fit.at_double
            ax.plot(grid, 1 - _error(grid, *fit.params), "--", color="C1", label="power-law fit")
            bar, style = [[at - low], [high - at]], {"fmt": "s", "color": "C1", "capsize": 3}
            ax.errorbar([2 * fit.n], [at], bar, **style, label="expected at 2x")
        ax.set(xscale="log", xticks=n, xticklabels=self.sizes, xlabel="training images per class")
        ax.legend(loc="lower right")
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, format="png", facecolor="white")


def sufficiency_curve(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    n_classes: int,
    C: float,
    class_names: list[str] | tuple[str, ...],
    sizes: tuple[int, ...] | None = None,
    seeds: int = 5,
    seed: int = 0,
) -> SufficiencyCurve:
    """The curve (module docstring) of features float32 (N, D), int labels (N,) in [0, n_classes)
    of the training and evaluation splits at inverse L2 strength `C`, at `sizes` ascending images
    per class (default 1, 2, 5, ... all); draw s of `seeds` orders each class by
    `default_rng(seed + s)`. UserError: a split is empty, or x, y, names differ in size."""
    y_train, y_eval = np.asarray(y_train, np.int64), np.asarray(y_eval, np.int64)
    lengths = (len(x_train), len(x_eval), len(class_names))
    if not len(y_train) or not len(y_eval) or lengths != (len(y_train), len(y_eval), n_classes):
        raise UserError(f"sufficiency curve: a split is empty or lengths differ: {lengths}")
    counts, in_eval = (np.bincount(y, minlength=n_classes) for y in (y_train, y_eval))
    ladder = (m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e < counts.max())
    sizes = tuple(sizes or (*ladder, int(counts.max())))
    by_class = [np.flatnonzero(y_train == k) for k in range(n_classes)]
    rngs = [np.random.default_rng(seed + s) for s in range(seeds)]
    orders = [[rng.permutation(i) for i in by_class] for rng in rngs]
    scores, share = np.zeros((len(sizes), seeds, 1 + n_classes)), np.where(in_eval, in_eval, np.nan)
    with threadpool_limits(1):
        for i, n in enumerate(sizes):
            for s in range(1 if n >= counts.max() else seeds):  # all photos: one fit for every seed
                idx = np.sort(np.concatenate([order[:n] for order in orders[s]]))
                head = fit_head(x_train[idx], y_train[idx], n_classes, C, track=False).head
                hit = head.probabilities(x_eval).argmax(1) == y_eval
                scores[i, s] = [hit.mean(), *np.bincount(y_eval[hit], minlength=n_classes) / share]
            scores[i, s + 1 :] = scores[i, s]
    fits, names, eval_counts = {}, ("all", *class_names), np.array([len(y_eval), *in_eval])
    for j, top in enumerate([counts.max(), *counts]):  # a class's own count caps its sizes
        if eval_counts[j]:
            n, first = np.unique(np.minimum(sizes, top), return_index=True)
            fits[names[j]] = extrapolate(n, *_mean_se(scores[first, :, j], eval_counts[j]))
    return SufficiencyCurve(sizes, names, scores, eval_counts, fits)
