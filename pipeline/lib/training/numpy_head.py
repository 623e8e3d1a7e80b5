"""The classification head trained on cached features in NumPy: Keras' algorithm without TensorFlow.

With a frozen backbone the trainable model is one Dense layer with a softmax (features (N, D) ->
probabilities (N, C)); Keras spends most of a head's `fit` in per-epoch and per-batch machinery,
not arithmetic (~65 ms per epoch, 13 s for 200 epochs of the default data, against 0.1 s here).
This module runs the same computation as `keras.Model.fit` of `build_head` compiled as
`PhaseRunner` compiles it, step for step:

- loss: categorical cross-entropy on the logits (Keras takes the softmax's logits), with label
  smoothing y (1 - s) + s / C, class weights as per-example weights, reduced as
  sum(w_i CE_i) / batch size, plus the kernel's L2 penalty `l2 * sum(W ** 2)` (in `loss` and
  `val_loss`, as Keras adds `model.losses` to both);
- optimizers with Keras 3's update rules and defaults: Adam (beta 0.9 / 0.999, epsilon 1e-7,
  Kingma & Ba 2015, Algorithm 1 with the bias correction folded into the rate), AdamW (Adam plus
  decoupled weight decay 0.004 x rate, Loshchilov & Hutter 2019), SGD (no momentum), RMSprop
  (rho 0.9, epsilon 1e-7 inside the square root);
- learning rates: constant, `cosine` (Keras' CosineDecay to 0 over the phase's steps, evaluated at
  the optimizer's iteration count) or `reduce_on_plateau` (Keras' ReduceLROnPlateau, no cooldown);
- early stopping as Keras' EarlyStopping(restore_best_weights=True): the best epoch's weights
  are restored at the end, stopped or not;
- the logged numbers as Keras logs them: per batch the running means over the epoch so far
  (loss weighted by batch size, accuracy unweighted even with class weights), per epoch the epoch's
  means, `val_loss` / `val_accuracy` on the whole validation split, the epoch's learning rate;
- the batch order of epoch e is `epoch_order(n, shuffle, seed, e)`, the order `ArrayBatches`
  gives Keras; dropout masks are drawn from NumPy's generator seeded by (seed, epoch), so
  a run is a pure function of its inputs (not the masks Keras would draw).

`tests/test_numpy_head.py` trains the same head from the same weights with Keras and here and
compares the weights and every logged number. Computation is float64 on one BLAS thread (the
same bytes on every run and machine core count); the weights are returned as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.lib.errors import UserError
from pipeline.lib.training.head import TrainingRecord

#: Keras 3's defaults for the optimizers `train.optimizer` names.
ADAM_BETAS = (0.9, 0.999)
EPSILON = 1e-7
ADAMW_WEIGHT_DECAY = 0.004
RMSPROP_RHO = 0.9


class TrainingDivergedError(UserError):
    """The head's loss or weights stopped being finite numbers (or its features are not)."""


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """int64 (n,) permutation of epoch `epoch` (0-based): a pure function of (seed, epoch) when
    shuffling, the identity otherwise. `pipeline.lib.training.batches.ArrayBatches` uses it too."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (N, C) one-hot rows of int labels (N,) (as `keras.utils.to_categorical`)."""
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


