"""The whole pipeline as users run it: `dvc repro` in a real git + DVC repository, then MLflow.

The repository is a copy of the project with params.yaml composed from `experiment=smoke` (tiny
images, alpha 0.35, no weights) after its first `dvc repro` (the session's `smoke_project`, shared
with the remote and CI-report tests), moved to a folder of its own: DVC must find it up to date
there, and MLflow's store must hold the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.project_repo import attempt, copy_reproduced, dvc, git, stages_run

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_and_writes_outputs(repo: Path, first_repro: str):
    ran = stages_run(first_repro)
    assert ran[:4] == ["config", "prepare", "featurize", "train"] and sorted(ran[4:]) == [
        "evaluate",
        "export",
    ]
    for path in [
        "data/prepared/manifest.csv",
        "reports/label_issues.csv",
        "reports/near_duplicates.csv",
        "reports/sufficiency.csv",
        "reports/audit_figures/sufficiency.png",
        "data/features/train.npy",
        "models/backbone.tflite",
        "models/model.json",
        "outputs/mlflow_run.json",
        "reports/metrics.json",
        "reports/train_history.csv",
        "reports/predictions.csv",
        "reports/eval_figures/confusion_matrix.png",
        "reports/eval_figures/gallery.png",
        "reports/train_figures/loss.png",
        "reports/classification_report.txt",
        "exports/model_float32.tflite",
        "exports/model_int8.tflite",
        "reports/export_metrics.json",
    ]:
        assert (repo / path).is_file(), path
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"config", "prepare", "featurize", "train", "evaluate", "export"}
    history = (repo / "reports/train_history.csv").read_text().splitlines()
    header = history[0].split(",")
    assert header[0] == "step" and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(header)
    iterations = json.loads((repo / "reports/train_metrics.json").read_text())["head"]["iterations"]
    assert len(history) == 1 + 1 + iterations  # the start, then one row per L-BFGS iteration


def test_metrics_show_and_plots(repo: Path, first_repro: str):
    metrics = json.loads((repo / "reports/metrics.json").read_text())["test"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["ci_low"] <= metrics["accuracy"] <= metrics["ci_high"]
    width = max(len(line) for line in dvc(repo, "metrics", "show").splitlines())
    assert width <= 120, f"`dvc metrics show` is {width} columns wide"
    per_class = json.loads((repo / "reports/classification_report.json").read_text())
    assert set(json.loads((repo / "models/model.json").read_text())["classes"]) <= set(per_class)
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    text = json.dumps(shown)
    assert "test" in text and "macro_f1" in text and "ece" in text
    assert "Container_Small_B" not in text  # per-class scores are not DVC metrics
    out = dvc(repo, "plots", "show", "--json")
    assert "Confusion matrix" in out and "Loss" in out and "confusion" in out


def test_second_repro_is_a_no_op(repo: Path, first_repro: str):
    out = dvc(repo, "repro")
    assert stages_run(out) == []
    assert "up to date" in dvc(repo, "status")


def test_mlflow_run_holds_everything(repo: Path, first_repro: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("toy-trucks")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "train and evaluate write to one run"
    run_ = runs[0]
    assert run_.info.run_id == json.loads((repo / "outputs/mlflow_run.json").read_text())["run_id"]
    assert run_.info.status == "FINISHED"
    params = run_.data.params
    assert params["train.C"] == "auto" and params["model.alpha"] == "0.35"
    assert params["model.weights"] == "null" and params["data.synthetic.train_per_class"] == "4"
    metrics = run_.data.metrics
    for key in (
        "test_accuracy",
        "test_macro_f1",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "head_C",
        "head_iterations",
        "test_recall_Container_Small_B",
        "export_float32_agreement",
        "export_int8_size_bytes",
    ):
        assert key in metrics, key
    assert metrics["trainable_params"] == 6 * 1281  # 1280 features at alpha 0.35 too
    # per solver step, at the steps of reports/train_history.csv (0 = the start)
    steps = client.get_metric_history(run_.info.run_id, "val_accuracy")
    assert [m.step for m in steps] == list(range(int(metrics["head_iterations"]) + 1))
    # tags: git commit and the DVC hash of the prepared data
    head = git(repo, "rev-parse", "HEAD").strip()
    assert run_.data.tags["git_commit"] == head
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    prepared = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    assert run_.data.tags["dvc_prepared_md5"] == prepared["md5"]
    inputs = run_.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == prepared["md5"]

    # artifacts
    def listing(path: str = "") -> set[str]:
        found = set()
        for item in client.list_artifacts(run_.info.run_id, path):
            found |= listing(item.path) if item.is_dir else {item.path}
        return found

    artifacts = listing()
    for name in (
        "config.yaml",
        "figures/loss.png",
        "figures/accuracy.png",
        "figures/confusion_matrix.png",
        "figures/gallery.png",
        "reports/classification_report.txt",
        "reports/classification_report.json",
        "reports/metrics.json",
        "data/report.json",
        "train_head.json",
        "exports/model_int8.tflite",
        "reports/export_metrics.json",
    ):
        assert name in artifacts, name
    config = yaml.safe_load(
        client.download_artifacts(run_.info.run_id, "config.yaml", str(repo / "dl"))
        and (repo / "dl" / "config.yaml").read_text()
    )
    assert config["train"]["C"] == "auto" and config["train"]["solver"] == "auto"


def test_logged_model_loads_back_with_its_signature(repo: Path, first_repro: str, monkeypatch):
    import mlflow
    import numpy as np

    from pipeline.lib.data.prepared import PreparedDataset

    monkeypatch.chdir(repo)  # the manifest's photo folder is relative to the project

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    run_id = json.loads((repo / "outputs/mlflow_run.json").read_text())["run_id"]
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.metadata.signature is not None  # outputs; inputs: raw images of any kind
    images = PreparedDataset(repo / "data/prepared").images("test")[:3]  # uint8, decoded photos
    out = model.predict(images)
    assert len(out) == 3 and list(out.columns) == ["label", "probability", "scores"]
    probs = np.array([list(s.values()) for s in out["scores"]])
    assert probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_editing_train_params_invalidates_train_not_the_features(repo: Path, first_repro: str):
    """A train parameter edited in params.yaml: DVC sees `train` (and `evaluate`, whose audit
    fits heads at train.C) changed (the downstream stages rerun after train: see the `dvc exp run` test
    below), `prepare` and `featurize` unchanged."""
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["C"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(repo, "status", "--json"))
    finally:
        (repo / "params.yaml").write_text(original)
    assert set(status) == {"config", "train", "evaluate"}, status  # its audit fits at train.C
    assert {"changed deps": {"params.yaml": {"train.C": "modified"}}} in status["train"], status
    assert json.loads(dvc(repo, "status", "--json")) == {}


def test_dvc_exp_run_recomposes_params_from_conf(
    smoke_history: tuple[Path, dict], smoke_project: tuple[Path, str], tmp_path: Path
):
    """`dvc exp run -S experiment=smoke -S train.C=0.01 -S train.label_smoothing=0.1` (the
    session's `smoke_history`): DVC's Hydra integration recomposes params.yaml from conf/ with
    the overrides; train reruns, the features are reused, and the stages after train rerun
    exactly when the model folder changed (the smoke backbone's random features are ~1e-11, so
    the head is the same zeros at any C: DVC then rightly skips them)."""
    repo = copy_reproduced(smoke_history[0], tmp_path / "repo")
    ran = stages_run(smoke_history[1]["output"])

    def outs(folder: Path, stage: str) -> dict[str, str]:
        lock = yaml.safe_load((folder / "dvc.lock").read_text())
        return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}

    changed = outs(repo, "train")["models"] != outs(smoke_project[0], "train")["models"]
    assert ran[:2] == ["config", "train"]
    # evaluate's params include train.C (its audit fits heads at it): it reruns; export when the
    # model folder changed
    assert sorted(ran[2:]) == (["evaluate", "export"] if changed else ["evaluate"])
    params = yaml.safe_load((repo / "params.yaml").read_text())
    before = yaml.safe_load((smoke_project[0] / "params.yaml").read_text())
    assert params["train"]["C"] == 0.01 and params["train"]["label_smoothing"] == 0.1
    assert params["data"]["image_size"] == 32  # experiment=smoke
    for key in ("C", "label_smoothing"):
        del params["train"][key], before["train"][key]
    assert params == before  # everything else as composed before
    head = json.loads((repo / "reports/train_metrics.json").read_text())["head"]
    assert head["C"] == 0.01 and head["C_choice"] == {"rule": "train.C"}
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    assert '"C": 0.01' in json.dumps(shown), shown
    assert "up to date" in dvc(repo, "status")


def test_an_applied_experiment_reproduces_and_a_conf_edit_is_still_caught(
    smoke_history: tuple[Path, dict], tmp_path: Path
):
    """`dvc exp run -S` writes params.yaml without our header; the config stage records the
    overrides in it, so `dvc exp apply <exp>` + `dvc repro` rerun nothing, and a conf/ edit made
    afterwards stops the config stage with a command that keeps the experiment's values."""
    repo = copy_reproduced(smoke_history[0], tmp_path / "repo")
    header = (repo / "params.yaml").read_text().split("\n", 1)[0]
    assert "train.C=0.01" in header and "train.label_smoothing=0.1" in header
    dvc(repo, "exp", "run", "--name", "c-point-one", "-S", "experiment=smoke", "-S", "train.C=0.1")
    git(repo, "reset", "-q", "--hard")
    dvc(repo, "checkout", "--force")
    dvc(repo, "exp", "apply", "c-point-one")
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["C"] == 0.1
    assert "up to date" in dvc(repo, "status")
    assert stages_run(dvc(repo, "repro")) == []
    conf = repo / "conf/train/default.yaml"
    conf.write_text(conf.read_text().replace("\nmax_iter: ", "\nmax_iter: 1"))
    stopped = attempt([sys.executable, "-m", "dvc", "repro"], repo)
    assert stopped.returncode != 0 and "train.max_iter" in stopped.stderr + stopped.stdout
    assert "python -m pipeline.params" in stopped.stderr and "train.C=0.1" in stopped.stderr
