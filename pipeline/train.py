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
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import run_step
from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.files import atomic_dir, dvc_md5, write_json
from pipeline.lib.model.saving import CLASSES_FILE, MODEL_FILE, PREPROCESSING_FILE, summary_text
from pipeline.lib.reporting.tables import write_csv
from pipeline.lib.tracking.runs import RUN_FILE
from pipeline.lib.training.fit import fit

log = logging.getLogger(__name__)


def train(cfg: Config) -> float | None:
    import mlflow

    from pipeline.lib.model.build import count_params, resolve_weights
    from pipeline.lib.reporting import figures as plots
    from pipeline.lib.tracking import runs as tracking

    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    tracking.check_reachable(cfg.tracking.uri, cfg.tracking.timeout_s)
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
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
        tracking.log_dataset(
            Path(cfg.paths.prepared) / "manifest.csv",
            prepared_md5,
            name=f"{cfg.data.source}:{Path(cfg.data.path).name}",
            source=str(Path(cfg.data.path).resolve()),
        )
        mlflow.log_dict(dataset.report, "data/report.json")
        result = fit(cfg, dataset, prepared_md5)
        model, epochs, batches = result["model"], result["epochs"], result["batches"]
        params = count_params(model)
        final = {k: v[-1] for k, v in epochs.items() if k != "epoch" and v}
        log.info(
            "Trained (%s) in %.1f s: %s; trainable %d, frozen %d parameters",
            result["mode"],
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
        mlflow.set_tag("training_mode", result["mode"])
        phases = result.get("phases", {})
        phase_params = {
            f"trainable_params_{name}": info["trainable_params"] for name, info in phases.items()
        }
        mlflow.log_metrics(phase_params)
        if "phase2" in phases:
            mlflow.set_tag("fine_tune_first_epoch", str(phases["phase2"]["first_epoch"]))
            mlflow.log_dict(phases, "fine_tune_phases.json")
        if result.get("stopped_early_at"):
            mlflow.set_tag(
                "early_stopped_at_epoch", ",".join(str(e) for e in result["stopped_early_at"])
            )
        if result.get("class_weight"):
            mlflow.log_dict(
                {dataset.classes[i]: w for i, w in result["class_weight"].items()},
                "class_weight.json",
            )

        metrics = {
            "train": {"loss": final.get("loss"), "accuracy": final.get("accuracy")},
            "val": {"loss": final.get("val_loss"), "accuracy": final.get("val_accuracy")},
            "params": {**params, **phase_params},
            "mode": result["mode"],
            "seconds": round(result["seconds"], 3),
        }
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
                reports / "train_history.csv",
                reports / "train_batches.csv",
                reports / "train_metrics.json",
            ],
            "reports",
        )
        summary = summary_text(model)
        mlflow.log_text(summary, "model_summary.txt")

        with atomic_dir(cfg.paths.models) as tmp:
            model.save(tmp / MODEL_FILE)
            write_json(tmp / CLASSES_FILE, dataset.classes)
            write_json(
                tmp / PREPROCESSING_FILE,
                {"image_size": dataset.image_size, "resize": cfg.data.resize},
            )
            write_json(
                tmp / RUN_FILE,
                {
                    "run_id": run_id,
                    "experiment_id": run.info.experiment_id,
                    "tracking_uri": cfg.tracking.uri,
                },
            )
            (tmp / "summary.txt").write_text(summary, encoding="utf-8")
        if cfg.tracking.log_model:
            example = np.asarray(
                dataset.images("val" if dataset.size("val") else "train")[:1], dtype=np.float32
            )
            tracking.log_model(model, example, registered_model=cfg.tracking.registered_model)
    return final.get("val_accuracy", final.get("accuracy"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_step(train, cfg)


if __name__ == "__main__":
    main()
