"""Stage `export` (opt-in: with `export.formats` empty, the default, it writes empty reports in
a second, without TensorFlow or MLflow): the model folder as a Keras whole model and TFLite files,
each checked against the folder's `Classifier` on the test split.

    python -m pipeline.export 'export.formats=[keras,float32,int8]'

- `keras`: `model.keras`, MobileNetV2 + a Dense layer holding the head's weights, saved
  deterministically; `float32`: its graph as is; `float16`: float16 weights (half the file);
  `int8`: calibrated on `export.representative_samples` train images, I/O `export.int8_io`.

Checks (also in MLflow): top-1 agreement with the model against `export.targets` (recorded, the
stage does not fail), accuracy, file size, single-image latency (median of `export.latency_runs`
calls after `export.latency_warmup`, on `export.num_threads` threads). `paths.exports` also gets
`model.json`. `reports/export_metrics.json` (DVC metrics): agreement, accuracy, size_mib per
model; `reports/export_details.json`: all but the latencies (MLflow, `outputs/export_latency.json`).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.prepared import SPLITS, open_prepared
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import atomic_dir, write_json
from pipeline.lib.model.classifier import BACKBONE_FILE, CARD_FILE, HEAD_FILE, trained_classifier
from pipeline.lib.model.export import (
    DETAILS_FILE,
    LATENCY_FILE,
    METRICS_FILE,
    NOTHING_EXPORTED,
    NOTHING_EXPORTED_TEXT,
    ParityCheck,
    export_file,
    export_formats,
    headline_metrics,
    keras_model,
    representative_images,
    size_record,
    split_timings,
)
from pipeline.lib.model.scoring import split_scores

log = logging.getLogger(__name__)
TRAIN, _, TEST = SPLITS


def _write_outputs(cfg: Config, files: dict[str, bytes], details: dict[str, Any]) -> Path:
    """Write `paths.exports` (the `files` and model.json, or `NOTHING_EXPORTED`), the reports and
    the latency file; return the exports folder."""
    exports = Path(cfg.paths.exports)
    with atomic_dir(exports, "paths.exports") as tmp:
        for fmt, content in files.items():
            (tmp / export_file(fmt)).write_bytes(content)
        if files:
            (tmp / CARD_FILE).write_bytes((Path(cfg.paths.models) / CARD_FILE).read_bytes())
        else:  # a word for who opens the folder (and no "empty output" from DVC)
            (tmp / NOTHING_EXPORTED).write_text(NOTHING_EXPORTED_TEXT, encoding="utf-8")
    reports = Path(cfg.paths.reports)
    stable, timings = split_timings(details)
    write_json(reports / DETAILS_FILE, stable)
    write_json(reports / METRICS_FILE, headline_metrics(stable))
    write_json(Path(cfg.paths.run_file).parent / LATENCY_FILE, timings)  # untracked: timings
    return exports


def export(cfg: Config) -> dict[str, Any]:
    """Export `paths.models` in `export.formats`, check each, write the reports; return the
    details ({"model": {...}, "<format>": {...}, "test_images": N, "latency": {...}}). Raises
    StageInputError: no prepared data, no trained model, an empty test or (int8) train split."""
    e = cfg.export
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    classifier = trained_classifier(cfg.paths.models, dataset.classes)
    if not e.formats:  # opt-in: no TensorFlow, no MLflow
        log.info("export.formats is empty: nothing exported (opt in: export.formats=[keras])")
        _write_outputs(cfg, {}, {"formats": []})
        return {"formats": []}
    if dataset.size(TEST) == 0:
        raise StageInputError(f"The {TEST} split of {dataset.folder} is empty: no parity check.")
    reference = split_scores(classifier, dataset, TEST, cfg.paths.features)[0]
    check = ParityCheck(dataset.images(TEST), dataset.labels(TEST), reference, e)
    calibration = None
    if "int8" in e.formats:
        calibration = representative_images(dataset.images(TRAIN), e.representative_samples)
    files, results = export_formats(keras_model(classifier, cfg.model), check, calibration)
    names = [BACKBONE_FILE, HEAD_FILE, CARD_FILE]
    own = size_record(sum((Path(cfg.paths.models) / f).stat().st_size for f in names)) | {
        "accuracy": float(np.mean(check.reference.argmax(axis=1) == check.y_true)),
        "latency_ms": check.latency_ms(partial(classifier.predict_proba, check.one_image)),
    }
    details = {"model": {"files": names, **own}, **results, "test_images": len(check.y_true)}
    details["latency"] = check.describe()
    exports = _write_outputs(cfg, files, details)
    _log_export(cfg, results, own["latency_ms"], [exports / export_file(f) for f in files])
    return details


def _log_export(cfg: Config, results: dict[str, Any], model_ms: float, files: list[Path]) -> None:
    import mlflow  # ~2 s with the tracking code, and only when something is exported

    from pipeline.lib.tracking import runs

    reports = Path(cfg.paths.reports)
    with runs.stage_run(cfg, "export"):
        keys = ("agreement", "accuracy", "size_bytes", "latency_ms")
        keys += ("max_abs_prob_diff", "target_met")
        flat = {f"export_{fmt}_{k}": float(r[k]) for fmt, r in results.items() for k in keys}
        mlflow.log_metrics(flat | {"export_model_latency_ms": model_ms})
        runs.log_files(files, "exports")
        runs.log_files([reports / METRICS_FILE, reports / DETAILS_FILE], "reports")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    run_step(export, cfg)


main = entry_point(hydra_main, __doc__, sections=("export",))

if __name__ == "__main__":
    main()
