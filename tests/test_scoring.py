"""`scoring.split_scores` and the evaluate stage on a model folder: the head on the cached
features when the model's backbone.tflite is the featurized one, its LiteRT backbone on the images
otherwise (a fine-tuned backbone); both give the same probabilities, and no TensorFlow is imported
by evaluate, predict or the served model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.errors import StageInputError
from pipeline.lib.model.classifier import BACKBONE_FILE, Classifier, trained_classifier
from pipeline.lib.model.scoring import split_scores
from pipeline.prepare import prepare
from tests.conftest import ROOT, tiny_config, tiny_overrides
from tests.model_folder import WEIGHTS, fit_model_folder

#: The real backbone (a random one pools to ~0 features: every head then gives ~1/K).
REAL = {"tracking.log_model": "false", "model.alpha": 1.0, "model.weights": WEIGHTS}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("scoring")
    cfg = tiny_config(tmp, **REAL)
    prepare(cfg)
    featurize(cfg)
    fit_model_folder(cfg, temperature=1.5)
    return tmp, cfg


def test_cached_features_and_the_backbone_give_the_same_probabilities(world, tmp_path):
    _, cfg = world
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    classifier = Classifier.load(cfg.paths.models)
    cached = split_scores(classifier, dataset, "test", cfg.paths.features)[0]
    on_images = classifier.predict_proba(dataset.images("test"))
    assert cached.dtype == np.float64 and cached.shape == (12, 6)
    assert np.allclose(cached, on_images, atol=1e-6)
    assert len(set(cached.argmax(axis=1))) >= 2  # not one class for every image
    # features of another backbone are not used: the model's own backbone runs instead
    other = tmp_path / "features"
    other.mkdir()
    (other / BACKBONE_FILE).write_bytes(b"another backbone")
    assert np.allclose(split_scores(classifier, dataset, "test", other)[0], on_images)
    # TTA: the mean with the flipped images' probabilities
    tta = split_scores(classifier, dataset, "test", cfg.paths.features, tta=True)[0]
    flipped = classifier.predict_proba(np.asarray(dataset.images("test"))[:, :, ::-1])
    assert np.allclose(tta, (on_images + flipped) / 2, atol=1e-6)
    assert not np.allclose(tta, on_images, atol=1e-4)


def test_a_model_of_other_classes_or_files_is_refused(world, tmp_path):
    _, cfg = world
    with pytest.raises(StageInputError, match="trained on classes"):
        trained_classifier(cfg.paths.models, ["a", "b"])
    with pytest.raises(StageInputError, match="No trained model"):
        trained_classifier(tmp_path, ["a"])


def test_nan_inf_and_out_of_range_pixels_are_refused():
    from pipeline.lib.model.classifier import check_pixels

    for bad, word in ((np.nan, "NaN"), (np.inf, "infinite"), (300.0, "out of range")):
        images = np.zeros((1, 4, 4, 3))
        images[0, 1, 2, 0] = bad
        with pytest.raises(ValueError, match=word):
            check_pixels(images)
    assert check_pixels(np.full((1, 4, 4, 3), 255, np.uint8)).dtype == np.float32


def _imported(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT
    )
    return proc, {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}


def test_evaluate_predict_and_the_served_model_import_no_tensorflow(world):
    """evaluate (the head on the cached features), pipeline.predict on a folder and the MLflow
    model's loader and predict, each under -X importtime: neither TensorFlow nor Keras."""
    tmp, cfg = world
    proc, imported = _imported(["-m", "pipeline.evaluate", *tiny_overrides(tmp, **REAL)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the head on the cached features" in proc.stdout + proc.stderr
    assert not imported & {"tensorflow", "keras"}
    expected = pd.read_csv(Path(cfg.paths.reports) / "predictions.csv")
    out = tmp / "p.json"
    proc, imported = _imported(
        ["-m", "pipeline.predict", str(tmp / "raw" / "test"), "--model", cfg.paths.models,
         "--output", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not imported & {"tensorflow", "keras"}
    rows = {
        Path(r["path"]).relative_to(tmp / "raw").as_posix(): r for r in json.loads(out.read_text())
    }
    got = np.array([rows[p]["probability"] for p in expected["path"]])
    assert np.allclose(got, expected["confidence"], atol=1e-6)
    served = (
        "import sys, numpy as np; from types import SimpleNamespace as N;"
        "from pipeline.lib.tracking.pyfunc_model import ClassifierModel, ARTIFACTS;"
        f"m = ClassifierModel(); m.load_context(N(artifacts={{k: '{cfg.paths.models}/' + f "
        "for k, f in ARTIFACTS.items()}));"
        "print(m.predict(None, np.zeros((2, 40, 40, 3), np.uint8)).shape)"
    )
    proc, imported = _imported(["-c", served])
    assert proc.returncode == 0 and "(2, 3)" in proc.stdout, proc.stderr[-2000:]
    assert not imported & {"tensorflow", "keras"}


def test_a_tampered_model_folder_is_one_error(world, tmp_path):
    """Files mixed from two trainings, a head with NaN weights, a card that is not train's: each
    is refused when the model is loaded (StageInputError: one line, exit 2), not a traceback or
    NaN predictions."""
    _, cfg = world
    images = open_prepared(cfg.paths.prepared, cfg.data).images("test")[:2]

    def tampered(edit) -> Path:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cfg.paths.models, folder)
        edit(folder)
        return folder

    def card(folder: Path, **changes) -> None:
        data = json.loads((folder / "model.json").read_text()) | changes
        (folder / "model.json").write_text(json.dumps(data))

    head = np.load(Path(cfg.paths.models) / "head.npy")
    nan_head = head.copy()
    nan_head[0, 0] = np.nan
    cases = {
        "NaN or infinite": lambda f: np.save(f / "head.npy", nan_head),
        "takes 32 px images": lambda f: card(f, image_size=64),
        "not the model card": lambda f: card(f, classes=["a", "a", "b", "c", "d", "e"]),
        "model card": lambda f: card(f, resize="sideways"),
    }
    for message, edit in cases.items():
        with pytest.raises(StageInputError, match=message):
            Classifier.load(tampered(edit)).predict_proba(images)
