"""The default head (`train.solver=lbfgs`): scikit-learn's multinomial `LogisticRegression` (L2
on the kernel, none on the bias) with Keras' label smoothing and class weights, at its optimum:

    minimise  ( sum_i s_i CE(softmax(x_i W + b), t_i) + ||W||^2 / (2 C) ) / sum_i s_i

t_i = (1 - eps) onehot(y_i) + eps / K (`train.label_smoothing`), s_i the class weight of y_i
(`train.class_weight`), C the inverse regularisation strength (`train.C`). It is convex: scipy's
L-BFGS-B solves it with scikit-learn's `lbfgs` settings (ftol = 64 eps, maxls 50) but gtol 1e-6
(1e-4 leaves weakly penalised fits short of their optimum), BLAS on one thread (OpenBLAS' threads
made these small problems 50-100x slower on a loaded machine), the float32 features cast to
float64 in blocks (`classifier.dot64`).

`train.C=auto` (`choose_c`): stratified k-fold cross-validation on the training split over
`C_GRID`, warm-started from strong to weak regularisation; the highest held-out accuracy wins,
ties broken by the lowest held-out log loss; cached per feature set, so a sweep pays it once.
With fewer than `MIN_PER_CLASS_FOR_CV` training images in a class: C = 1 (scikit-learn's).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from threadpoolctl import threadpool_limits

from pipeline.lib.config.schema import TrainConfig
from pipeline.lib.errors import UserError
from pipeline.lib.files import cache_root, write_json
from pipeline.lib.model.classifier import Head, dot64
from pipeline.lib.training.calibration import calibrate

log = logging.getLogger(__name__)

#: The C values `train.C=auto` cross-validates (scikit-learn's grid without 1e-4 and 1e4).
C_GRID = tuple(float(c) for c in np.round(10.0 ** np.arange(-3, 3.25, 0.5), 6))
MIN_PER_CLASS_FOR_CV = 3  # training images in every class (one per fold)
CV_FOLDS = 5  # at most
UNDERFIT_TRAIN_ACCURACY = 0.9  # a head below it at its optimum gets a warning
SEARCH_VERSION = 2  # part of `choose_c`'s cache key: bump it when the objective or search change


class FeatureError(UserError):
    """The features cannot be fitted (non-finite values)."""


@dataclass
class HeadFit:
    """A fitted head; `history`: at the start (step 0) and after each iteration, the mean
    cross-entropy (nats, no penalty) and accuracy on train and val: step, loss, accuracy,
    val_loss, val_accuracy."""

    head: Head
    C: float
    iterations: int
    converged: bool
    history: dict[str, list[float]] = field(default_factory=dict)


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray | None:
    """`train.class_weight`: None for `none`; for `auto` float64 (num_classes,) of scikit-learn's
    `balanced` weights n / (k count) of the classes in `labels`, 1.0 for a class absent there."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def _targets(y: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """float64 (N, K) smoothed one-hot targets of int labels `y`."""
    t = np.full((len(y), num_classes), smoothing / num_classes)
    t[np.arange(len(y)), y] += 1.0 - smoothing
    return t


def _unpack(theta: np.ndarray, dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (D, K), bias (K,)) views of the solver's flat parameter vector."""
    return theta[: dim * num_classes].reshape(dim, num_classes), theta[dim * num_classes :]


def _objective(
    theta: np.ndarray,
    x: np.ndarray,
    rows: np.ndarray | None,
    t: np.ndarray,
    s: np.ndarray,
    c: float,
    last: dict,
) -> tuple[float, np.ndarray]:
    """(value, gradient) at `theta` on `x` (its `rows`); `last`: theta and its log-probabilities."""
    kernel, bias = _unpack(theta, x.shape[1], t.shape[1])
    log_p = log_softmax(dot64(x, kernel, index=rows) + bias, axis=1)
    last.update(theta=theta.copy(), log_p=log_p)
    total = s.sum()
    value = float(-(s[:, None] * t * log_p).sum() + 0.5 * (kernel * kernel).sum() / c) / total
    g = (np.exp(log_p) - t) * (s[:, None] / total)
    grad = np.concatenate(
        [(dot64(x, g, transpose=True, index=rows) + kernel / (c * total)).ravel(), g.sum(0)]
    )
    return value, grad


