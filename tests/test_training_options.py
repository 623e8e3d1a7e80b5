"""Training options (`train.*`): fine-tuning as a second phase, augmentation, class weights, label
smoothing, early stopping, learning-rate schedules, the mirrored strategy.

One tiny imbalanced folder dataset (3 classes, 8/4/4 training images of 32 px, alpha 0.35, random
weights) is prepared and featurized once. A random backbone at 32 px gives features of ~1e-12, on
which a head only moves its bias, so (as in test_resume) the cached features are replaced by
informative ones (a centre per class plus noise, of the size real pooled features have): the head
really learns, and the options' effects on losses are visible. The runs that must go end to end
through the backbone (fine-tuning, augmentation) are kept to one each: tracing MobileNetV2's
training step is what costs time here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline.featurize import featurize
from pipeline.lib.config.schema import ConfigError, validate
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5, read_json
from pipeline.lib.model.build import (
    BACKBONE_NAME,
    build_augmentation,
    build_feature_extractor,
)
from pipeline.lib.model.classifier import BACKBONE_FILE, CARD_FILE
from pipeline.lib.model.features import load_cached_features
from pipeline.lib.training import keras_fit
from pipeline.lib.training.head import class_weights
from pipeline.lib.training.keras_fit import KerasFit, fit_keras
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import compose, tiny_overrides

TRAIN_COUNTS = (8, 4, 4)  # imbalanced: class 0 has twice the images of the others
CLASSES = len(TRAIN_COUNTS)
BATCH = 8
STEPS_PER_EPOCH = math.ceil(sum(TRAIN_COUNTS) / BATCH)  # 2
LR = 0.003
HEAD_PARAMS = CLASSES * (1280 + 1)  # Dense(3) on MobileNetV2's 1280 pooled features


def write_folder_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    counts = {"training": TRAIN_COUNTS, "validation": (2, 2, 2), "test": (2, 2, 2)}
    for split, per_class in counts.items():
        for label, n in enumerate(per_class):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(n):  # noise: every image unique (no leakage between splits)
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")


def config(tmp: Path, data: dict[str, object], **extra: object):
    values = {
        "train.solver": "keras",
        "train.batch_size": BATCH,
        "train.learning_rate": LR,
        "train.epochs": 4,
        "tracking.log_model": False,
        **data,
        **extra,
    }
    overrides = [o for o in tiny_overrides(tmp, **values) if not o.startswith("data.synthetic.")]
    return validate(compose(["data=folder", *overrides]))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("options-data")
    write_folder_dataset(tmp / "photos")
    shared = {
        "data.path": tmp / "photos",
        "paths.prepared": tmp / "prepared",
        "paths.features": tmp / "features",
    }
    cfg = config(tmp, shared)
    prepare(cfg)
    featurize(cfg)
    dataset, folder = PreparedDataset(cfg.paths.prepared), Path(cfg.paths.features)
    assert np.bincount(dataset.labels("train")).tolist() == list(TRAIN_COUNTS)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(CLASSES, np.load(folder / "train.npy").shape[1]))
    for split in ("train", "val"):
        labels = dataset.labels(split)
        noise = rng.normal(scale=2.0, size=(len(labels), centres.shape[1]))
        np.save(folder / f"{split}.npy", (0.1 * (centres[labels] + noise)).astype(np.float32))
    return shared


@pytest.fixture(scope="module")
def dataset(data) -> PreparedDataset:
    return PreparedDataset(data["paths.prepared"])


class ReadsRecorded(dict):
    """The cached features, recording which splits are read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)


