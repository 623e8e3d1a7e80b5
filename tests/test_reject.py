"""The reject option (`pipeline.lib.model.reject`, `train.reject`): a rule chosen on the validation
split for the user's target, stored in model.json, applied by `pipeline.predict` and the MLflow
pyfunc model (label `unknown`), reported by evaluate (metrics.json `reject`, coverage.csv).

The real case: trained on 10 of the 12 flower classes of ../shared/data/flowers12 (the ImageNet
backbone), the photos of the 2 classes left out must mostly come back `unknown`.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline import predict
from pipeline.evaluate import evaluate
from pipeline.featurize import featurize
from pipeline.lib.config.schema import validate
from pipeline.lib.data.images import load_rgb
from pipeline.lib.model.classifier import CARD_FILE, Classifier
from pipeline.lib.model.reject import UNKNOWN, RejectRule, coverage_curve, fit_rule
from pipeline.lib.tracking.pyfunc_model import ARTIFACTS, ClassifierModel
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, compose, imagenet_weights_available, seeded_store

FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"
LEFT_OUT = ("tigerlily", "windflower")  # the last two classes by name: no choice made on results
COVERAGE = 0.85  # the target: accept 85 % of the validation photos


def test_the_rule_reaches_its_target_on_the_validation_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    correct = rng.random(200) < 1 / (1 + np.exp(-2 * scores)) + 0.3  # right more when high
    for value in (0.9, 0.95, 0.99):
        rule = fit_rule("accuracy", value, scores, correct)
        kept = rule.accepts(scores)
        assert correct[kept].mean() >= value == rule.value and rule.val_coverage == kept.mean()
        # the most photos: accepting the next one down would miss the target
        below = scores[~kept]
        if len(below):
            more = scores >= below.max()
            assert correct[more].mean() < value
    for value in (0.5, 0.85, 1.0):
        rule = fit_rule("coverage", value, scores, correct)
        assert rule.accepts(scores).mean() == pytest.approx(value, abs=1 / 200)
    assert fit_rule("none", 0.9, scores, correct) is None
    all_right = fit_rule("accuracy", 0.99, scores, np.ones(200, bool))
    assert all_right.threshold == scores.min() and all_right.val_coverage == 1.0
    curve = coverage_curve(scores, correct)
    assert curve["coverage"][-1] == 1.0 and curve["accuracy"][-1] == pytest.approx(correct.mean())
    with pytest.raises(ValueError):
        RejectRule.from_card({**vars(rule), "threshold": float("nan")})


def _known_folder(tmp: Path) -> Path:
    """flowers12 without the LEFT_OUT classes, copied (the shared folder is never written)."""
    for split in ("training", "validation", "test"):
        for folder in sorted((FLOWERS / split).iterdir()):
            if folder.name not in LEFT_OUT:
                shutil.copytree(folder, tmp / "flowers10" / split / folder.name)
    return tmp / "flowers10"


@pytest.fixture(scope="module")
def flowers(tmp_path_factory: pytest.TempPathFactory):
    if not (FLOWERS.is_dir() and imagenet_weights_available()):
        pytest.fail("needs ../shared/data/flowers12 and the ImageNet weights (`make weights`)")
    tmp = tmp_path_factory.mktemp("reject")
    values = {
        "data": "folder",
        "data.path": _known_folder(tmp),
        "data.leakage": "warn",  # flowers12 holds one iris photo in train and val
        "tracking.uri": seeded_store(tmp),
        "tracking.artifact_location": tmp / "mlartifacts",
        "tracking.log_model": "false",
        "paths.prepared": tmp / "prepared",
        "paths.features": tmp / "features",
        "paths.models": tmp / "models",
        "paths.reports": tmp / "reports",
        "paths.run_file": tmp / "mlflow_run.json",
        "train.reject.target": "coverage",
        "train.reject.value": COVERAGE,
    }
    cfg = validate(compose([f"{k}={v}" for k, v in values.items()]))
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    metrics = evaluate(cfg)
    unknown = [p for c in LEFT_OUT for p in sorted(FLOWERS.glob(f"*/{c}/*"))]
    return {"cfg": cfg, "tmp": tmp, "metrics": metrics, "unknown": unknown}


def test_photos_of_classes_never_trained_on_are_rejected_by_predict(flowers, capsys):
    cfg, tmp, metrics = flowers["cfg"], flowers["tmp"], flowers["metrics"]
    card = json.loads((Path(cfg.paths.models) / CARD_FILE).read_text())
    assert card["reject"]["target"] == "coverage" and card["reject"]["value"] == COVERAGE
    out = tmp / "unknown.csv"
    dirs = [str(FLOWERS / s / c) for s in ("training", "validation", "test") for c in LEFT_OUT]
    assert predict.main([*dirs, "--model", cfg.paths.models, "--output", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(flowers["unknown"]) == 160
    rejected = np.mean([r["predicted"] == UNKNOWN for r in rows])
    reject = json.loads((Path(cfg.paths.reports) / "metrics.json").read_text())["reject"]
    assert reject == metrics["reject"]
    html = (Path(cfg.paths.reports) / "eval_report.html").read_text(encoding="utf-8")
    assert f"answers <b>unknown</b> for {1 - reject['coverage']:.1%} of the test photos" in html
    with capsys.disabled():
        print(
            f"\nflowers12, trained on 10 classes, {LEFT_OUT} left out, target coverage "
            f"{COVERAGE}: val coverage {card['reject']['val_coverage']:.3f} (val accuracy "
            f"{card['reject']['val_accuracy']:.3f}); the left-out photos rejected {rejected:.3f}; "
            f"known test photos accepted {reject['coverage']:.3f}, accuracy on them "
            f"{reject['accuracy']:.3f} (all: {metrics['test']['accuracy']:.3f})"
        )
    assert rejected >= 0.70  # the goal; measured 0.77 on average over 8 other pairs
    # rejecting the unseen kinds costs few known photos, and the accepted ones are as right
    assert reject["coverage"] >= COVERAGE - 0.1
    assert reject["accuracy"] >= max(metrics["test"]["accuracy"], 0.95)
    curve = (Path(cfg.paths.reports) / "coverage.csv").read_text().splitlines()
    assert curve[0] == "coverage,accuracy,threshold" and len(curve) > 50
    assert (Path(cfg.paths.reports) / "eval_figures" / "coverage.png").stat().st_size > 1000


def test_the_mlflow_model_answers_unknown_for_them(flowers, tmp_path):
    models = Path(flowers["cfg"].paths.models)
    saved = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(
        saved,
        python_model=ClassifierModel(),
        artifacts={key: str(models / file) for key, file in ARTIFACTS.items()},
    )
    photos = flowers["unknown"][::8]
    frame = mlflow.pyfunc.load_model(str(saved)).predict([p.read_bytes() for p in photos])
    expected = Classifier.load(models)
    images = np.stack([load_rgb(p, expected.image_size, resize="stretch") for p in photos])
    probs, accepted = expected.classify(images)
    assert (frame["label"] == UNKNOWN).to_numpy().tolist() == (~accepted).tolist()
    assert (frame["label"] == UNKNOWN).mean() >= 0.5
    unknown = frame[frame["label"] == UNKNOWN].iloc[0]
    assert set(unknown["scores"]) == set(expected.classes)  # the scores come with it


def test_target_none_changes_no_prediction(flowers):
    """The same head without a rule: predictions as before rejection existed (argmax)."""
    models = Path(flowers["cfg"].paths.models)
    classifier = Classifier.load(models)
    plain = Classifier(
        classifier.head,
        type(classifier.card)(**{**vars(classifier.card), "reject": None}),
        classifier.backbone_source,
    )
    images = np.stack(
        [load_rgb(p, classifier.image_size, resize="stretch") for p in flowers["unknown"][:16]]
    )
    probs, accepted = plain.classify(images)
    assert accepted.all()
    np.testing.assert_array_equal(probs, plain.predict_proba(images))
    with_rule, _ = classifier.classify(images)
    np.testing.assert_allclose(with_rule, probs, rtol=1e-12)  # the rule only adds the label


def test_a_class_named_unknown_is_refused_with_the_reject_option(tmp_path):
    """`unknown` is the label of rejected photos: a class of that name (any case) would be
    indistinguishable, so train refuses it (one line naming classes.json) before fitting."""
    from pipeline.featurize import featurize
    from pipeline.lib.errors import UserError
    from pipeline.prepare import prepare
    from pipeline.train import train
    from tests.test_prepared import folder_config, write_photos

    write_photos(tmp_path / "photos", {"cat": 8, " Unknown": 8})
    cfg = folder_config(tmp_path, tmp_path / "photos", **{"train.reject.target": "coverage"})
    prepare(cfg)
    featurize(cfg)
    with pytest.raises(UserError, match=r"a class is named 'unknown' .*classes\.json"):
        train(cfg)
    assert not (tmp_path / "models").exists()
