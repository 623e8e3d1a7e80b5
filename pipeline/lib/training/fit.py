"""The head's training: seeds, batches, callbacks, checkpoints and the two-phase `fit`.

With a frozen backbone the head is trained on the cached backbone features (the `featurize`
stage), which gives the same model as end-to-end training at a fraction of the cost; the model
returned is still one complete Keras model (images -> class probabilities).

The training state is saved after every epoch (Keras' `BackupAndRestore`) in a folder of
`train.checkpoint_dir` keyed by the run's settings; with `train.resume=true` an interrupted run
continues from its last saved epoch and ends with the same weights and metrics as an uninterrupted
run: the batch order and dropout masks are pure functions of (seed, epoch), not of what ran before.

The steps of `fit`: build the networks (`build_networks`), choose what phase 1 trains on (cached
features or images, `phase1_inputs`), prepare the checkpoint folder, run phase 1 and, with
`train.fine_tune.enabled`, phase 2 (`PhaseRunner`), then collect the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipeline.lib.config.schema import Config
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import read_json, write_json
from pipeline.lib.model.features import load_cached_features
from pipeline.lib.training.head import TrainingRecord

log = logging.getLogger(__name__)


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and Keras/TensorFlow, and turn on TensorFlow's op determinism (same
    seed, same data -> the same weights, bit for bit, on the same machine)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # older TF builds lack it; seeds still apply
    with contextlib.suppress(Exception):
        tf.config.experimental.enable_op_determinism()


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


@dataclass
class Networks:
    """The Keras models of one training run, sharing their weights.

    `extractor`: images (B, H, W, 3) float32 0..255 -> features (B, D); `head`: features ->
    class probabilities (B, C); `full`: images -> probabilities (what is saved);
    `image_net`: `full` with the augmentation layers in front (`full` itself without them).
    """

    extractor: Any
    head: Any
    full: Any
    image_net: Any
    augmented: bool


def build_networks(cfg: Config, num_classes: int, image_size: int) -> Networks:
    """The extractor (seeded by `model.init_seed` when it has no weights), then, seeded by
    `train.seed`, the head and the augmentation layers."""
    from pipeline.lib.model.build import (
        build_augmentation,
        build_feature_extractor,
        build_head,
        compose,
        compose_augmented,
    )

    t = cfg.train
    extractor = build_feature_extractor(
        cfg.model.alpha, cfg.model.weights, image_size, cfg.model.init_seed
    )
    set_seeds(t.seed)
    dim = int(extractor.output.shape[-1])
    head = build_head(dim, num_classes, cfg.model.dropout, cfg.model.head_init)
    augmentation = build_augmentation(t.augment, t.seed) if t.augment.enabled else []
    full = compose(extractor, head)
    image_net = compose_augmented(extractor, head, augmentation) if augmentation else full
    return Networks(extractor, head, full, image_net, bool(augmentation))


def head_only_networks(
    cfg: Config, dataset: PreparedDataset, prepared_md5: str
) -> tuple[Networks, dict[str, np.ndarray]] | None:
    """(networks holding only the head, {"train", "val": cached features}) when the head alone
    can be trained (frozen backbone, feature cache on, no augmentation, no fine-tuning) and
    `paths.features` holds features of these inputs; else None. MobileNetV2 is not built: what a
    sweep job over head settings needs (`train.save_model=auto` in a Hydra multirun). The head is
    seeded by `train.seed` as in `build_networks`, so it trains to the same weights."""
    from pipeline.lib.model.build import build_head

    t = cfg.train
    if _head_only_refusal(cfg):
        return None
    features = load_cached_features(cfg, prepared_md5)
    if features is None:
        return None
    set_seeds(t.seed)
    dim = int(features["train"].shape[1])
    head = build_head(dim, dataset.num_classes, cfg.model.dropout, cfg.model.head_init)
    nets = Networks(extractor=None, head=head, full=head, image_net=head, augmented=False)
    return nets, {s: features[s] for s in ("train", "val")}


def phase1_inputs(
    cfg: Config, dataset: PreparedDataset, prepared_md5: str, nets: Networks
) -> tuple[Any, dict[str, np.ndarray]]:
    """(network, {"train", "val": inputs}) of phase 1: the head on cached features when the
    backbone is frozen and nothing is augmented (augmented images differ every epoch, so their
    features cannot be cached), else the image network on the prepared images. Features missing
    from `paths.features` (or computed from other inputs) are computed here, in memory."""
    t = cfg.train
    if not (t.use_feature_cache and cfg.model.freeze_backbone and not nets.augmented):
        if nets.augmented and t.use_feature_cache and cfg.model.freeze_backbone:
            log.info("train.augment.enabled: training end to end on images, not on cached features")
        return nets.image_net, {s: dataset.images(s) for s in ("train", "val")}
    features = load_cached_features(cfg, prepared_md5)
    if features is None:
        from pipeline.lib.model.features import backbone_featurizer, featurize_array

        m = cfg.model
        featurizer, dim = backbone_featurizer(
            m.alpha,
            m.weights,
            dataset.image_size,
            m.init_seed,
            cfg.featurize.backend,
            cfg.featurize.num_threads,
        )
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
    return nets.head, features


def prepare_checkpoint(cfg: Config, prepared_md5: str) -> Path:
    """The run's checkpoint folder (`checkpoint_folder`): kept with `train.resume=true`, removed
    (an earlier run's state) otherwise."""
    checkpoint = checkpoint_folder(cfg, prepared_md5)
    if cfg.train.resume:
        found = checkpoint.exists()
        log.info(
            "train.resume=true: %s %s",
            "resuming from" if found else "no checkpoint to resume from, starting afresh:",
            checkpoint,
        )
    elif checkpoint.exists():
        log.info("train.resume=false: removing the earlier checkpoint %s", checkpoint)
        shutil.rmtree(checkpoint)
    return checkpoint


@dataclass
class PhaseRunner(TrainingRecord):
    """Runs the training phases of one run with Keras and gathers what they ran (the
    `TrainingRecord`); `extra_callbacks` are added to every phase's `fit`."""

    extra_callbacks: Sequence[Any] = ()
    #: Save the state after every epoch (BackupAndRestore); off for a head-only sweep job
    #: without `train.resume`, where per-epoch saves cost ~70 % of the fit.
    backup: bool = True

    def run(
        self,
        name: str,
        net: Any,
        x: dict[str, Any],
        rate: float,
        epochs: tuple[int, int],
        backup: Path,
    ) -> int:
        """Compile `net` and train it on `x` from epoch `epochs[0]` to `epochs[1]` (0-based,
        exclusive) at learning rate `rate`, saving the state in `backup` after every epoch;
        append what ran; return the number of epochs done by its end."""
        from pipeline.lib.model.build import count_params
        from pipeline.lib.training.batches import ArrayBatches

        t, (first, last) = self.cfg.train, epochs
        y = self.targets
        train_batches = ArrayBatches(x["train"], y["train"], t.batch_size, t.shuffle, t.seed)
        val = (
            ArrayBatches(x["val"], y["val"], t.batch_size, False, t.seed) if self.has_val else None
        )
        schedule = self._compile(net, rate, (last - first) * len(train_batches))
        callbacks, state, recorder, stopper = self._callbacks(
            net, train_batches, schedule, last, backup
        )
        self.phases[name] = {
            # the head takes features (B, D), the image networks images (B, H, W, 3)
            "mode": "cached_features" if len(net.input.shape) == 2 else "end_to_end",
            "trainable_params": count_params(net)["trainable"],
            "learning_rate": float(rate),
            "first_epoch": first + 1,
        }
        net._initial_epoch = None  # a restored epoch of an earlier fit must not carry over
        # shuffle=False: the batches order themselves per (seed, epoch); Keras would reorder them
        result = net.fit(
            train_batches,
            initial_epoch=first,
            epochs=last,
            validation_data=val,
            class_weight=self.class_weight,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )
        done = self._record(name, result.history, state, recorder, last)
        if stopper is not None and stopper.stopped_epoch > 0:
            self.stopped.append(done)
            log.info("Early stopping in %s after epoch %d (best weights restored)", name, done)
        self.phases[name]["last_epoch"] = done
        return done

    def _compile(self, net: Any, rate: float, steps: int) -> Any:
        """Compile `net` (optimizer, loss with label smoothing, accuracy); return the cosine
        schedule over `steps` when `train.lr_schedule=cosine`, else None."""
        import keras

        from pipeline.lib.model.build import make_optimizer

        t = self.cfg.train
        schedule = (
            keras.optimizers.schedules.CosineDecay(rate, steps)
            if t.lr_schedule == "cosine"
            else None
        )
        loss: Any = (
            "categorical_crossentropy"
            if t.label_smoothing == 0
            else keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing)
        )
        net.compile(
            optimizer=make_optimizer(t.optimizer, schedule or rate), loss=loss, metrics=["accuracy"]
        )
        return schedule

    def _callbacks(
        self, net: Any, train_batches: Any, schedule: Any, last: int, backup: Path
    ) -> tuple[list[Any], Any, Any, Any]:
        """(callbacks in order, the EpochState, the BatchRecorder, the EarlyStopping or None).

        The learning-rate logger comes before ReduceLROnPlateau and BackupAndRestore, so the
        state saved holds a reduced rate; BackupAndRestore restores weights, optimizer state and
        epoch at the start (if saved), saves every epoch and deletes its folder at the end. The
        caller's callbacks come last."""
        import keras

        from pipeline.lib.training.callbacks import (
            AtomicBackupAndRestore,
            BatchRecorder,
            EpochState,
            LearningRateLogger,
        )

        t = self.cfg.train
        callbacks: list[Any] = [LearningRateLogger(schedule)]
        if t.lr_schedule == "reduce_on_plateau":
            p = t.plateau
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=self.monitor,
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
                monitor=self.monitor,
                patience=t.early_stopping.patience,
                min_delta=t.early_stopping.min_delta,
                restore_best_weights=True,
                verbose=0,
            )
            callbacks.append(stopper)
        state = EpochState([train_batches], net, len(train_batches))
        recorder = BatchRecorder(len(self.targets["train"]), last, t.batch_size)
        # replaced atomically: a process killed while saving leaves the previous epoch's state
        backup_cb = AtomicBackupAndRestore(str(backup), save_freq="epoch", delete_checkpoint=True)
        callbacks += [backup_cb] if self.backup else []
        callbacks += [state, recorder, *self.extra_callbacks]
        return callbacks, state, recorder, stopper

    def _record(
        self, name: str, ran: dict[str, list[Any]], state: Any, recorder: Any, last: int
    ) -> int:
        """Append the epochs and batches that ran; return the epochs done by the phase's end."""
        count = len(ran.get("loss", []))
        if state.first_epoch is None:
            log.warning(
                "The checkpoint already held all epochs of %s: nothing was trained "
                "(run with train.resume=false to train again)",
                name,
            )
            return last
        first = state.first_epoch
        self.history["epoch"] += list(range(first + 1, first + count + 1))
        for key, values in ran.items():
            self.history.setdefault(key, []).extend(float(v) for v in values)
        for key, values in recorder.batches.items():
            self.batches[key].extend(values)
        return first + count