@dataclass
class Head:
    """A Dense softmax head: `kernel` float (D, C) and `bias` float (C,)."""

    kernel: np.ndarray
    bias: np.ndarray

    @classmethod
    def initial(cls, dim: int, num_classes: int, init: str, seed: int) -> Head:
        """The head before training: kernel by `model.head_init` (`zeros`; `glorot_uniform`:
        U(+-sqrt(6 / (D + C))); `he_normal`: truncated N(0, 2 / D) at 2 std, Keras' formulas, drawn
        from NumPy's generator seeded by `seed`), bias zeros. Raises ValueError for another
        `init`."""
        rng = np.random.default_rng(seed)
        if init == "zeros":
            kernel = np.zeros((dim, num_classes))
        elif init == "glorot_uniform":
            limit = math.sqrt(6.0 / (dim + num_classes))
            kernel = rng.uniform(-limit, limit, (dim, num_classes))
        elif init == "he_normal":
            std = math.sqrt(2.0 / dim) / 0.87962566103423978  # truncated at 2 std
            kernel = rng.normal(0.0, std, (dim, num_classes))
            while (out := np.abs(kernel) > 2 * std).any():  # truncated: redrawn, as Keras does
                kernel[out] = rng.normal(0.0, std, int(out.sum()))
        else:
            raise ValueError(f"unknown head initializer {init!r}")
        return cls(kernel.astype(np.float64), np.zeros(num_classes))

    def copy(self) -> Head:
        """An independent copy."""
        return Head(self.kernel.copy(), self.bias.copy())

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float64 (N, C) logits of features `x` (N, D)."""
        return np.asarray(x, dtype=np.float64) @ self.kernel + self.bias

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C) softmax probabilities of features `x` (N, D) (inference: no dropout)."""
        return np.exp(log_softmax(self.logits(x))).astype(np.float32)

    def weights(self) -> list[np.ndarray]:
        """[kernel float32 (D, C), bias float32 (C,)]: a Keras Dense layer's `set_weights` list."""
        return [self.kernel.astype(np.float32), self.bias.astype(np.float32)]

    def scaled(self, temperature: float) -> Head:
        """The head whose softmax is softmax(z / T): kernel and bias divided by T."""
        return Head(self.kernel / temperature, self.bias / temperature)


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log softmax of float (N, C) logits, computed stably (max subtracted)."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass
class Optimizer:
    """One of Keras' optimizers (`name`: adam, adamw, sgd, rmsprop) over the head's two
    variables; `step` applies one update at learning rate `lr` (Keras 3's formulas, module
    docstring). `iterations` counts the updates, as Keras' `optimizer.iterations`."""

    name: str
    iterations: int = 0
    slots: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def step(self, variables: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        """Update `variables` in place from `grads` (same shapes)."""
        if not self.slots:
            self.slots = {k: [np.zeros_like(v) for v in variables] for k in ("m", "v")}
        if self.name == "adamw":  # decoupled weight decay, before the Adam step (as Keras)
            for var in variables:
                var -= var * ADAMW_WEIGHT_DECAY * lr
        t = self.iterations + 1
        for var, g, m, v in zip(variables, grads, self.slots["m"], self.slots["v"], strict=True):
            if self.name in ("adam", "adamw"):
                b1, b2 = ADAM_BETAS
                alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                m += (g - m) * (1 - b1)
                v += (g * g - v) * (1 - b2)
                var -= alpha * m / (np.sqrt(v) + EPSILON)
            elif self.name == "rmsprop":
                v[...] = RMSPROP_RHO * v + (1 - RMSPROP_RHO) * g * g
                var -= lr * g / np.sqrt(v + EPSILON)
            elif self.name == "sgd":
                var -= lr * g
            else:
                raise ValueError(f"unknown optimizer {self.name!r}")
        self.iterations = t


def cosine_rate(rate: float, steps: int) -> Callable[[int], float]:
    """Keras' CosineDecay(rate, steps) (alpha 0, no warm-up): the rate at optimizer step k."""

    def at(k: int) -> float:
        fraction = min(k, steps) / max(steps, 1)
        return rate * 0.5 * (1.0 + math.cos(math.pi * fraction))

    return at


@dataclass
class Monitor:
    """Keras' improvement bookkeeping for a `min` monitor: improved when value + min_delta < best."""

    patience: int
    min_delta: float
    best: float | None = None
    wait: int = 0

    def improved(self, value: float) -> bool:
        """Whether `value` beats the best so far (the first value always does)."""
        return self.best is None or value + abs(self.min_delta) < self.best


@dataclass
class Settings:
    """What one phase of head training runs with (from `train.*`, `model.dropout`).

    `class_weight`: {class index: weight} or None; `l2`: the kernel's L2 factor; `plateau`:
    (factor, patience, min_delta, min_lr) when `lr_schedule` is `reduce_on_plateau`;
    `early_stopping`: (patience, min_delta) or None."""

    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str = "adam"
    seed: int = 0
    shuffle: bool = True
    l2: float = 0.0
    label_smoothing: float = 0.0
    dropout: float = 0.0
    class_weight: dict[int, float] | None = None
    lr_schedule: str = "none"
    plateau: tuple[float, int, float, float] | None = None
    early_stopping: tuple[int, float] | None = None


def settings_from_config(cfg: Any, l2: float, class_weight: dict[int, float] | None) -> Settings:
    """The `Settings` of phase 1 of `cfg` (`train.*`, `model.dropout`)."""
    t = cfg.train
    p, es = t.plateau, t.early_stopping
    return Settings(
        epochs=int(t.epochs),
        batch_size=int(t.batch_size),
        learning_rate=float(t.learning_rate),
        optimizer=str(t.optimizer),
        seed=int(t.seed),
        shuffle=bool(t.shuffle),
        l2=float(l2),
        label_smoothing=float(t.label_smoothing),
        dropout=float(cfg.model.dropout),
        class_weight=class_weight,
        lr_schedule=str(t.lr_schedule),
        plateau=(float(p.factor), int(p.patience), float(p.min_delta), float(p.min_lr)),
        early_stopping=(int(es.patience), float(es.min_delta)) if es.enabled else None,
    )


@dataclass
class HeadRun:
    """What one `fit_head` ran: per-epoch `history` ({"epoch": [1-based], "loss", "accuracy",
    "val_loss", "val_accuracy" (with a validation split), "learning_rate"}), per-batch `batches`
    ({"step", "epoch", "loss", "accuracy"}, running means over the epoch) and the 1-based epoch
    early stopping ended at (`stopped_epoch`, 0 when it ran every epoch)."""

    history: dict[str, list[float]] = field(default_factory=lambda: {"epoch": []})
    batches: dict[str, list[float]] = field(
        default_factory=lambda: {"step": [], "epoch": [], "loss": [], "accuracy": []}
    )
    stopped_epoch: int = 0

    def add(self, epoch: int, logs: dict[str, float]) -> None:
        """Append epoch `epoch`'s (1-based) logs to the history."""
        self.history["epoch"].append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))


