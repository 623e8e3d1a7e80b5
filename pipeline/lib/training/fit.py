"""The head's training: seeds, batches, callbacks, checkpoints and the two-phase `fit`.

With a frozen backbone the head is trained on the cached backbone features (the `featurize`
stage), which gives the same model as end-to-end training at a fraction of the cost; the model
returned is still one complete Keras model (images -> class probabilities).

The training state is saved after every epoch (Keras' `BackupAndRestore`) in a folder of
`train.checkpoint_dir` keyed by the run's settings; with `train.resume=true` an interrupted run
continues from its last saved epoch and ends with the same weights and metrics as an uninterrupted
run: the batch order and dropout masks are pure functions of (seed, epoch), not of what ran before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipeline.lib.config.schema import Config
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import read_json, write_json
from pipeline.lib.model.features import load_cached_features

log = logging.getLogger(__name__)

#: Keras callbacks appended to every `fit`, after the checkpointing one. Empty in production;
#: tests put a callback here that interrupts training at a chosen epoch.
EXTRA_CALLBACKS: list[Any] = []


def set_seeds(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # older TF builds lack it; seeds still apply
    with contextlib.suppress(Exception):
        tf.config.experimental.enable_op_determinism()


def batch_recorder(total_images: int, epochs: int, batch_size: int, progress: bool = True) -> Any:
    """A Keras callback: per-batch loss/accuracy (as Keras reports them) and a progress bar in
    images per second. Steps are global batch numbers (epoch e, batch b: (e-1) * batches per
    epoch + b + 1), so a run resumed from a checkpoint numbers its batches as an uninterrupted
    run would."""
    import keras
    from tqdm import tqdm

    steps_per_epoch = max(math.ceil(total_images / batch_size), 1)

    class BatchRecorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.batches: dict[str, list[float]] = {
                "step": [],
                "epoch": [],
                "loss": [],
                "accuracy": [],
            }
            self.bar: Any = None
            self.epoch = 0
            self.start = 0.0
            self.seen = 0

        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = None
            self.start = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if self.bar is None:  # the first epoch that runs (later than 0 after a restore)
                self.bar = tqdm(
                    total=total_images * (epochs - epoch),
                    unit="img",
                    desc="train",
                    disable=not progress,
                )
            self.epoch = epoch + 1
            self.in_epoch = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            logs = logs or {}
            step = (self.epoch - 1) * steps_per_epoch + batch + 1
            self.batches["step"].append(step)
            self.batches["epoch"].append(self.epoch)
            self.batches["loss"].append(float(logs.get("loss", math.nan)))
            self.batches["accuracy"].append(float(logs.get("accuracy", math.nan)))
            size = min(batch_size, total_images - self.in_epoch)
            self.in_epoch += size
            self.seen += size
            self.bar.update(size)
            rate = self.seen / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(
                epoch=self.epoch, loss=f"{logs.get('loss', math.nan):.3f}", img_per_s=f"{rate:.0f}"
            )

        def on_train_end(self, logs: Any = None) -> None:
            if self.bar is not None:
                self.bar.close()

    return BatchRecorder()


class ArrayBatches:
    """Batches of an array (cached features in memory, or memory-mapped prepared images) and
    one-hot labels, for `fit(..., shuffle=False)`.

    The order of epoch e is a pure function of (seed, e), whatever ran before: an `epoch_state`
    callback sets `epoch` at the start of each epoch, and the permutation is computed from it
    when first needed, so a run resumed at epoch e sees the batches an uninterrupted run sees.
    """

    def __new__(
        cls, x: np.ndarray, targets: np.ndarray, batch_size: int, shuffle: bool, seed: int
    ) -> Any:
        import keras

        class _Batches(keras.utils.PyDataset):
            def __init__(self) -> None:
                super().__init__()
                self.epoch = 0
                self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

            def __len__(self) -> int:
                return math.ceil(len(x) / batch_size)

            def order(self) -> np.ndarray:
                epoch, cached = self.epoch, self._order  # one read each: prefetch runs in a thread
                if cached is None or cached[0] != epoch:
                    perm = (
                        np.random.default_rng((seed, epoch)).permutation(len(x))
                        if shuffle
                        else np.arange(len(x))
                    )
                    cached = self._order = (epoch, perm)
                return cached[1]

            def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
                idx = np.sort(
                    self.order()[i * batch_size : (i + 1) * batch_size]
                )  # memmap: in order
                return np.asarray(x[idx], dtype=np.float32), targets[idx]

        return _Batches()


#: Augmentation layers draw a few random tensors per step (RandomZoom: 2); their generator's
#: counter is set to epoch x steps x this at each epoch start, so epochs never reuse draws.
AUGMENT_DRAWS_PER_STEP = 16


def epoch_state(datasets: list[Any], model: Any, steps_per_epoch: int) -> Any:
    """A Keras callback that, at the start of each epoch, sets everything random that depends on
    the epoch: the batch order of `datasets`, the dropout masks and the augmentations of `model`'s
    layers.

    Dropout draws its masks from a `SeedGenerator` whose state Keras' checkpoints do not hold;
    setting its counter to epoch x steps per epoch (what it reaches anyway when each step draws
    once) makes the masks of a resumed run those of an uninterrupted one. Augmentation layers
    (`train.augment`) are handled alike, with room for several draws per step. `first_epoch` is
    the first epoch that ran (0-based; later than 0 when resumed from a checkpoint).
    """
    import keras

    generators = []
    for layer in model.layers:
        for attr, stride in (("seed_generator", 1), ("generator", AUGMENT_DRAWS_PER_STEP)):
            generator = getattr(layer, attr, None)
            if isinstance(generator, keras.random.SeedGenerator):
                generators.append((generator, int(np.asarray(generator.state.numpy())[0]), stride))

    class EpochState(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.first_epoch: int | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if self.first_epoch is None:
                self.first_epoch = epoch
            for dataset in datasets:
                dataset.epoch = epoch
            for generator, base, stride in generators:
                generator.state.assign(
                    np.array([base, epoch * steps_per_epoch * stride], dtype=generator.state.dtype)
                )

    return EpochState()


def learning_rate_logger(schedule: Any = None) -> Any:
    """A Keras callback that adds `learning_rate` to each epoch's logs: the rate of the epoch's
    last step (`schedule` evaluated there, else the optimizer's current rate). Placed before
    ReduceLROnPlateau, it records the rate the epoch trained with, before any reduction."""
    import keras

    class LearningRateLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if logs is None:
                return
            optimizer = self.model.optimizer
            if schedule is not None:
                step = max(int(np.asarray(optimizer.iterations.numpy())) - 1, 0)
                rate = schedule(step)
            else:
                rate = optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(rate))

    return LearningRateLogger()


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """`train.class_weight`: None for `none`; for `auto` sklearn's `balanced` weights
    (n_samples / (n_classes * count)) of the classes in `labels`, 1.0 for a class absent there."""
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels)
    present = np.unique(labels)
    balanced = compute_class_weight("balanced", classes=present, y=labels)
    weights = {c: 1.0 for c in range(num_classes)}
    weights.update({int(c): float(w) for c, w in zip(present, balanced, strict=False)})
    return weights


def distribution_strategy(name: str) -> Any:
    """`train.strategy`: the default (one device) or a MirroredStrategy over every visible GPU
    (the CPU when there is none)."""
    import tensorflow as tf

    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        log.info("train.strategy=mirrored: %d replica(s)", strategy.num_replicas_in_sync)
        return strategy
    return tf.distribute.get_strategy()


def checkpoint_folder(cfg: Config, prepared_md5: str) -> Path:
    """Where `fit` saves the training state after every epoch: a folder of
    `train.checkpoint_dir` keyed by what determines the run (the model, train and featurize
    settings but `train.resume` / `train.checkpoint_dir`, the prepared data) and by where it writes
    its model, so a resumed run only ever picks up its own checkpoint and two runs never share one.
    """
    train_settings = OmegaConf.to_container(cfg.train, resolve=True)
    assert isinstance(train_settings, dict)
    for name in ("resume", "checkpoint_dir"):
        train_settings.pop(name, None)
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "train": train_settings,
        "featurize": OmegaConf.to_container(cfg.featurize, resolve=True),
        "prepared_md5": prepared_md5,
        "models": str(Path(cfg.paths.models).resolve()),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.train.checkpoint_dir) / f"train-{digest}"


#: In the checkpoint folder, once phase 1 of a fine-tuning run has finished: its weights and how
#: many epochs it ran; phase 2 saves its state in the sub-folder FINE_TUNE_DIR.
PHASE1_WEIGHTS = "phase1.weights.h5"
PHASE1_DONE = "phase1.json"
FINE_TUNE_DIR = "fine_tune"


def fit(cfg: Config, dataset: PreparedDataset, prepared_md5: str) -> dict[str, Any]:
    """Train the model; return the full model (images -> probabilities), the per-epoch history,
    per-batch records and how it was trained.

    Phase 1 trains the head: on cached features when the backbone is frozen (and no augmentation),
    else end to end on images. With `train.fine_tune.enabled`, phase 2 unfreezes the backbone's top
    layers (BatchNorm stays frozen) and trains end to end on images at `fine_tune.learning_rate`,
    its epochs numbered after phase 1's: one continuous history and batch numbering.

    The state is saved after every epoch; with `train.resume` an interrupted run continues from
    its last saved epoch (history and batches then hold only the epochs run here, numbered as in
    the whole run; `resumed_from_epoch` says how many were restored), else it starts afresh.
    Limitation: EarlyStopping's and ReduceLROnPlateau's counters (epochs without improvement, best
    value, best weights) are not in the checkpoint, so a resumed run with `early_stopping` or
    `lr_schedule=reduce_on_plateau` restarts them and may stop or reduce later than an
    uninterrupted run; `cosine` resumes exactly (a function of the restored optimizer step).
    """
    strategy = distribution_strategy(cfg.train.strategy)
    with strategy.scope():
        return _fit(cfg, dataset, prepared_md5, strategy)


def _fit(cfg: Config, dataset: PreparedDataset, prepared_md5: str, strategy: Any) -> dict[str, Any]:
    import keras

    from pipeline.lib.model.build import (
        build_augmentation,
        build_feature_extractor,
        build_head,
        compose,
        compose_augmented,
        count_params,
        find_backbone,
        make_optimizer,
        unfreeze_top,
    )
    from pipeline.lib.model.features import choose_backend, featurize_array, make_featurizer

    t, c, ft = cfg.train, dataset.num_classes, cfg.train.fine_tune
    extractor = build_feature_extractor(
        cfg.model.alpha, cfg.model.weights, dataset.image_size, cfg.model.init_seed
    )
    set_seeds(t.seed)
    dim = int(extractor.output.shape[-1])
    head = build_head(dim, c, cfg.model.dropout, cfg.model.head_init)
    augmentation = build_augmentation(t.augment, t.seed) if t.augment.enabled else []
    y = {s: keras.utils.to_categorical(dataset.labels(s), c) for s in ("train", "val")}
    n_train = len(y["train"])
    has_val = len(y["val"]) > 0
    # augmented images differ every epoch, so their features cannot be cached
    cached = t.use_feature_cache and cfg.model.freeze_backbone and not augmentation
    if augmentation and t.use_feature_cache and cfg.model.freeze_backbone:
        log.info("train.augment.enabled: training end to end on images, not on cached features")
    start = time.perf_counter()
    images = {s: dataset.images(s) for s in ("train", "val")}
    full = compose(extractor, head)  # what is saved: images -> probabilities, no augmentation
    image_net = compose_augmented(extractor, head, augmentation) if augmentation else full
    if cached:
        features = load_cached_features(cfg, prepared_md5)
        if features is None:
            backend = choose_backend(
                cfg.featurize.backend, extractor, dataset.size("train") + dataset.size("val")
            )
            featurizer = make_featurizer(extractor, backend, cfg.featurize.num_threads)
            features = {
                s: featurize_array(
                    featurizer,
                    dataset.images(s),
                    cfg.featurize.batch_size,
                    dim,
                    progress=f"features {s}",
                )
                for s in ("train", "val")
            }
        net, x = head, features
    else:
        net, x = image_net, images
    loss: Any = (
        "categorical_crossentropy"
        if t.label_smoothing == 0
        else keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing)
    )
    weights = class_weights(dataset.labels("train"), c, t.class_weight)
    steps_per_epoch = max(math.ceil(n_train / t.batch_size), 1)
    monitor = "val_loss" if has_val else "loss"
    if not has_val and (t.early_stopping.enabled or t.lr_schedule == "reduce_on_plateau"):
        log.warning("No validation split: early stopping / reduce_on_plateau watch the train loss")

    checkpoint = checkpoint_folder(cfg, prepared_md5)
    if t.resume:
        log.info(
            "train.resume=true: %s %s",
            "resuming from"
            if checkpoint.exists()
            else "no checkpoint to resume from, starting afresh:",
            checkpoint,
        )
    elif checkpoint.exists():
        log.info("train.resume=false: removing the earlier checkpoint %s", checkpoint)
        shutil.rmtree(checkpoint)

    history: dict[str, list[float]] = {"epoch": []}
    batches: dict[str, list[float]] = {"step": [], "epoch": [], "loss": [], "accuracy": []}
    phases: dict[str, dict[str, Any]] = {}
    stopped: list[int] = []

    def run_phase(
        name: str, net: Any, x: dict[str, Any], rate: float, first: int, last: int, backup: Path
    ) -> int:
        """Compile `net` and train it from epoch `first` to `last` (0-based, exclusive); append
        what ran to the history; return the number of epochs done by its end."""
        schedule = (
            keras.optimizers.schedules.CosineDecay(rate, (last - first) * steps_per_epoch)
            if t.lr_schedule == "cosine"
            else None
        )
        net.compile(
            optimizer=make_optimizer(t.optimizer, schedule or rate), loss=loss, metrics=["accuracy"]
        )
        net._initial_epoch = None  # a restored epoch of an earlier fit must not carry over
        train_batches = ArrayBatches(x["train"], y["train"], t.batch_size, t.shuffle, t.seed)
        val = ArrayBatches(x["val"], y["val"], t.batch_size, False, t.seed) if has_val else None
        state = epoch_state([train_batches], net, len(train_batches))
        recorder = batch_recorder(n_train, last, t.batch_size)
        # before BackupAndRestore, so that the state it saves holds a reduced learning rate
        callbacks: list[Any] = [learning_rate_logger(schedule)]
        if t.lr_schedule == "reduce_on_plateau":
            p = t.plateau
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=monitor,
                    factor=p.factor,
                    patience=p.patience,
                    min_delta=p.min_delta,
                    min_lr=p.min_lr,
                    verbose=0,
                )
            )
        stopper = None
        if t.early_stopping.enabled:
            stopper = keras.callbacks.EarlyStopping(
                monitor=monitor,
                patience=t.early_stopping.patience,
                min_delta=t.early_stopping.min_delta,
                restore_best_weights=True,
                verbose=0,
            )
            callbacks.append(stopper)
        callbacks += [
            # restores weights, optimizer state and epoch at the start (if saved), saves every
            # epoch, deletes its folder when training ends
            keras.callbacks.BackupAndRestore(
                str(backup), save_freq="epoch", delete_checkpoint=True
            ),
            state,
            recorder,
            *EXTRA_CALLBACKS,
        ]
        phases[name] = {
            "mode": "cached_features" if net is head else "end_to_end",
            "trainable_params": count_params(net)["trainable"],
            "learning_rate": float(rate),
            "first_epoch": first + 1,
        }
        # shuffle=False: the batches order themselves per (seed, epoch); Keras would reorder them
        result = net.fit(
            train_batches,
            initial_epoch=first,
            epochs=last,
            validation_data=val,
            class_weight=weights,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )
        ran = {k: [float(v) for v in values] for k, values in result.history.items()}
        count = len(ran.get("loss", []))
        if state.first_epoch is None:
            log.warning(
                "The checkpoint already held all epochs of %s: nothing was trained "
                "(run with train.resume=false to train again)",
                name,
            )
            done = last
        else:
            history["epoch"] += list(range(state.first_epoch + 1, state.first_epoch + count + 1))
            for key, values in ran.items():
                history.setdefault(key, []).extend(values)
            for key, values in recorder.batches.items():
                batches[key].extend(values)
            done = state.first_epoch + count
        if stopper is not None and stopper.stopped_epoch > 0:
            stopped.append(done)
            log.info("Early stopping in %s after epoch %d (best weights restored)", name, done)
        phases[name]["last_epoch"] = done
        return done

    phase1_done = checkpoint / PHASE1_DONE
    if ft.enabled and t.resume and phase1_done.is_file():
        done = int(read_json(phase1_done)["epochs"])
        full.load_weights(checkpoint / PHASE1_WEIGHTS)
        phases["phase1"] = read_json(phase1_done)["phase"]
        log.info("Phase 1 had finished (%d epochs): resuming with fine-tuning", done)
    else:
        done = run_phase("phase1", net, x, t.learning_rate, 0, t.epochs, checkpoint)
    if ft.enabled:
        if not (checkpoint / PHASE1_DONE).is_file():
            checkpoint.mkdir(parents=True, exist_ok=True)
            full.save_weights(checkpoint / PHASE1_WEIGHTS)
            write_json(phase1_done, {"epochs": done, "phase": phases["phase1"]})
        unfrozen = unfreeze_top(find_backbone(extractor), ft.unfreeze_top_n)
        log.info(
            "Fine-tuning: %d backbone layers unfrozen (BatchNorm kept frozen), lr %g, "
            "epochs %d..%d",
            len(unfrozen),
            ft.learning_rate,
            done + 1,
            done + ft.epochs,
        )
        run_phase(
            "phase2",
            image_net,
            images,
            ft.learning_rate,
            done,
            done + ft.epochs,
            checkpoint / FINE_TUNE_DIR,
        )
        phases["phase2"]["unfrozen_layers"] = unfrozen
        shutil.rmtree(checkpoint, ignore_errors=True)
    seconds = time.perf_counter() - start
    first = (
        history["epoch"][0] - 1 if history["epoch"] else t.epochs + (ft.epochs if ft.enabled else 0)
    )
    return {
        "model": full,
        "epochs": history,
        "batches": batches,
        "mode": phases["phase1"]["mode"],
        "seconds": seconds,
        "resumed_from_epoch": first,
        "phases": phases,
        "class_weight": weights,
        "stopped_early_at": stopped,
        "strategy": t.strategy,
        "replicas": int(strategy.num_replicas_in_sync),
    }