def _scores(
    head_params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    k: int,
    log_p: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) of flat parameters (or `log_p`) on `x` (its
    `rows`), labels `y`."""
    if log_p is None:
        kernel, bias = _unpack(head_params, x.shape[1], k)
        log_p = log_softmax(dot64(x, kernel, index=rows) + bias, axis=1)
    return float(-log_p[np.arange(len(y)), y].mean()), float((log_p.argmax(1) == y).mean())


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    c: float,
    *,
    class_weight: str = "none",
    label_smoothing: float = 0.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: np.ndarray | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    track: bool = True,
    rows: np.ndarray | None = None,
) -> HeadFit:
    """The optimum of the objective (module docstring) at C = `c` > 0 on features `x` float
    (N, D) (or its `rows` int (M,), not copied) and int labels `y` (N,) (or (M,)). `init`: flat
    float64 start (zeros: None); `val`: (features, labels) scored into `history` at each step;
    `track`: record `history` (a pass per step). Raises FeatureError: `x` is not finite."""
    x = np.asarray(x, dtype=np.float32 if np.asarray(x).dtype == np.float32 else np.float64)
    if not np.isfinite(x.sum(dtype=np.float64)):  # no (N, D) mask; float32 sums cannot overflow
        raise FeatureError(
            "The cached features hold NaN or infinite values: rerun the featurize stage "
            "(`dvc repro -f featurize`); if they come back, a photo or the weights file is broken."
        )
    y = np.asarray(y, dtype=np.int64)
    weights = class_weights(y, num_classes, class_weight)
    s = np.ones(len(y)) if weights is None else weights[y]
    t = _targets(y, num_classes, label_smoothing)
    theta0 = np.zeros(x.shape[1] * num_classes + num_classes) if init is None else init
    history: dict[str, list[float]] = {"step": [], "loss": [], "accuracy": []}
    last: dict[str, np.ndarray] = {}  # the objective's latest theta and log-probabilities
    if val is not None:
        history |= {"val_loss": [], "val_accuracy": []}
        xv, yv = val[0], np.asarray(val[1], np.int64)

    def record(theta: np.ndarray) -> None:
        history["step"].append(len(history["step"]))
        same = "theta" in last and np.array_equal(last["theta"], theta)
        loss, acc = _scores(theta, x, y, num_classes, last["log_p"] if same else None, rows)
        history["loss"].append(loss)
        history["accuracy"].append(acc)
        if val is not None:
            loss, acc = _scores(theta, xv, yv, num_classes)
            history["val_loss"].append(loss)
            history["val_accuracy"].append(acc)

    if track:
        record(theta0)  # step 0: the start
    result = minimize(
        _objective,
        theta0,
        args=(x, rows, t, s, c, last),
        jac=True,
        method="L-BFGS-B",
        callback=record if track else None,
        options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxls": 50},
    )
    kernel, bias = _unpack(result.x, x.shape[1], num_classes)
    head = Head(kernel.astype(np.float32), bias.astype(np.float32))
    return HeadFit(head, c, int(result.nit), bool(result.success), history)


def _cv_scores(
    x: np.ndarray, y: np.ndarray, num_classes: int, folds: int, seed: int, **fit_args: object
) -> tuple[list[float], list[float]]:
    """(held-out log loss, held-out accuracy) of each C of `C_GRID`, means over `folds`."""
    from sklearn.model_selection import StratifiedKFold  # 0.5 s to import, for a cache miss

    losses, accuracies = np.zeros(len(C_GRID)), np.zeros(len(C_GRID))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_idx, held_idx in splitter.split(x, y):
        start = None
        for i, c in enumerate(C_GRID):
            fitted = fit_head(
                x, y[fit_idx], num_classes, c, init=start, track=False, rows=fit_idx, **fit_args
            )
            start = np.concatenate([fitted.head.kernel.ravel(), fitted.head.bias]).astype(float)
            loss, accuracy = _scores(start, x, y[held_idx], num_classes, rows=held_idx)
            losses[i] += loss / folds
            accuracies[i] += accuracy * len(held_idx) / len(y)
    return losses.tolist(), accuracies.tolist()


def cache_dir() -> Path:
    return cache_root() / "head"


@threadpool_limits.wrap(limits=1)  # see the module docstring
def choose_c(
    x: np.ndarray, y: np.ndarray, num_classes: int, seed: int, **fit_args: object
) -> tuple[float, dict[str, object]]:
    """(C, how it was chosen) for `train.C=auto` (module docstring), cached in `cache_dir()`
    under the hash of the features, labels, seed and fit settings."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=num_classes)
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    if smallest < MIN_PER_CLASS_FOR_CV:
        return 1.0, {
            "rule": f"C = 1: a class has {smallest} training images (< 3 to cross-validate)"
        }
    folds = min(CV_FOLDS, smallest)
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x, dtype=np.float32))
    digest.update(np.ascontiguousarray(y, dtype=np.int64))
    settings = [SEARCH_VERSION, C_GRID, folds, seed, num_classes, sorted(fit_args.items())]
    digest.update(json.dumps(settings, default=str).encode())
    path = cache_dir() / f"{digest.hexdigest()[:32]}.json"
    try:
        found = json.loads(path.read_text())
        return float(found["C"]), found
    except (OSError, ValueError, KeyError):
        pass
    losses, accuracies = _cv_scores(np.asarray(x), y, num_classes, folds, seed, **fit_args)
    top = np.isclose(accuracies, max(accuracies), rtol=0, atol=1e-9)
    best = int(np.argmin(np.where(top, losses, np.inf)))
    choice = {
        "C": C_GRID[best],
        "folds": folds,
        "grid": list(C_GRID),
        "cv_accuracy": accuracies,
        "cv_log_loss": losses,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, choice)
    except OSError as exc:  # a read-only cache only costs time
        log.debug("C choice not cached (%s)", exc)
    return C_GRID[best], choice


