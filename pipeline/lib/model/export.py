"""Export of a model folder: a Keras whole model (`keras_model`: MobileNetV2 + the head's
weights), and TensorFlow Lite files converted from it; each checked against the model folder's
`Classifier` on the test split.

The export stage (`pipeline.export`) calls `export_formats`; the pieces are public for tests:
`keras_model` -> `frozen_graph` -> `convert` (float32, float16, int8) -> `check_export` (parity
with the Classifier on the test split, file size, single-image latency, tensor types).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.console import stderr_without
from pipeline.lib.data.prepared import iter_batches
from pipeline.lib.errors import StageInputError
from pipeline.lib.model import build
from pipeline.lib.model.classifier import Classifier
from pipeline.lib.model.saving import save_model
from pipeline.lib.model.tflite import TFLiteRunner

log = logging.getLogger(__name__)


def export_file(fmt: str) -> str:
    """The file name of the `fmt` export in `paths.exports`: `model.keras`, `model_int8.tflite`."""
    return "model.keras" if fmt == "keras" else f"model_{fmt}.tflite"


def keras_model(classifier: Classifier, alpha: float, weights: str | None, init_seed: int) -> Any:
    """The model folder as one Keras model (images 0..255 -> probabilities): the MobileNetV2
    feature extractor (`build.build_feature_extractor`) + a Dense softmax layer holding the
    head's kernel and bias (temperature folded in). Imports TensorFlow."""
    extractor = build.build_feature_extractor(alpha, weights, classifier.image_size, init_seed)
    head = build.build_head(classifier.head.kernel.shape[0], len(classifier.classes), 0.0)
    head.get_layer(build.HEAD_NAME).set_weights([classifier.head.kernel, classifier.head.bias])
    return build.compose(extractor, head)


def _predict(predict: Callable[[np.ndarray], Any], images: np.ndarray) -> np.ndarray:
    """float32 (N, C): `predict` over `images` in batches of 32."""
    return np.concatenate([np.asarray(predict(b), np.float32) for b in iter_batches(images, 32)])


def representative_indices(n_train: int, n_samples: int) -> np.ndarray:
    """Which training images calibrate int8, as int64 indices: `n_samples` spread evenly over the
    split (which is ordered by class, so every class is represented), all when there are fewer."""
    n = min(n_train, n_samples)
    return (
        np.unique(np.linspace(0, n_train - 1, num=n).round().astype(np.int64))
        if n
        else np.zeros(0, dtype=np.int64)
    )


def frozen_graph(model: Any) -> Any:
    """The Keras model's inference graph (float32 input, batch dimension free) with its weights
    as constants (a TensorFlow ConcreteFunction).

    Traced and frozen once for all formats: `TFLiteConverter.from_keras_model` redoes both for
    every conversion, which costs about ten times more than the conversion itself.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([None, *model.input.shape[1:]], tf.float32, name="image")
    function = tf.function(lambda image: model(image, training=False))
    return convert_variables_to_constants_v2(function.get_concrete_function(spec))


def convert(
    graph: Any, fmt: str, representative: np.ndarray | None = None, int8_io: str = "uint8"
) -> bytes:
    """The frozen graph (`frozen_graph`) as a TFLite flatbuffer in `fmt`.

    Args:
        fmt: `float32` (as is), `float16` (float16 weights) or `int8` (full-integer).
        representative: int8 only: (M, H, W, 3) training images (0..255) to calibrate with.
        int8_io: int8 only: the input and output tensor type, `uint8` or `int8`.

    Raises:
        StageInputError: int8 without calibration images.
        ValueError: an unknown `fmt`.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([graph])
    if fmt == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "int8":
        if representative is None or not len(representative):
            raise StageInputError(
                "export.formats has int8, but there are no training images "
                "to calibrate it with (the prepared train split is empty)."
            )

        def dataset() -> Iterator[list[np.ndarray]]:
            """The int8 converter's calibration data: each image as a float32 (1, S, S, 3) batch."""
            for image in representative:
                yield [np.asarray(image, dtype=np.float32)[None]]

        io_type = {"uint8": tf.uint8, "int8": tf.int8}[int8_io]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    elif fmt != "float32":
        raise ValueError(f"export.formats: unknown format {fmt!r}")
    with stderr_without("fully_quantize: "):  # the MLIR quantizer's bare settings dump
        return converter.convert()


