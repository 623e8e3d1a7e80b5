"""Test-time augmentation: a model's probabilities averaged over each image and its horizontal
flip (`evaluate.tta`, `truck-predict --tta`). A flip-invariant image gets exactly its own
probabilities; the averaged rows still sum to 1."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.lib.model.batch_predict import predict_batches

#: Images per `predict` call on the flipped images.
BATCH_SIZE = 64


def hflip(images: np.ndarray) -> np.ndarray:
    """`images` (N, H, W, C) mirrored left-right (a copy, same dtype)."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1, :])


def flip_averaged(
    probs: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    num_classes: int,
) -> np.ndarray:
    """float32 (N, C): the mean of `probs` (the model's probabilities of `images`, (N, C)) and
    `predict`'s probabilities of the flipped images (run in batches of `BATCH_SIZE`)."""
    flipped = predict_batches(lambda batch: predict(hflip(batch)), images, BATCH_SIZE, num_classes)
    return ((np.asarray(probs, dtype=np.float32) + flipped) / 2).astype(np.float32)
