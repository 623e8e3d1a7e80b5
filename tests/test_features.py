"""The featurizer: TFLite (XNNPACK) matches Keras, converts once per backbone (a cached
conversion never changes the features, and is found without TensorFlow by `backbone_key`),
streams batches."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5
from pipeline.lib.model import build
from pipeline.lib.model.build import (
    WeightsNotFoundError,
    build_feature_extractor,
    imagenet_weights_path,
)
from pipeline.lib.model.features import (
    backbone_featurizer,
    backbone_key,
    extractor_fingerprint,
    featurize_array,
    load_cached_features,
    make_featurizer,
    tflite_cache_path,
)
from pipeline.lib.training import keras_fit
from pipeline.prepare import prepare
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def extractor():
    return build_feature_extractor(alpha=0.35, weights=None, image_size=32, init_seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)


@pytest.mark.slow  # converts MobileNetV2 to TFLite (30-90 s)
def test_tflite_features_match_keras_and_the_conversion_is_cached(extractor, images, tmp_path):
    keras_out = featurize_array(make_featurizer(extractor, "keras"), images, 8, 1280)
    cache = tmp_path / "cache"
    path = tflite_cache_path(extractor_fingerprint(extractor), cache)
    assert not path.exists()
    fresh = featurize_array(make_featurizer(extractor, "tflite", 2, cache), images, 8, 1280)
    assert path.is_file()
    assert fresh.shape == keras_out.shape == (37, 1280)
    assert np.abs(fresh - keras_out).max() <= 1e-3
    # a warm cache only saves time: the same bytes, whatever the threads and batch size
    cached = featurize_array(make_featurizer(extractor, "tflite", 1, cache), images, 5, 1280)
    assert cached.tobytes() == fresh.tobytes()


@pytest.mark.slow  # converts MobileNetV2 to TFLite (30-90 s)
def test_a_corrupt_cached_conversion_is_converted_again(images, tmp_path):
    cache = tmp_path / "cache"

    def features() -> np.ndarray:
        featurizer, dim = backbone_featurizer(0.35, None, 32, 0, "tflite", 0, cache)
        return featurize_array(featurizer, images, 8, dim)

    fresh = features()
    path = tflite_cache_path(backbone_key(0.35, None, 32, 0), cache)
    flatbuffer = path.read_bytes()
    path.write_bytes(flatbuffer[: len(flatbuffer) // 2])  # e.g. a disk that filled up
    again = features()
    assert again.tobytes() == fresh.tobytes()
    assert path.read_bytes() == flatbuffer  # converted afresh, to the same bytes


def test_an_unknown_backend_is_refused(extractor):
    with pytest.raises(ValueError, match="featurize.backend='auto'"):
        make_featurizer(extractor, "auto")
    with pytest.raises(ValueError, match="featurize.backend='auto'"):
        backbone_featurizer(0.35, None, 32, backend="auto")


def test_fingerprint_follows_the_weights():
    a = build_feature_extractor(0.35, None, 32, init_seed=0)
    b = build_feature_extractor(0.35, None, 32, init_seed=0)
    c = build_feature_extractor(0.35, None, 32, init_seed=1)
    assert extractor_fingerprint(a) == extractor_fingerprint(b) != extractor_fingerprint(c)


def test_the_backbone_key_follows_what_builds_the_extractor(tmp_path, monkeypatch):
    """Computed from files and settings (no Keras model): the same inputs give the same key;
    other weights bytes, alpha, size, seed (without weights), Keras version or settings, or a
    change to build.py give another, so a stale conversion is never found."""
    home = tmp_path / "keras"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    for alpha, size in ((1.0, 224), (0.5, 224), (1.0, 160)):  # the same bytes in three files
        imagenet_weights_path(alpha, size).parent.mkdir(parents=True, exist_ok=True)
        imagenet_weights_path(alpha, size).write_bytes(b"weights v1")
    mine = tmp_path / "mine.h5"
    mine.write_bytes(b"weights v1")
    base = backbone_key(1.0, "imagenet", 224, init_seed=0)
    assert backbone_key(1.0, "imagenet", 224, init_seed=7) == base  # no seed with weights
    keys = {
        base,
        backbone_key(0.5, "imagenet", 224),
        backbone_key(1.0, "imagenet", 160),
        backbone_key(1.0, str(mine), 224),
        backbone_key(1.0, None, 224, init_seed=0),
        backbone_key(1.0, None, 224, init_seed=1),
    }
    assert len(keys) == 6 and all(len(k) == 32 for k in keys)
    imagenet_weights_path(1.0, 224).write_bytes(b"weights v2")
    assert backbone_key(1.0, "imagenet", 224) not in keys
    mine.write_bytes(b"weights v2")
    assert backbone_key(1.0, str(mine), 224) not in keys
    imagenet_weights_path(1.0, 224).write_bytes(b"weights v1")
    assert backbone_key(1.0, "imagenet", 224) == base  # a key names bytes, not a file's history
    (home / "keras.json").write_text('{"floatx": "float32", "image_data_format": "channels_last"}')
    assert backbone_key(1.0, "imagenet", 224) == base  # what Keras writes on first import
    (home / "keras.json").write_text('{"floatx": "float16"}')
    assert backbone_key(1.0, "imagenet", 224) not in keys
    (home / "keras.json").unlink()
    edited = tmp_path / "build.py"
    edited.write_text(Path(build.__file__).read_text() + "\n# a change\n")
    with monkeypatch.context() as m:
        m.setattr(build, "__file__", str(edited))
        assert backbone_key(1.0, "imagenet", 224) not in keys
    real_version = importlib.metadata.version
    with monkeypatch.context() as m:
        m.setattr(
            importlib.metadata, "version", lambda n: "9.9" if n == "keras" else real_version(n)
        )
        assert backbone_key(1.0, "imagenet", 224) not in keys
    assert backbone_key(1.0, "imagenet", 224) == base
    with pytest.raises(WeightsNotFoundError):
        backbone_key(0.75, "imagenet", 224)  # no such file in Keras' cache


def test_featurize_streams_into_a_memory_map(extractor, images, tmp_path):
    out = np.lib.format.open_memmap(
        tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(len(images), 1280)
    )
    seen = []

    def featurizer(batch):
        seen.append(len(batch))
        return extractor.predict_on_batch(batch)

    featurize_array(featurizer, images, 16, 1280, out=out)
    assert seen == [16, 16, 5]  # one batch at a time, never the whole array
    np.testing.assert_allclose(
        np.load(tmp_path / "f.npy"),
        extractor.predict(images.astype(np.float32), verbose=0),
        atol=1e-5,
    )


@pytest.mark.slow
def test_training_on_cached_features_matches_end_to_end(tmp_path, monkeypatch):
    """Same head, same batches (no shuffle, no dropout): the head Keras fits on the cached
    (LiteRT) features must be the one that end-to-end training through the frozen Keras backbone
    gives. Plumbing, so a tiny random backbone; the ImageNet backbone's learning is tested in
    test_transfer_learning."""
    small = {
        "data.image_size": 64,
        "train.solver": "keras",
        "train.shuffle": "false",
        "train.epochs": 3,
        "train.batch_size": 8,
    }
    cfg = tiny_config(tmp_path, **small)
    prepare(cfg)
    featurize(cfg)
    dataset = PreparedDataset(cfg.paths.prepared)
    md5 = dvc_md5(cfg.paths.prepared)
    features = load_cached_features(cfg, md5)
    cached = keras_fit.fit_keras(cfg, dataset, features, md5)
    monkeypatch.setattr(keras_fit, "phase1_on_images", lambda cfg: True)
    e2e = keras_fit.fit_keras(cfg, dataset, features, md5)
    modes = [f.runner.phases["phase1"]["mode"] for f in (cached, e2e)]
    assert modes == ["cached_features", "end_to_end"]
    assert e2e.extractor is None  # frozen: the saved model keeps featurize's backbone
    history, reference = cached.runner.history, e2e.runner.history
    assert history["loss"][-1] < history["loss"][0]  # it did learn something
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(history[key], reference[key], atol=2e-3, err_msg=key)
    np.testing.assert_allclose(
        cached.head.probabilities(features["test"]),
        e2e.head.probabilities(features["test"]),
        atol=2e-3,
    )


def test_the_cache_key_follows_the_conversion_code(monkeypatch):
    """A change to how the backbone is converted must miss the old cache entries (a stale hit
    would give other features with no error)."""
    from pipeline.lib.model import features

    before = features.backbone_key(0.35, None, 32, 0)

    def convert_to_tflite(extractor):  # another conversion (e.g. optimizations on)
        return b"other"

    monkeypatch.setattr(features, "convert_to_tflite", convert_to_tflite)
    assert features.backbone_key(0.35, None, 32, 0) != before


def test_the_feature_key_follows_a_weights_file_changed_in_place(tmp_path):
    """DVC sees only the `model.weights` string: a file rewritten in place must still make the
    cached features another backbone's (train then recomputes them, evaluate runs the model)."""
    from pipeline.lib.model.features import feature_key
    from tests.conftest import compose

    weights = tmp_path / "user.weights.h5"
    weights.write_bytes(b"first weights")
    cfg = compose([f"model.weights={weights}"])
    before = feature_key(cfg, "prepared.dir")
    weights.write_bytes(b"other weights")
    after = feature_key(cfg, "prepared.dir")
    assert before["weights"] == after["weights"] and before["weights_md5"] != after["weights_md5"]
    assert feature_key(compose(["model.weights=null"]), "prepared.dir")["weights_md5"] is None