def run_fit(tmp: Path, data: dict[str, object], callbacks=(), **extra: object) -> KerasFit:
    """`fit_keras` on the module's data, its cached features passed as a `ReadsRecorded`."""
    cfg = config(tmp, data, **extra)
    md5 = dvc_md5(cfg.paths.prepared)
    features = ReadsRecorded(load_cached_features(cfg, md5))
    fitted = fit_keras(cfg, PreparedDataset(cfg.paths.prepared), features, md5, callbacks)
    fitted.cache_reads = features.reads  # type: ignore[attr-defined]
    return fitted


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory: pytest.TempPathFactory) -> KerasFit:
    """Every option at its default: the head on the cached features."""
    return run_fit(tmp_path_factory.mktemp("baseline"), data)


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(-np.log(probabilities[np.arange(len(labels)), labels])))


# ------------------------------------------------------------------------------------------------
# the schema


@pytest.fixture(scope="module")
def composed():
    """conf/ composed once (Hydra's composition is the slow part); each case edits a copy."""
    return compose()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.class_weight", "balanced"),
        ("train.lr_schedule", "step"),
        ("train.strategy", "tpu"),
        ("train.label_smoothing", 1.0),
        ("train.label_smoothing", "some"),
        ("train.fine_tune.unfreeze_top_n", 0),
        ("train.fine_tune.learning_rate", 0),
        ("train.fine_tune.epochs", 0),
        ("train.fine_tune.layers", 3),
        ("train.augment.zoom", 1.5),
        ("train.augment.flip", "diagonal"),
        ("train.early_stopping.patience", -1),
        ("train.plateau.factor", 1.0),
    ],
)
def test_bad_training_options_name_the_key(composed, key, value):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(composed)
    cfg["train"]["solver"] = "keras"  # lbfgs would refuse any change to a Keras-only key
    node = cfg
    *parents, leaf = key.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert key in str(err.value)


def test_options_are_off_by_default(composed):
    """Every option but early stopping, which the default head uses to converge (README
    "Training the head"; `experiment=study` turns it off)."""
    t = validate(composed).train
    assert (t.fine_tune.enabled, t.augment.enabled, t.early_stopping.enabled) == (
        False,
        False,
        True,
    )
    assert (t.class_weight, t.label_smoothing, t.lr_schedule, t.strategy) == (
        "none",
        0.0,
        "none",
        "default",
    )
    assert t.fine_tune.learning_rate < t.learning_rate / 10


