"""Stage `export`: the trained model (images 0..255 -> class probabilities) as TensorFlow Lite, for
a phone app; each export checked against the Keras model on the test split.

    python -m pipeline.export                              # export.formats=[float32,int8]
    python -m pipeline.export 'export.formats=[float32,int8,float16]'

Formats (`export.formats`):

- `float32`: the Keras graph as is; should agree with Keras on (nearly) every image.
- `int8`: full-integer quantization, weights and activations int8, calibrated on
  `export.representative_samples` images of the training split. Its input and output are
  `export.int8_io` (default `uint8`): a camera frame's RGB bytes go in as they are (the input
  scale is about 1, zero point 0, both recorded in the metrics; the model rescales to [-1, 1]
  itself) and the probabilities come out as bytes with scale 1/256. `int8` is offered for
  runtimes that want signed tensors end to end.
- `float16`: float16 weights (half the file), computed in float32 on a CPU.

Parity (written to `reports/export_metrics.json`, logged to the pipeline's MLflow run): top-1
agreement with the Keras model on the test split (targets `export.targets`: whether each is met is
recorded, the stage does not fail), the accuracy of each, the file size, and single-image latency
on this CPU (median of `export.latency_runs` calls of `interpreter.invoke()` after
`export.latency_warmup`, XNNPACK with `export.num_threads` threads; Keras `predict_on_batch` on one
image for comparison).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import StageInputError, run_step
from pipeline.lib.data.prepared import iter_batches, open_prepared
from pipeline.lib.files import atomic_dir, read_json, write_json
from pipeline.lib.model.saving import MODEL_FILE, trained_model_folder
from pipeline.lib.tracking.runs import RUN_FILE

log = logging.getLogger(__name__)

METRICS_FILE = "export_metrics.json"
#: Images per interpreter call when predicting the test split.
BATCH_SIZE = 32


def export_file(fmt: str) -> str:
    return f"model_{fmt}.tflite"


def representative_indices(n_train: int, n_samples: int) -> np.ndarray:
    """Which training images calibrate int8: `n_samples` spread evenly over the split (which is
    ordered by class, so every class is represented), all of them when there are fewer."""
    n = min(n_train, n_samples)
    return (
        np.unique(np.linspace(0, n_train - 1, num=n).round().astype(np.int64))
        if n
        else np.zeros(0, dtype=np.int64)
    )


def frozen_graph(model: Any) -> Any:
    """The model's inference graph (batch dimension free) with its weights as constants.

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
    """The frozen graph (`frozen_graph`) as a TFLite flatbuffer in `fmt` (`float32`, `float16`
    or `int8`)."""
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
    return converter.convert()


def interpreter(flatbuffer: bytes, num_threads: int) -> Any:
    """tf.lite.Interpreter (XNNPACK is its default CPU delegate) with `num_threads` threads."""
    import tensorflow as tf

    with warnings.catch_warnings():  # tf.lite.Interpreter's own deprecation notice
        warnings.simplefilter("ignore")
        return tf.lite.Interpreter(model_content=flatbuffer, num_threads=num_threads)


def _quant(detail: dict) -> tuple[float, int]:
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def io_description(detail: dict) -> dict[str, Any]:
    scale, zero_point = _quant(detail)
    out: dict[str, Any] = {
        "dtype": np.dtype(detail["dtype"]).name,
        "shape": [int(s) for s in detail["shape"]],
    }
    if scale:
        out |= {"scale": scale, "zero_point": zero_point}
    return out


