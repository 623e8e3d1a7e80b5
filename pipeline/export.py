"""Stage `export` (opt-in: `export.formats` is empty by default, and the stage then writes empty
reports in about a second, without TensorFlow or MLflow): the model folder as a Keras whole model
and TensorFlow Lite files, each checked against the folder's `Classifier` on the test split.

    python -m pipeline.export 'export.formats=[keras,float32,int8]'

- `keras`: `model.keras`, MobileNetV2 + a Dense layer holding the head's weights (the featurized
  backbone: a fine-tuned one's agreement shows it), saved deterministically.
- `float32`: the Keras graph as is; `float16`: float16 weights (half the file); `int8`: calibrated
  on `export.representative_samples` train images, input/output of type `export.int8_io`.

Checks (also in MLflow): top-1 agreement with the model against `export.targets` (recorded, the
stage does not fail), accuracy, file size, single-image latency (median of `export.latency_runs`
calls after `export.latency_warmup`, on `export.num_threads` threads). `paths.exports` also gets
`model.json` (for `pipeline.predict`). `reports/export_metrics.json` (DVC metrics): agreement,
accuracy, size_mib per model; `reports/export_details.json`: all but the machine-dependent
latencies, which go to MLflow and `outputs/export_latency.json`.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.console import stderr_without
from pipeline.lib.data.prepared import SPLITS, iter_batches, open_prepared
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import atomic_dir, write_json
from pipeline.lib.model import build
from pipeline.lib.model.classifier import (
    BACKBONE_FILE,
    CARD_FILE,
    HEAD_FILE,
    Classifier,
    trained_classifier,
)
from pipeline.lib.model.saving import save_model
from pipeline.lib.model.scoring import split_scores
from pipeline.lib.model.tflite import TFLiteRunner

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

#: The keys of each model's record that `headline_metrics` keeps (`dvc metrics show`).
HEADLINE_KEYS = ("agreement", "accuracy", "size_mib")
#: Machine-dependent keys, kept out of the DVC outputs (MLflow, `outputs/export_latency.json`).
TIMING_KEYS = ("latency_ms",)


def export_file(fmt: str) -> str:
    """The file name of the `fmt` export in `paths.exports`: `model.keras`, `model_int8.tflite`."""
    return "model.keras" if fmt == "keras" else f"model_{fmt}.tflite"


def keras_model(classifier: Classifier, alpha: float, weights: str | None, init_seed: int) -> Any:
    """The model folder as one Keras model (images 0..255 -> probabilities): the MobileNetV2
    extractor + a Dense softmax layer holding the head's weights. Imports TensorFlow."""
    extractor = build.build_feature_extractor(alpha, weights, classifier.image_size, init_seed)
    head = build.build_head(classifier.head.kernel.shape[0], len(classifier.classes), 0.0)
    head.get_layer(build.HEAD_NAME).set_weights([classifier.head.kernel, classifier.head.bias])
    return build.compose(extractor, head)


def representative_indices(n_train: int, n_samples: int) -> np.ndarray:
    """int64 indices of the int8 calibration images: `n_samples` spread evenly over the
    (class-ordered) train split, all of them when there are fewer."""
    n = min(n_train, n_samples)
    return np.unique(np.linspace(0, n_train - 1, num=n).round().astype(np.int64))


