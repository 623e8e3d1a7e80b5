"""The one TensorFlow Lite interpreter runner: featurize, export and predict run `.tflite` models
through `TFLiteRunner`.

A runner is a function from float images to float outputs, whatever the model's tensor types:

    runner = TFLiteRunner(Path("exports/model_int8.tflite"), num_threads=2)
    probs = runner(images)        # float32 (N, H, W, 3), 0..255  ->  float32 (N, K)

Integer (int8/uint8) inputs are quantized with the input tensor's scale and zero point, integer
outputs dequantized with the output's; float16/float32 tensors are cast. The interpreter is
LiteRT's (`ai_edge_litert.interpreter.Interpreter`, the successor TensorFlow 2.20 deprecates
`tf.lite.Interpreter` for; the same outputs, bit for bit), whose default CPU delegate is XNNPACK.
It does not import TensorFlow (~0.05 s to import instead of ~4.5 s), so a process that only runs
`.tflite` models (featurize on a warm conversion cache, predict) never loads it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.console import stderr_without


class TFLiteRunner:
    """A `.tflite` model (one input, one output tensor) as a function on image batches.

    Args:
        model: the flatbuffer's bytes, or the path of a `.tflite` file.
        num_threads: CPU threads of the interpreter; None or 0 = all cores (`os.cpu_count()`).

    Attributes:
        input_shape: the input tensor's shape as converted, e.g. (1, 224, 224, 3) (batch first;
            a free batch dimension shows as 1).
        input_dtype / output_dtype: the tensors' numpy dtypes (float32, float16, int8, uint8).
        input_quantization / output_quantization: (scale, zero_point), (0.0, 0) when not
            quantized.

    Calling it runs a batch float32 (N, H, W, 3) (any real dtype; pixel values 0..255 for the
    pipeline's models) and returns float32 (N, K): the output tensor, dequantized, one row per
    image. A batch size the model does not have resizes the interpreter; a model converted with
    a fixed batch of 1 that cannot be resized is run one image at a time.

    Raises:
        ValueError: the model cannot be loaded (not a TFLite flatbuffer, unreadable file), or its
            input is an integer tensor without quantization parameters.
    """

    def __init__(self, model: bytes | str | os.PathLike[str], num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        source: dict[str, Any] = (
            {"model_content": bytes(model)}
            if isinstance(model, bytes | bytearray)
            else {"model_path": str(Path(model))}
        )
        threads = num_threads or os.cpu_count() or 1
        try:
            # LiteRT's C++ "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on every
            # interpreter (whatever TF_CPP_MIN_LOG_LEVEL says); its Python warnings
            with warnings.catch_warnings(), stderr_without("TensorFlow Lite XNNPACK delegate"):
                warnings.simplefilter("ignore")
                self.interpreter = Interpreter(**source, num_threads=threads)
                self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ValueError(f"not a loadable TensorFlow Lite model: {exc}") from exc
        self.num_threads = threads
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in self.input["shape"])
        self.input_dtype = np.dtype(self.input["dtype"])
        self.output_dtype = np.dtype(self.output["dtype"])
        self.input_quantization = _quantization(self.input)
        self.output_quantization = _quantization(self.output)
        if self.input_dtype.kind in "iu" and not self.input_quantization[0]:
            raise ValueError(f"its {self.input_dtype.name} input has no quantization parameters")
        self._batch = self.input_shape[0]

    def quantize(self, images: np.ndarray) -> np.ndarray:
        """`images` (float, real-valued) as the input tensor's dtype: cast for a float input;
        `round(x / scale + zero_point)` clipped to the integer range for an int8/uint8 one."""
        if self.input_dtype.kind == "f":
            return np.ascontiguousarray(images, dtype=self.input_dtype)
        scale, zero_point = self.input_quantization
        info = np.iinfo(self.input_dtype)
        q = np.rint(np.asarray(images, dtype=np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """Output tensor values as float32: `(q - zero_point) * scale` for an integer output
        (scale 1 when it has none), a cast for a float one."""
        if self.output_dtype.kind == "f":
            return np.asarray(values, dtype=np.float32)
        scale, zero_point = self.output_quantization
        return (np.asarray(values, dtype=np.float32) - zero_point) * np.float32(scale or 1.0)

    def set_input(self, images: np.ndarray) -> None:
        """Resize the interpreter to `len(images)` if needed and set its (quantized) input;
        `invoke()` then runs it (what a latency measurement times).

        Raises:
            RuntimeError / ValueError: the model's batch dimension cannot be resized.
        """
        if len(images) != self._batch:
            self.interpreter.resize_tensor_input(
                self.input["index"], [len(images), *self.input_shape[1:]], strict=False
            )
            self.interpreter.allocate_tensors()
            self._batch = len(images)
        self.interpreter.set_tensor(self.input["index"], self.quantize(images))

    def invoke(self) -> None:
        """Run the interpreter on the input last set (`set_input`)."""
        self.interpreter.invoke()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        try:
            self.set_input(images)
        except (RuntimeError, ValueError):  # a model converted with a fixed batch size
            self.interpreter.resize_tensor_input(
                self.input["index"], list(self.input_shape), strict=False
            )
            self.interpreter.allocate_tensors()
            self._batch = self.input_shape[0]
            if self._batch != 1 or n == 1:
                raise
            return np.concatenate([self(images[i : i + 1]) for i in range(n)])
        self.interpreter.invoke()
        values = self.interpreter.get_tensor(self.output["index"])
        return self.dequantize(np.array(values).reshape(n, -1))

    def tensor_dtypes(self) -> dict[str, int]:
        """How many tensors of each dtype the model holds, by dtype name (sorted); an int8 model:
        int8 weights and activations, int32 biases."""
        counts: dict[str, int] = {}
        for detail in self.interpreter.get_tensor_details():
            name = np.dtype(detail["dtype"]).name
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))


def _quantization(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)