class TFLiteModel:
    """A TFLite classifier as a function: float32 images (B, H, W, 3) in 0..255 -> probabilities
    (B, C) in float32, quantizing the input and dequantizing the output of an integer model."""

    def __init__(self, flatbuffer: bytes, num_threads: int) -> None:
        self.interpreter = interpreter(flatbuffer, num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = int(self.input["shape"][0])

    def quantize(self, images: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.input["dtype"])
        if dtype == np.float32:
            return np.ascontiguousarray(images, dtype=np.float32)
        scale, zero_point = _quant(self.input)
        info = np.iinfo(dtype)
        q = np.round(np.asarray(images, dtype=np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        if np.dtype(self.output["dtype"]) == np.float32:
            return values.astype(np.float32)
        scale, zero_point = _quant(self.output)
        return (values.astype(np.float32) - zero_point) * scale

    def set_input(self, images: np.ndarray) -> None:
        if len(images) != self._batch:
            self.interpreter.resize_tensor_input(
                self.input["index"], [len(images), *images.shape[1:]], strict=False
            )
            self.interpreter.allocate_tensors()
            self._batch = len(images)
        self.interpreter.set_tensor(self.input["index"], self.quantize(images))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.set_input(images)
        self.interpreter.invoke()
        return self.dequantize(self.interpreter.get_tensor(self.output["index"]))


def predict(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    out = [np.asarray(fn(batch)) for batch in iter_batches(images, BATCH_SIZE)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def median_latency_ms(call: Callable[[], Any], runs: int, warmup: int) -> float:
    """Median wall time of `call()` in milliseconds, over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000.0, 4)


def tflite_latency_ms(
    flatbuffer: bytes, image: np.ndarray, num_threads: int, runs: int, warmup: int
) -> float:
    """Single-image latency of `interpreter.invoke()` (input already set, batch 1)."""
    runner = TFLiteModel(flatbuffer, num_threads)
    runner.set_input(np.asarray(image, dtype=np.float32)[None])
    return median_latency_ms(runner.interpreter.invoke, runs, warmup)


def tensor_dtypes(flatbuffer: bytes) -> dict[str, int]:
    """How many tensors of each dtype the model holds (an int8 model: int8 and int32 biases)."""
    counts: dict[str, int] = {}
    for detail in interpreter(flatbuffer, 1).get_tensor_details():
        name = np.dtype(detail["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def parity(probs: np.ndarray, reference: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the reference (Keras) predictions, accuracy, probability error."""
    pred, ref = probs.argmax(axis=1), reference.argmax(axis=1)
    diff = np.abs(probs - reference)
    return {
        "agreement": float(np.mean(pred == ref)),
        "disagreements": int(np.sum(pred != ref)),
        "accuracy": float(np.mean(pred == y_true)),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
    }


def export(cfg: Config) -> dict[str, Any]:
    import mlflow

    from pipeline.lib.model.build import load_model
    from pipeline.lib.tracking import runs as tracking

    e = cfg.export
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    models, _ = trained_model_folder(cfg, dataset)
    if dataset.size("test") == 0:
        raise StageInputError(
            f"The test split of {dataset.folder} is empty: no parity check is possible."
        )
    model = load_model(models / MODEL_FILE)
    threads = e.num_threads or os.cpu_count() or 1
    images = dataset.images("test")
    y_true = dataset.labels("test")
    reference = predict(model.predict_on_batch, images)
    one = np.asarray(images[:1], dtype=np.float32)
    keras_ms = median_latency_ms(
        lambda: model.predict_on_batch(one), e.latency_runs, e.latency_warmup
    )
    train_images = dataset.images("train")
    chosen = representative_indices(len(train_images), e.representative_samples)
    representative = np.asarray(train_images[chosen]) if "int8" in e.formats else None

    results: dict[str, Any] = {}
    flatbuffers: dict[str, bytes] = {}
    graph = frozen_graph(model)
    for fmt in e.formats:
        start = time.perf_counter()
        flatbuffer = convert(graph, fmt, representative, e.int8_io)
        seconds = time.perf_counter() - start
        flatbuffers[fmt] = flatbuffer
        runner = TFLiteModel(flatbuffer, threads)
        probs = predict(runner, images)
        target = float(e.targets[fmt])
        check = parity(probs, reference, y_true)
        results[fmt] = {
            "file": export_file(fmt),
            "size_bytes": len(flatbuffer),
            "size_mib": round(len(flatbuffer) / 2**20, 4),
            **check,
            "target_agreement": target,
            "target_met": bool(check["agreement"] >= target),
            "latency_ms": tflite_latency_ms(
                flatbuffer, one[0], threads, e.latency_runs, e.latency_warmup
            ),
            "input": io_description(runner.input),
            "output": io_description(runner.output),
            "tensor_dtypes": tensor_dtypes(flatbuffer),
            "convert_seconds": round(seconds, 3),
        }
        if fmt == "int8":
            results[fmt]["representative_samples"] = int(len(chosen))
        r = results[fmt]
        log.info(
            "%s: %.2f MiB, agreement %.4f (%d of %d differ, target %.2f %s), accuracy %.4f, "
            "%.2f ms/image",
            fmt,
            r["size_mib"],
            r["agreement"],
            r["disagreements"],
            len(y_true),
            target,
            "met" if r["target_met"] else "NOT met",
            r["accuracy"],
            r["latency_ms"],
        )
        if not r["target_met"]:
            log.warning(
                "export %s: top-1 agreement with Keras %.4f is below the target %.2f",
                fmt,
                r["agreement"],
                target,
            )

    keras_size = (models / MODEL_FILE).stat().st_size
    metrics = {
        "keras": {
            "file": MODEL_FILE,
            "size_bytes": keras_size,
            "size_mib": round(keras_size / 2**20, 4),
            "accuracy": float(np.mean(reference.argmax(axis=1) == y_true)),
            "latency_ms": keras_ms,
        },
        **results,
        "test_images": int(len(y_true)),
        "latency": {
            "runs": int(e.latency_runs),
            "warmup": int(e.latency_warmup),
            "threads": int(threads),
            "tflite": "tf.lite.Interpreter, XNNPACK delegate, batch 1, invoke() only",
            "keras": "predict_on_batch, batch 1",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }

    exports = Path(cfg.paths.exports)
    with atomic_dir(exports) as tmp:
        for fmt, flatbuffer in flatbuffers.items():
            (tmp / export_file(fmt)).write_bytes(flatbuffer)
    reports = Path(cfg.paths.reports)
    write_json(reports / METRICS_FILE, metrics)

    run_file = models / RUN_FILE
    run_id = read_json(run_file)["run_id"] if run_file.is_file() else None
    with tracking.active_run(cfg.tracking, run_id=run_id, run_name=cfg.tracking.run_name):
        flat = {"export_keras_latency_ms": keras_ms}
        for fmt, r in results.items():
            flat |= {
                f"export_{fmt}_{k}": float(r[k])
                for k in ("agreement", "accuracy", "size_bytes", "latency_ms", "max_abs_prob_diff")
            }
            flat[f"export_{fmt}_target_met"] = float(r["target_met"])
        mlflow.log_metrics(flat)
        tracking.log_files([exports / export_file(fmt) for fmt in flatbuffers], "exports")
        tracking.log_files([reports / METRICS_FILE], "reports")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_step(export, cfg)


if __name__ == "__main__":
    main()
