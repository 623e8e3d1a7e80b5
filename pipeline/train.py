"""Stage `train`: fit the classification head on top of the frozen MobileNetV2, log it to MLflow.

With a frozen backbone the head is trained on the cached backbone features (the `featurize`
stage), which gives the same model as end-to-end training at a fraction of the cost; the saved
model is still one complete Keras model (images -> class probabilities).

    python -m pipeline.train train.epochs=3 model.alpha=0.35 model.weights=null
    python -m pipeline.train -m train.learning_rate=1e-3,1e-2      # one MLflow run per job
    python -m pipeline.train train.resume=true      # continue an interrupted run from its checkpoint

Options (`train.*`, README "Training options"): fine-tuning as a second phase (top backbone
layers unfrozen, BatchNorm frozen, one continuous history), augmentation (end to end on images;
the saved model has no augmentation layers), class weights, label smoothing, early stopping,
cosine / reduce-on-plateau learning rates, and a MirroredStrategy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.prepared import PreparedDataset, data_root, data_tags, open_prepared
from pipeline.lib.files import atomic_dir, dvc_md5, write_json
from pipeline.lib.model.saving import (
    CLASSES_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    save_model,
    summary_text,
    write_head,
    write_run_record,
)
from pipeline.lib.reporting.tables import write_csv
from pipeline.lib.training.fit import checkpoint_folder, fit

log = logging.getLogger(__name__)


def train(cfg: Config, callbacks: Sequence[Any] = ()) -> float | None:
    """Train the model on `paths.prepared` (and the cached features in `paths.features`), write
    the DVC outputs and log everything to one MLflow run; return the final validation accuracy
    (the training accuracy when there is no validation split), the value sweeps optimise.

    The steps: check the inputs, open the MLflow run, log the inputs, `fit`, log the training,
    write the reports (`paths.reports`: train_metrics.json, train_history.csv,
    train_batches.csv, train_figures/), write the model folder (`paths.models`: model.keras,
    head.npy, head.json, classes.json, preprocessing.json, summary.txt) and record the run in `paths.run_file`. Every
    file written into the DVC outputs is a function of the inputs alone (no timings, no dates,
    no run ids): the same inputs give the same bytes.

    `callbacks`: Keras callbacks added to every training phase (e.g. one that stops it).

    Raises:
        WeightsNotFoundError: `model.weights` is not available offline.
        StageInputError: the prepared data is missing or was prepared for another image size.
    """
    from pipeline.lib.model.build import resolve_weights
    from pipeline.lib.tracking import runs as tracking
    from pipeline.lib.training.fit import uses_numpy

    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    uses_numpy(cfg, callbacks)  # train.backend=numpy with settings it cannot train: before any run
    tracking.check_reachable(cfg.tracking.uri, cfg.tracking.timeout_s)
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    prepared_md5 = dvc_md5(cfg.paths.prepared)
    tags = {
        "dvc_prepared_md5": prepared_md5,
        "data_source": cfg.data.source,
        **data_tags(dataset.report),
    }
    checkpoint = checkpoint_folder(cfg, prepared_md5)  # train.resume continues its run
    with tracking.stage_run(cfg, "train", checkpoint=checkpoint, tags=tags) as run:
        _log_inputs(cfg, dataset, prepared_md5)
        saves = _saves_model(cfg)
        result = fit(cfg, dataset, prepared_md5, callbacks=callbacks, full_model=saves)
        metrics = _train_metrics(result)
        _log_training(result, metrics, dataset.classes)
        _write_reports(cfg, result, metrics)
        if saves:
            _write_model_folder(cfg, dataset, result["model"])
            write_run_record(cfg, run)
            if cfg.tracking.log_model:  # registered by evaluate, with test metrics
                tracking.log_model(cfg.paths.models)
        else:
            log.info("train.save_model=%s: no model saved or logged", cfg.train.save_model)
    final = metrics["val" if metrics["val"]["accuracy"] is not None else "train"]
    return final["accuracy"]


def _saves_model(cfg: Config) -> bool:
    """`train.save_model`: `always`, `never`, or `auto` = not in a Hydra sweep job (`-m`), where
    only the head is trained, on the cached features, and no model is saved or logged."""
    from pipeline.lib.config.step import in_multirun

    return cfg.train.save_model == "always" or (
        cfg.train.save_model == "auto" and not in_multirun()
    )


def _final(result: dict[str, Any]) -> dict[str, float]:
    """The last epoch's value of every metric of the history."""
    return {k: v[-1] for k, v in result["epochs"].items() if k != "epoch" and v}


