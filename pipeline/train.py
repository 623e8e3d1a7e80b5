"""Stage `train`: fit the classification head on top of the frozen MobileNetV2, log it to MLflow.

With a frozen backbone the head is trained on the cached backbone features (the `featurize`
stage), which gives the same model as end-to-end training at a fraction of the cost; the saved
model is still one complete Keras model (images -> class probabilities).

    python -m pipeline.train train.epochs=3 model.alpha=0.35 model.weights=null
    python -m pipeline.train -m train.learning_rate=1e-3,1e-2      # one MLflow run per job
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.config import Config
from pipeline.data import PreparedDataset
from pipeline.featurize import load_cached_features, open_prepared
from pipeline.files import atomic_dir, atomic_file, dvc_md5, write_json

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MODEL_FILE = "model.keras"


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
    images per second."""
    import keras
    from tqdm import tqdm

    class BatchRecorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.batches: dict[str, list[float]] = {"step": [], "epoch": [], "loss": [], "accuracy": []}
            self.bar: Any = None
            self.epoch = 0
            self.start = 0.0
            self.seen = 0

        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = tqdm(total=total_images * epochs, unit="img", desc="train", disable=not progress)
            self.start = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch + 1
            self.in_epoch = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            logs = logs or {}
            step = len(self.batches["step"]) + 1
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
            self.bar.close()

    return BatchRecorder()


class ImageBatches:
    """Batches of prepared images (memory-mapped) and one-hot labels, reshuffled every epoch."""

    def __new__(cls, images: np.ndarray, targets: np.ndarray, batch_size: int, shuffle: bool,
                seed: int) -> Any:
        import keras

        class _Batches(keras.utils.PyDataset):
            def __init__(self) -> None:
                super().__init__()
                self.rng = np.random.default_rng(seed)
                self.order = np.arange(len(images))
                self.on_epoch_end()

            def __len__(self) -> int:
                return math.ceil(len(images) / batch_size)

            def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
                idx = np.sort(self.order[i * batch_size : (i + 1) * batch_size])
                return np.asarray(images[idx], dtype=np.float32), targets[idx]

            def on_epoch_end(self) -> None:
                if shuffle:
                    self.order = self.rng.permutation(len(images))

        return _Batches()


def fit(cfg: Config, dataset: PreparedDataset, prepared_md5: str) -> dict[str, Any]:
    """Train the head (on cached features when the backbone is frozen); return the full model,
    per-epoch history, per-batch records and how it was trained."""
    import keras

    from pipeline.features import choose_backend, featurize_array, make_featurizer
    from pipeline.model import build_feature_extractor, build_head, compose, make_optimizer

    t, c = cfg.train, dataset.num_classes
    extractor = build_feature_extractor(
        cfg.model.alpha, cfg.model.weights, dataset.image_size, cfg.model.init_seed
    )
    set_seeds(t.seed)
    dim = int(extractor.output.shape[-1])
    head = build_head(dim, c, cfg.model.dropout)
    y = {s: keras.utils.to_categorical(dataset.labels(s), c) for s in ("train", "val")}
    n_train = len(y["train"])
    recorder = batch_recorder(n_train, t.epochs, t.batch_size)
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
        head.compile(optimizer=make_optimizer(t.optimizer, t.learning_rate),
                     loss="categorical_crossentropy", metrics=["accuracy"])
        history = head.fit(
            features["train"], y["train"], batch_size=t.batch_size, epochs=t.epochs,
            validation_data=(features["val"], y["val"]) if has_val else None,
            shuffle=t.shuffle, verbose=0, callbacks=[recorder],
        )
        model = compose(extractor, head)
    else:
        model = compose(extractor, head)
        model.compile(optimizer=make_optimizer(t.optimizer, t.learning_rate),
                      loss="categorical_crossentropy", metrics=["accuracy"])
        batches = ImageBatches(dataset.images("train"), y["train"], t.batch_size, t.shuffle, t.seed)
        val = ImageBatches(dataset.images("val"), y["val"], t.batch_size, False, t.seed) if has_val else None
        # shuffle=False: the batches shuffle themselves (seeded); Keras would also reorder them
        history = model.fit(batches, epochs=t.epochs, validation_data=val, verbose=0,
                            shuffle=False, callbacks=[recorder])
    seconds = time.perf_counter() - start
    epochs = {k: [float(v) for v in values] for k, values in history.history.items()}
    epochs["epoch"] = list(range(1, len(epochs.get("loss", [])) + 1))
    return {"model": model, "epochs": epochs, "batches": recorder.batches,
            "mode": "cached_features" if cached else "end_to_end", "seconds": seconds}


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
                batches={k: batches[k] for k in ("step", "loss", "accuracy")},
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