@dataclass
class Split:
    """Features (N, D) (float32 kept as is: batches are widened to float64 as they are used, so
    a large split costs no float64 copy), one-hot targets float64 (N, C) and per-example weights
    float64 (N,)."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, class_weight: dict[int, float] | None) -> Split:
        """The split of features `x` and one-hot `y`, weighted by `class_weight` (None: 1)."""
        y = np.asarray(y, dtype=np.float64)
        if class_weight is None or not len(y):
            w = np.ones(len(y))
        else:
            w = np.array([class_weight[int(c)] for c in y.argmax(axis=1)], dtype=np.float64)
        x = np.asarray(x)
        return cls(x if x.dtype.kind == "f" else x.astype(np.float64), y, w)


def _loss_terms(head: Head, split: Split, smoothing: float, l2: float) -> tuple[np.ndarray, ...]:
    """(per-example CE (B,), softmax (B, C), smoothed targets (B, C), logits (B, C)) of `split`
    and the penalty (a 0-d array)."""
    z = head.logits(split.x)
    logp = log_softmax(z)
    c = split.y.shape[1]
    target = split.y * (1.0 - smoothing) + smoothing / c if smoothing else split.y
    ce = -(target * logp).sum(axis=1)
    return ce, np.exp(logp), target, z, np.asarray(l2 * float((head.kernel**2).sum()))


def evaluate(head: Head, split: Split, settings: Settings) -> tuple[float, float]:
    """(loss, accuracy) of `head` on `split` as Keras' `evaluate` reports them: mean CE (label
    smoothing included, no example weights) + the L2 penalty; the fraction argmax-correct."""
    ce, _, _, z, penalty = _loss_terms(head, split, settings.label_smoothing, settings.l2)
    correct = z.argmax(axis=1) == split.y.argmax(axis=1)
    return float(ce.mean() + penalty), float(correct.mean())


def _train_step(
    head: Head, batch: Split, settings: Settings, optimizer: Optimizer, lr: float
) -> tuple[float, np.ndarray]:
    """One optimizer step on `batch`; return (its loss before the update, correct (B,) bool)."""
    ce, probs, target, z, penalty = _loss_terms(head, batch, settings.label_smoothing, settings.l2)
    n = len(batch.w)
    loss = float((batch.w * ce).sum() / n + penalty)
    # d(sum_i w_i CE_i / n) / dz = w_i (softmax - target) / n (the targets' rows sum to 1)
    grad_z = batch.w[:, None] * (probs - target) / n
    grads = [batch.x.T @ grad_z + 2.0 * settings.l2 * head.kernel, grad_z.sum(axis=0)]
    optimizer.step([head.kernel, head.bias], grads, lr)
    return loss, z.argmax(axis=1) == batch.y.argmax(axis=1)


def _batch(train: Split, idx: np.ndarray, dropout: float, rng: Any) -> Split:
    """The examples `idx` of `train`, their features dropped out at rate `dropout` (inverted
    dropout, as Keras' Dropout layer in training) when it is > 0."""
    x = np.asarray(train.x[idx], dtype=np.float64)
    if dropout > 0:
        x = x * (rng.random(x.shape) >= dropout) / (1.0 - dropout)
    return Split(x, train.y[idx], train.w[idx])


def _run_epoch(
    head: Head, train: Split, settings: Settings, optimizer: Optimizer, epoch: int, rate: Any
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Train one epoch (0-based `epoch`); `rate(k)` is the learning rate of optimizer step k.
    Return (the epoch's {"loss", "accuracy"}, its batches' running means): the loss weighted by
    batch size, the accuracy unweighted (Keras 3 does not pass class weights to `accuracy`)."""
    s = settings
    n, steps = len(train.w), max(math.ceil(len(train.w) / s.batch_size), 1)
    order = epoch_order(n, s.shuffle, s.seed, epoch)
    rng = np.random.default_rng((s.seed, epoch, 1)) if s.dropout > 0 else None
    loss_sum = correct_sum = seen = 0.0
    batches: dict[str, list[float]] = {"step": [], "epoch": [], "loss": [], "accuracy": []}
    for b in range(steps):
        idx = np.sort(order[b * s.batch_size : (b + 1) * s.batch_size])
        batch = _batch(train, idx, s.dropout, rng)
        loss, correct = _train_step(head, batch, s, optimizer, rate(optimizer.iterations))
        seen += len(idx)
        loss_sum += loss * len(idx)
        correct_sum += float(correct.sum())
        batches["step"].append(epoch * steps + b + 1)
        batches["epoch"].append(epoch + 1)
        batches["loss"].append(loss_sum / seen)
        batches["accuracy"].append(correct_sum / seen)
    return {"loss": batches["loss"][-1], "accuracy": batches["accuracy"][-1]}, batches


def fit_head(head: Head, train: Split, val: Split | None, settings: Settings) -> HeadRun:
    """Train `head` (updated in place) on `train` for up to `settings.epochs` epochs, validating
    on `val` (None or empty: none) after each; see the module docstring for what runs.

    Returns the `HeadRun`. With early stopping, `head` ends with the weights of the epoch whose
    monitored value (val_loss, else loss) was lowest.

    Raises:
        TrainingDivergedError: an epoch's training loss is not finite (NaN or inf: the learning
            rate is too high for these features), or there is nothing to train on. Keras would
            go on training a NaN model; here the run stops with the epoch named.
    """
    if not len(train.w):
        raise TrainingDivergedError("no training images: nothing to train the head on")
    from threadpoolctl import threadpool_limits

    s, run = settings, HeadRun()
    has_val = val is not None and len(val.w) > 0
    optimizer = Optimizer(s.optimizer)
    steps = max(math.ceil(len(train.w) / s.batch_size), 1) * s.epochs
    cosine = cosine_rate(s.learning_rate, steps) if s.lr_schedule == "cosine" else None
    lr = s.learning_rate
    plateau = Monitor(s.plateau[1], s.plateau[2]) if s.lr_schedule == "reduce_on_plateau" else None
    stopper = Monitor(*s.early_stopping) if s.early_stopping else None
    best = head.copy()
    with threadpool_limits(1):  # one BLAS thread: the same sums, hence bytes, everywhere
        for epoch in range(s.epochs):
            logs, batches = _run_epoch(
                head, train, s, optimizer, epoch, cosine or (lambda k, r=lr: r)
            )
            if has_val:
                logs["val_loss"], logs["val_accuracy"] = evaluate(head, val, s)
            logs["learning_rate"] = cosine(optimizer.iterations - 1) if cosine else lr
            _check_loss(logs["loss"], epoch, s)
            run.add(epoch + 1, logs)
            for key, values in batches.items():
                run.batches[key].extend(values)
            current = logs["val_loss" if has_val else "loss"]
            if plateau is not None:
                lr = _plateau(plateau, current, lr, s.plateau)
            if stopper is not None:
                stopper.wait += 1
                if stopper.improved(current):
                    stopper.best, stopper.wait, best = current, 0, head.copy()
                elif stopper.wait >= stopper.patience and epoch > 0:
                    run.stopped_epoch = epoch + 1
                    break
    if stopper is not None:  # Keras restores the best weights at the end, stopped or not
        head.kernel[...], head.bias[...] = best.kernel, best.bias
    return run


def _check_loss(loss: float, epoch: int, s: Settings) -> None:
    """Raise TrainingDivergedError when epoch `epoch`'s (0-based) training loss is not finite."""
    if not math.isfinite(loss):
        raise TrainingDivergedError(
            f"the head's training loss is {loss} at epoch {epoch + 1} "
            f"(train.learning_rate={s.learning_rate:g}, train.optimizer={s.optimizer}): "
            "it diverged; lower train.learning_rate"
        )


def _plateau(monitor: Monitor, current: float, lr: float, plateau: tuple) -> float:
    """Keras' ReduceLROnPlateau (no cooldown) after an epoch: the next epoch's learning rate."""
    factor, _, _, min_lr = plateau
    if monitor.improved(current):
        monitor.best, monitor.wait = current, 0
        return lr
    monitor.wait += 1
    if monitor.wait >= monitor.patience and lr > np.float32(min_lr):
        monitor.wait = 0
        return max(lr * factor, min_lr)
    return lr


# --- The pipeline's phase 1 in NumPy: PhaseRunner's counterpart (pipeline.lib.training.fit) ---


@dataclass
class NumpyPhaseRunner(TrainingRecord):
    """Runs the head's training phases of one run in NumPy and gathers what they ran (the
    `TrainingRecord`, as `pipeline.lib.training.fit.PhaseRunner` does with Keras); `l2` is the
    kernel's L2 factor."""

    l2: float = 0.0

    def run(self, name: str, head: Head, x: dict[str, np.ndarray], epochs: int) -> int:
        """Train `head` (in place) on features `x` {"train", "val"} for up to `epochs` epochs at
        `train.learning_rate`; append what ran; return the epochs run."""
        settings = settings_from_config(self.cfg, self.l2, self.class_weight)
        settings.epochs = int(epochs)
        train = Split.of(x["train"], self.targets["train"], self.class_weight)
        val = Split.of(x["val"], self.targets["val"], None)
        ran = fit_head(head, train, val, settings)
        done = len(ran.history["epoch"])
        for key, values in ran.history.items():
            self.history.setdefault(key, []).extend(values)
        for key, values in ran.batches.items():
            self.batches[key].extend(values)
        if ran.stopped_epoch:
            self.stopped.append(done)
        self.phases[name] = {
            "mode": "cached_features",
            "trainable_params": int(head.kernel.size + head.bias.size),
            "learning_rate": float(settings.learning_rate),
            "first_epoch": 1,
            "last_epoch": done,
        }
        return done


def refit_on_train_val(
    runner: NumpyPhaseRunner, head: Head, initial: Head, x: dict[str, np.ndarray]
) -> NumpyPhaseRunner:
    """`train.refit_on_train_val` in NumPy: `head` reset to `initial` and trained on train + val
    for the epochs early stopping chose in `runner`, early stopping off (as
    `pipeline.lib.training.head.refit_on_train_val` does with Keras); return the refit's runner."""
    import logging

    from omegaconf import OmegaConf

    from pipeline.lib.training.fit import class_weights
    from pipeline.lib.training.head import best_epoch, l2_strength

    cfg = runner.cfg
    epochs = best_epoch(runner.history, runner.monitor)
    y = np.concatenate([runner.targets["train"], runner.targets["val"]])
    refit_cfg = OmegaConf.merge(cfg, {"train": {"early_stopping": {"enabled": False}}})
    weights = class_weights(y.argmax(axis=1), y.shape[1], cfg.train.class_weight)
    refit = NumpyPhaseRunner(
        refit_cfg, {"train": y, "val": y[:0]}, weights, l2=l2_strength(cfg.train.l2, len(y))
    )
    merged = np.concatenate([np.asarray(x["train"]), np.asarray(x["val"])])
    head.kernel[...], head.bias[...] = initial.kernel, initial.bias
    logging.getLogger(__name__).info(
        "Refit on train + val: %d images, %d epochs (early stopping's choice)", len(y), epochs
    )
    refit.run("refit", head, {"train": merged, "val": merged[:0]}, epochs)
    return refit


def train_head(
    cfg: Any, x: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int
) -> tuple[Head, NumpyPhaseRunner]:
    """The pipeline's head training in NumPy: `model.head_init`, the L2 of `train.l2`, phase 1
    (`train.*`), then `pipeline.lib.training.head.finish` (refit, temperature scaling, the
    underfitting warning).

    Args:
        cfg: the validated config (`train`, `model.head_init`, `model.dropout`).
        x: {"train", "val": float32 features (N, D)} (val may be empty).
        labels: {"train", "val": int labels (N,)}.
        num_classes: C.

    Returns (the trained head, temperature folded in; the runner, its `head_info` set).

    Raises:
        TrainingDivergedError: features that are not finite, a loss that stops being finite, or
            weights that overflow float32 (the type they are saved in).
    """
    from pipeline.lib.training.fit import class_weights
    from pipeline.lib.training.head import finish, l2_strength

    t = cfg.train
    _check_features(x)
    targets = {s: one_hot(labels[s], num_classes) for s in ("train", "val")}
    runner = NumpyPhaseRunner(
        cfg,
        targets,
        class_weights(labels["train"], num_classes, t.class_weight),
        l2=l2_strength(t.l2, len(labels["train"])),
    )
    head = Head.initial(int(x["train"].shape[1]), num_classes, cfg.model.head_init, int(t.seed))
    initial = head.copy()
    runner.run("phase1", head, x, int(t.epochs))
    final = [head]

    def scale(temperature: float) -> None:
        final[0] = head.scaled(temperature)

    runner.head_info = finish(
        runner,
        lambda: head.probabilities(x["val"]),
        lambda: refit_on_train_val(runner, head, initial, x),
        scale,
    )
    _check_weights(final[0], float(t.learning_rate))
    return final[0], runner


def _check_features(x: dict[str, np.ndarray]) -> None:
    """Raise TrainingDivergedError when a split's features hold NaN or inf."""
    for split, values in x.items():
        if len(values) and not np.isfinite(values).all():
            raise TrainingDivergedError(
                f"the cached {split} features hold NaN or inf values: recompute them "
                "(`dvc repro -f featurize`)"
            )


def _check_weights(head: Head, learning_rate: float) -> None:
    """Raise TrainingDivergedError when `head`'s weights are not finite in float32 (saved so)."""
    with np.errstate(over="ignore"):
        finite = all(np.isfinite(w).all() for w in head.weights())
    if not finite:
        raise TrainingDivergedError(
            "the trained head's weights overflow float32 (the type they are saved in): it "
            f"diverged; lower train.learning_rate (now {learning_rate:g})"
        )
