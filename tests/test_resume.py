"""Checkpoints every epoch and `train.resume=true`: an interrupted run, resumed, ends exactly where
an uninterrupted run with the same seed ends (tiny data, real components, real MLflow store)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import dvc_md5, read_json
from pipeline.lib.model.classifier import BACKBONE_FILE, HEAD_FILE, Head
from pipeline.lib.model.features import backbone_key, tflite_cache_path
from pipeline.lib.training import keras_fit
from pipeline.lib.training.callbacks import ArrayBatches
from pipeline.lib.training.keras_fit import checkpoint_folder
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import tiny_config

# trains several times end to end (about 3 minutes): not in `make test-fast`
pytestmark = pytest.mark.slow

EPOCHS = 4
STEPS_PER_EPOCH = 3  # 24 tiny training images, batch 8


class Interrupted(KeyboardInterrupt):
    """What Ctrl-C (or SIGTERM, via pipeline.lib.tracking.runs) raises in the middle of training."""


def stop_after(epochs: int):
    import keras

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == epochs:
                raise Interrupted(f"stopped after epoch {epochs}")

    return StopAfter()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Prepared images and cached features, shared by every run here.

    A random-weights backbone at 32 px gives features of ~1e-12: a head trained on them only
    moves its bias, and dropout changes nothing. The cached features are replaced by informative
    ones (a centre per class plus noise), so the head really learns and dropout matters, and an
    exact match after a resume says something.
    """
    shared = prepared_data(tmp_path_factory.mktemp("resume-data"))
    dataset, folder = PreparedDataset(shared["paths.prepared"]), Path(shared["paths.features"])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(dataset.num_classes, np.load(folder / "train.npy").shape[1]))
    for split in ("train", "val"):
        labels = dataset.labels(split)
        noise = rng.normal(scale=2.0, size=(len(labels), centres.shape[1]))
        np.save(folder / f"{split}.npy", (centres[labels] + noise).astype(np.float32))
    return shared


def prepared_data(tmp: Path) -> dict[str, str]:
    """Tiny data prepared and featurized under `tmp`: the overrides that point a config at it."""
    cfg = tiny_config(tmp, **{"train.checkpoint_dir": tmp / "checkpoints"})
    prepare(cfg)
    featurize(cfg)
    folder = Path(cfg.paths.features)
    if not (folder / BACKBONE_FILE).is_file():  # stop-gap until featurize writes it itself
        m = cfg.model
        key = backbone_key(m.alpha, m.weights, cfg.data.image_size, m.init_seed)
        shutil.copyfile(tflite_cache_path(key), folder / BACKBONE_FILE)
    return {
        "data.synthetic.dir": cfg.data.synthetic.dir,
        "paths.prepared": cfg.paths.prepared,
        "paths.features": cfg.paths.features,
    }


def config(tmp: Path, data: dict[str, str], **extra: object):
    values = {
        **data,
        "train.epochs": EPOCHS,
        "train.batch_size": 8,
        "train.checkpoint_dir": tmp / "checkpoints",
        "tracking.log_model": False,
        "train.solver": "keras",  # per-epoch checkpoints are Keras' (L-BFGS has no epochs)
        **extra,
    }
    return tiny_config(tmp, **values)


def outcome(cfg) -> dict:
    """What a finished run left: metrics, per-epoch history, per-batch steps, head weights."""
    reports, models = Path(cfg.paths.reports), Path(cfg.paths.models)
    head = Head.load(models / HEAD_FILE)
    with open(reports / "train_history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    with open(reports / "train_batches.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    return {
        "metrics": json.loads((reports / "train_metrics.json").read_text()),
        "history": {
            int(r["step"]): {k: float(v) for k, v in r.items() if k != "step"} for r in history
        },
        "steps": steps,
        "weights": [head.kernel, head.bias],
    }


def runs(cfg) -> list:
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)


