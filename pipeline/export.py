"""Stage `export`: the trained model (images 0..255 -> class probabilities) as TensorFlow Lite, for
a phone app; each export checked against the Keras model on the test split.

    python -m pipeline.export 'export.formats=[float32,int8]'
    python -m pipeline.export 'export.formats=[float32,int8,float16]'

Opt-in: `export.formats` is empty by default, and then the stage only writes empty reports (an
empty `paths.exports`, `{}` metrics), in about a second, without TensorFlow or MLflow; `dvc exp
run -S 'export.formats=[float32,int8]'` (or conf/export/default.yaml) turns it on.

Formats (`export.formats`):

- `float32`: the Keras graph as is; should agree with Keras on (nearly) every image.
- `int8`: full-integer quantization, weights and activations int8, calibrated on
  `export.representative_samples` images of the training split. Its input and output are
  `export.int8_io` (default `uint8`): a camera frame's RGB bytes go in as they are (the input
  scale is about 1, zero point 0, both recorded in the metrics; the model rescales to [-1, 1]
  itself) and the probabilities come out as bytes with scale 1/256. `int8` is offered for
  runtimes that want signed tensors end to end.
- `float16`: float16 weights (half the file), computed in float32 on a CPU.

Parity (logged to the pipeline's MLflow run): top-1 agreement with the Keras model on the test
split (targets `export.targets`: whether each is met is recorded, the stage does not fail), the
accuracy of each, the file size, and single-image latency on this CPU (median of
`export.latency_runs` calls of `interpreter.invoke()` after `export.latency_warmup`, XNNPACK with
`export.num_threads` threads; Keras `predict_on_batch` on one image for comparison).
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
from pipeline.lib.model.saving import MODEL_FILE, trained_model_folder

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
    "export.formats is empty (the default): no TensorFlow Lite model was exported.\n"
    "Opt in: dvc exp run -S 'export.formats=[float32,int8]'  (README: Export to TensorFlow Lite)\n"
)


def _calibration_images(dataset: PreparedDataset, cfg: Config) -> np.ndarray | None:
    """The int8 calibration images (`export.representative_samples` of the train split), or
    None when int8 is not exported."""
    from pipeline.lib.model.export import representative_indices

    if "int8" not in cfg.export.formats:
        return None
    train_images = dataset.images(TRAIN)
    chosen = representative_indices(len(train_images), cfg.export.representative_samples)
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
    """Write `paths.exports` (replaced atomically: one .tflite file per format; with none,
    `NOTHING_EXPORTED` says why) and the two report files; return (exports, reports) folders."""
    from pipeline.lib.model.export import export_file, headline_metrics, split_timings

    exports = Path(cfg.paths.exports)
    with atomic_dir(exports) as tmp:
        for fmt, flatbuffer in flatbuffers.items():
            (tmp / export_file(fmt)).write_bytes(flatbuffer)
        if not flatbuffers:  # a word for who opens the folder (and no "empty output" from DVC)
            (tmp / NOTHING_EXPORTED).write_text(NOTHING_EXPORTED_TEXT, encoding="utf-8")
    reports = Path(cfg.paths.reports)
    stable, timings = split_timings(details)
    write_json(reports / DETAILS_FILE, stable)
    write_json(reports / METRICS_FILE, headline_metrics(stable))
    write_json(Path(cfg.paths.run_file).parent / LATENCY_FILE, timings)  # untracked: timings
    return exports, reports


def export(cfg: Config) -> dict[str, Any]:
    """Export `paths.models` as TFLite (`export.formats`) into `paths.exports`, check each
    against Keras on the test split, write the reports; return the details
    ({"keras": {...}, "<format>": {...}, "test_images": N, "latency": {...}}).

    Raises:
        StageInputError: no prepared data, no trained model, an empty test or (int8) train split.
    """
    e = cfg.export
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    models, _ = trained_model_folder(cfg, dataset)
    if not e.formats:  # opt-in: no TensorFlow, no MLflow
        log.info(
            "export.formats is empty: nothing exported (opt in: export.formats=[float32,int8])"
        )
        _write_outputs(cfg, {}, {"formats": []})
        return {"formats": []}
    from pipeline.lib.model import export as tflite_export
    from pipeline.lib.model.build import load_model
    from pipeline.lib.model.scoring import test_probabilities

    images = _test_images(dataset)
    model = load_model(models / MODEL_FILE)
    # the Keras reference: the head on the cached test features when they match (checked)
    reference = test_probabilities(cfg, dataset, models, TEST, model=model)
    data = tflite_export.ParityData(images, dataset.labels(TEST), reference)
    latency = tflite_export.LatencySettings(
        e.latency_runs, e.latency_warmup, e.num_threads or os.cpu_count() or 1
    )
    keras = tflite_export.keras_record(model, (models / MODEL_FILE).stat().st_size, data, latency)
    flatbuffers, results = tflite_export.export_formats(
        model,
        list(e.formats),
        dict(e.targets),
        data,
        latency,
        _calibration_images(dataset, cfg),
        e.int8_io,
    )
    metrics = {
        "keras": {"file": MODEL_FILE, **keras},
        **results,
        "test_images": int(len(data.y_true)),
        "latency": latency.describe(),
    }
    exports, reports = _write_outputs(cfg, flatbuffers, metrics)
    _log_export(
        cfg,
        results,
        keras["latency_ms"],
        [exports / f for f in map(tflite_export.export_file, flatbuffers)],
    )
    return metrics


def _log_export(cfg: Config, results: dict[str, Any], keras_ms: float, files: list[Path]) -> None:
    """Add the export's metrics (per format), the .tflite `files` and the reports to the
    pipeline's MLflow run (README: "How runs are recorded")."""
    import mlflow

    from pipeline.lib.tracking import runs as tracking

    reports = Path(cfg.paths.reports)
    with tracking.stage_run(cfg, "export"):
        flat = {"export_keras_latency_ms": keras_ms}
        for fmt, r in results.items():
            flat |= {
                f"export_{fmt}_{k}": float(r[k])
                for k in ("agreement", "accuracy", "size_bytes", "latency_ms", "max_abs_prob_diff")
            }
            flat[f"export_{fmt}_target_met"] = float(r["target_met"])
        mlflow.log_metrics(flat)
        tracking.log_files(files, "exports")
        tracking.log_files([reports / METRICS_FILE, reports / DETAILS_FILE], "reports")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `export` on conf/ composed with the command-line overrides."""
    run_step(export, cfg)


main = entry_point(hydra_main, __doc__, sections=("export",))

if __name__ == "__main__":
    main()
