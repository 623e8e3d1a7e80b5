"""The `export` stage's formats (`pipeline/export.py`): a Keras whole model and TFLite files,
each checked against the model folder's `Classifier` on the test split."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from pipeline.lib.config.schema import ExportConfig, ModelConfig
from pipeline.lib.console import stderr_without
from pipeline.lib.data.prepared import iter_batches
from pipeline.lib.errors import StageInputError
from pipeline.lib.model import build
from pipeline.lib.model.classifier import Classifier
from pipeline.lib.model.saving import keras_archive
from pipeline.lib.model.tflite import TFLiteRunner

log = logging.getLogger(__name__)

METRICS_FILE = "export_metrics.json"  # in paths.reports: DVC metrics (`HEADLINE_KEYS`)
DETAILS_FILE = "export_details.json"  # in paths.reports: the full record but the timings
LATENCY_FILE = "export_latency.json"  # beside `paths.run_file` (not a DVC output): the timings
NOTHING_EXPORTED = "NOTHING_EXPORTED.txt"  # `paths.exports` when `export.formats` is empty
NOTHING_EXPORTED_TEXT = (
    "export.formats is empty (the default): no model was exported.\n"
    "Opt in: dvc exp run -S 'export.formats=[keras,float32,int8]'  (README: Export)\n"
)

HEADLINE_KEYS = ("agreement", "accuracy", "size_mib")


def export_file(fmt: str) -> str:
    """The file name of the `fmt` export in `paths.exports`: `model.keras`, `model_int8.tflite`."""
    return "model.keras" if fmt == "keras" else f"model_{fmt}.tflite"


def keras_model(classifier: Classifier, m: ModelConfig) -> Any:
    """The model folder as one Keras model, images 0..255 -> probabilities: `model.*`'s
    MobileNetV2 extractor + a Dense layer holding the head's weights."""
    extractor = build.build_feature_extractor(
        m.alpha, m.weights, classifier.image_size, m.init_seed
    )
    head = build.build_head(classifier.head.kernel.shape[0], len(classifier.classes), 0.0)
    head.get_layer(build.HEAD_NAME).set_weights([classifier.head.kernel, classifier.head.bias])
    return build.compose(extractor, head)


def representative_images(train_images: Any, n_samples: int) -> np.ndarray:
    """`n_samples` images (all when fewer) spread evenly over the class-ordered train split."""
    n = len(train_images)
    chosen = np.unique(np.linspace(0, n - 1, num=min(n, n_samples)).round().astype(np.int64))
    return np.asarray(train_images[chosen])


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
    """The TFLite flatbuffer: `float32`, `float16` weights, or `int8` calibrated on
    `representative` (M, H, W, 3) 0..255, input/output `int8_io`. StageInputError: no images."""
    import tensorflow as tf

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
        converter.representative_dataset = lambda: ([np.float32(x)[None]] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = {"uint8": tf.uint8, "int8": tf.int8}[int8_io]
        converter.inference_input_type = converter.inference_output_type = io_type
    with stderr_without("fully_quantize: "):  # the MLIR quantizer's bare settings dump
        return converter.convert()


def size_record(size_bytes: int) -> dict[str, Any]:
    return {"size_bytes": int(size_bytes), "size_mib": round(size_bytes / 2**20, 4)}


@dataclass(frozen=True)
class ParityCheck:
    """The test split's uint8 (N, H, W, 3) `images` (N >= 1), int (N,) `y_true` and the
    `Classifier`'s (N, C) `reference` probabilities, against which every export is checked."""

    images: np.ndarray
    y_true: np.ndarray
    reference: np.ndarray
    settings: ExportConfig

    @property
    def threads(self) -> int:
        return self.settings.num_threads or os.cpu_count() or 1

    @property
    def one_image(self) -> np.ndarray:
        return np.asarray(self.images[:1], dtype=np.float32)

    def latency_ms(self, call: Callable[[], Any]) -> float:
        """Median ms of `export.latency_runs` calls after `export.latency_warmup`."""
        for _ in range(self.settings.latency_warmup):
            call()
        times = timeit.repeat(call, repeat=self.settings.latency_runs, number=1)
        return round(statistics.median(times) * 1000.0, 4)

    def parity(self, predict: Callable[[np.ndarray], Any], size: int, target: float) -> dict:
        """Size, top-1 agreement with the reference, accuracy, probability differences of
        `predict`; whether the agreement meets `target`."""
        batches = iter_batches(self.images, 32)
        probs = np.concatenate([np.asarray(predict(b), np.float32) for b in batches])
        pred, ref = probs.argmax(axis=1), self.reference.argmax(axis=1)
        diff = np.abs(probs - self.reference)
        agreement = float(np.mean(pred == ref))
        return size_record(size) | {
            "agreement": agreement,
            "disagreements": int(np.sum(pred != ref)),
            "accuracy": float(np.mean(pred == self.y_true)),
            "max_abs_prob_diff": float(diff.max()),
            "mean_abs_prob_diff": float(diff.mean()),
            "target_agreement": float(target),
            "target_met": agreement >= target,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "runs": self.settings.latency_runs,
            "warmup": self.settings.latency_warmup,
            "threads": self.threads,
            "tflite": "LiteRT Interpreter (ai_edge_litert), XNNPACK delegate, batch 1, invoke() only",
            "keras": "predict_on_batch, batch 1",
            "model": "Classifier (LiteRT backbone + head), batch 1",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        }


def _tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    out = {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(s) for s in detail["shape"]]}
    return out | ({"scale": float(scale), "zero_point": int(zero_point)} if scale else {})