def assert_same_result(got: dict, want: dict) -> None:
    for split in ("train", "val"):
        for metric in ("loss", "accuracy"):
            np.testing.assert_allclose(
                got["metrics"][split][metric],
                want["metrics"][split][metric],
                rtol=0,
                atol=1e-5,
                err_msg=f"{split} {metric}",
            )
    for g, w in zip(got["weights"], want["weights"], strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    for epoch, row in got["history"].items():  # the epochs a resumed run ran match the same epochs
        for key, value in row.items():
            np.testing.assert_allclose(
                value,
                want["history"][epoch][key],
                rtol=0,
                atol=1e-5,
                err_msg=f"epoch {epoch} {key}",
            )


def interrupt(cfg, after: int) -> Path:
    """Run `cfg` and stop it after `after` epochs (a Keras callback passed to `train`, as Ctrl-C
    would); check what the stopped run left behind."""
    with pytest.raises(Interrupted):
        train(cfg, callbacks=[stop_after(after)])
    checkpoint = checkpoint_folder(cfg, dvc_md5(cfg.paths.prepared))
    assert read_json(checkpoint / "training_metadata.json")["epoch"] == after
    assert (checkpoint / "latest.weights.h5").is_file()
    assert [r.info.status for r in runs(cfg)] == ["KILLED"]  # not left RUNNING
    assert not Path(cfg.paths.models).exists()  # no half-trained model as an output
    return checkpoint


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run of EPOCHS epochs on cached features."""
    cfg = config(tmp_path_factory.mktemp("reference"), data)
    train(cfg)
    assert not checkpoint_folder(cfg, dvc_md5(cfg.paths.prepared)).exists()  # removed at the end
    result = outcome(cfg)
    losses = [result["history"][e]["loss"] for e in range(1, EPOCHS + 1)]
    assert losses[0] - losses[-1] > 0.05, losses  # it learns: matching losses are no coincidence
    return result


def test_interrupted_run_resumes_to_the_same_result(data, reference, tmp_path):
    cfg = config(tmp_path, data)
    checkpoint = interrupt(cfg, 2)

    train(config(tmp_path, data, **{"train.resume": True}))
    got = outcome(cfg)
    assert_same_result(got, reference)
    assert sorted(got["history"]) == [3, 4]  # only the remaining epochs ran
    assert got["steps"] == list(range(2 * STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert not checkpoint.exists()  # removed once training finished

    (resumed,) = runs(cfg)  # the interrupted run, reopened (pipeline.lib.tracking.runs)
    assert resumed.info.status == "FINISHED"
    assert got["metrics"]["head"]["resumed_from_epoch"] == 2
    assert resumed.data.metrics["head_resumed_from_epoch"] == 2
    # the epochs that ran here are logged at their numbers in the whole run
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "loss")] == [3, 4]
    assert resumed.data.metrics["final_val_loss"] == pytest.approx(
        reference["metrics"]["val"]["loss"], abs=1e-5
    )


def test_without_resume_an_earlier_checkpoint_is_ignored(data, reference, tmp_path):
    cfg = config(tmp_path, data)
    checkpoint = interrupt(cfg, 2)

    train(cfg)  # train.resume=false: a fresh start
    got = outcome(cfg)
    assert sorted(got["history"]) == [1, 2, 3, 4]
    assert_same_result(got, reference)
    assert not checkpoint.exists()
    assert runs(cfg)[-1].data.metrics["head_resumed_from_epoch"] == 0


def test_resume_without_checkpoint_trains_from_the_start(data, reference, tmp_path):
    cfg = config(tmp_path, data, **{"train.resume": True})
    train(cfg)
    got = outcome(cfg)
    assert sorted(got["history"]) == [1, 2, 3, 4]
    assert_same_result(got, reference)


def test_dropout_is_exact_across_a_resume(data, reference, tmp_path):
    dropout = {"model.dropout": 0.5}
    whole = config(tmp_path / "whole", data, **dropout)
    train(whole)
    want = outcome(whole)
    assert abs(want["metrics"]["train"]["loss"] - reference["metrics"]["train"]["loss"]) > 1e-3
    cfg = config(tmp_path / "stopped", data, **dropout)
    interrupt(cfg, 2)
    train(config(tmp_path / "stopped", data, **dropout, **{"train.resume": True}))
    assert_same_result(outcome(cfg), want)


def test_end_to_end_training_resumes_to_the_same_result(tmp_path, monkeypatch):
    """The images flow through the frozen backbone (the cached features are not read). The
    features are the real ones here: the train metrics are of the head on them."""
    monkeypatch.setattr(keras_fit, "phase1_on_images", lambda cfg: True)
    data = prepared_data(tmp_path / "data")
    e2e = {"train.epochs": 3}
    whole = config(tmp_path / "whole", data, **e2e)
    train(whole)
    cfg = config(tmp_path / "stopped", data, **e2e)
    interrupt(cfg, 1)
    train(config(tmp_path / "stopped", data, **e2e, **{"train.resume": True}))
    got, want = outcome(cfg), outcome(whole)
    assert got["metrics"]["head"]["phases"]["phase1"]["mode"] == "end_to_end"
    assert sorted(got["history"]) == [2, 3]
    assert_same_result(got, want)


def test_checkpoint_folder_is_keyed_by_what_determines_the_run(tmp_path):
    md5 = "0" * 32 + ".dir"
    keras = {"train.solver": "keras"}
    base = tiny_config(tmp_path, **keras)
    folder = checkpoint_folder(base, md5)
    assert folder.parent == Path(base.train.checkpoint_dir)
    resume = {"train.resume": True}
    assert checkpoint_folder(tiny_config(tmp_path, **keras, **resume), md5) == folder
    for change in (
        {"train.learning_rate": 0.01},
        {"train.seed": 1},
        {"train.C": 10},
        {"model.dropout": 0.2},
        {"featurize.batch_size": 7},
        {"paths.models": tmp_path / "other"},
    ):
        assert checkpoint_folder(tiny_config(tmp_path, **keras, **change), md5) != folder, change
    assert checkpoint_folder(base, "1" * 32 + ".dir") != folder


def test_batch_order_is_a_function_of_seed_and_epoch():
    x, y = np.arange(20, dtype=np.float32)[:, None], np.zeros((20, 1), dtype=np.float32)

    def epoch_batches(dataset, epoch):
        dataset.epoch = epoch
        return np.concatenate([dataset[i][0][:, 0] for i in range(len(dataset))])

    walked = ArrayBatches(x, y, 8, True, 42)
    orders = [epoch_batches(walked, e) for e in range(4)]
    jumped = ArrayBatches(x, y, 8, True, 42)  # straight to epoch 3, as after a restore
    np.testing.assert_array_equal(epoch_batches(jumped, 3), orders[3])
    assert sorted(orders[3]) == list(range(20))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    np.testing.assert_array_equal(epoch_batches(ArrayBatches(x, y, 8, False, 42), 3), np.arange(20))
