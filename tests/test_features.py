"""The featurizer: TFLite (XNNPACK) matches Keras, converts once per backbone (a cached
conversion never changes the features), streams batches."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5
from pipeline.lib.model.build import build_feature_extractor
from pipeline.lib.model.features import (
    extractor_fingerprint,
    featurize_array,
    make_featurizer,
    tflite_cache_path,
)
from pipeline.lib.training.fit import fit
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
    assert not tflite_cache_path(extractor, cache).exists()
    fresh = featurize_array(make_featurizer(extractor, "tflite", 2, cache), images, 8, 1280)
    assert tflite_cache_path(extractor, cache).is_file()
    assert fresh.shape == keras_out.shape == (37, 1280)
    assert np.abs(fresh - keras_out).max() <= 1e-3
    # a warm cache only saves time: the same bytes, whatever the threads and batch size
    cached = featurize_array(make_featurizer(extractor, "tflite", 1, cache), images, 5, 1280)
    assert cached.tobytes() == fresh.tobytes()


@pytest.mark.slow  # converts MobileNetV2 to TFLite (30-90 s)
def test_a_corrupt_cached_conversion_is_converted_again(extractor, images, tmp_path):
    cache = tmp_path / "cache"
    fresh = featurize_array(make_featurizer(extractor, "tflite", 0, cache), images, 8, 1280)
    path = tflite_cache_path(extractor, cache)
    flatbuffer = path.read_bytes()
    path.write_bytes(flatbuffer[: len(flatbuffer) // 2])  # e.g. a disk that filled up
    again = featurize_array(make_featurizer(extractor, "tflite", 0, cache), images, 8, 1280)
    assert again.tobytes() == fresh.tobytes()
    assert path.read_bytes() == flatbuffer  # converted afresh, to the same bytes


def test_an_unknown_backend_is_refused(extractor):
    with pytest.raises(ValueError, match="featurize.backend='auto'"):
        make_featurizer(extractor, "auto")


def test_fingerprint_follows_the_weights():
    a = build_feature_extractor(0.35, None, 32, init_seed=0)
    b = build_feature_extractor(0.35, None, 32, init_seed=0)
    c = build_feature_extractor(0.35, None, 32, init_seed=1)
    assert extractor_fingerprint(a) == extractor_fingerprint(b) != extractor_fingerprint(c)


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
def test_training_on_cached_features_matches_end_to_end(tmp_path):
    """Same head, same batches (no shuffle, no dropout): the cached-feature path must give the
    model that end-to-end training through the frozen backbone gives. Plumbing, so a tiny random
    backbone; the ImageNet backbone's learning is tested in test_transfer_learning."""
    small = {"data.image_size": 64, "train.shuffle": "false", "train.epochs": 3}
    cached_cfg = tiny_config(tmp_path, **small)
    prepare(cached_cfg)
    featurize(cached_cfg)
    dataset = PreparedDataset(cached_cfg.paths.prepared)
    md5 = dvc_md5(cached_cfg.paths.prepared)
    cached = fit(cached_cfg, dataset, md5)
    e2e = fit(tiny_config(tmp_path, **small, **{"train.use_feature_cache": "false"}), dataset, md5)
    assert (cached["mode"], e2e["mode"]) == ("cached_features", "end_to_end")
    assert cached["epochs"]["loss"][-1] < cached["epochs"]["loss"][0]  # it did learn something
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(
            cached["epochs"][key], e2e["epochs"][key], atol=2e-3, err_msg=key
        )
    images = np.asarray(dataset.images("test"), dtype=np.float32)
    np.testing.assert_allclose(
        cached["model"].predict(images, verbose=0),
        e2e["model"].predict(images, verbose=0),
        atol=2e-3,
    )
