"""Stage `export`: the model folder (images 0..255 -> class probabilities) as a Keras whole model
and TensorFlow Lite files, for other runtimes and phone apps; each export checked against the
model folder's `Classifier` on the test split.

    python -m pipeline.export 'export.formats=[keras,float32,int8]'

Opt-in: `export.formats` is empty by default, and then the stage only writes empty reports (an
empty `paths.exports`, `{}` metrics), in about a second, without TensorFlow or MLflow; `dvc exp
run -S 'export.formats=[float32,int8]'` (or conf/export/default.yaml) turns it on.

Formats (`export.formats`); the TFLite ones are converted from the Keras model:

- `keras`: `model.keras`, MobileNetV2 (`model.*`) + a Dense layer holding the head's weights,
  saved deterministically (`saving.save_model`); the backbone must be the featurized one (a
  fine-tuned backbone's weights are not in the model folder: its agreement shows it).
- `float32`: the Keras graph as is; should agree with the model on (nearly) every image.
- `int8`: full-integer quantization, weights and activations int8, calibrated on
  `export.representative_samples` images of the training split. Its input and output are
  `export.int8_io` (default `uint8`): a camera frame's RGB bytes go in as they are (the input
  scale is about 1, zero point 0, both recorded in the metrics; the model rescales to [-1, 1]
  itself) and the probabilities come out as bytes with scale 1/256. `int8` is offered for
  runtimes that want signed tensors end to end.
- `float16`: float16 weights (half the file), computed in float32 on a CPU.

Parity (logged to the pipeline's MLflow run): top-1 agreement with the model on the test
split (targets `export.targets`: whether each is met is recorded, the stage does not fail), the
accuracy of each, the file size, and single-image latency on this CPU (median of
`export.latency_runs` calls of `interpreter.invoke()` after `export.latency_warmup`, XNNPACK with
`export.num_threads` threads; the model folder's `Classifier` on one image for comparison).
`paths.exports` also gets the model's `model.json` (classes, resize), so that
`pipeline.predict` can run an exported file.
`reports/export_metrics.json` (a DVC metrics file) holds the headline numbers per model
(agreement, accuracy, size_mib); `reports/export_details.json` everything (tensor
types, quantization, targets). Latencies depend on the machine, not on the inputs: they go to
the MLflow run and `outputs/export_latency.json`, never into a DVC output. The logic is
`pipeline.lib.model.export`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, StageInputError, entry_point, run_step
from pipeline.lib.data.prepared import SPLITS, PreparedDataset, open_prepared
from pipeline.lib.files import atomic_dir, write_json
from pipeline.lib.model import export as exporting
from pipeline.lib.model.classifier import (
    BACKBONE_FILE,
    CARD_FILE,
    HEAD_FILE,
    trained_classifier,
)
from pipeline.lib.model.scoring import split_probabilities

log = logging.getLogger(__name__)

#: The DVC metrics file (headline numbers) and the full record (a plain output), in paths.reports.
METRICS_FILE = "export_metrics.json"
DETAILS_FILE = "export_details.json"
#: Latencies and the machine's thread count, beside `paths.run_file` (not a DVC output).
LATENCY_FILE = "export_latency.json"
TRAIN, _, TEST = SPLITS
#: What `paths.exports` holds when `export.formats` is empty (the default).
NOTHING_EXPORTED = "NOTHING_EXPORTED.txt"
NOTHING_EXPORTED_TEXT = (
    "export.formats is empty (the default): no model was exported.\n"
    "Opt in: dvc exp run -S 'export.formats=[keras,float32,int8]'  (README: Export)\n"
)


def _calibration_images(dataset: PreparedDataset, cfg: Config) -> np.ndarray | None:
    """The int8 calibration images (`export.representative_samples` of the train split), or
    None when int8 is not exported."""
    if "int8" not in cfg.export.formats:
        return None
    train_images = dataset.images(TRAIN)
    chosen = exporting.representative_indices(len(train_images), cfg.export.representative_samples)
    return np.asarray(train_images[chosen])


def _test_images(dataset: PreparedDataset) -> np.ndarray:
    """The test split's uint8 images (N, S, S, 3), N >= 1; else a StageInputError."""
    if dataset.size(TEST) == 0:
        raise StageInputError(
            f"The {TEST} split of {dataset.folder} is empty: no parity check is possible."
        )
    return dataset.images(TEST)


