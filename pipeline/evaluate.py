"""Stage `evaluate`: predict the test split with the model folder (`Classifier`: the head on the
cached test features when the model's backbone is the featurized one, else its LiteRT backbone on
the images); write metrics, the classification report, the confusion matrix and the prediction
gallery; add them to the pipeline run's MLflow run (the one `train` started). No TensorFlow.

    python -m pipeline.evaluate
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import mlflow
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.class_names import class_key
from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.model.classifier import trained_classifier
from pipeline.lib.model.scoring import split_probabilities
from pipeline.lib.reporting.evaluation import (
    FIGURES_DIR,
    REPORT_HTML,
    SPLIT,
    Evaluation,
    evaluation_metrics,
    per_class_metrics,
    write_figures,
    write_html_report,
    write_tables,
)
from pipeline.lib.reporting.metrics import Predictions
from pipeline.lib.tracking import runs

log = logging.getLogger(__name__)


def evaluate(cfg: Config) -> dict[str, Any]:
    """Predict the test split with `paths.models`, write the reports into `paths.reports` and
    log them to the pipeline's MLflow run; return the metrics ({"test": {...}}).

    Raises:
        StageInputError: no prepared data, or no trained model for its classes.
    """
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    classifier = trained_classifier(cfg.paths.models, dataset.classes)
    probs = split_probabilities(
        classifier, dataset, SPLIT, cfg.paths.features, tta=cfg.evaluate.tta
    )
    ev = Evaluation(
        Predictions(probs, dataset.labels(SPLIT), classifier.classes),
        dataset.images(SPLIT),
        [row.path for row in dataset.manifest(SPLIT)],
    )
    reports = Path(cfg.paths.reports)
    metrics = evaluation_metrics(ev)
    report_text = write_tables(ev, reports, metrics)
    figures = write_figures(
        ev, reports / FIGURES_DIR, cfg.evaluate.gallery_size, cfg.evaluate.gallery_columns
    )
    write_html_report(ev, reports, metrics, cfg.evaluate.report_images_per_cell)
    log.info(
        "Test accuracy %.4f, macro F1 %.4f on %d images\n%s",
        metrics[SPLIT]["accuracy"],
        metrics[SPLIT]["macro_f1"],
        len(probs),
        report_text,
    )

    with runs.stage_run(cfg, "evaluate"):  # README: "How runs are recorded"
        t = metrics["test"]
        flat = {f"test_{k}": float(v) for k, v in t.items()}  # accuracy, ci_low/high, F1, ece
        per_class = per_class_metrics(ev)
        flat["test_weighted_f1"] = float(per_class["weighted_f1"])
        for kind in ("precision", "recall", "f1"):
            flat |= {f"test_{kind}_{_metric_name(c)}": v for c, v in per_class[kind].items()}
        mlflow.set_tag("evaluate_tta", str(bool(cfg.evaluate.tta)).lower())
        mlflow.log_metrics(flat)
        runs.log_files([reports / "eval_figures" / f.name for f in figures], "figures")
        runs.log_files(
            [
                reports / "metrics.json",
                reports / "classification_report.json",
                reports / "classification_report.txt",
                reports / "predictions.csv",
                reports / REPORT_HTML,
            ],
            "reports",
        )
    return metrics


def _metric_name(name: str) -> str:
    """The MLflow metric key part of class `name`: collision-free and bounded (class_names)."""
    return class_key(name)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `evaluate` on conf/ composed with the command-line overrides."""
    run_step(evaluate, cfg)


main = entry_point(hydra_main, __doc__, sections=("evaluate",))

if __name__ == "__main__":
    main()
