"""Keras `fit` where images must flow (`train.solver=keras`): the study's epochs, augmentation,
fine-tuning, an unfrozen backbone. The state is saved every epoch in a folder keyed by the run's
settings: with `train.resume=true` an interrupted run ends as an uninterrupted one would."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from omegaconf import OmegaConf

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import in_multirun
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import no_space_error, read_json, write_json
from pipeline.lib.model import build
from pipeline.lib.model.classifier import Head
from pipeline.lib.model.features import featurize_array
from pipeline.lib.training.callbacks import (
    ArrayBatches,
    AtomicBackupAndRestore,
    BatchRecorder,
    EpochState,
    LearningRateLogger,
)
from pipeline.lib.training.head import class_weights

log = logging.getLogger(__name__)


def checkpoint_folder(cfg: Config, prepared_md5: str) -> Path:
    """`train.checkpoint_dir/train-<digest>`, keyed by what determines the run (settings but
    resume / checkpoint_dir, data, model folder): a resume finds only its own."""
    train_settings = OmegaConf.to_container(cfg.train, resolve=True)
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "train": {k: v for k, v in train_settings.items() if k not in ("resume", "checkpoint_dir")},
        "featurize": OmegaConf.to_container(cfg.featurize, resolve=True),
        "prepared_md5": prepared_md5,
        "models": str(Path(cfg.paths.models).resolve()),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.train.checkpoint_dir) / f"train-{digest}"


@dataclass
class Networks:
    """One run's Keras models, sharing weights: `extractor` images 0..255 -> features (None when
    only the head trains), `head`, `full` (both), `image_net` (`full` behind any augmentation)."""

    extractor: Any
    head: Any
    full: Any
    image_net: Any


def build_networks(
    cfg: Config, num_classes: int, image_size: int, l2: float, feature_dim: int | None
) -> Networks:
    """The extractor (none when `feature_dim` is given), then, seeded by `train.seed`, the head
    (`l2`: its kernel's penalty) and the augmentation layers."""
    t, m = cfg.train, cfg.model
    extractor = None
    if feature_dim is None:
        extractor = build.build_feature_extractor(m.alpha, m.weights, image_size, m.init_seed)
        feature_dim = int(extractor.output.shape[-1])
    keras.utils.set_random_seed(t.seed)  # Python, NumPy, TensorFlow
    tf.config.experimental.enable_op_determinism()
    head = build.build_head(feature_dim, num_classes, m.dropout, m.head_init, l2)
    if extractor is None:
        return Networks(None, head, head, head)
    full = build.compose(extractor, head)
    augmentation = build.build_augmentation(t.augment, t.seed) if t.augment.enabled else None
    image_net = full if augmentation is None else build.compose(extractor, head, augmentation)
    return Networks(extractor, head, full, image_net)


def phase1_on_images(cfg: Config) -> bool:
    """Whether phase 1 trains on images (augmented, or an unfrozen backbone), not on features."""
    return cfg.train.augment.enabled or not cfg.model.freeze_backbone


def prepare_checkpoint(cfg: Config, prepared_md5: str) -> Path:
    """`checkpoint_folder`: kept with `train.resume=true`, else removed (an earlier run's)."""
    checkpoint = checkpoint_folder(cfg, prepared_md5)
    if cfg.train.resume:
        state = "resuming from" if checkpoint.exists() else "no checkpoint, starting afresh:"
        log.info("train.resume=true: %s %s", state, checkpoint)
    elif checkpoint.exists():
        log.info("train.resume=false: removing the earlier checkpoint %s", checkpoint)
        shutil.rmtree(checkpoint)
    return checkpoint


@dataclass
class PhaseRunner:
    """Runs a fit's phases, recording per-epoch `history` (epoch 1-based, metrics), per-batch
    `batches`, each phase's settings (`phases`) and where early stopping ended one (`stopped`)."""

    cfg: Config
    targets: dict[str, np.ndarray]
    class_weight: dict[int, float] | None
    history: dict[str, list[float]] = field(default_factory=lambda: {"epoch": []})
    batches: dict[str, list[float]] = field(
        default_factory=lambda: {"step": [], "epoch": [], "loss": [], "accuracy": []}
    )
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: list[int] = field(default_factory=list)
    extra_callbacks: Sequence[Any] = ()
    backup: bool = True  # the state saved every epoch (~70 % of a head-only sweep job's time)

    def run(
        self, name: str, net: Any, x: dict[str, Any], rate: float, epochs: range, backup: Path
    ) -> int:
        """Train `net` on `x` over `epochs` (0-based) at `rate`, its state in `backup`; return the
        epochs done."""
        t, first, last, y = self.cfg.train, epochs.start, epochs.stop, self.targets
        train_batches = ArrayBatches(x["train"], y["train"], t.batch_size, t.shuffle, t.seed)
        val = ArrayBatches(x["val"], y["val"], t.batch_size, False, 0) if len(y["val"]) else None
        steps = (last - first) * len(train_batches)
        cosine = t.lr_schedule == "cosine"
        schedule = keras.optimizers.schedules.CosineDecay(rate, steps) if cosine else None
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing)
        net.compile(build.make_optimizer(t.optimizer, schedule or rate), loss, metrics=["accuracy"])
        callbacks, stopper = self._callbacks(schedule, backup)
        state = EpochState(train_batches, net, len(train_batches))
        recorder = BatchRecorder(self.batches, len(y["train"]), last, t.batch_size)
        self.phases[name] = {
            # the head takes features (B, D), the image networks images (B, H, W, 3)
            "mode": "cached_features" if len(net.input.shape) == 2 else "end_to_end",
            "trainable_params": build.count_params(net)["trainable"],
            "learning_rate": float(rate),
            "first_epoch": first + 1,
        }
        net._initial_epoch = None  # a restored epoch of an earlier fit must not carry over
        # shuffle=False: the batches order themselves per (seed, epoch); Keras would reorder them
        ran = net.fit(
            train_batches,
            initial_epoch=first,
            epochs=last,
            validation_data=val,
            class_weight=self.class_weight,
            verbose=0,
            shuffle=False,
            callbacks=[*callbacks, state, recorder, *self.extra_callbacks],
        ).history
        done = last
        if state.first_epoch is None:
            log.warning(
                "The checkpoint already held all epochs of %s: nothing was trained "
                "(run with train.resume=false to train again)",
                name,
            )
        else:
            done = state.first_epoch + len(ran.get("loss", []))
            self.history["epoch"] += list(range(state.first_epoch + 1, done + 1))
            for key, values in ran.items():
                self.history.setdefault(key, []).extend(float(v) for v in values)
        if stopper is not None and stopper.stopped_epoch > 0:
            self.stopped.append(done)
            log.info("Early stopping in %s after epoch %d (best weights restored)", name, done)
        self.phases[name]["last_epoch"] = done
        return done

    def _callbacks(self, schedule: Any, backup: Path) -> tuple[list[Any], Any]:
        """(callbacks, EarlyStopping or None); the rate logger runs before ReduceLROnPlateau."""
        t = self.cfg.train
        monitor = "val_loss" if len(self.targets["val"]) else "loss"
        callbacks: list[Any] = [LearningRateLogger(schedule)]
        if t.lr_schedule == "reduce_on_plateau":
            # factor, patience, min_delta, min_lr
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, **t.plateau))
        stopper = None
        if t.early_stopping.enabled:
            stopping = {k: getattr(t.early_stopping, k) for k in ("patience", "min_delta")}
            stopper = keras.callbacks.EarlyStopping(monitor, restore_best_weights=True, **stopping)
            callbacks.append(stopper)
        if self.backup:  # replaced atomically: a killed process leaves the last epoch's state
            callbacks.append(
                AtomicBackupAndRestore(str(backup), save_freq="epoch", delete_checkpoint=True)
            )
        return callbacks, stopper