def io_description(dtype: np.dtype, shape: tuple[int, ...], quant: tuple[float, int]) -> dict:
    """A tensor as {"dtype", "shape"} plus {"scale", "zero_point"} when it is quantized."""
    out: dict[str, Any] = {"dtype": np.dtype(dtype).name, "shape": [int(s) for s in shape]}
    if quant[0]:
        out |= {"scale": quant[0], "zero_point": quant[1]}
    return out


def median_latency_ms(call: Callable[[], Any], runs: int, warmup: int) -> float:
    """Median wall time of `call()` in milliseconds (4 decimals), over `runs` calls after
    `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000.0, 4)


def parity(probs: np.ndarray, reference: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (0..1) and disagreements (count) of `probs` (N, C) with the reference
    (the model folder's `Classifier`) probabilities (N, C), accuracy against `y_true` (N,), and the max/mean absolute
    probability difference."""
    pred, ref = probs.argmax(axis=1), reference.argmax(axis=1)
    diff = np.abs(probs - reference)
    return {
        "agreement": float(np.mean(pred == ref)),
        "disagreements": int(np.sum(pred != ref)),
        "accuracy": float(np.mean(pred == y_true)),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
    }


@dataclass(frozen=True)
class ParityData:
    """What every export is checked against.

    Attributes:
        images: uint8 (N, H, W, 3) the test split (may be memory-mapped), N >= 1.
        y_true: int (N,) true labels.
        reference: (N, C) the model folder's (`Classifier`) probabilities on `images`.
    """

    images: np.ndarray
    y_true: np.ndarray
    reference: np.ndarray


@dataclass(frozen=True)
class LatencySettings:
    """Single-image latency: median of `runs` calls after `warmup`, `threads` CPU threads."""

    runs: int
    warmup: int
    threads: int

    def describe(self) -> dict[str, Any]:
        """The settings and the machine, as recorded with the export details."""
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


def check_export(
    flatbuffer: bytes, data: ParityData, latency: LatencySettings, target: float
) -> dict[str, Any]:
    """One TFLite export's record: file size (bytes, MiB), `parity` with the model, whether top-1
    agreement meets `target`, single-image `invoke()` latency (ms), input/output tensors, tensor
    dtypes."""
    runner = TFLiteRunner(flatbuffer, latency.threads)
    check = parity(_predict(runner, data.images), data.reference, data.y_true)
    runner.set_input(np.asarray(data.images[:1], dtype=np.float32))
    return {
        "size_bytes": len(flatbuffer),
        "size_mib": round(len(flatbuffer) / 2**20, 4),
        **check,
        "target_agreement": float(target),
        "target_met": bool(check["agreement"] >= target),
        "latency_ms": median_latency_ms(runner.invoke, latency.runs, latency.warmup),
        "input": io_description(runner.input_dtype, runner.input_shape, runner.input_quantization),
        "output": io_description(
            runner.output_dtype,
            tuple(runner.output["shape"]),
            runner.output_quantization,
        ),
        "tensor_dtypes": runner.tensor_dtypes(),
    }


def check_keras(
    model: Any, archive: bytes, data: ParityData, latency: LatencySettings, target: float
) -> dict[str, Any]:
    """The Keras export's record: file size, `parity` with the model, whether top-1 agreement
    meets `target`, single-image `predict_on_batch` latency (ms)."""
    check = parity(_predict(model.predict_on_batch, data.images), data.reference, data.y_true)
    one = np.asarray(data.images[:1], dtype=np.float32)
    return {
        "size_bytes": len(archive),
        "size_mib": round(len(archive) / 2**20, 4),
        **check,
        "target_agreement": float(target),
        "target_met": bool(check["agreement"] >= target),
        "latency_ms": median_latency_ms(
            lambda: model.predict_on_batch(one), latency.runs, latency.warmup
        ),
    }


def model_record(
    classifier: Classifier, size_bytes: int, data: ParityData, latency: LatencySettings
) -> dict:
    """The model folder's line of the comparison: size, test accuracy, single-image latency
    (ms) of the `Classifier`."""
    one = np.asarray(data.images[:1], dtype=np.float32)
    return {
        "size_bytes": int(size_bytes),
        "size_mib": round(size_bytes / 2**20, 4),
        "accuracy": float(np.mean(data.reference.argmax(axis=1) == data.y_true)),
        "latency_ms": median_latency_ms(
            lambda: classifier.predict_proba(one), latency.runs, latency.warmup
        ),
    }


