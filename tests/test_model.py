"""The head's initialisation (`model.head_init`), and which backbone weights file is used."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.lib.model.build import (
    BACKBONE_NAME,
    WEIGHTS_FILE,
    WeightsNotFoundError,
    build_feature_extractor,
    build_head,
    imagenet_weights_path,
    resolve_weights,
)
from tests.conftest import ROOT, imagenet_weights_available, tiny_config


def test_zero_initialised_head_starts_from_uniform_class_scores():
    head = build_head(feature_dim=16, num_classes=6, dropout=0.0, init="zeros")
    features = np.random.default_rng(0).uniform(0, 6, size=(5, 16)).astype("float32")
    np.testing.assert_allclose(head.predict(features, verbose=0), np.full((5, 6), 1 / 6), atol=1e-6)
    assert head.count_params() == 16 * 6 + 6


def test_glorot_head_starts_from_random_class_scores():
    head = build_head(feature_dim=16, num_classes=6, dropout=0.0, init="glorot_uniform")
    features = np.random.default_rng(0).uniform(0, 6, size=(5, 16)).astype("float32")
    assert np.abs(head.predict(features, verbose=0) - 1 / 6).max() > 0.01


def test_default_config_uses_the_zero_initialised_head(tmp_path):
    assert tiny_config(tmp_path).model.head_init == "zeros"


def test_unknown_head_init_is_rejected_naming_the_key(tmp_path):
    from pipeline.lib.config.schema import ConfigError

    with pytest.raises(ConfigError, match="model.head_init"):
        tiny_config(tmp_path, **{"model.head_init": "ones"})


def whole_h5(path):
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("kernel", data=np.arange(4096, dtype=np.float32))


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    whole_h5(tmp_path / "models" / WEIGHTS_FILE.format(alpha=1.0, size=224))
    return tmp_path / "models"


@pytest.mark.parametrize("size", [32, 100, 160, 200, 256])
def test_a_size_keras_has_no_file_of_uses_the_224_file(keras_home, size):
    """Keras ships ImageNet weights at 96..224 px; any other size (and a shipped size whose file
    is not there) loads the 224 file, as Keras does: that is the file the feature key hashes."""
    the_224_file = keras_home / WEIGHTS_FILE.format(alpha=1.0, size=224)
    assert imagenet_weights_path(1.0, size) == the_224_file
    assert resolve_weights("imagenet", 1.0, size) == the_224_file
    assert resolve_weights("imagenet", 1.0, 224) == the_224_file
    the_160_file = keras_home / WEIGHTS_FILE.format(alpha=1.0, size=160)
    whole_h5(the_160_file)
    assert resolve_weights("imagenet", 1.0, 160) == the_160_file  # its own file, when there


def test_a_missing_file_names_it_and_make_weights(keras_home):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("imagenet", 0.5, 200)
    text = str(info.value)
    assert WEIGHTS_FILE.format(alpha=0.5, size=224) in text and "`make weights`" in text
    assert "160" not in text and "\n" not in text


@pytest.mark.parametrize("weights", ["imagenet", "file"])
def test_a_truncated_weights_file_is_one_line_before_any_work(keras_home, weights):
    """An interrupted copy or download: named, with its size and the fix, when resolving."""
    path = keras_home / WEIGHTS_FILE.format(alpha=1.0, size=224)
    path.write_bytes(path.read_bytes()[:3000])
    if weights == "file":
        path = path.rename(keras_home / "mine.h5")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("imagenet" if weights == "imagenet" else str(path), 1.0, 224)
    text = str(info.value)
    assert str(path) in text and "truncated" in text and "3000 bytes" in text and "\n" not in text
    assert ("`make weights`" in text) == (weights == "imagenet")


def test_featurize_refuses_a_truncated_weights_file_at_once(tmp_path):
    home = tmp_path / "keras"
    whole_h5(home / "models" / WEIGHTS_FILE.format(alpha=1.0, size=224))
    path = home / "models" / WEIGHTS_FILE.format(alpha=1.0, size=224)
    path.write_bytes(path.read_bytes()[:3000])
    env = {"KERAS_HOME": str(home), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.featurize", "model.weights=imagenet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ERROR: model.weights=imagenet: {path}")
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not imagenet_weights_available(), reason="needs `make weights`")
def test_a_200_px_backbone_has_the_224_px_imagenet_weights():
    at_224 = build_feature_extractor(1.0, "imagenet", 224).get_layer(BACKBONE_NAME).get_weights()
    at_200 = build_feature_extractor(1.0, "imagenet", 200).get_layer(BACKBONE_NAME).get_weights()
    assert len(at_200) == len(at_224)
    assert all(np.array_equal(a, b) for a, b in zip(at_200, at_224, strict=True))