def run_phase1(
    runner: PhaseRunner, net: Any, x: dict[str, Any], nets: Networks, checkpoint: Path
) -> int:
    """Phase 1; its epochs (saved in `checkpoint` when fine-tuning: a resumed run skips it)."""
    t = runner.cfg.train
    weights, done_file = checkpoint / "phase1.weights.h5", checkpoint / "phase1.json"
    if t.fine_tune.enabled and t.resume and done_file.is_file():
        done = int(read_json(done_file)["epochs"])
        nets.full.load_weights(weights)
        runner.phases["phase1"] = read_json(done_file)["phase"]
        log.info("Phase 1 had finished (%d epochs): resuming with fine-tuning", done)
        return done
    done = runner.run("phase1", net, x, t.learning_rate, range(t.epochs), checkpoint)
    if t.fine_tune.enabled:
        checkpoint.mkdir(parents=True, exist_ok=True)
        nets.full.save_weights(weights)
        write_json(done_file, {"epochs": done, "phase": runner.phases["phase1"]})
    return done


def run_phase2(
    runner: PhaseRunner, nets: Networks, images: dict[str, Any], done: int, checkpoint: Path
) -> None:
    """Fine-tune the backbone's top `unfreeze_top_n` layers (BatchNorm frozen) on images, after
    phase 1's epochs; then remove the checkpoint folder."""
    ft = runner.cfg.train.fine_tune
    unfrozen = build.unfreeze_top(nets.extractor.get_layer(build.BACKBONE_NAME), ft.unfreeze_top_n)
    log.info("Fine-tuning %d layers (BatchNorm frozen), lr %g", len(unfrozen), ft.learning_rate)
    epochs, backup = range(done, done + ft.epochs), checkpoint / "fine_tune"
    runner.run("phase2", nets.image_net, images, ft.learning_rate, epochs, backup)
    runner.phases["phase2"]["unfrozen_layers"] = unfrozen
    shutil.rmtree(checkpoint, ignore_errors=True)


