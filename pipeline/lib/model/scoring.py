"""Test-split probabilities of the trained model, computing each thing once.

With a frozen backbone the saved model is MobileNetV2 + the trained head, and the featurize stage
has already run MobileNetV2 over the test images (`paths.features`/test.npy). So, when those cached
features were computed from these images with this backbone (`load_cached_features`), the test
split is scored by the saved model's head (its Dense layer `classifier`) on them, and the saved
whole model is still verified: it must give the same probabilities (`ATOL`) on a small sample of
the images. Otherwise (no matching features, a fine-tuned or unfrozen backbone) the whole model
runs on the images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import dvc_md5
from pipeline.lib.model.batch_predict import predict_batches
from pipeline.lib.model.build import HEAD_NAME, load_model
from pipeline.lib.model.features import load_cached_features
from pipeline.lib.model.saving import MODEL_FILE

log = logging.getLogger(__name__)

#: Images of the split the whole model is checked on (evenly spaced).
SAMPLE = 8
#: Largest |difference| allowed between the whole model's and the head-on-features probabilities
#: (TFLite and Keras backbones agree to ~1e-5 in the features).
ATOL = 1e-4
#: Images per Keras `predict_on_batch` call when the whole model runs on the images.
BATCH_SIZE = 64


class ScoringMismatchError(StageInputError):
    """The saved model and the cached features disagree on the sample images."""


def test_probabilities(
    cfg: Any, dataset: PreparedDataset, models: Path, split: str = "test", model: Any = None
) -> np.ndarray:
    """float32 (N, K) class probabilities of `split`'s images by the model in `models`.

    The head on the cached features when they match (see the module's docstring), checked
    against the whole model on `SAMPLE` images; else the whole model on every image.
    `model`: the Keras model of `models` if already loaded (else it is loaded here).

    Raises:
        ScoringMismatchError: the whole model's probabilities on the sample differ from the
            head's on the cached features by more than `ATOL` (naming both files).
    """
    model = load_model(models / MODEL_FILE) if model is None else model
    images = dataset.images(split)
    classes = int(model.output.shape[-1])
    features = _matching_features(cfg, split)
    if features is None or len(features) != len(images) or not len(images):
        return predict_batches(model.predict_on_batch, images, BATCH_SIZE, classes)
    probs = np.asarray(model.get_layer(HEAD_NAME)(features), dtype=np.float32)
    sample = np.unique(np.linspace(0, len(images) - 1, min(SAMPLE, len(images))).astype(int))
    # an eager call: 8 images do not repay tracing `predict_on_batch`'s function
    whole = np.asarray(model(np.asarray(images[sample], dtype=np.float32), training=False))
    diff = float(np.abs(whole - probs[sample]).max())
    if diff > ATOL:
        raise ScoringMismatchError(
            f"{models / MODEL_FILE} and the cached features {Path(cfg.paths.features)}/"
            f"{split}.npy disagree (max |difference| of probabilities {diff:.2g} > {ATOL:g} on "
            f"{len(sample)} images): rerun `dvc repro` (featurize, then train)."
        )
    log.info(
        "Scored %d %s images from the cached features; the whole model agrees on %d (max |diff| "
        "%.1e)",
        len(images),
        split,
        len(sample),
        diff,
    )
    return probs


def _matching_features(cfg: Any, split: str) -> np.ndarray | None:
    """The cached features of `split` when the model's backbone is the featurized one (frozen,
    not fine-tuned) and they were computed from these prepared images; else None."""
    if not cfg.model.freeze_backbone or cfg.train.fine_tune.enabled:
        return None
    features = load_cached_features(cfg, dvc_md5(cfg.paths.prepared))
    return None if features is None else features[split]


test_probabilities.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