def run_phase1(
    runner: PhaseRunner, net: Any, x: dict[str, Any], nets: Networks, checkpoint: Path
) -> int:
    """Phase 1 (`train.epochs` at `train.learning_rate`); when fine-tuning, its end is saved
    in the checkpoint folder, and a resumed run whose phase 1 had finished skips it. Returns
    the epochs phase 1 ran."""
    t = runner.cfg.train
    done_file = checkpoint / PHASE1_DONE
    if t.fine_tune.enabled and t.resume and done_file.is_file():
        done = int(read_json(done_file)["epochs"])
        nets.full.load_weights(checkpoint / PHASE1_WEIGHTS)
        runner.phases["phase1"] = read_json(done_file)["phase"]
        log.info("Phase 1 had finished (%d epochs): resuming with fine-tuning", done)
        return done
    done = runner.run("phase1", net, x, t.learning_rate, (0, t.epochs), checkpoint)
    if t.fine_tune.enabled:
        checkpoint.mkdir(parents=True, exist_ok=True)
        nets.full.save_weights(checkpoint / PHASE1_WEIGHTS)
        write_json(done_file, {"epochs": done, "phase": runner.phases["phase1"]})
    return done


def run_phase2(
    runner: PhaseRunner, nets: Networks, images: dict[str, Any], done: int, checkpoint: Path
) -> None:
    """Phase 2 (fine-tuning): the backbone's top `fine_tune.unfreeze_top_n` layers unfrozen
    (BatchNorm kept frozen), end to end on images at `fine_tune.learning_rate`, its epochs
    numbered after phase 1's; the checkpoint folder is removed at its end."""
    from pipeline.lib.model.build import find_backbone, unfreeze_top

    ft = runner.cfg.train.fine_tune
    unfrozen = unfreeze_top(find_backbone(nets.extractor), ft.unfreeze_top_n)
    log.info(
        "Fine-tuning: %d backbone layers unfrozen (BatchNorm kept frozen), lr %g, epochs %d..%d",
        len(unfrozen),
        ft.learning_rate,
        done + 1,
        done + ft.epochs,
    )
    runner.run(
        "phase2",
        nets.image_net,
        images,
        ft.learning_rate,
        (done, done + ft.epochs),
        checkpoint / FINE_TUNE_DIR,
    )
    runner.phases["phase2"]["unfrozen_layers"] = unfrozen
    shutil.rmtree(checkpoint, ignore_errors=True)