def frozen_graph(model: Any) -> Any:
    """The model's inference graph (float32 input, free batch) with its weights as constants:
    traced once for every format (`from_keras_model` would trace per conversion, ~10x its cost)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([None, *model.input.shape[1:]], tf.float32, name="image")
    function = tf.function(lambda image: model(image, training=False))
    return convert_variables_to_constants_v2(function.get_concrete_function(spec))


def convert(
    graph: Any, fmt: str, representative: np.ndarray | None = None, int8_io: str = "uint8"
) -> bytes:
    """The frozen graph as a TFLite flatbuffer: `float32`, `float16` weights, or `int8` calibrated
    on `representative` (M, H, W, 3) images 0..255, its input/output of type `int8_io` (uint8 |
    int8). Raises StageInputError: int8 without images; ValueError: an unknown `fmt`."""
    import tensorflow as tf

    if fmt not in ("float32", "float16", "int8"):
        raise ValueError(f"export.formats: unknown format {fmt!r}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([graph])
    if fmt != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "int8":
        if representative is None or not len(representative):
            raise StageInputError(
                "export.formats has int8, but the prepared train split is empty: there are no "
                "images to calibrate it with."
            )
        images = representative
        converter.representative_dataset = lambda: ([np.float32(x)[None]] for x in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"uint8": tf.uint8, "int8": tf.int8}[int8_io]
        converter.inference_input_type = converter.inference_output_type = io_type
    with stderr_without("fully_quantize: "):  # the MLIR quantizer's bare settings dump
        return converter.convert()


def _size(size_bytes: int) -> dict[str, Any]:
    return {"size_bytes": int(size_bytes), "size_mib": round(size_bytes / 2**20, 4)}


@dataclass(frozen=True)
class ParityCheck:
    """What every export is checked against: the test split's uint8 (N, H, W, 3) `images` (N >= 1),
    int (N,) `y_true`, the `Classifier`'s (N, C) `reference` probabilities; latency: the median
    of `runs` single-image calls after `warmup`, on `threads` CPU threads."""

    images: np.ndarray
    y_true: np.ndarray
    reference: np.ndarray
    runs: int
    warmup: int
    threads: int

    @property
    def one_image(self) -> np.ndarray:
        return np.asarray(self.images[:1], dtype=np.float32)

    def latency_ms(self, call: Callable[[], Any]) -> float:
        """Median wall time of `call()` in ms (4 decimals)."""
        for _ in range(self.warmup):
            call()
        times = timeit.repeat(call, repeat=self.runs, number=1)
        return round(statistics.median(times) * 1000.0, 4)

    def parity(self, predict: Callable[[np.ndarray], Any], size: int, target: float) -> dict:
        """Size; top-1 agreement (0..1), disagreements, accuracy and max/mean absolute probability
        difference of `predict` (batches of 32) against the reference; whether it meets `target`."""
        batches = iter_batches(self.images, 32)
        probs = np.concatenate([np.asarray(predict(b), np.float32) for b in batches])
        pred, ref = probs.argmax(axis=1), self.reference.argmax(axis=1)
        diff = np.abs(probs - self.reference)
        agreement = float(np.mean(pred == ref))
        return _size(size) | {
            "agreement": agreement,
            "disagreements": int(np.sum(pred != ref)),
            "accuracy": float(np.mean(pred == self.y_true)),
            "max_abs_prob_diff": float(diff.max()),
            "mean_abs_prob_diff": float(diff.mean()),
            "target_agreement": float(target),
            "target_met": agreement >= target,
        }

    def describe(self) -> dict[str, Any]:
        """The latency settings and the machine, as recorded with the export details."""
        return {
            "runs": int(self.runs),
            "warmup": int(self.warmup),
            "threads": int(self.threads),
            "tflite": "LiteRT Interpreter (ai_edge_litert), XNNPACK delegate, batch 1, invoke() only",
            "keras": "predict_on_batch, batch 1",
            "model": "Classifier (LiteRT backbone + head), batch 1",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        }


def _tensor(detail: dict[str, Any]) -> dict[str, Any]:
    """A TFLite tensor as {"dtype", "shape"} (+ {"scale", "zero_point"} when quantized)."""
    scale, zero_point = detail["quantization"]
    out = {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(s) for s in detail["shape"]]}
    return out | ({"scale": float(scale), "zero_point": int(zero_point)} if scale else {})


def split_timings(details: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(details without timings, timings): each record's `TIMING_KEYS` and the "latency" settings
    go to the second, so that the first is the same bytes for the same inputs."""
    stable = {k: v for k, v in details.items() if k != "latency"}
    timings = {}
    for name, record in stable.items():
        if isinstance(record, dict):
            stable[name] = {k: v for k, v in record.items() if k not in TIMING_KEYS}
            timings[name] = {k: record[k] for k in TIMING_KEYS if k in record}
    return stable, timings | ({"latency": details["latency"]} if "latency" in details else {})


def headline_metrics(details: dict[str, Any]) -> dict[str, Any]:
    """The `HEADLINE_KEYS` of each model's record in the export details (`dvc metrics show`)."""
    return {
        name: {k: record[k] for k in HEADLINE_KEYS if k in record}
        for name, record in details.items()
        if isinstance(record, dict) and "size_mib" in record
    }


