"""Test-time augmentation: a flip-invariant image keeps its probabilities; others are averaged."""

from __future__ import annotations

import numpy as np

from pipeline.lib.model.tta import flip_averaged, hflip


def _model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_tta_changes_nothing_for_a_flip_invariant_input():
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (5, 8, 4, 3)).astype(np.uint8)
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)  # mirror-symmetric
    assert np.array_equal(hflip(images), images)
    model = _model()
    probs = model.predict_on_batch(images.astype(np.float32))
    np.testing.assert_allclose(
        flip_averaged(probs, model.predict_on_batch, images, 3), probs, atol=1e-6
    )


def test_tta_averages_image_and_flip():
    images = np.random.default_rng(1).integers(0, 255, (4, 8, 8, 3)).astype(np.uint8)
    model = _model()
    probs = np.asarray(model.predict_on_batch(images.astype(np.float32)))
    flipped = np.asarray(model.predict_on_batch(hflip(images).astype(np.float32)))
    out = flip_averaged(probs, model.predict_on_batch, images, 3)
    np.testing.assert_allclose(out, (probs + flipped) / 2, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
