"""Shared fixtures: compose the real config from conf/, tiny variants for fast plumbing tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def compose(overrides: list[str] | None = None):
    """conf/ composed by Hydra, as `python -m pipeline.<stage> <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def tiny_overrides(tmp: Path, **extra: object) -> list[str]:
    """Small images, alpha 0.35, no weights, everything under `tmp`: plumbing in seconds."""
    values: dict[str, object] = {
        "data.path": tmp / "raw",
        "data.image_size": 32,
        "data.synthetic.size": 48,
        "data.synthetic.train_per_class": 4,
        "data.synthetic.val_per_class": 2,
        "data.synthetic.test_per_class": 2,
        "model.alpha": 0.35,
        "model.weights": "null",
        "train.epochs": 2,
        "train.batch_size": 8,
        "featurize.backend": "keras",
        "evaluate.gallery_size": 4,
        "tracking.uri": f"sqlite:///{tmp}/mlflow.db",
        "tracking.artifact_location": tmp / "mlartifacts",
        "paths.raw": tmp / "data/raw",
        "paths.prepared": tmp / "data/prepared",
        "paths.features": tmp / "data/features",
        "paths.models": tmp / "models",
        "paths.reports": tmp / "reports",
        "train.checkpoint_dir": tmp / "checkpoints",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(tmp: Path, **extra: object):
    from pipeline.config import validate

    return validate(compose(tiny_overrides(tmp, **extra)))


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted TFLite backbones go to a per-session cache, not the user's."""
    os.environ["TRUCK_CACHE_DIR"] = str(tmp_path_factory.mktemp("truck-cache"))


@pytest.fixture
def tiny(tmp_path: Path):
    return tiny_config(tmp_path)


def imagenet_weights_available() -> bool:
    from pipeline.model import imagenet_weights_path

    return imagenet_weights_path(1.0, 224).is_file()


def python() -> str:
    return sys.executable