def l2_factor(c: float | str | None, n_train: int) -> float:
    """`train.C` as Keras' L2 factor on the batch-mean loss: 1 / (2 C n_train), scikit-learn's
    objective (`auto`: C = 1; null: no penalty)."""
    if c is None:
        return 0.0
    return 1.0 / (2.0 * (1.0 if c == "auto" else float(c)) * max(int(n_train), 1))


@dataclass
class KerasFit:
    """The `head` (not calibrated); the `extractor` and its `features` when its weights changed
    (else None); the `runner`'s records."""

    head: Head
    extractor: keras.Model | None
    features: dict[str, np.ndarray] | None
    runner: PhaseRunner
    params: dict[str, int]
    seconds: float
    resumed_from_epoch: int
    replicas: int


def fit_keras(
    cfg: Config,
    dataset: PreparedDataset,
    features: dict[str, np.ndarray],
    prepared_md5: str,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> KerasFit:
    """Keras `fit`: phase 1 trains the head on the cached `features` {"train", "val": float32
    (N, D)} unless `phase1_on_images`; phase 2 (`train.fine_tune`) the backbone's top too.
    `callbacks` follow the pipeline's own in every phase."""
    t, c = cfg.train, dataset.num_classes
    mirrored = t.strategy == "mirrored"  # every GPU, else the CPU
    strategy = tf.distribute.MirroredStrategy() if mirrored else tf.distribute.get_strategy()
    log.info("train.strategy=%s: %d replica(s)", t.strategy, strategy.num_replicas_in_sync)
    on_images = phase1_on_images(cfg)
    head_only = not on_images and not t.fine_tune.enabled
    images = {s: dataset.images(s) for s in ("train", "val")}
    targets = {s: keras.utils.to_categorical(dataset.labels(s), c) for s in ("train", "val")}
    l2 = l2_factor(t.C, len(targets["train"]))
    with strategy.scope():
        start = time.perf_counter()
        dim = features["train"].shape[1] if head_only else None
        nets = build_networks(cfg, c, dataset.image_size, l2, dim)
        net, x = (nets.image_net, images) if on_images else (nets.head, features)
        weights = class_weights(dataset.labels("train"), c, t.class_weight)
        runner = PhaseRunner(
            cfg,
            targets,
            None if weights is None else dict(enumerate(weights.tolist())),
            extra_callbacks=tuple(callbacks),
            backup=not head_only or t.resume or not in_multirun(),
        )
        try:  # a full disk under the checkpoint: one line (the last epoch's state stays)
            checkpoint = prepare_checkpoint(cfg, prepared_md5)
            done = run_phase1(runner, net, {s: x[s] for s in ("train", "val")}, nets, checkpoint)
            if t.fine_tune.enabled:
                run_phase2(runner, nets, images, done, checkpoint)
        except OSError as exc:
            raise no_space_error(exc, t.checkpoint_dir, "train.checkpoint_dir") or exc from None
        seconds = time.perf_counter() - start
    kernel, bias = nets.head.get_layer(build.HEAD_NAME).get_weights()
    changed = t.fine_tune.enabled or not cfg.model.freeze_backbone
    extractor = nets.extractor if changed else None
    new_features = None
    if extractor is not None:  # the photos decoded batch by batch
        featurize = extractor.predict_on_batch
        dim = int(extractor.output_shape[-1])
        new_features = {s: featurize_array(featurize, images[s], 32, dim) for s in images}
    epochs = runner.history["epoch"]  # none ran: the checkpoint held them all
    resumed = epochs[0] - 1 if epochs else t.epochs + t.fine_tune.enabled * t.fine_tune.epochs
    head = Head(np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
    params, replicas = build.count_params(nets.full), int(strategy.num_replicas_in_sync)
    return KerasFit(head, extractor, new_features, runner, params, seconds, resumed, replicas)
