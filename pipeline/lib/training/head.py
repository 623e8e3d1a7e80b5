"""What makes the default head converge and tell the truth: its L2 penalty, the epoch early
stopping chose, an optional refit on train + val, temperature scaling and the warnings of a head
that did not fit its own training images.

The L2 penalty: scikit-learn's LogisticRegression minimises sum_i CE_i + ||W||^2 / (2 C); Keras
adds a regulariser's value to the batch *mean* loss, so the same objective per example is
mean CE + l2 ||W||^2 with l2 = 1 / (2 C n_train). `train.l2: auto` uses C = 1, scikit-learn's
default (no tuning on any one dataset): the penalty shrinks as the training set grows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: A head whose final training accuracy is below this gets a warning (it has not fit its data).
UNDERFIT_TRAIN_ACCURACY = 0.9


@dataclass
class TrainingRecord:
    """What a head's training phases ran, whatever ran them (Keras: `fit.PhaseRunner`, NumPy:
    `numpy_head.NumpyPhaseRunner`), and what `finish` reads: the config, the one-hot `targets`
    {"train", "val": (N, C)}, the class weights, one continuous per-epoch `history`
    ({"epoch": [1-based], metric: [...]}), per-batch `batches`, `phases` (per phase: mode,
    trainable_params, learning_rate, first_epoch, last_epoch), the epochs at which early stopping
    ended a phase (`stopped`) and `finish`'s result (`head_info`)."""

    cfg: Any
    targets: dict[str, np.ndarray]
    class_weight: dict[int, float] | None
    history: dict[str, list[float]] = field(default_factory=lambda: {"epoch": []})
    batches: dict[str, list[float]] = field(
        default_factory=lambda: {"step": [], "epoch": [], "loss": [], "accuracy": []}
    )
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: list[int] = field(default_factory=list)
    head_info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_val(self) -> bool:
        """Whether there is a validation split."""
        return len(self.targets["val"]) > 0

    @property
    def monitor(self) -> str:
        """What early stopping and ReduceLROnPlateau watch: val_loss, else loss."""
        return "val_loss" if self.has_val else "loss"


def l2_strength(setting: Any, n_train: int) -> float:
    """`train.l2` as the Keras L2 factor: `auto` -> 1 / (2 n_train) (LogisticRegression's C=1,
    per example), a number -> itself, 0 -> no penalty."""
    if setting == "auto":
        return 1.0 / (2.0 * max(int(n_train), 1))
    return float(setting)


def set_kernel_l2(head: Any, factor: float) -> None:
    """Put an L2 penalty of `factor` (0 = none) on the kernel of `head`'s last Dense layer. The
    regulariser is set on the built variable (Keras sums `variable.regularizer` of trainable
    weights into the loss) and on the layer (so it is part of the saved config)."""
    import keras

    from pipeline.lib.training.calibration import head_dense

    dense = head_dense(head)
    reg = keras.regularizers.L2(factor) if factor > 0 else None
    dense.kernel_regularizer = reg
    dense.kernel.regularizer = reg


def best_epoch(history: dict[str, list[float]], monitor: str) -> int:
    """The 1-based epoch with the lowest `monitor` in `history` (what early stopping restored);
    the last epoch when `monitor` is missing."""
    values = history.get(monitor) or []
    if not values:
        return len(history.get("loss", [])) or 1
    return int(np.argmin(values)) + 1


def warn_if_underfit(history: dict[str, list[float]], n_train: int, steps: int) -> bool:
    """Warn (and return True) when the final training accuracy is below
    `UNDERFIT_TRAIN_ACCURACY`: the head has not fit its own training images (too few optimiser
    steps, too strong a penalty, or classes the features cannot separate)."""
    accuracy = (history.get("accuracy") or [None])[-1]
    if accuracy is None or accuracy >= UNDERFIT_TRAIN_ACCURACY:
        return False
    log.warning(
        "The head ends at training accuracy %.3f on %d images after %d optimiser steps: it has "
        "not fit its own training data. Train longer (train.epochs, early stopping's patience), "
        "lower train.l2, or look for mislabelled / look-alike classes.",
        accuracy,
        n_train,
        steps,
    )
    return True


