"""Stage `train`: its DVC outputs (`models`, `reports/train_figures`, the train metrics and
history) are the same bytes when it runs again on the same inputs; the MLflow run id, which
differs on every run, is kept outside them (`paths.run_file`)."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.errors import UserError
from pipeline.lib.files import NoSpaceError
from pipeline.lib.model.classifier import HEAD_FILE, Head
from pipeline.lib.model.saving import trained_run_id
from pipeline.train import TrainingDivergedError, train
from tests.conftest import ROOT, prepared_overrides, seeded_store, tiny_config, tiny_overrides

REPORTS = ("train_metrics.json", "train_history.csv")


def outputs(cfg) -> dict[str, bytes]:
    """Every file of the train stage's DVC outputs, by path relative to its folder."""
    models, reports = Path(cfg.paths.models), Path(cfg.paths.reports)
    found = {f"models/{p.relative_to(models)}": p for p in models.rglob("*") if p.is_file()}
    figures = reports / "train_figures"
    found |= {f"figures/{p.relative_to(figures)}": p for p in figures.rglob("*") if p.is_file()}
    found |= {f"reports/{name}": reports / name for name in REPORTS}
    return {name: path.read_bytes() for name, path in sorted(found.items())}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("train-inputs")
    return {
        **prepared_overrides(tmp),
        "tracking.uri": seeded_store(tmp),  # the store tiny_config(tmp) uses
        "tracking.log_model": False,
        "train.C": "auto",  # the cross-validated choice, cached after the first run
    }


def test_training_twice_gives_the_same_bytes_and_the_run_id_stays_out_of_models(inputs, tmp_path):
    first = tiny_config(tmp_path / "first", **inputs)
    second = tiny_config(tmp_path / "second", **inputs)
    train(first)
    train(second)
    got, want = outputs(second), outputs(first)
    want_files = {"models/backbone.tflite", "models/head.npy", "models/model.json"}
    assert want_files | {"figures/loss.png", "reports/train_history.csv"} <= set(want)
    assert not any("mlflow" in name for name in want)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs between two runs on the same inputs"
    assert "seconds" not in json.loads(want["reports/train_metrics.json"])
    # two runs, each recorded outside `models`, each naming the model it trained
    runs = [json.loads(Path(c.paths.run_file).read_text()) for c in (first, second)]
    assert runs[0]["run_id"] != runs[1]["run_id"]
    assert trained_run_id(second) == runs[1]["run_id"]


def test_a_run_file_of_another_model_is_not_used(inputs, tmp_path):
    cfg = tiny_config(tmp_path, **inputs)
    train(cfg)
    assert trained_run_id(cfg) is not None
    (Path(cfg.paths.models) / HEAD_FILE).write_bytes(b"another model")
    assert trained_run_id(cfg) is None


def test_an_unwritable_checkpoint_dir_is_refused_before_training(inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = tiny_config(
        tmp_path, **inputs, **{"train.solver": "keras", "train.checkpoint_dir": blocker / "ckpt"}
    )
    with pytest.raises(UserError, match="train.checkpoint_dir=.*cannot be written"):
        train(cfg)
    assert not Path(cfg.paths.reports, "train_metrics.json").exists()  # nothing trained


def test_a_full_disk_under_the_keras_checkpoint_is_one_line_and_no_half_file(
    inputs, tmp_path, monkeypatch
):
    """The per-epoch backup (train.checkpoint_dir) hits a full disk half-way through its weights
    file (h5py: a strerror over several lines): one line naming the folder and its key."""
    import keras

    def full(model, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "Unable to create file (errno = 28,\n error message = ...)")

    monkeypatch.setattr(keras.Model, "save_weights", full)
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tmp_path, **inputs, **{"train.solver": "keras", "train.checkpoint_dir": ckpt})
    with pytest.raises(NoSpaceError) as caught:
        train(cfg)
    message = str(caught.value)
    assert message.startswith(f"No space left to write {ckpt} (No space left on device)")
    assert "set train.checkpoint_dir to a folder on another one" in message
    assert "\n" not in message and not list(ckpt.rglob("*.h5"))


def _file_size_limit() -> None:  # writes past 1 MB fail with EFBIG, as a full disk's ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_a_full_disk_under_paths_models_is_one_line_and_leaves_nothing(inputs, tmp_path):
    """Case disk-full-mlflow-store, part 2: the model folder (its backbone.tflite is 1.6 MB) cannot
    be written: one line naming it and paths.models, exit 2, no half-written folder."""
    values = inputs | {"tracking.uri": seeded_store(tmp_path)}  # an empty store: < 1 MB
    cfg = tiny_config(tmp_path, **values)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *tiny_overrides(tmp_path, **values)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_file_size_limit,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: No space left to write {cfg.paths.models} ("), last
    assert "set paths.models to a folder on another one" in last
    models = Path(cfg.paths.models)
    assert not models.exists() and not list(models.parent.glob(f".{models.name}.*"))


def test_a_diverged_keras_fit_is_one_error_and_a_sweep_goes_on(inputs, tmp_path):
    diverging = {"train.solver": "keras", "train.optimizer": "sgd", "train.epochs": 3}
    cfg = tiny_config(tmp_path, **inputs, **diverging, **{"train.learning_rate": 1e38})
    with pytest.raises(TrainingDivergedError, match="lower train.learning_rate"):
        train(cfg)
    overrides = tiny_overrides(tmp_path / "sweep", **inputs, **diverging)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "-m", *overrides, "tracking.log_model=false"]
        + [f"hydra.sweep.dir={tmp_path}/sweep/jobs", "train.learning_rate=1e38,0.001"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "this job scores -inf, the sweep goes on" in out
    assert "Best job of 2: run job 1" in out


def test_train_metrics_describe_the_saved_head(inputs, tmp_path):
    """reports/train_metrics.json (and MLflow's final_*) are the numbers of the head that is saved
    (calibrated, as scored later), not of some earlier iterate."""
    cfg = tiny_config(tmp_path, **inputs)
    train(cfg)
    metrics = json.loads(Path(cfg.paths.reports, "train_metrics.json").read_text())
    head = Head.load(Path(cfg.paths.models) / HEAD_FILE)
    labels = PreparedDataset(cfg.paths.prepared)
    for split in ("train", "val"):
        p = head.probabilities(np.load(Path(cfg.paths.features) / f"{split}.npy"))
        y = labels.labels(split)
        assert metrics[split]["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()))
        loss = float(-np.log(p[np.arange(len(y)), y]).mean())
        assert metrics[split]["loss"] == pytest.approx(loss, rel=1e-6)
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(trained_run_id(cfg))
    assert run.data.metrics["final_val_loss"] == pytest.approx(metrics["val"]["loss"])
