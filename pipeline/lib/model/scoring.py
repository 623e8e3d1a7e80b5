"""A split's probabilities by the trained model, without TensorFlow: the head on `paths.features`
when the model's backbone.tflite is the featurized one and the features are of these prepared
images, else the model's backbone on the images (fine-tuned, stale or missing features).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5, md5_file, read_json
from pipeline.lib.model.classifier import BACKBONE_FILE, Classifier
from pipeline.lib.model.features import META_FILE

log = logging.getLogger(__name__)


def _cached_features(
    features: str | Path, backbone: Path, prepared: str | Path, split: str
) -> np.ndarray | None:
    folder = Path(features)
    cached = folder / BACKBONE_FILE
    if not cached.is_file() or md5_file(cached) != md5_file(backbone):
        log.info("The model's backbone is not the featurized one (fine-tuned, or no features)")
        return None
    if read_json(folder / META_FILE).get("key", {}).get("prepared_md5") != dvc_md5(prepared):
        log.info("%s was computed from other prepared images", folder)
        return None
    return np.load(folder / f"{split}.npy")


def split_scores(
    classifier: Classifier,
    dataset: PreparedDataset,
    split: str,
    features_dir: str | Path,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (N, C) probabilities, float64 (N,) energies) of `split`'s images; with `tta`,
    averaged with the flipped images' (by the backbone: they have no cached features)."""
    images = dataset.images(split)
    features = _cached_features(features_dir, classifier.backbone_source, dataset.folder, split)
    if features is None or len(features) != len(images):
        log.info("Scoring the %d %s images with the model's backbone", len(images), split)
        features = classifier.features(images)
    else:
        log.info("Scoring the %d %s images: the head on the cached features", len(images), split)
    views = [features]
    if tta:
        log.info("TTA: averaging each %s image with its horizontal flip", split)
        views.append(classifier.features(images, flip=True))
    return classifier.scores(views)