def refit_on_train_val(runner: Any, nets: Any, net: Any, initial: list[Any], x: dict) -> Any:
    """Train the head again from its initial weights `initial` (`nets.head.get_weights()` before
    training) on train + val (`x`: {"train", "val": inputs of `net`}, labels from `runner`) for
    the epochs early stopping chose in `runner`'s phase 1, with early stopping off; return the
    PhaseRunner that ran it (its history is the refit's)."""
    from omegaconf import OmegaConf

    from pipeline.lib.training.fit import PhaseRunner, class_weights

    cfg = runner.cfg
    epochs = best_epoch(runner.history, runner.monitor)
    y = np.concatenate([runner.targets["train"], runner.targets["val"]])
    refit_cfg = OmegaConf.merge(cfg, {"train": {"early_stopping": {"enabled": False}}})
    labels = y.argmax(axis=1)
    weights = class_weights(labels, y.shape[1], cfg.train.class_weight)
    refit = PhaseRunner(
        refit_cfg, {"train": y, "val": y[:0]}, weights, extra_callbacks=runner.extra_callbacks
    )
    merged = np.concatenate([np.asarray(x["train"]), np.asarray(x["val"])])
    nets.head.set_weights(initial)
    set_kernel_l2(nets.head, l2_strength(cfg.train.l2, len(y)))
    log.info("Refit on train + val: %d images, %d epochs (early stopping's choice)", len(y), epochs)
    backup = runner_backup(cfg)
    refit.run(
        "refit",
        net,
        {"train": merged, "val": merged[:0]},
        cfg.train.learning_rate,
        (0, epochs),
        backup,
    )
    return refit


def runner_backup(cfg: Any) -> Any:
    """A fresh folder for the refit's per-epoch state (BackupAndRestore deletes it at the end)."""
    import tempfile
    from pathlib import Path

    Path(cfg.train.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="refit-", dir=cfg.train.checkpoint_dir))


def finish(
    runner: Any,
    predict_val: Callable[[], np.ndarray],
    refit: Callable[[], Any],
    scale: Callable[[float], None],
) -> dict[str, Any]:
    """After phase 1 (and 2), whatever trained the head (Keras or NumPy): refit on train + val
    (`train.refit_on_train_val`), temperature scaling on the validation split
    (`train.calibrate`), the underfitting warning.

    Args:
        runner: the phase runner that trained (`history`, `batches`, `targets`, `cfg`,
            `has_val`, `monitor`).
        predict_val: the trained head's float (N_val, C) validation probabilities.
        refit: trains the head again on train + val; returns the refit's runner.
        scale: folds a temperature T into the head (kernel and bias / T).

    Returns {"best_epoch", "temperature" (None when not calibrated), "val_nll_before"/"_after",
    "refit_epochs", "refit_images", "refit_history", "l2"}.
    """
    from pipeline.lib.training.calibration import calibrate

    t = runner.cfg.train
    y_val = runner.targets["val"].argmax(axis=1) if runner.has_val else np.zeros(0, np.int64)
    n_train = len(runner.targets["train"])
    info: dict[str, Any] = {
        "best_epoch": best_epoch(runner.history, runner.monitor),
        "l2": l2_strength(t.l2, n_train),
        "temperature": None,
    }
    steps = len(runner.batches["step"])
    warn_if_underfit(runner.history, n_train, steps)
    val_probs = None
    if t.calibrate and runner.has_val:
        val_probs = np.asarray(predict_val())
    elif t.calibrate:
        log.warning("train.calibrate: no validation split, so no temperature scaling (T = 1)")
    if t.refit_on_train_val:
        if runner.has_val:
            refitted = refit()
            info["refit_epochs"] = len(refitted.history["epoch"])
            info["refit_images"] = len(refitted.targets["train"])
            info["refit_history"] = refitted.history
        else:
            log.warning("train.refit_on_train_val: no validation split, nothing to add")
    if val_probs is not None:
        calibration = calibrate(val_probs, y_val)
        scale(calibration["temperature"])
        info.update(calibration)
    return info


def finish_keras(runner: Any, nets: Any, net: Any, initial: list[Any], x: dict) -> dict[str, Any]:
    """`finish` for a head trained by Keras: `net` (features or images -> probabilities) predicts
    the validation inputs `x["val"]`, the refit starts from `initial` (`nets.head.get_weights()`
    before training), the temperature is folded into `nets.head`."""
    from pipeline.lib.training.calibration import apply_temperature

    return finish(
        runner,
        lambda: net.predict(x["val"], batch_size=256, verbose=0),
        lambda: refit_on_train_val(runner, nets, net, initial, x),
        lambda temperature: apply_temperature(nets.head, temperature),
    )
