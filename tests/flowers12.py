"""Real photos for the audit tests: flowers12 (`../shared/data/flowers12`, 960 photos) decoded as
prepare decodes them and featurized by the project's LiteRT backbone (MobileNetV2 1.0, ImageNet
weights), computed once per test session under pytest's session temp folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.lib.data.images import load_rgb
from pipeline.lib.model.features import ShardedTFLite, backbone_flatbuffer, featurize_array
from tests.model_folder import WEIGHTS

FLOWERS = WEIGHTS.parents[2] / "shared" / "data" / "flowers12"
SPLIT_FOLDERS = {"training": "train", "validation": "val", "test": "test"}
SIZE = 224


@dataclass
class Photos:
    """Photos in a fixed order: relative `paths`, `splits`, class index `labels` (int64 (N,)),
    `classes` and float32 (N, 1280) backbone `features`."""

    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    classes: list[str]
    features: np.ndarray


def featurize_files(files: list[Path]) -> np.ndarray:
    """float32 (N, 1280) features of image files, decoded as prepare does (224 px, stretch)."""
    if not WEIGHTS.is_file():
        pytest.fail(f"the ImageNet weights file {WEIGHTS} is needed (`make weights`)")
    images = np.stack([load_rgb(f, SIZE) for f in files])
    featurizer = ShardedTFLite(backbone_flatbuffer(1.0, str(WEIGHTS), SIZE), 2)
    return featurize_array(featurizer, images, 32, featurizer.feature_dim)


def flowers12_photos(base: Path) -> Photos:
    """Every flowers12 photo with its features, cached in `base` (the session's temp root)."""
    if not FLOWERS.is_dir():
        pytest.fail(f"the real photos {FLOWERS} are needed (../shared/data/flowers12)")
    files = sorted(FLOWERS.glob("*/*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    cache = base / "flowers12_features.npy"
    if not cache.is_file():
        np.save(cache, featurize_files(files))
    return Photos(
        paths=[f.relative_to(FLOWERS).as_posix() for f in files],
        splits=[SPLIT_FOLDERS[f.parents[1].name] for f in files],
        labels=np.array([classes.index(f.parent.name) for f in files], dtype=np.int64),
        classes=classes,
        features=np.load(cache),
    )
