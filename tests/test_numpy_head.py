"""pipeline.lib.training.numpy_head: the head trained in NumPy runs Keras' algorithm.

The same head (same initial weights, batches, settings) is trained by Keras' `fit` (the pipeline's
own PhaseRunner) and by `fit_head`; the weights and every logged number must agree to float32
precision, for each optimizer, schedule and loss option NumPy takes over.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from pipeline.lib.config.schema import ConfigError
from pipeline.lib.training import numpy_head as nh
from tests.conftest import compose

N, N_VAL, DIM, CLASSES = 50, 20, 16, 3


def _data(seed: int = 1) -> tuple[np.ndarray, ...]:
    """Separable-ish features: a centre per class plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, DIM))
    y = rng.integers(0, CLASSES, N)
    y_val = rng.integers(0, CLASSES, N_VAL)
    x = (centres[y] + rng.normal(scale=1.5, size=(N, DIM))).astype(np.float32)
    x_val = (centres[y_val] + rng.normal(scale=1.5, size=(N_VAL, DIM))).astype(np.float32)
    return x, y, x_val, y_val


def _keras_and_numpy(overrides: list[str]) -> tuple[dict, nh.HeadRun, list, nh.Head]:
    """Train the same head with Keras (PhaseRunner) and with fit_head; return (Keras runner
    history/batches/stopped, NumPy run, Keras weights, NumPy head)."""
    from pipeline.lib.model.build import build_head
    from pipeline.lib.training import head as head_lib
    from pipeline.lib.training.fit import PhaseRunner, class_weights

    cfg = compose(overrides)
    t = cfg.train
    x, y, x_val, y_val = _data()
    l2 = head_lib.l2_strength(t.l2, N)
    weights = class_weights(y, CLASSES, t.class_weight)
    targets = {"train": nh.one_hot(y, CLASSES), "val": nh.one_hot(y_val, CLASSES)}
    net = build_head(DIM, CLASSES, 0.0, "glorot_uniform")
    head_lib.set_kernel_l2(net, l2)
    initial = net.get_weights()
    runner = PhaseRunner(cfg, targets, weights)
    runner.backup = False
    with tempfile.TemporaryDirectory() as backup:
        runner.run(
            "phase1", net, {"train": x, "val": x_val}, t.learning_rate, (0, t.epochs), backup
        )
    head = nh.Head(initial[0].astype(np.float64), initial[1].astype(np.float64))
    run = nh.fit_head(
        head,
        nh.Split.of(x, targets["train"], weights),
        nh.Split.of(x_val, targets["val"], None),
        nh.settings_from_config(cfg, l2, weights),
    )
    keras_side = {"history": runner.history, "batches": runner.batches, "stopped": runner.stopped}
    return keras_side, run, net.get_weights(), head


