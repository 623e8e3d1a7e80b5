"""The one batch-predict loop: a model function over a (memory-mapped) image array, one batch in
memory at a time. Used by evaluate (Keras) and export (Keras and TFLite)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.lib.data.prepared import iter_batches

#: Images per call when predicting a split.
BATCH_SIZE = 32


def predict_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int = BATCH_SIZE,
    num_outputs: int = 0,
) -> np.ndarray:
    """`predict` applied to `images` batch by batch, the results stacked.

    Args:
        predict: float32 (B, H, W, 3) -> (B, K), e.g. Keras `model.predict_on_batch` or a
            `pipeline.lib.model.tflite.TFLiteRunner`.
        images: (N, H, W, 3), any numeric dtype (uint8 prepared arrays, memory-mapped); each
            batch is passed as float32 with its values unchanged.
        batch_size: images per call (the last batch may be smaller).
        num_outputs: K, the width of the empty result when there are no images.

    Returns:
        float32 (N, K); (0, num_outputs) when `images` is empty.
    """
    out = [
        np.asarray(predict(batch), dtype=np.float32) for batch in iter_batches(images, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, num_outputs), dtype=np.float32)
