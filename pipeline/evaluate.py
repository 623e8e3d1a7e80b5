"""Stage `evaluate`: predict the test split with the saved model; write metrics, the
classification report, the confusion matrix and the prediction gallery; add them to the
pipeline run's MLflow run (the one `train` started).

    python -m pipeline.evaluate
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import run_step
from pipeline.lib.data.prepared import iter_batches, open_prepared
from pipeline.lib.files import atomic_dir, atomic_file, read_json, write_json
from pipeline.lib.model.saving import MODEL_FILE, trained_model_folder
from pipeline.lib.reporting.tables import write_csv
from pipeline.lib.tracking.runs import RUN_FILE

log = logging.getLogger(__name__)


def predict(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) of a (memory-mapped) image array, batch by batch."""
    out = [np.asarray(model.predict_on_batch(batch)) for batch in iter_batches(images, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output.shape[-1]), dtype=np.float32)


def gallery_indices(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Which test images the gallery shows: the mistakes first, then a round-robin over classes,
    so every class appears (in dataset order within a class)."""
    wrong = [int(i) for i in np.flatnonzero(y_true != y_pred)]
    by_class = [list(np.flatnonzero(y_true == c)) for c in np.unique(y_true)]
    chosen = wrong[: max(n // 2, 1)] if n else []
    rounds = max((len(b) for b in by_class), default=0)
    for r in range(rounds):
        for members in by_class:
            if len(chosen) >= n:
                return np.array(sorted(chosen), dtype=np.int64)
            if r < len(members) and int(members[r]) not in chosen:
                chosen.append(int(members[r]))
    return np.array(sorted(chosen[:n]), dtype=np.int64)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class precision/recall/F1 (the `dvc metrics show` file)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "precision": {c: float(p) for c, p in zip(classes, precision, strict=False)},
        "recall": {c: float(r) for c, r in zip(classes, recall, strict=False)},
        "f1": {c: float(v) for c, v in zip(classes, f1, strict=False)},
        "support": {c: int(s) for c, s in zip(classes, support, strict=False)},
    }


def evaluate(cfg: Config) -> dict[str, Any]:
    import mlflow
    from sklearn.metrics import classification_report, confusion_matrix

    from pipeline.lib.model.build import load_model
    from pipeline.lib.reporting import figures as plots
    from pipeline.lib.tracking import runs as tracking

    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    models, classes = trained_model_folder(cfg, dataset)
    model = load_model(models / MODEL_FILE)
    images = dataset.images("test")
    y_true = dataset.labels("test")
    probs = predict(model, images)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)

    labels = list(range(len(classes)))
    metrics = {"test": classification_metrics(y_true, y_pred, classes)}
    report_text = classification_report(
        y_true, y_pred, labels=labels, target_names=classes, zero_division=0, digits=4
    )
    report_dict = classification_report(
        y_true, y_pred, labels=labels, target_names=classes, zero_division=0, output_dict=True
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)

    reports = Path(cfg.paths.reports)
    write_json(reports / "metrics.json", metrics)
    write_json(reports / "classification_report.json", report_dict)
    with atomic_file(reports / "classification_report.txt") as fh:
        fh.write(report_text)
    rows = dataset.manifest("test")
    write_csv(
        reports / "predictions.csv",
        {
            "path": [r.path for r in rows],
            "actual": [classes[i] for i in y_true],
            "predicted": [classes[i] for i in y_pred],
            "confidence": [round(float(p.max()), 6) for p in probs],
        },
    )
    shown = gallery_indices(y_true, y_pred, cfg.evaluate.gallery_size)
    with atomic_dir(reports / "eval_figures") as tmp:
        figures = [
            plots.save_confusion_matrix(matrix, classes, tmp / "confusion_matrix.png"),
            plots.save_confusion_matrix(
                matrix,
                classes,
                tmp / "confusion_matrix_normalized.png",
                normalize=True,
                title="Confusion matrix (row-normalised)",
            ),
            plots.save_gallery(
                images[shown],
                probs[shown],
                y_true[shown],
                classes,
                tmp / "gallery.png",
                columns=cfg.evaluate.gallery_columns,
            ),
        ]
    log.info(
        "Test accuracy %.4f, macro F1 %.4f on %d images\n%s",
        metrics["test"]["accuracy"],
        metrics["test"]["macro_f1"],
        len(y_true),
        report_text,
    )

    run_file = models / RUN_FILE
    run_id = read_json(run_file)["run_id"] if run_file.is_file() else None
    with tracking.active_run(cfg.tracking, run_id=run_id, run_name=cfg.tracking.run_name):
        t = metrics["test"]
        flat = {
            "test_accuracy": t["accuracy"],
            "test_macro_f1": t["macro_f1"],
            "test_weighted_f1": t["weighted_f1"],
        }
        for kind in ("precision", "recall", "f1"):
            flat |= {f"test_{kind}_{_metric_name(c)}": v for c, v in t[kind].items()}
        mlflow.log_metrics(flat)
        tracking.log_files([reports / "eval_figures" / f.name for f in figures], "figures")
        tracking.log_files(
            [
                reports / "metrics.json",
                reports / "classification_report.json",
                reports / "classification_report.txt",
                reports / "predictions.csv",
            ],
            "reports",
        )
    return metrics


def _metric_name(name: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces."""
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_step(evaluate, cfg)


if __name__ == "__main__":
    main()
