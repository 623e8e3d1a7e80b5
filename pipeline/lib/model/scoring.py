"""Test-split probabilities of the trained model, computing each thing once, without TensorFlow.

With a frozen backbone the saved model is MobileNetV2 + the trained head, and the featurize stage
has already run MobileNetV2 over the test images (`paths.features`/test.npy). So, when those cached
features were computed from these images with this backbone (`load_cached_features`), the test
split is scored by the saved head (`paths.models`/head.npy, the Dense layer's weights) on them in
NumPy. The saved whole model is still verified: train checks, before saving, that model.keras
gives the same probabilities (`ATOL`) on a sample of the images (`check_whole_model`). Otherwise
(no matching features, a fine-tuned or unfrozen backbone) the whole Keras model runs on the images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import dvc_md5, md5_file
from pipeline.lib.model.batch_predict import predict_batches
from pipeline.lib.model.features import load_cached_features
from pipeline.lib.model.saving import (
    HEAD_FILE,
    HEAD_RECORD_FILE,
    MODEL_FILE,
    head_record,
    read_head,
)

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


def head_probabilities(kernel: np.ndarray, bias: np.ndarray, features: np.ndarray) -> np.ndarray:
    """float32 (N, C) softmax(features @ kernel + bias): the Dense head (kernel (D, C), bias
    (C,)) on features (N, D), computed in float64."""
    z = np.asarray(features, np.float64) @ np.asarray(kernel, np.float64) + bias
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_probabilities(
    cfg: Any, dataset: PreparedDataset, models: Path, split: str = "test", model: Any = None
) -> np.ndarray:
    """float32 (N, K) class probabilities of `split`'s images by the model in `models`.

    The saved head (`HEAD_FILE`) on the cached features when they match (see the module's
    docstring) and are those train checked the whole model on (`HEAD_RECORD_FILE`); else the
    whole Keras model (`model`, or `models`/model.keras loaded here) on
    every image.

    Raises:
        StageInputError: head.npy is missing or unreadable.
        ScoringMismatchError: the cached features are not those train checked the model on, or
            the head does not take them (another backbone).
    """
    images = dataset.images(split)
    features = _matching_features(cfg, split)
    record = head_record(models)
    checked = record.get("features_md5")
    if features is None or checked is None or len(features) != len(images) or not len(images):
        from pipeline.lib.model.build import load_model

        log.info(
            "Scoring the %s images with the whole model (%s): %s",
            split,
            models / MODEL_FILE,
            _no_features_reason(cfg)
            if features is None
            else f"{models / HEAD_RECORD_FILE} names no features the model was checked on",
        )

        model = load_model(models / MODEL_FILE) if model is None else model
        classes = int(model.output.shape[-1])
        return predict_batches(model.predict_on_batch, images, BATCH_SIZE, classes)
    if dvc_md5(cfg.paths.features) != checked:
        raise ScoringMismatchError(
            f"{cfg.paths.features} is not what train checked {models / MODEL_FILE} against "
            f"({models / HEAD_RECORD_FILE}: features {checked}): rerun `dvc repro` (featurize, "
            "then train)."
        )
    _check_pair(models, record)
    kernel, bias = read_head(models)
    if kernel.shape[0] != features.shape[1]:
        raise ScoringMismatchError(
            f"{models / HEAD_FILE} takes {kernel.shape[0]} features, but {cfg.paths.features}/"
            f"{split}.npy has {features.shape[1]}: rerun `dvc repro` (featurize, then train)."
        )
    log.info(
        "Scored %d %s images: the saved head (%s) on the cached features",
        len(images),
        split,
        models / HEAD_FILE,
    )
    return head_probabilities(kernel, bias, features)


def _no_features_reason(cfg: Any) -> str:
    """Why no cached features stand for the model's backbone (for the log)."""
    if not cfg.model.freeze_backbone:
        return "the backbone was trained (model.freeze_backbone=false)"
    if cfg.train.fine_tune.enabled:
        return "the backbone was fine-tuned (train.fine_tune.enabled=true)"
    return "no cached features of this backbone and these images"


def _check_pair(models: Path, record: dict[str, Any]) -> None:
    """Raise ScoringMismatchError unless head.npy and model.keras are the files train saved and
    checked together (their md5s in `HEAD_RECORD_FILE`)."""
    for name, key in ((HEAD_FILE, "head_md5"), (MODEL_FILE, "model_md5")):
        if not (models / name).is_file() or md5_file(models / name) != record.get(key):
            raise ScoringMismatchError(
                f"{models / name} is not the file train saved and checked with its other half "
                f"({models / HEAD_RECORD_FILE}: {key} {record.get(key)}): rerun the train stage "
                "(`dvc repro -f train`)."
            )


def check_whole_model(
    cfg: Any, dataset: PreparedDataset, model: Any, kernel: np.ndarray, bias: np.ndarray
) -> float | None:
    """Train's check before saving: the whole Keras `model` (images -> probabilities) on `SAMPLE`
    test images (the training images when there is no test split) against the head (`kernel`,
    `bias`) on their cached features. Returns the max |difference|, None when no cached
    features match (then later stages run the whole model and nothing needs checking).

    Raises:
        ScoringMismatchError: the difference exceeds `ATOL` (naming the features folder).
    """
    split = "test" if len(dataset.labels("test")) else "train"
    features = _matching_features(cfg, split)
    images = dataset.images(split)
    if features is None or len(features) != len(images) or not len(images):
        return None
    sample = np.unique(np.linspace(0, len(images) - 1, min(SAMPLE, len(images))).astype(int))
    # an eager call: 8 images do not repay tracing `predict_on_batch`'s function
    whole = np.asarray(model(np.asarray(images[sample], dtype=np.float32), training=False))
    diff = float(np.abs(whole - head_probabilities(kernel, bias, features[sample])).max())
    if not diff <= ATOL:  # NaN included
        raise ScoringMismatchError(
            f"The trained model and the cached features {Path(cfg.paths.features)}/{split}.npy "
            f"disagree (max |difference| of probabilities {diff:.2g} > {ATOL:g} on {len(sample)} "
            "images): the features are stale (e.g. the weights file changed in place, which DVC "
            "does not see): `dvc repro -f featurize`."
        )
    log.info("The whole model agrees with the head on %d %s images (max |diff| %.1e)",
             len(sample), split, diff)  # fmt: skip
    return diff


def _matching_features(cfg: Any, split: str) -> np.ndarray | None:
    """The cached features of `split` when the model's backbone is the featurized one (frozen,
    not fine-tuned) and they were computed from these prepared images; else None."""
    if not cfg.model.freeze_backbone or cfg.train.fine_tune.enabled:
        return None
    features = load_cached_features(cfg, dvc_md5(cfg.paths.prepared))
    return None if features is None else features[split]


test_probabilities.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