def _train_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics file's content: final loss/accuracy of train and val, parameter counts
    (trainable, non_trainable, total; trainable per phase), the training mode. No timings."""
    final = _final(result)
    phases = result.get("phases", {})
    return {
        "train": {"loss": final.get("loss"), "accuracy": final.get("accuracy")},
        "val": {"loss": final.get("val_loss"), "accuracy": final.get("val_accuracy")},
        "params": {
            **result["params"],
            **{f"trainable_params_{name}": p["trainable_params"] for name, p in phases.items()},
        },
        "mode": result["mode"],
        "backend": result["backend"],  # what trained the head: numpy | keras (train.backend)
        # best epoch, L2 factor, temperature (None: not calibrated), refit (pipeline.lib.training.head)
        "head": {k: v for k, v in result.get("head", {}).items() if k != "refit_history"},
    }


def _log_inputs(cfg: Config, dataset: PreparedDataset, prepared_md5: str) -> None:
    """The config, the prepared dataset (an MLflow input, its DVC hash as digest) and its report."""
    import mlflow

    from pipeline.lib.tracking import runs as tracking

    tracking.log_config(cfg)
    tracking.log_dataset(
        Path(cfg.paths.prepared) / "manifest.csv",
        prepared_md5,
        name=f"{cfg.data.source}:{Path(data_root(cfg.data)).name}",
        source=str(Path(data_root(cfg.data)).resolve()),
    )
    mlflow.log_dict(dataset.report, "data/report.json")


def _log_training(result: dict[str, Any], metrics: dict[str, Any], classes: list[str]) -> None:
    """Log how training went: to the console, and to the MLflow run (per-epoch and per-batch
    metrics, final values, the training time, parameter counts, phases, early stopping, class
    weights)."""
    import mlflow

    from pipeline.lib.tracking import runs as tracking

    epochs, batches, final = result["epochs"], result["batches"], _final(result)
    params = metrics["params"]
    log.info(
        "Trained (%s, %s) in %.1f s: %s; trainable %d, frozen %d parameters",
        result["mode"],
        result["backend"],
        result["seconds"],
        {k: round(v, 4) for k, v in final.items()},
        params["trainable"],
        params["non_trainable"],
    )
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
    mlflow.log_metrics(
        {
            "train_seconds": result["seconds"],
            "trainable_params": params["trainable"],
            "non_trainable_params": params["non_trainable"],
        }
    )
    mlflow.log_metrics({k: v for k, v in params.items() if k.startswith("trainable_params_")})
    mlflow.set_tag("training_mode", result["mode"])
    mlflow.set_tag("train_backend", result["backend"])  # numpy | keras (train.backend)
    _log_options(result, classes)
    head = {k: v for k, v in metrics["head"].items() if isinstance(v, int | float)}
    mlflow.log_metrics({f"head_{k}": float(v) for k, v in head.items()})  # head_temperature, ...


def _log_options(result: dict[str, Any], classes: list[str]) -> None:
    """Tags and files of the training options that ran: fine-tuning, early stopping, weights."""
    import mlflow

    phases = result.get("phases", {})
    if "phase2" in phases:
        mlflow.set_tag("fine_tune_first_epoch", str(phases["phase2"]["first_epoch"]))
        mlflow.log_dict(phases, "fine_tune_phases.json")
    if result.get("stopped_early_at"):
        mlflow.set_tag(
            "early_stopped_at_epoch", ",".join(str(e) for e in result["stopped_early_at"])
        )
    if result.get("class_weight"):
        mlflow.log_dict(
            {classes[i]: w for i, w in result["class_weight"].items()}, "class_weight.json"
        )


def _write_reports(cfg: Config, result: dict[str, Any], metrics: dict[str, Any]) -> None:
    """train_metrics.json, train_history.csv, train_batches.csv and train_figures/ in
    `paths.reports`, each also logged to the MLflow run."""
    from pipeline.lib.reporting import figures as plots
    from pipeline.lib.tracking import runs as tracking

    reports, epochs, batches = Path(cfg.paths.reports), result["epochs"], result["batches"]
    write_json(reports / "train_metrics.json", metrics)
    write_csv(
        reports / "train_history.csv",
        {"epoch": epochs["epoch"], **{k: v for k, v in epochs.items() if k != "epoch"}},
    )
    write_csv(reports / "train_batches.csv", batches)
    with atomic_dir(reports / "train_figures") as tmp:
        figures = plots.save_learning_curves(
            epochs,
            tmp,
            # steps counted from this run's first batch: the plot puts them on its epochs
            batches={
                "step": list(range(1, len(batches["step"]) + 1)),
                "loss": batches["loss"],
                "accuracy": batches["accuracy"],
            },
        )
    tracking.log_files([reports / "train_figures" / p.name for p in figures], "figures")
    tracking.log_files(
        [
            reports / name
            for name in ("train_history.csv", "train_batches.csv", "train_metrics.json")
        ],
        "reports",
    )


def _write_model_folder(cfg: Config, dataset: PreparedDataset, model: Any) -> None:
    """`paths.models`, replaced whole: model.keras (normalised: no save date), head.npy / head.json
    (its Dense head, and the cached features on which the whole model was checked to agree with
    it on sample test images), classes.json,
    preprocessing.json and summary.txt (also logged to the MLflow run)."""
    import mlflow

    from pipeline.lib.model.scoring import check_whole_model
    from pipeline.lib.training.calibration import head_dense

    kernel, bias = head_dense(model).get_weights()
    checked = check_whole_model(cfg, dataset, model, kernel, bias)  # evaluate scores with the head
    summary = summary_text(model)
    mlflow.log_text(summary, "model_summary.txt")
    with atomic_dir(cfg.paths.models) as tmp:
        save_model(model, tmp / MODEL_FILE)
        write_head(tmp, kernel, bias, None if checked is None else dvc_md5(cfg.paths.features))
        write_json(tmp / CLASSES_FILE, dataset.classes)
        write_json(
            tmp / PREPROCESSING_FILE,
            {"image_size": dataset.image_size, "resize": cfg.data.resize},
        )
        (tmp / "summary.txt").write_text(summary, encoding="utf-8")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point: run `train` on conf/ + overrides; return the value sweeps optimise."""
    return run_step(train, cfg)


main = entry_point(hydra_main, __doc__, sections=("train", "model", "tracking"))

if __name__ == "__main__":
    main()