BASE = ["train.epochs=10", "train.batch_size=8"]
CASES = {
    "adam, no penalty": ["train.l2=0"],
    "adam, L2 auto": ["train.l2=auto"],
    "label smoothing, class weights": ["train.label_smoothing=0.1", "train.class_weight=auto"],
    "sgd": ["train.optimizer=sgd", "train.learning_rate=0.05"],
    "rmsprop": ["train.optimizer=rmsprop"],
    "adamw": ["train.optimizer=adamw"],
    "cosine": ["train.lr_schedule=cosine"],
    "reduce on plateau": ["train.lr_schedule=reduce_on_plateau", "train.learning_rate=0.05"],
    "no shuffle": ["train.shuffle=false"],
    "early stopping": [
        "train.epochs=60",
        "train.early_stopping.patience=3",
        "train.learning_rate=0.1",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_fit_head_matches_keras_fit(name: str):
    keras_side, run, keras_weights, head = _keras_and_numpy(BASE + CASES[name])
    # the weights, to float32 precision
    np.testing.assert_allclose(head.kernel, keras_weights[0], atol=2e-5)
    np.testing.assert_allclose(head.bias, keras_weights[1], atol=2e-5)
    # every per-epoch number Keras logs (loss with the penalty, val_*, learning rate)
    history = keras_side["history"]
    assert run.history["epoch"] == history["epoch"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        np.testing.assert_allclose(run.history[key], history[key], atol=2e-5, err_msg=key)
    # per-batch running means and their global step numbers
    batches = keras_side["batches"]
    assert run.batches["step"] == batches["step"]
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(run.batches[key], batches[key], atol=2e-5, err_msg=key)
    # early stopping ends at the same epoch
    assert ([run.stopped_epoch] if run.stopped_epoch else []) == keras_side["stopped"]


def test_early_stopping_case_really_stops():
    keras_side, run, _, _ = _keras_and_numpy(BASE + CASES["early stopping"])
    assert 0 < run.stopped_epoch < 60


def test_dropout_masks_are_a_function_of_the_seed():
    x, y, x_val, y_val = _data()
    train = nh.Split.of(x, nh.one_hot(y, CLASSES), None)
    val = nh.Split.of(x_val, nh.one_hot(y_val, CLASSES), None)

    def trained(seed: int) -> nh.Head:
        head = nh.Head.initial(DIM, CLASSES, "zeros", 0)
        nh.fit_head(head, train, val, nh.Settings(5, 8, 0.01, seed=seed, dropout=0.5))
        return head

    a, b, c = trained(1), trained(1), trained(2)
    assert a.kernel.tobytes() == b.kernel.tobytes()
    assert not np.allclose(a.kernel, c.kernel)


def test_initial_heads():
    assert not nh.Head.initial(DIM, CLASSES, "zeros", 0).kernel.any()
    glorot = nh.Head.initial(DIM, CLASSES, "glorot_uniform", 3).kernel
    assert np.abs(glorot).max() <= np.sqrt(6 / (DIM + CLASSES))
    assert glorot.tobytes() == nh.Head.initial(DIM, CLASSES, "glorot_uniform", 3).kernel.tobytes()
    he = nh.Head.initial(1000, CLASSES, "he_normal", 0).kernel
    assert he.std() == pytest.approx(np.sqrt(2 / 1000), rel=0.05)  # truncation keeps the std
    assert np.abs(he).max() <= 2 * np.sqrt(2 / 1000) / 0.87962566103423978
    with pytest.raises(ValueError, match="unknown head initializer"):
        nh.Head.initial(DIM, CLASSES, "ones", 0)


def test_train_head_folds_the_temperature_into_the_head():
    # overlapping classes: validation mistakes, so T is fitted, and the saved head is scaled by it
    cfg = compose(["train.epochs=30", "train.batch_size=8"])
    rng = np.random.default_rng(0)
    y = {"train": rng.integers(0, CLASSES, 60), "val": rng.integers(0, CLASSES, 40)}
    x = {s: (rng.normal(size=(len(v), DIM)) + v[:, None] * 0.3).astype(np.float32)
         for s, v in y.items()}  # fmt: skip
    head, runner = nh.train_head(cfg, x, y, CLASSES)
    info = runner.head_info
    assert info["temperature"] not in (None, 1.0)
    assert info["val_nll_after"] < info["val_nll_before"]
    # the same data and settings train the same head again, to the bit
    again, _ = nh.train_head(cfg, x, y, CLASSES)
    assert head.kernel.tobytes() == again.kernel.tobytes()


def test_refit_on_train_val_trains_for_the_chosen_epochs():
    cfg = compose(["train.epochs=40", "train.batch_size=8", "train.refit_on_train_val=true"])
    x, y, x_val, y_val = _data()
    head, runner = nh.train_head(
        cfg, {"train": x, "val": x_val}, {"train": y, "val": y_val}, CLASSES
    )
    info = runner.head_info
    assert info["refit_images"] == N + N_VAL
    assert info["refit_epochs"] == info["best_epoch"]


def test_backend_numpy_is_refused_where_it_cannot_train():
    from pipeline.lib.training.fit import numpy_refusal, uses_numpy

    assert uses_numpy(compose([]))
    assert not uses_numpy(compose(["train.backend=keras"]))
    fine_tune = compose(["train.fine_tune.enabled=true"])
    assert numpy_refusal(fine_tune) == "train.fine_tune.enabled=true"
    assert not uses_numpy(fine_tune)  # auto falls back to Keras
    with pytest.raises(ConfigError, match=r"train.backend=numpy .*train.fine_tune.enabled=true"):
        uses_numpy(compose(["train.backend=numpy", "train.fine_tune.enabled=true"]))


def test_a_diverging_head_stops_with_the_epoch_named():
    cfg = compose(["train.epochs=20", "train.batch_size=8", "train.optimizer=sgd",
                   "train.learning_rate=1e30", "train.early_stopping.enabled=false"])  # fmt: skip
    x, y, x_val, y_val = _data()
    with pytest.raises(nh.TrainingDivergedError, match="lower train.learning_rate"):
        nh.train_head(cfg, {"train": x * 1e20, "val": x_val}, {"train": y, "val": y_val}, CLASSES)


def test_features_that_are_not_finite_are_refused():
    x, y, x_val, y_val = _data()
    x[3, 2] = np.nan
    with pytest.raises(nh.TrainingDivergedError, match="train features hold NaN or inf"):
        nh.train_head(compose([]), {"train": x, "val": x_val}, {"train": y, "val": y_val}, CLASSES)