def fit(
    cfg: Config,
    dataset: PreparedDataset,
    prepared_md5: str,
    callbacks: Sequence[Any] = (),
    full_model: bool = True,
) -> dict[str, Any]:
    """Train the model as `cfg.train` says; return what was trained and how.

    Args:
        cfg: the validated config (`model`, `train`, `featurize`, `paths.features`).
        dataset: the prepared data (train and val splits are used).
        prepared_md5: its DVC hash (keys the cached features and the checkpoint folder).
        callbacks: Keras callbacks added, after the pipeline's own, to every phase's `fit`
            (e.g. one that stops training).
        full_model: False lets a head-only run skip MobileNetV2 (`head_only_networks`): then,
            when the cached features fit, "model" is the head (features (B, D) -> (B, C)).

    Returns:
        {"model": the full Keras model (images float32 (B, H, W, 3) 0..255 -> probabilities
        (B, C)); None for a NumPy-trained head alone), "full_model": whether it is the whole
        model, "params": its parameter counts, "backend": "numpy" | "keras", "epochs": per-epoch history {"epoch": [1-based], "loss": [...], ...},
        "batches": {"step", "epoch", "loss", "accuracy"}, "mode": "cached_features" |
        "end_to_end", "seconds": wall-clock training time (s), "resumed_from_epoch": epochs
        restored from a checkpoint, "phases", "class_weight", "stopped_early_at", "strategy",
        "replicas"}.

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
    if uses_numpy(cfg, callbacks):
        runner, nets, head, seconds = _train_numpy(cfg, dataset, prepared_md5, full_model)
        params = head.kernel.size + head.bias.size
        counts = {"trainable": params, "non_trainable": 0, "total": params}
        return _fit_result(cfg, runner, nets, seconds, 1, counts)
    strategy = distribution_strategy(cfg.train.strategy)
    with strategy.scope():
        start = time.perf_counter()
        runner, nets = _train(cfg, dataset, prepared_md5, callbacks, full_model)
        seconds = time.perf_counter() - start
    return _fit_result(cfg, runner, nets, seconds, int(strategy.num_replicas_in_sync))


def _head_only_refusal(cfg: Config) -> list[str]:
    """The settings that make training more than a head on cached features (empty: the head
    alone trains): an unfrozen backbone, no feature cache, augmentation, fine-tuning."""
    t = cfg.train
    reasons = {
        "model.freeze_backbone=false": not cfg.model.freeze_backbone,
        "train.use_feature_cache=false": not t.use_feature_cache,
        "train.augment.enabled=true": t.augment.enabled,
        "train.fine_tune.enabled=true": t.fine_tune.enabled,
    }
    return [name for name, applies in reasons.items() if applies]


def numpy_refusal(cfg: Config) -> str | None:
    """Why the NumPy trainer cannot train this run's head (None when it can): it trains only a
    Dense head on cached features (`_head_only_refusal`), on one device."""
    found = _head_only_refusal(cfg)
    found += ["train.strategy=mirrored"] if cfg.train.strategy != "default" else []
    return ", ".join(found) if found else None


def uses_numpy(cfg: Config, callbacks: Sequence[Any] = ()) -> bool:
    """`train.backend`: whether NumPy trains the head (`pipeline.lib.training.numpy_head`).
    `auto`: when `numpy_refusal` finds nothing and no Keras callbacks are given; `numpy`: always
    (raises ConfigError naming what prevents it); `keras`: never."""
    from pipeline.lib.config.schema import ConfigError

    backend, refusal = cfg.train.backend, numpy_refusal(cfg)
    if backend == "numpy" and (refusal or callbacks):
        why = refusal or "Keras callbacks were given"
        raise ConfigError(
            f"train.backend=numpy trains a Dense head on cached features only, not with {why}: "
            "use train.backend=auto or keras"
        )
    return backend == "numpy" or (backend == "auto" and refusal is None and not callbacks)


def _train_numpy(
    cfg: Config, dataset: PreparedDataset, prepared_md5: str, full_model: bool
) -> tuple[Any, Networks | None, Any, float]:
    """(runner, networks or None, the trained NumPy head, seconds its training took (not the
    networks' building)) of a NumPy-trained run: the head is
    trained on the cached features (computed here, in memory, when `paths.features` has none);
    with `full_model` the Keras networks are built and their head gets its weights."""
    from pipeline.lib.training import head as head_lib
    from pipeline.lib.training.calibration import head_dense
    from pipeline.lib.training.numpy_head import train_head

    features = load_cached_features(cfg, prepared_md5)
    nets = None
    if features is None or full_model:
        nets = build_networks(cfg, dataset.num_classes, dataset.image_size)
        if features is None:
            _, features = phase1_inputs(cfg, dataset, prepared_md5, nets)
    if cfg.train.resume:
        log.info("train.resume: the NumPy head trains in about a second, so it trains afresh")
    x = {s: np.asarray(features[s], dtype=np.float32) for s in ("train", "val")}
    labels = {s: dataset.labels(s) for s in ("train", "val")}
    start = time.perf_counter()
    head, runner = train_head(cfg, x, labels, dataset.num_classes)
    seconds = time.perf_counter() - start  # the head's training alone, as the Keras path times it
    if nets is not None:
        refit = runner.head_info.get("refit_images")  # the refit's penalty follows its images
        l2 = head_lib.l2_strength(cfg.train.l2, refit) if refit else runner.l2
        head_lib.set_kernel_l2(nets.head, l2)
        head_dense(nets.head).set_weights(head.weights())
    return runner, nets, head, seconds


def _fit_result(
    cfg: Config,
    runner: Any,
    nets: Networks | None,
    seconds: float,
    replicas: int,
    params: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The dict `fit` returns, from the finished phase runner and the networks it trained.
    `params`: given for a NumPy-trained head (its counts, used when `nets` is None), None for
    Keras."""
    from pipeline.lib.model.build import count_params

    t = cfg.train
    history = runner.history
    total = t.epochs + (t.fine_tune.epochs if t.fine_tune.enabled else 0)
    full = nets is not None and nets.extractor is not None
    return {
        "model": nets.full if nets is not None else None,
        "full_model": full,
        "params": count_params(nets.full) if nets is not None else params,
        "backend": "keras" if params is None else "numpy",
        "epochs": history,
        "batches": runner.batches,
        "mode": runner.phases["phase1"]["mode"],
        "seconds": seconds,
        "resumed_from_epoch": history["epoch"][0] - 1 if history["epoch"] else total,
        "phases": runner.phases,
        "class_weight": runner.class_weight,
        "stopped_early_at": runner.stopped,
        "strategy": t.strategy,
        "replicas": replicas,
        "head": runner.head_info,
    }


def _train(
    cfg: Config,
    dataset: PreparedDataset,
    prepared_md5: str,
    callbacks: Sequence[Any],
    full_model: bool = True,
) -> tuple[PhaseRunner, Networks]:
    """The steps of `fit`, inside the distribution strategy's scope."""
    import keras

    c = dataset.num_classes
    head_only = None if full_model else head_only_networks(cfg, dataset, prepared_md5)
    if head_only is not None:
        nets, x = head_only
        net = nets.head
    else:
        nets = build_networks(cfg, c, dataset.image_size)
        net, x = phase1_inputs(cfg, dataset, prepared_md5, nets)
    targets = {s: keras.utils.to_categorical(dataset.labels(s), c) for s in ("train", "val")}
    weights = class_weights(dataset.labels("train"), c, cfg.train.class_weight)
    runner = PhaseRunner(cfg, targets, weights, extra_callbacks=tuple(callbacks))
    runner.backup = head_only is None or cfg.train.resume
    if not runner.has_val and (
        cfg.train.early_stopping.enabled or cfg.train.lr_schedule == "reduce_on_plateau"
    ):
        log.info(
            "No validation split: early stopping / reduce_on_plateau watch the train loss "
            "(training stops once the regularised loss stops improving)"
        )
    from pipeline.lib.training import head

    head.set_kernel_l2(nets.head, head.l2_strength(cfg.train.l2, len(targets["train"])))
    initial = nets.head.get_weights()
    checkpoint = prepare_checkpoint(cfg, prepared_md5)
    done = run_phase1(runner, net, x, nets, checkpoint)
    if cfg.train.fine_tune.enabled:
        images = {s: dataset.images(s) for s in ("train", "val")}
        run_phase2(runner, nets, images, done, checkpoint)
    runner.head_info = head.finish_keras(runner, nets, net, initial, x)
    return runner, nets