def split_timings(details: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(details without timings, timings): the first is the same bytes for the same inputs."""
    stable = dict(details)
    timings = {"latency": stable.pop("latency")} if "latency" in stable else {}
    for name, record in details.items():
        if isinstance(record, dict) and "latency_ms" in record:
            stable[name] = {k: v for k, v in record.items() if k != "latency_ms"}
            timings[name] = {"latency_ms": record["latency_ms"]}
    return stable, timings


def headline_metrics(details: dict[str, Any]) -> dict[str, Any]:
    """The `HEADLINE_KEYS` of each model's record in the export details (`dvc metrics show`)."""
    return {
        name: {k: record[k] for k in HEADLINE_KEYS if k in record}
        for name, record in details.items()
        if isinstance(record, dict) and "size_mib" in record
    }


def export_formats(
    model: Any, check: ParityCheck, representative: np.ndarray | None
) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """({format: file bytes}, {format: record}) of `export.formats`, each checked (`parity`,
    latency; TFLite: tensors); `representative`: the int8 calibration images."""
    settings = check.settings
    graph = frozen_graph(model) if set(settings.formats) - {"keras"} else None
    files: dict[str, bytes] = {}
    records: dict[str, dict[str, Any]] = {}
    for fmt in settings.formats:
        target = float(getattr(settings.targets, fmt))
        start = time.perf_counter()
        r: dict[str, Any] = {"file": export_file(fmt)}
        if fmt == "keras":
            files[fmt] = keras_archive(model)
            seconds = time.perf_counter() - start
            r |= check.parity(model.predict_on_batch, len(files[fmt]), target)
            r["latency_ms"] = check.latency_ms(partial(model.predict_on_batch, check.one_image))
        else:
            files[fmt] = convert(graph, fmt, representative, settings.int8_io)
            seconds = time.perf_counter() - start
            runner = TFLiteRunner(files[fmt], check.threads)
            r |= check.parity(runner, len(files[fmt]), target)
            runner.set_input(check.one_image)
            r |= {
                "latency_ms": check.latency_ms(runner.interpreter.invoke),
                "input": _tensor(runner.input),
                "output": _tensor(runner.output),
                "tensor_dtypes": runner.tensor_dtypes(),
            }
        if fmt == "int8":
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
