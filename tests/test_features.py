"""The featurizer (`pipeline.lib.model.features`): the LiteRT backbone matches the Keras
extractor it was converted from, converts once per backbone (a cached conversion never changes
the features, and is found without TensorFlow by `backbone_key`), gives the same features
whatever the batch size and threads, streams batches."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.config.schema import ConfigError, validate
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5
from pipeline.lib.model import build
from pipeline.lib.model.build import (
    WeightsNotFoundError,
    build_feature_extractor,
    imagenet_weights_path,
)
from pipeline.lib.model.features import (
    ShardedTFLite,
    backbone_flatbuffer,
    backbone_key,
    featurize_array,
    load_cached_features,
    tflite_cache_path,
)
from pipeline.lib.training import keras_fit
from pipeline.prepare import prepare
from tests.conftest import ROOT, WEIGHTS_FILE, compose, tiny_config


@pytest.fixture(scope="module")
def extractor():
    return build_feature_extractor(alpha=0.35, weights=None, image_size=32, init_seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)


def imagenet_weights() -> str:
    """The MobileNetV2 ImageNet weights file (`make weights`): with random weights the pooled
    features are ~1e-11, and any two featurizers would agree to 1e-3."""
    for path in (imagenet_weights_path(1.0, 224), ROOT.parent / "shared" / "models" / WEIGHTS_FILE):
        if path.is_file():
            return str(path)
    pytest.fail(f"the MobileNetV2 ImageNet weights file {WEIGHTS_FILE} is needed (`make weights`)")


WARM_CACHE_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from pipeline.lib.model.features import ShardedTFLite, backbone_flatbuffer, featurize_array
    images = np.load(sys.argv[1])
    featurizer = ShardedTFLite(backbone_flatbuffer(1.0, sys.argv[4], 32, 0, Path(sys.argv[2])), 3)
    np.save(sys.argv[3], featurize_array(featurizer, images, 7, featurizer.feature_dim))
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    """
)


@pytest.mark.slow  # converts MobileNetV2 to TFLite (30-90 s)
def test_tflite_features_match_keras_and_the_conversion_is_cached(images, tmp_path):
    weights = imagenet_weights()
    extractor = build_feature_extractor(1.0, weights, 32, 0)
    keras_out = featurize_array(extractor.predict_on_batch, images, 8, 1280)
    cache = tmp_path / "cache"
    path = tflite_cache_path(backbone_key(1.0, weights, 32, 0), cache)
    assert not path.exists()
    featurizer = ShardedTFLite(backbone_flatbuffer(1.0, weights, 32, 0, cache), 2)
    dim = featurizer.feature_dim
    fresh = featurize_array(featurizer, images, 8, dim)
    assert path.is_file() and dim == 1280
    assert fresh.shape == keras_out.shape == (37, 1280)
    assert np.abs(keras_out).max() > 0.1 and np.std(keras_out, axis=0).max() > 0.01  # real
    assert np.abs(fresh - keras_out).max() <= 1e-3
    # a warm cache only saves time: the same bytes, whatever the threads and batch size
    for threads, batch in ((1, 5), (3, 37), (8, 1)):
        cached = featurize_array(ShardedTFLite(path, threads), images, batch, dim)
        assert cached.tobytes() == fresh.tobytes(), (threads, batch)

    # and the warm cache is found without TensorFlow or Keras (a fresh process)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run(
        [sys.executable, "-c", WARM_CACHE_PROBE, str(tmp_path / "images.npy"), str(cache),
         str(tmp_path / "features.npy"), weights],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    top_level = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "ai_edge_litert" in top_level and "pipeline" in top_level
    assert not top_level & {"tensorflow", "keras", "tf_keras"}, sorted(top_level)
    assert np.load(tmp_path / "features.npy").tobytes() == fresh.tobytes()


@pytest.mark.slow  # converts MobileNetV2 to TFLite (30-90 s)
def test_a_corrupt_cached_conversion_is_converted_again(images, tmp_path):
    cache = tmp_path / "cache"

    def features() -> np.ndarray:
        featurizer = ShardedTFLite(backbone_flatbuffer(0.35, None, 32, 0, cache))
        return featurize_array(featurizer, images, 8, featurizer.feature_dim)

    fresh = features()
    path = tflite_cache_path(backbone_key(0.35, None, 32, 0), cache)
    flatbuffer = path.read_bytes()
    path.write_bytes(flatbuffer[: len(flatbuffer) // 2])  # e.g. a disk that filled up
    again = features()
    assert again.tobytes() == fresh.tobytes()
    assert path.read_bytes() == flatbuffer  # converted afresh, to the same bytes
    assert backbone_flatbuffer(0.35, None, 32, 0, cache) == flatbuffer  # and found again


@pytest.mark.parametrize("override", ["+featurize.backend=keras", "+featurize.backend=auto"])
def test_the_removed_backend_setting_is_refused_with_its_key(override):
    """LiteRT is the only featurizer: a leftover `featurize.backend` is an error naming it,
    never silently ignored."""
    with pytest.raises(ConfigError, match=r"featurize\.backend"):
        validate(compose([override]))


def weights_h5(path: Path, version: str) -> None:
    """A small whole HDF5 file (what `resolve_weights` checks), its bytes set by `version`."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("v", data=np.frombuffer(version.encode(), np.uint8), track_times=False)


def test_the_backbone_key_follows_what_builds_the_extractor(tmp_path, monkeypatch):
    """Computed from files and settings (no Keras model): the same inputs give the same key;
    other weights bytes, alpha, size, seed (without weights), Keras version or settings, or a
    change to build.py give another, so a stale conversion is never found."""
    home = tmp_path / "keras"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    for alpha, size in ((1.0, 224), (0.5, 224), (1.0, 160)):  # the same bytes in three files
        weights_h5(home / "models" / build.WEIGHTS_FILE.format(alpha=alpha, size=size), "v1")
    mine = tmp_path / "mine.h5"
    weights_h5(mine, "v1")
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
    weights_h5(imagenet_weights_path(1.0, 224), "v2")
    assert backbone_key(1.0, "imagenet", 224) not in keys
    weights_h5(mine, "v2")
    assert backbone_key(1.0, str(mine), 224) not in keys
    weights_h5(imagenet_weights_path(1.0, 224), "v1")
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
    import h5py

    from pipeline.lib.model.features import feature_key

    weights = tmp_path / "user.weights.h5"

    def write(value: float) -> None:  # a real (tiny) HDF5 file: damaged files are refused
        with h5py.File(weights, "w") as fh:
            fh["w"] = [value]

    write(1.0)
    cfg = compose([f"model.weights={weights}"])
    before = feature_key(cfg, "prepared.dir")
    write(2.0)
    after = feature_key(cfg, "prepared.dir")
    assert before["weights"] == after["weights"] and before["weights_md5"] != after["weights_md5"]
    assert feature_key(compose(["model.weights=null"]), "prepared.dir")["weights_md5"] is None