# ------------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture(scope="module")
def fine_tuned(data, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A whole train step: 2 epochs of the head on cached features, then 2 epochs with the top
    12 backbone layers unfrozen, end to end on images; with what `fit_keras` returned to it."""
    tmp = tmp_path_factory.mktemp("fine-tune")
    cfg = config(
        tmp,
        data,
        **{
            "train.solver": "auto",  # fine-tuning implies keras
            "train.epochs": 2,
            "train.fine_tune.enabled": True,
            "train.fine_tune.unfreeze_top_n": 12,
            "train.fine_tune.epochs": 2,
            "train.fine_tune.learning_rate": 1e-4,
        },
    )
    fitted: list[KerasFit] = []
    real = keras_fit.fit_keras

    def recorded(*args, **kwargs):
        fitted.append(real(*args, **kwargs))
        return fitted[-1]

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(keras_fit, "fit_keras", recorded)
        train(cfg)
    return {"cfg": cfg, "fit": fitted[0]}


def expected_phase2_params() -> tuple[int, list[str]]:
    """Head + every weight of the backbone's top 12 layers but BatchNormalization's."""
    import keras

    backbone = build_feature_extractor(0.35, None, 32).get_layer(BACKBONE_NAME)
    top = [
        layer
        for layer in backbone.layers[-12:]
        if not isinstance(layer, keras.layers.BatchNormalization) and layer.weights
    ]
    count = sum(int(np.prod(w.shape)) for layer in top for w in layer.weights)
    return HEAD_PARAMS + count, [layer.name for layer in top]


def test_fine_tuning_unfreezes_the_top_layers_but_batchnorm(fine_tuned):
    cfg, fitted = fine_tuned["cfg"], fine_tuned["fit"]
    metrics = json.loads((Path(cfg.paths.reports) / "train_metrics.json").read_text())
    phases = metrics["head"]["phases"]
    want, names = expected_phase2_params()
    assert names == ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"]
    assert phases["phase1"]["trainable_params"] == HEAD_PARAMS == 3843
    assert phases["phase2"]["trainable_params"] == want > HEAD_PARAMS
    assert phases["phase2"]["unfrozen_layers"] == names
    assert (phases["phase1"]["mode"], phases["phase2"]["mode"]) == ("cached_features", "end_to_end")
    assert phases["phase2"]["first_epoch"] == 3 and metrics["params"]["trainable"] == want
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id]
    )
    assert run.data.metrics["trainable_params"] == want
    assert run.data.params["train.fine_tune.enabled"] == "True"
    assert run.data.tags["train_solver"] == "keras"
    logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/train_head.json")
    assert logged["phases"]["phase2"]["first_epoch"] == 3

    # the fine-tuned backbone: only the named layers trained; converted to LiteRT for the model
    extractor = fitted.extractor
    trainable = {w.path.split("/")[-2] for w in extractor.trainable_weights}
    assert trainable == set(names)
    count = sum(int(np.prod(w.shape)) for w in extractor.trainable_weights)
    assert count + fitted.head.kernel.size + fitted.head.bias.size == want
    models, features = Path(cfg.paths.models), Path(cfg.paths.features)
    assert read_json(models / CARD_FILE)["backbone"]["fine_tuned"] is True
    assert (models / BACKBONE_FILE).stat().st_size > 0
    if (features / BACKBONE_FILE).is_file():  # written by featurize: the backbone before training
        assert (models / BACKBONE_FILE).read_bytes() != (features / BACKBONE_FILE).read_bytes()
    # the features of the fine-tuned extractor, which the saved head was calibrated on
    images = np.asarray(PreparedDataset(cfg.paths.prepared).images("val"), np.float32)
    np.testing.assert_allclose(fitted.features["val"], np.asarray(extractor(images)), atol=1e-5)


def test_fine_tuning_keeps_batchnorm_in_inference_mode(fine_tuned):
    """BatchNorm layers stay frozen and never update their moving statistics: they equal those
    of the (seeded) initial backbone after two epochs of end-to-end training."""
    import keras

    fresh = build_feature_extractor(0.35, None, 32).get_layer(BACKBONE_NAME)
    trained = fine_tuned["fit"].extractor.get_layer(BACKBONE_NAME)
    norms = [
        layer for layer in trained.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(norms) == 52 and not any(layer.trainable for layer in norms)
    for layer in norms:
        for got, want in zip(
            layer.get_weights(), fresh.get_layer(layer.name).get_weights(), strict=True
        ):  # gamma, beta, moving mean, moving variance
            np.testing.assert_array_equal(got, want, err_msg=layer.name)
    # while the unfrozen convolutions did move
    changed = trained.get_layer("Conv_1").get_weights()[0]
    assert not np.array_equal(changed, fresh.get_layer("Conv_1").get_weights()[0])


def test_fine_tuning_continues_one_history(fine_tuned):
    cfg = fine_tuned["cfg"]
    reports = Path(cfg.paths.reports)
    with open(reports / "train_history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in history] == [1, 2, 3, 4]
    rates = [float(r["learning_rate"]) for r in history]
    assert rates[:2] == pytest.approx([LR] * 2) and rates[2:] == pytest.approx([1e-4] * 2)
    with open(reports / "train_batches.csv", newline="") as fh:
        batches = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in batches] == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    assert [int(r["epoch"]) for r in batches] == [
        e for e in (1, 2, 3, 4) for _ in range(STEPS_PER_EPOCH)
    ]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = json.loads(Path(cfg.paths.run_file).read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "batch_loss")] == list(
        range(1, 4 * STEPS_PER_EPOCH + 1)
    )
    assert (reports / "train_figures" / "loss.png").is_file()
    assert not any(Path(cfg.train.checkpoint_dir).iterdir())  # both phases' state removed


# ------------------------------------------------------------------------------------------------
# augmentation


def test_augmentation_layers_change_images_only_in_training():
    class Augment:
        enabled, flip, rotation, zoom, translation, contrast, brightness = (
            True,
            "horizontal",
            0.1,
            0.1,
            0.1,
            0.2,
            0.2,
        )

    layers = build_augmentation(Augment, seed=3)
    assert [type(layer).__name__ for layer in layers] == [
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomTranslation",
        "RandomContrast",
        "RandomBrightness",
    ]
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3)).astype(np.float32)
    for layer in layers:
        np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
        changed = np.asarray(layer(images, training=True))
        assert changed.shape == images.shape and not np.allclose(changed, images), layer.name


def test_augmentation_bypasses_the_feature_cache(data, dataset, baseline, tmp_path):
    result = run_fit(tmp_path, data, **{"train.augment.enabled": True, "train.epochs": 1})
    assert result.cache_reads == [] and result.runner.phases["phase1"]["mode"] == "end_to_end"
    assert result.runner.phases["phase1"]["trainable_params"] == HEAD_PARAMS
    # augmentation off (the baseline): the features are read from the cache
    assert "train" in baseline.cache_reads
    assert baseline.runner.phases["phase1"]["mode"] == "cached_features"

    # The backbone stayed frozen: the saved model is the featurize stage's backbone (no
    # augmentation layers) and the head; no new extractor, no new features, and the parameter
    # counts are those of backbone + head alone.
    assert result.extractor is None and result.features is None
    backbone = build_feature_extractor(0.35, None, 32).get_layer(BACKBONE_NAME)
    assert result.params == {
        "trainable": HEAD_PARAMS,
        "non_trainable": backbone.count_params(),
        "total": HEAD_PARAMS + backbone.count_params(),
    }
    assert result.head.kernel.shape == (1280, CLASSES) and result.head.bias.shape == (CLASSES,)
    assert np.abs(result.head.bias).max() > 0  # it trained
    probabilities = result.head.probabilities(np.load(Path(data["paths.features"]) / "val.npy"))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# class weights, label smoothing


def test_class_weight_auto_is_sklearn_balanced(data, dataset, baseline, tmp_path):
    n = sum(TRAIN_COUNTS)
    want = {c: n / (CLASSES * count) for c, count in enumerate(TRAIN_COUNTS)}  # 2/3, 4/3, 4/3
    got = class_weights(dataset.labels("train"), CLASSES, "auto")
    assert got.tolist() == pytest.approx(list(want.values()))
    assert class_weights(dataset.labels("train"), CLASSES, "none") is None
    assert class_weights(np.array([0, 0, 1]), 3, "auto")[2] == 1.0  # absent class: weight 1

    # batches of 5: the seeded first batch is imbalanced (of 8 it happens to hold 4 + 2 + 2)
    weighted = run_fit(tmp_path, data, **{"train.class_weight": "auto", "train.batch_size": 5})
    assert weighted.runner.class_weight == pytest.approx(want)
    assert baseline.runner.class_weight is None
    # The loss Keras minimises is weighted. The zero-initialised head predicts 1/3 for every
    # class at the first step, so each image's loss is ln 3 and the first batch's loss is ln 3 x
    # the mean weight of its images (the batch order is a function of seed and epoch).
    order = np.random.default_rng((42, 0)).permutation(sum(TRAIN_COUNTS))[:5]
    first = [want[label] for label in dataset.labels("train")[order]]
    assert baseline.runner.batches["loss"][0] == pytest.approx(math.log(3), rel=1e-5)
    assert weighted.runner.batches["loss"][0] == pytest.approx(
        math.log(3) * np.mean(first), rel=1e-5
    )
    assert abs(np.mean(first) - 1) > 0.1


def test_label_smoothing_keeps_the_loss_above_the_smoothed_targets_entropy(
    data, baseline, tmp_path
):
    smoothing = 0.3
    high = 1 - smoothing + smoothing / CLASSES  # smoothed target of the true class
    low = smoothing / CLASSES
    floor = -(high * math.log(high) + (CLASSES - 1) * low * math.log(low))
    smoothed = run_fit(tmp_path, data, **{"train.label_smoothing": smoothing}).runner.history
    assert baseline.runner.history["loss"][-1] < floor - 0.1  # unsmoothed: well below
    assert min(smoothed["loss"]) >= floor - 1e-4
    assert smoothed["loss"][-1] < smoothed["loss"][0]  # and it learns


# ------------------------------------------------------------------------------------------------
# early stopping, learning-rate schedules


def test_early_stopping_and_reduce_on_plateau(data, dataset, tmp_path):
    """min_delta far above any possible improvement: only epoch 1 counts as one. The learning
    rate halves after each epoch from the second on (plateau patience 1); training stops after
    epoch 3 of 6 (early-stopping patience 2) and the weights of epoch 1 come back."""
    result = run_fit(
        tmp_path,
        data,
        **{
            "train.epochs": 6,
            "train.early_stopping.enabled": True,
            "train.early_stopping.patience": 2,
            "train.early_stopping.min_delta": 100.0,
            "train.lr_schedule": "reduce_on_plateau",
            "train.plateau.factor": 0.5,
            "train.plateau.patience": 1,
            "train.plateau.min_delta": 100.0,
            # val_loss is then the plain cross-entropy of the restored weights (Keras adds the
            # L2 penalty to the loss it reports)
            "train.C": "null",
        },
    )
    history = result.runner.history
    assert history["epoch"] == [1, 2, 3] and result.runner.stopped == [3]
    assert history["learning_rate"] == pytest.approx([LR, LR, LR / 2], rel=1e-6)
    val_loss = history["val_loss"]
    assert min(abs(val_loss[0] - val_loss[1]), abs(val_loss[0] - val_loss[2])) > 1e-3
    features = np.load(Path(data["paths.features"]) / "val.npy")
    got = cross_entropy(result.head.probabilities(features), dataset.labels("val"))
    assert got == pytest.approx(val_loss[0], abs=1e-4)  # epoch 1's weights restored


def test_cosine_schedule_decays_the_learning_rate(data, tmp_path):
    epochs = 3
    result = run_fit(tmp_path, data, **{"train.epochs": epochs, "train.lr_schedule": "cosine"})
    rates = result.runner.history["learning_rate"]
    total = epochs * STEPS_PER_EPOCH
    want = [
        LR * 0.5 * (1 + math.cos(math.pi * (e * STEPS_PER_EPOCH - 1) / total))
        for e in range(1, epochs + 1)
    ]  # at each epoch's last step
    assert rates == pytest.approx(want, rel=1e-5)
    assert rates[0] > rates[1] > rates[2] > 0


# ------------------------------------------------------------------------------------------------
# tf.distribute


def test_mirrored_strategy_trains_to_the_default_strategy_result(data, baseline, tmp_path):
    import keras
    import tensorflow as tf

    strategies: list = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            strategies.append(self.model.distribute_strategy)

    result = run_fit(tmp_path, data, callbacks=[Probe()], **{"train.strategy": "mirrored"})
    assert result.replicas >= 1 and len(strategies) == 1
    assert isinstance(strategies[0], tf.distribute.MirroredStrategy)
    assert baseline.replicas == 1
    history, reference = result.runner.history, baseline.runner.history
    assert history["loss"][-1] < history["loss"][0] - 0.1  # it learns
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(history[key], reference[key], atol=1e-4, err_msg=key)
    np.testing.assert_allclose(result.head.kernel, baseline.head.kernel, atol=1e-4)
