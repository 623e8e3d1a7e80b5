"""From the test split's predictions: metrics, classification report, CSVs and figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.data.prepared import SPLITS
from pipeline.lib.files import atomic_dir, atomic_file, metric_values, write_json
from pipeline.lib.reporting import figures
from pipeline.lib.reporting.metrics import (
    Predictions,
    classification_reports,
    confusion,
    gallery_heading,
    gallery_indices,
    headline_metrics,
    reliability_bins,
)
from pipeline.lib.reporting.tables import write_csv

#: Files evaluate writes in `paths.reports` (DVC outputs of the stage, see dvc.yaml).
METRICS_FILE = "metrics.json"
FIGURES_DIR = "eval_figures"
REPORT_HTML = "eval_report.html"
#: The split evaluate measures ("test"), and the key of its section in the metrics file.
SPLIT = SPLITS[-1]
WIDE_INTERVAL = 0.2  # a test split whose 95 % accuracy interval is wider gets a warning

log = logging.getLogger(__name__)


def evaluation_metrics(p: Predictions) -> dict[str, Any]:
    """`metrics.json`: {"test": `headline_metrics`}; warns when the interval is too wide."""
    m = headline_metrics(p)
    if m["ci_high"] - m["ci_low"] > WIDE_INTERVAL:
        log.warning(
            f"The test split has {len(p.y_true)} images: test accuracy {m['accuracy']:.3f} has a "
            f"95% interval of [{m['ci_low']:.3f}, {m['ci_high']:.3f}], too wide to tell models "
            "apart. Use more test images or `python -m pipeline.crossval` (k-fold over every photo)."
        )
    return {SPLIT: metric_values(m)}


def write_tables(p: Predictions, paths: list[str], reports: Path, metrics: dict[str, Any]) -> str:
    """Write the metrics file, the classification report (JSON, text), predictions.csv (`paths`,
    actual, predicted, confidence to 6 digits) and confusion.csv into `reports`; return the text
    report. confusion.csv has no paths and "<" as "﹤" (U+FE64) in class names: `dvc plots show`
    embeds its columns unescaped in a `<script>` block, which no name may end or comment out."""
    text, as_dict = classification_reports(p)
    write_json(reports / METRICS_FILE, metrics)
    write_json(reports / "classification_report.json", as_dict)
    write_text(reports / "classification_report.txt", text)
    rows = {
        "path": list(paths),
        "actual": [p.classes[i] for i in p.y_true],
        "predicted": [p.classes[i] for i in p.y_pred],
        "confidence": [round(float(row.max()), 6) for row in p.probs],
    }
    write_csv(reports / "predictions.csv", rows)
    safe = {k: [name.replace("<", "\ufe64") for name in rows[k]] for k in ("actual", "predicted")}
    write_csv(reports / "confusion.csv", safe)
    return text


def write_figures(
    p: Predictions, images: np.ndarray, folder: Path, gallery_size: int, columns: int
) -> list[Path]:
    """Replace `folder` with the confusion matrices (counts, row-normalised), the reliability
    diagram and the gallery of `gallery_size` of `images` (uint8 (N, S, S, 3), a memmap too)."""
    matrix, shown = confusion(p), gallery_indices(p.y_true, p.y_pred, gallery_size)
    heading = gallery_heading(p.y_true, p.y_pred, shown)
    drawn = {
        "confusion_matrix": figures.confusion_figure(matrix, p.classes),
        "confusion_matrix_normalized": figures.confusion_figure(
            matrix, p.classes, normalize=True, title="Confusion matrix (row-normalised)"
        ),
        "reliability_diagram": figures.reliability_figure(reliability_bins(p.probs, p.y_true)),
        "gallery": figures.gallery_figure(
            images[shown], p.probs[shown], p.y_true[shown], p.classes, columns, heading=heading
        ),
    }
    with atomic_dir(folder) as tmp:
        for name, fig in drawn.items():
            figures.save_figure(fig, tmp / f"{name}.png")
    return [folder / f"{name}.png" for name in drawn]


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8); return `path`."""
    with atomic_file(path) as fh:
        fh.write(text)
    return path