#: The keys of each model's record that `headline_metrics` keeps (`dvc metrics show`).
HEADLINE_KEYS = ("agreement", "accuracy", "size_mib")
#: What depends on the machine and the moment, not on the inputs: kept out of the DVC outputs
#: (MLflow metrics and `outputs/export_latency.json` instead).
TIMING_KEYS = ("latency_ms",)


def split_timings(details: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the details without timings, the timings): `{"<model>": {"latency_ms": ms}, "latency":
    settings}` go to the second, so that the first is the same bytes for the same inputs."""
    stable: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for name, record in details.items():
        if name == "latency":
            timings[name] = record
        elif isinstance(record, dict):
            stable[name] = {k: v for k, v in record.items() if k not in TIMING_KEYS}
            timings[name] = {k: record[k] for k in TIMING_KEYS if k in record}
        else:
            stable[name] = record
    return stable, timings


def headline_metrics(details: dict[str, Any]) -> dict[str, Any]:
    """The few numbers per model worth a column in `dvc metrics show` (`HEADLINE_KEYS`), from
    the full export details (`{"keras": {...}, "<fmt>": {...}, ...}`)."""
    return {
        name: {k: record[k] for k in HEADLINE_KEYS if k in record}
        for name, record in details.items()
        if isinstance(record, dict) and "size_mib" in record
    }


def export_formats(
    model: Any,
    formats: list[str],
    targets: dict[str, float],
    data: ParityData,
    latency: LatencySettings,
    representative: np.ndarray | None = None,
    int8_io: str = "uint8",
) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """Save the Keras `model` (`keras`) and convert it to the TFLite `formats`, checking each
    (`check_keras`, `check_export`).

    Args:
        targets: the top-1 agreement each format should reach, by format.
        representative: (M, H, W, 3) calibration images, needed when `formats` has int8.

    Returns:
        ({format: file bytes}, {format: record}); a record also names its `file` and,
        for int8, how many `representative_samples` calibrated it.

    Raises:
        StageInputError / ValueError: as `convert`.
    """
    graph = frozen_graph(model) if set(formats) - {"keras"} else None
    flatbuffers: dict[str, bytes] = {}
    records: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        start = time.perf_counter()
        record: dict[str, Any] = {"file": export_file(fmt)}
        if fmt == "keras":
            flatbuffers[fmt] = keras_archive(model)
            seconds = time.perf_counter() - start
            record |= check_keras(model, flatbuffers[fmt], data, latency, float(targets[fmt]))
        else:
            flatbuffers[fmt] = convert(graph, fmt, representative, int8_io)
            seconds = time.perf_counter() - start
            record |= check_export(flatbuffers[fmt], data, latency, float(targets[fmt]))
        if fmt == "int8" and representative is not None:
            record["representative_samples"] = int(len(representative))
        records[fmt] = record
        _log_record(fmt, record, len(data.y_true), seconds)
    return flatbuffers, records


def keras_archive(model: Any) -> bytes:
    """The bytes of `model` saved as a `.keras` archive by `saving.save_model` (deterministic)."""
    with tempfile.TemporaryDirectory(prefix="export-keras-") as tmp:
        return save_model(model, Path(tmp) / "model.keras").read_bytes()


def _log_record(fmt: str, r: dict[str, Any], n: int, convert_seconds: float) -> None:
    log.info(
        "%s: %.2f MiB, agreement %.4f (%d of %d differ, target %.2f %s), accuracy %.4f, "
        "%.2f ms/image (converted in %.1f s)",
        fmt,
        r["size_mib"],
        r["agreement"],
        r["disagreements"],
        n,
        r["target_agreement"],
        "met" if r["target_met"] else "NOT met",
        r["accuracy"],
        r["latency_ms"],
        convert_seconds,
    )
    if not r["target_met"]:
        log.warning(
            "export %s: top-1 agreement with the model %.4f is below the target %.2f",
            fmt,
            r["agreement"],
            r["target_agreement"],
        )
