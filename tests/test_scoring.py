"""`scoring.test_probabilities`: the test split scored by the saved model's head on the cached
features, the saved whole model checked on a sample; the whole model on images otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.model.build import load_model
from pipeline.lib.model.saving import MODEL_FILE
from pipeline.lib.model.scoring import ScoringMismatchError, test_probabilities
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import tiny_config

#: The real backbone (a random one pools to ~0 features: every head then gives ~1/K).
REAL = {
    "tracking.log_model": "false",
    "data.image_size": 224,
    "model.alpha": 1.0,
    "model.weights": "imagenet",
    "train.epochs": 5,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("scoring")
    cfg = tiny_config(tmp, **REAL)
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    return tmp, cfg


def whole_model_probabilities(cfg) -> np.ndarray:
    model = load_model(Path(cfg.paths.models) / MODEL_FILE)
    images = open_prepared(cfg.paths.prepared, cfg.data).images("test")
    return np.asarray(model.predict_on_batch(np.asarray(images, dtype=np.float32)))


def test_head_on_cached_features_gives_the_whole_models_probabilities(trained):
    _, cfg = trained
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    probs = test_probabilities(cfg, dataset, Path(cfg.paths.models))
    assert probs.dtype == np.float32
    assert probs.shape == (dataset.size("test"), dataset.num_classes)
    whole = whole_model_probabilities(cfg)
    assert whole.max() > 2 / dataset.num_classes  # a head that tells the classes apart
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_features_that_disagree_with_the_saved_model_are_an_error_naming_both(trained, tmp_path):
    tmp, cfg = trained
    features = tmp_path / "features"
    features.mkdir()
    for name in ("train.npy", "val.npy", "meta.json"):
        (features / name).write_bytes((Path(cfg.paths.features) / name).read_bytes())
    test = np.load(Path(cfg.paths.features) / "test.npy")
    np.save(features / "test.npy", test[::-1].copy())  # other images' features
    bad = tiny_config(tmp, **REAL, **{"paths.features": features})
    dataset = open_prepared(bad.paths.prepared, bad.data)
    with pytest.raises(ScoringMismatchError) as error:
        test_probabilities(bad, dataset, Path(bad.paths.models))
    assert "model.keras" in str(error.value) and str(features) in str(error.value)
    assert "head.json" in str(error.value)

    # a fine-tuned backbone is not the featurized one: the whole model runs on the images
    tuned = tiny_config(
        tmp, **REAL, **{"paths.features": features, "train.fine_tune.enabled": "true"}
    )
    probs = test_probabilities(tuned, dataset, Path(tuned.paths.models))
    np.testing.assert_allclose(probs, whole_model_probabilities(cfg), atol=1e-5)


def test_evaluate_scores_the_saved_head_without_tensorflow(tmp_path):
    """The evaluate stage on a model trained on cached features: the saved head (head.npy) on
    them, in a process that never imports TensorFlow or Keras, and the metrics of the whole
    model."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, tiny_overrides

    cfg = tiny_config(tmp_path, **{"tracking.log_model": "false"})
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    head = json.loads((Path(cfg.paths.models) / "head.json").read_text())
    assert head["features_md5"].endswith(".dir")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.evaluate",
         *tiny_overrides(tmp_path, **{"tracking.log_model": "false"})],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "tensorflow" not in imported and "keras" not in imported
    assert "the saved head" in proc.stdout + proc.stderr
    accuracy = json.loads((Path(cfg.paths.reports) / "metrics.json").read_text())["test"]
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    whole = whole_model_probabilities(cfg).argmax(axis=1)
    assert accuracy["accuracy"] == pytest.approx((whole == dataset.labels("test")).mean())


def test_a_head_or_model_not_saved_together_is_refused(trained, tmp_path):
    """head.npy and model.keras are a pair (their md5s in head.json): a head edited by hand, or
    either file swapped, is refused in one line instead of scoring metrics that are not the
    model's."""
    import shutil

    from pipeline.lib.errors import StageInputError

    _, cfg = trained
    models = tmp_path / "models"
    shutil.copytree(cfg.paths.models, models)
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    head = np.load(models / "head.npy")
    np.save(models / "head.npy", head[:, ::-1].copy())  # two classes' columns swapped
    with pytest.raises(ScoringMismatchError, match=r"head\.npy is not the file train saved"):
        test_probabilities(cfg, dataset, models)
    np.save(models / "head.npy", head)  # the same values again: the same bytes, accepted
    assert test_probabilities(cfg, dataset, models).shape[0] == dataset.size("test")
    (models / "head.json").write_text("[1, 2]")
    with pytest.raises(StageInputError, match=r"head\.json is not the JSON object"):
        test_probabilities(cfg, dataset, models)