def _write_outputs(
    cfg: Config, flatbuffers: dict[str, bytes], details: dict[str, Any]
) -> tuple[Path, Path]:
    """Write `paths.exports` (replaced atomically: one file per format and the model's
    model.json; with none, `NOTHING_EXPORTED` says why) and the two report files; return
    (exports, reports) folders."""
    exports = Path(cfg.paths.exports)
    with atomic_dir(exports) as tmp:
        for fmt, flatbuffer in flatbuffers.items():
            (tmp / exporting.export_file(fmt)).write_bytes(flatbuffer)
        if flatbuffers:
            (tmp / CARD_FILE).write_bytes((Path(cfg.paths.models) / CARD_FILE).read_bytes())
        else:  # a word for who opens the folder (and no "empty output" from DVC)
            (tmp / NOTHING_EXPORTED).write_text(NOTHING_EXPORTED_TEXT, encoding="utf-8")
    reports = Path(cfg.paths.reports)
    stable, timings = exporting.split_timings(details)
    write_json(reports / DETAILS_FILE, stable)
    write_json(reports / METRICS_FILE, exporting.headline_metrics(stable))
    write_json(Path(cfg.paths.run_file).parent / LATENCY_FILE, timings)  # untracked: timings
    return exports, reports


def export(cfg: Config) -> dict[str, Any]:
    """Export `paths.models` in `export.formats` into `paths.exports`, check each against the
    model (`Classifier`) on the test split, write the reports; return the details
    ({"model": {...}, "<format>": {...}, "test_images": N, "latency": {...}}).

    Raises:
        StageInputError: no prepared data, no trained model, an empty test or (int8) train split.
    """
    e = cfg.export
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    classifier = trained_classifier(cfg.paths.models, dataset.classes)
    if not e.formats:  # opt-in: no TensorFlow, no MLflow
        log.info("export.formats is empty: nothing exported (opt in: export.formats=[keras])")
        _write_outputs(cfg, {}, {"formats": []})
        return {"formats": []}
    images = _test_images(dataset)
    reference = split_probabilities(classifier, dataset, TEST, cfg.paths.features)
    data = exporting.ParityData(images, dataset.labels(TEST), reference)
    latency = exporting.LatencySettings(
        e.latency_runs, e.latency_warmup, e.num_threads or os.cpu_count() or 1
    )
    model = exporting.keras_model(
        classifier, cfg.model.alpha, cfg.model.weights, cfg.model.init_seed
    )
    flatbuffers, results = exporting.export_formats(
        model,
        list(e.formats),
        dict(e.targets),
        data,
        latency,
        _calibration_images(dataset, cfg),
        e.int8_io,
    )
    files = [BACKBONE_FILE, HEAD_FILE, CARD_FILE]
    size = sum((Path(cfg.paths.models) / f).stat().st_size for f in files)
    own = exporting.model_record(classifier, size, data, latency)
    metrics = {
        "model": {"files": files, **own},
        **results,
        "test_images": int(len(data.y_true)),
        "latency": latency.describe(),
    }
    exports, _ = _write_outputs(cfg, flatbuffers, metrics)
    paths = [exports / exporting.export_file(fmt) for fmt in flatbuffers]
    _log_export(cfg, results, own["latency_ms"], paths)
    return metrics


def _log_export(cfg: Config, results: dict[str, Any], model_ms: float, files: list[Path]) -> None:
    """Add the export's metrics (per format), the exported `files` and the reports to the
    pipeline's MLflow run (README: "How runs are recorded")."""
    import mlflow  # ~2 s with the tracking code, and only when something is exported

    from pipeline.lib.tracking import runs

    reports = Path(cfg.paths.reports)
    with runs.stage_run(cfg, "export"):
        flat = {"export_model_latency_ms": model_ms}
        for fmt, r in results.items():
            flat |= {
                f"export_{fmt}_{k}": float(r[k])
                for k in ("agreement", "accuracy", "size_bytes", "latency_ms", "max_abs_prob_diff")
            }
            flat[f"export_{fmt}_target_met"] = float(r["target_met"])
        mlflow.log_metrics(flat)
        runs.log_files(files, "exports")
        runs.log_files([reports / METRICS_FILE, reports / DETAILS_FILE], "reports")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `export` on conf/ composed with the command-line overrides."""
    run_step(export, cfg)


main = entry_point(hydra_main, __doc__, sections=("export",))

if __name__ == "__main__":
    main()