def warn_if_underfit(accuracy: float, n_train: int) -> bool:
    """Warn (and return True) when the training accuracy is below `UNDERFIT_TRAIN_ACCURACY`."""
    if accuracy >= UNDERFIT_TRAIN_ACCURACY:
        return False
    log.warning(
        "The head fits only %.3f of its %d training images at its optimum: raise train.C "
        "(a weaker penalty), or look for mislabelled / look-alike classes.",
        accuracy,
        n_train,
    )
    return True


@dataclass
class TrainedHead:
    """The saved `head` (`temperature` folded in), its `fit` on train, how C was chosen, the
    validation NLL before/after calibration, the images of a refit on train + val."""

    head: Head
    fit: HeadFit
    choice: dict[str, object]
    temperature: float = 1.0
    val_nll_before: float | None = None
    val_nll_after: float | None = None
    refit_images: int | None = None


@threadpool_limits.wrap(limits=1)  # see the module docstring
def train_head(
    t: TrainConfig, x: dict[str, np.ndarray], y: dict[str, np.ndarray], num_classes: int
) -> TrainedHead:
    """The head `train.*` asks for: C (`choose_c` for auto), its optimum on `x["train"]` float
    (N, D) / `y["train"]` int (N,), temperature scaling on `val`, an optional refit on both."""
    fit_args = {"class_weight": t.class_weight, "label_smoothing": t.label_smoothing}
    if t.C == "auto":
        c, choice = choose_c(x["train"], y["train"], num_classes, t.seed, **fit_args)
        log.info("C = %g (%s)", c, choice.get("rule") or f"{choice['folds']}-fold CV log loss")
    else:
        c, choice = float(t.C), {"rule": "train.C"}
    has_val = len(y["val"]) > 0
    val = (x["val"], y["val"]) if has_val else None
    fit = fit_head(x["train"], y["train"], num_classes, c, max_iter=t.max_iter, val=val, **fit_args)
    if not fit.converged:
        log.warning("L-BFGS stopped after %d iterations (train.max_iter)", fit.iterations)
    warn_if_underfit(fit.history["accuracy"][-1], len(y["train"]))
    calibration: dict[str, float] = {}
    if t.calibrate and has_val:
        calibration = calibrate(fit.head.probabilities(x["val"]), y["val"])
    elif t.calibrate:
        log.warning("train.calibrate: no validation split, so no temperature scaling (T = 1)")
    result = TrainedHead(fit.head, fit, choice, **calibration)
    if t.refit_on_train_val and has_val:
        xy = np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]])
        refit = fit_head(*xy, num_classes, c, max_iter=t.max_iter, track=False, **fit_args)
        result.head, result.refit_images = refit.head, len(xy[1])
        log.info("Refit on train + val: %d images at C = %g", len(xy[1]), c)
    elif t.refit_on_train_val:
        log.warning("train.refit_on_train_val: no validation split, nothing to add")
    result.head = result.head.scaled(result.temperature)
    return result