def export_formats(
    model: Any,
    formats: list[str],
    targets: dict[str, float],
    check: ParityCheck,
    representative: np.ndarray | None = None,
    int8_io: str = "uint8",
) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """Save the Keras `model` (`keras`) and convert it to the TFLite `formats`, each checked
    (`check.parity` against `targets` by format, latency; TFLite: tensors and dtypes); return
    ({format: file bytes}, {format: record}). `representative`: the int8 calibration images."""
    graph = frozen_graph(model) if set(formats) - {"keras"} else None
    files: dict[str, bytes] = {}
    records: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        start = time.perf_counter()
        if fmt == "keras":
            with tempfile.TemporaryDirectory(prefix="export-keras-") as tmp:
                files[fmt] = save_model(model, Path(tmp) / "model.keras").read_bytes()
        else:
            files[fmt] = convert(graph, fmt, representative, int8_io)
        seconds = time.perf_counter() - start
        r: dict[str, Any] = {"file": export_file(fmt)}
        if fmt == "keras":
            r |= check.parity(model.predict_on_batch, len(files[fmt]), targets[fmt])
            r["latency_ms"] = check.latency_ms(partial(model.predict_on_batch, check.one_image))
        else:
            runner = TFLiteRunner(files[fmt], check.threads)
            r |= check.parity(runner, len(files[fmt]), targets[fmt])
            runner.set_input(check.one_image)
            r |= {
                "latency_ms": check.latency_ms(runner.invoke),
                "input": _tensor(runner.input),
                "output": _tensor(runner.output),
                "tensor_dtypes": runner.tensor_dtypes(),
            }
        if fmt == "int8" and representative is not None:
            r["representative_samples"] = len(representative)
        records[fmt] = r
        log.log(
            logging.INFO if r["target_met"] else logging.WARNING,
            "%s: %.2f MiB, top-1 agreement with the model %.4f (%d of %d differ, target %.2f %s), "
            "accuracy %.4f, %.2f ms/image (converted in %.1f s)",
            *(fmt, r["size_mib"], r["agreement"], r["disagreements"], len(check.y_true)),
            *(r["target_agreement"], "met" if r["target_met"] else "NOT met", r["accuracy"]),
            *(r["latency_ms"], seconds),
        )
    return files, records


def _write_outputs(cfg: Config, files: dict[str, bytes], details: dict[str, Any]) -> Path:
    """Write `paths.exports` atomically (the `files` and model.json, or `NOTHING_EXPORTED`), the
    two reports and the latency file; return the exports folder."""
    exports = Path(cfg.paths.exports)
    with atomic_dir(exports) as tmp:
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
    check = ParityCheck(
        dataset.images(TEST),
        dataset.labels(TEST),
        split_scores(classifier, dataset, TEST, cfg.paths.features)[0],
        e.latency_runs,
        e.latency_warmup,
        e.num_threads or os.cpu_count() or 1,
    )
    calibration = None
    if "int8" in e.formats:
        train_images = dataset.images(TRAIN)
        chosen = representative_indices(len(train_images), e.representative_samples)
        calibration = np.asarray(train_images[chosen])
    m = cfg.model
    model = keras_model(classifier, m.alpha, m.weights, m.init_seed)
    targets = {fmt: float(target) for fmt, target in e.targets.items()}
    files, results = export_formats(model, list(e.formats), targets, check, calibration, e.int8_io)
    names = [BACKBONE_FILE, HEAD_FILE, CARD_FILE]
    own = _size(sum((Path(cfg.paths.models) / f).stat().st_size for f in names)) | {
        "accuracy": float(np.mean(check.reference.argmax(axis=1) == check.y_true)),
        "latency_ms": check.latency_ms(partial(classifier.predict_proba, check.one_image)),
    }
    details = {"model": {"files": names, **own}, **results, "test_images": len(check.y_true)}
    details["latency"] = check.describe()
    exports = _write_outputs(cfg, files, details)
    _log_export(cfg, results, own["latency_ms"], [exports / export_file(f) for f in files])
    return details


def _log_export(cfg: Config, results: dict[str, Any], model_ms: float, files: list[Path]) -> None:
    """Log the metrics per format, the exported `files` and the reports to the pipeline's run."""
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
