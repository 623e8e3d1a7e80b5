"""Stage `train`: fit the classification head on top of the frozen MobileNetV2, log it to MLflow.

With a frozen backbone the head is trained on the cached backbone features (the `featurize`
stage), which gives the same model as end-to-end training at a fraction of the cost; the saved
model is still one complete Keras model (images -> class probabilities).

    python -m pipeline.train train.epochs=3 model.alpha=0.35 model.weights=null
    python -m pipeline.train -m train.learning_rate=1e-3,1e-2      # one MLflow run per job
    python -m pipeline.train train.resume=true      # continue an interrupted run from its checkpoint

The training state is saved after every epoch (Keras' `BackupAndRestore`) in a folder of
`train.checkpoint_dir` keyed by the run's settings; with `train.resume=true` an interrupted run
continues from its last saved epoch and ends with the same weights and metrics as an uninterrupted
run: the batch order and dropout masks are pure functions of (seed, epoch), not of what ran before.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Config
from pipeline.data import PreparedDataset
from pipeline.featurize import load_cached_features, open_prepared
from pipeline.files import atomic_dir, atomic_file, dvc_md5, write_json

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MODEL_FILE = "model.keras"

#: Keras callbacks appended to every `fit`, after the checkpointing one. Empty in production;
#: tests put a callback here that interrupts training at a chosen epoch.
EXTRA_CALLBACKS: list[Any] = []


def set_seeds(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # noqa: BLE001 (older TF builds lack it; seeds still apply)
        pass


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
            self.batches: dict[str, list[float]] = {"step": [], "epoch": [], "loss": [], "accuracy": []}
            self.bar: Any = None
            self.epoch = 0
            self.start = 0.0
            self.seen = 0

        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = None
            self.start = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if self.bar is None:  # the first epoch that runs (later than 0 after a restore)
                self.bar = tqdm(total=total_images * (epochs - epoch), unit="img", desc="train",
                                disable=not progress)
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
            self.bar.set_postfix(epoch=self.epoch, loss=f"{logs.get('loss', math.nan):.3f}",
                                 img_per_s=f"{rate:.0f}")

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

    def __new__(cls, x: np.ndarray, targets: np.ndarray, batch_size: int, shuffle: bool,
                seed: int) -> Any:
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
                    perm = (np.random.default_rng((seed, epoch)).permutation(len(x)) if shuffle
                            else np.arange(len(x)))
                    cached = self._order = (epoch, perm)
                return cached[1]

            def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
                idx = np.sort(self.order()[i * batch_size : (i + 1) * batch_size])  # memmap: in order
                return np.asarray(x[idx], dtype=np.float32), targets[idx]

        return _Batches()


def epoch_state(datasets: list[Any], model: Any, steps_per_epoch: int) -> Any:
    """A Keras callback that, at the start of each epoch, sets everything random that depends on
    the epoch: the batch order of `datasets` and the dropout masks of `model`'s layers.

    Dropout draws its masks from a `SeedGenerator` whose state Keras' checkpoints do not hold;
    setting its counter to epoch x steps per epoch (what it reaches anyway when each step draws
    once) makes the masks of a resumed run those of an uninterrupted one. `first_epoch` is the
    first epoch that ran (0-based; later than 0 when resumed from a checkpoint).
    """
    import keras

    generators = [layer.seed_generator for layer in model.layers
                  if isinstance(getattr(layer, "seed_generator", None), keras.random.SeedGenerator)]
    bases = [int(np.asarray(g.state.numpy())[0]) for g in generators]

    class EpochState(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.first_epoch: int | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if self.first_epoch is None:
                self.first_epoch = epoch
            for dataset in datasets:
                dataset.epoch = epoch
            for generator, base in zip(generators, bases):
                generator.state.assign(
                    np.array([base, epoch * steps_per_epoch], dtype=generator.state.dtype))

    return EpochState()


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


def fit(cfg: Config, dataset: PreparedDataset, prepared_md5: str) -> dict[str, Any]:
    """Train the head (on cached features when the backbone is frozen); return the full model,
    per-epoch history, per-batch records and how it was trained.

    The state is saved after every epoch; with `train.resume` an interrupted run continues from
    its last saved epoch (history and batches then hold only the epochs run here, numbered as in
    the whole run; `resumed_from_epoch` says how many were restored), else it starts afresh.
    """
    import keras

    from pipeline.features import choose_backend, featurize_array, make_featurizer
    from pipeline.model import build_feature_extractor, build_head, compose, make_optimizer

    t, c = cfg.train, dataset.num_classes
    extractor = build_feature_extractor(
        cfg.model.alpha, cfg.model.weights, dataset.image_size, cfg.model.init_seed
    )
    set_seeds(t.seed)
    dim = int(extractor.output.shape[-1])
    head = build_head(dim, c, cfg.model.dropout, cfg.model.head_init)
    y = {s: keras.utils.to_categorical(dataset.labels(s), c) for s in ("train", "val")}
    n_train = len(y["train"])
    has_val = len(y["val"]) > 0
    cached = t.use_feature_cache and cfg.model.freeze_backbone
    start = time.perf_counter()
    if cached:
        features = load_cached_features(cfg, prepared_md5)
        if features is None:
            backend = choose_backend(cfg.featurize.backend, extractor,
                                     dataset.size("train") + dataset.size("val"))
            featurizer = make_featurizer(extractor, backend, cfg.featurize.num_threads)
            features = {
                s: featurize_array(featurizer, dataset.images(s), cfg.featurize.batch_size, dim,
                                   progress=f"features {s}")
                for s in ("train", "val")
            }
        net, x = head, features
    else:
        net, x = compose(extractor, head), {s: dataset.images(s) for s in ("train", "val")}
    net.compile(optimizer=make_optimizer(t.optimizer, t.learning_rate),
                loss="categorical_crossentropy", metrics=["accuracy"])
    batches = ArrayBatches(x["train"], y["train"], t.batch_size, t.shuffle, t.seed)
    val = ArrayBatches(x["val"], y["val"], t.batch_size, False, t.seed) if has_val else None

    checkpoint = checkpoint_folder(cfg, prepared_md5)
    if t.resume:
        log.info("train.resume=true: %s %s", "resuming from" if checkpoint.exists()
                 else "no checkpoint to resume from, starting afresh:", checkpoint)
    elif checkpoint.exists():
        log.info("train.resume=false: removing the earlier checkpoint %s", checkpoint)
        shutil.rmtree(checkpoint)
    state = epoch_state([batches], net, len(batches))
    recorder = batch_recorder(n_train, t.epochs, t.batch_size)
    callbacks = [
        # restores weights, optimizer state and epoch at the start (if saved), saves every epoch,
        # deletes its folder when training ends
        keras.callbacks.BackupAndRestore(str(checkpoint), save_freq="epoch", delete_checkpoint=True),
        state, recorder, *EXTRA_CALLBACKS,
    ]
    # shuffle=False: the batches order themselves per (seed, epoch); Keras would reorder them
    history = net.fit(batches, epochs=t.epochs, validation_data=val, verbose=0, shuffle=False,
                      callbacks=callbacks)
    model = compose(extractor, head) if cached else net
    seconds = time.perf_counter() - start
    first = state.first_epoch if state.first_epoch is not None else t.epochs
    if state.first_epoch is None:
        log.warning("The checkpoint already held all %d epochs: nothing was trained, no metrics "
                    "recorded (run with train.resume=false to train again)", t.epochs)
    epochs = {k: [float(v) for v in values] for k, values in history.history.items()}
    epochs["epoch"] = list(range(first + 1, first + len(epochs.get("loss", [])) + 1))
    return {"model": model, "epochs": epochs, "batches": recorder.batches,
            "mode": "cached_features" if cached else "end_to_end", "seconds": seconds,
            "resumed_from_epoch": first}


def write_csv(path: Path, columns: dict[str, list[Any]]) -> None:
    names = list(columns)
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows(zip(*(columns[n] for n in names)))


def summary_text(model: Any) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=False)
    return "\n".join(lines) + "\n"


def train(cfg: Config) -> float | None:
    import mlflow

    from pipeline import plots, tracking
    from pipeline.model import count_params, resolve_weights

    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    tracking.check_reachable(cfg.tracking.uri, cfg.tracking.timeout_s)
    dataset = open_prepared(cfg)
    prepared_md5 = dvc_md5(cfg.paths.prepared)
    reports = Path(cfg.paths.reports)
    tags = {
        "git_commit": tracking.git_commit() or "unknown",
        "git_dirty": str(tracking.git_dirty()),
        "dvc_prepared_md5": prepared_md5,
        "data_source": cfg.data.source,
        "stage": "train",
    }
    with tracking.active_run(cfg.tracking, run_name=cfg.tracking.run_name, tags=tags) as run:
        run_id = run.info.run_id
        tracking.log_config(cfg)
        tracking.log_dataset(Path(cfg.paths.prepared) / "manifest.csv", prepared_md5,
                             name=f"{cfg.data.source}:{Path(cfg.data.path).name}",
                             source=str(Path(cfg.data.path).resolve()))
        mlflow.log_dict(dataset.report, "data/report.json")
        result = fit(cfg, dataset, prepared_md5)
        model, epochs, batches = result["model"], result["epochs"], result["batches"]
        params = count_params(model)
        final = {k: v[-1] for k, v in epochs.items() if k != "epoch" and v}
        log.info("Trained (%s) in %.1f s: %s; trainable %d, frozen %d parameters", result["mode"],
                 result["seconds"], {k: round(v, 4) for k, v in final.items()},
                 params["trainable"], params["non_trainable"])

        resumed_from = result.get("resumed_from_epoch", 0)
        if resumed_from:
            mlflow.set_tag("resumed_from_epoch", str(resumed_from))
            # the epochs run here, at their epoch numbers in the whole run
            tracking.log_history({}, batches)
            for i, epoch in enumerate(epochs["epoch"]):
                mlflow.log_metrics({k: v[i] for k, v in epochs.items() if k != "epoch"}, step=epoch)
        else:
            tracking.log_history(epochs, batches)
        mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
        mlflow.log_metrics({"train_seconds": result["seconds"],
                            "trainable_params": params["trainable"],
                            "non_trainable_params": params["non_trainable"]})
        mlflow.set_tag("training_mode", result["mode"])

        metrics = {
            "train": {"loss": final.get("loss"), "accuracy": final.get("accuracy")},
            "val": {"loss": final.get("val_loss"), "accuracy": final.get("val_accuracy")},
            "params": params,
            "mode": result["mode"],
            "seconds": round(result["seconds"], 3),
        }
        write_json(reports / "train_metrics.json", metrics)
        write_csv(reports / "train_history.csv",
                  {"epoch": epochs["epoch"], **{k: v for k, v in epochs.items() if k != "epoch"}})
        write_csv(reports / "train_batches.csv", batches)
        with atomic_dir(reports / "train_figures") as tmp:
            figures = plots.save_learning_curves(
                epochs, tmp,
                # steps counted from this run's first batch: the plot puts them on its epochs
                batches={"step": list(range(1, len(batches["step"]) + 1)),
                         "loss": batches["loss"], "accuracy": batches["accuracy"]},
            )
        tracking.log_files([reports / "train_figures" / p.name for p in figures], "figures")
        tracking.log_files([reports / "train_history.csv", reports / "train_batches.csv",
                            reports / "train_metrics.json"], "reports")
        summary = summary_text(model)
        mlflow.log_text(summary, "model_summary.txt")

        with atomic_dir(cfg.paths.models) as tmp:
            model.save(tmp / MODEL_FILE)
            write_json(tmp / "classes.json", dataset.classes)
            write_json(tmp / RUN_FILE, {"run_id": run_id, "experiment_id": run.info.experiment_id,
                                        "tracking_uri": cfg.tracking.uri})
            (tmp / "summary.txt").write_text(summary, encoding="utf-8")
        if cfg.tracking.log_model:
            example = np.asarray(dataset.images("val" if dataset.size("val") else "train")[:1],
                                 dtype=np.float32)
            tracking.log_model(model, example, registered_model=cfg.tracking.registered_model)
    return final.get("val_accuracy", final.get("accuracy"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline.step import run_step

    return run_step(train, cfg)


if __name__ == "__main__":
    main()
