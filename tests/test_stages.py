"""Each stage in-process on tiny data (32 px, alpha 0.35, no weights), with a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.audit import audit
from pipeline.evaluate import evaluate
from pipeline.featurize import featurize
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import read_json
from pipeline.lib.model.classifier import Classifier, model_md5
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory):
    """prepare -> featurize -> train -> evaluate (which audits the photos) once, on tiny data."""
    tmp = tmp_path_factory.mktemp("stages")
    cfg = tiny_config(tmp)
    report = prepare(cfg)
    meta = featurize(cfg)
    val_accuracy = train(cfg)
    metrics = evaluate(cfg)
    return {
        "tmp": tmp,
        "cfg": cfg,
        "report": report,
        "meta": meta,
        "val_accuracy": val_accuracy,
        "metrics": metrics,
    }


def client_for(cfg) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)


def test_prepare_writes_arrays_manifest_and_report(done):
    data = PreparedDataset(done["cfg"].paths.prepared)
    assert data.images("train").shape == (24, 32, 32, 3) and data.images("train").dtype == np.uint8
    assert data.size("val") == 12 and data.size("test") == 12
    assert data.num_classes == 6
    rows = data.manifest()
    assert len(rows) == 48 and all(len(r.sha256) == 64 for r in rows)
    assert done["report"]["totals"] == {"train": 24, "val": 12, "test": 12}


def test_featurize_writes_features_keyed_by_backbone(done):
    cfg = done["cfg"]
    feats = np.load(Path(cfg.paths.features) / "train.npy")
    assert feats.shape == (24, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    key = done["meta"]["key"]
    assert key["alpha"] == 0.35 and key["weights"] is None and key["prepared_md5"].endswith(".dir")


def test_train_writes_the_model_folder_and_run_id(done):
    """models/ is the model folder evaluate, predict, export and the served model load:
    backbone.tflite (the featurized flatbuffer, the backbone being frozen), head.npy and
    model.json (classes, input size, resize), and nothing else (no run id: a DVC output)."""
    cfg = done["cfg"]
    models = Path(cfg.paths.models)
    run = read_json(cfg.paths.run_file)
    assert sorted(p.name for p in models.iterdir()) == ["backbone.tflite", "head.npy", "model.json"]
    assert run["run_id"] not in (models / "model.json").read_text()
    assert (models / "backbone.tflite").read_bytes() == (
        Path(cfg.paths.features) / "backbone.tflite"
    ).read_bytes()
    classifier = Classifier.load(models)
    assert classifier.classes == PreparedDataset(cfg.paths.prepared).classes
    assert classifier.image_size == 32 and classifier.card.resize == cfg.data.resize
    assert classifier.head.kernel.shape == (1280, 6)
    assert model_md5(models) is not None
    status = client_for(cfg).get_run(run["run_id"]).info.status
    assert status == "FINISHED"
    params = read_json(Path(cfg.paths.reports) / "train_metrics.json")["params"]
    assert params["trainable"] == 7686  # 6 x (1280 + 1), as in the study


def test_evaluate_metrics_and_reports(done):
    reports = Path(done["cfg"].paths.reports)
    metrics = read_json(reports / "metrics.json")["test"]
    assert metrics == done["metrics"]["test"]
    assert set(metrics) == {"accuracy", "ci_low", "ci_high", "macro_f1", "ece"}
    # per-class scores, weighted F1 and the count live in classification_report.json, so that
    # `dvc metrics show` stays within 120 columns
    assert metrics["ci_low"] <= metrics["accuracy"] <= metrics["ci_high"]
    per_class = read_json(reports / "classification_report.json")
    assert per_class["macro avg"]["support"] == 12 and "Container_Big_Tractor_B" in per_class
    report = (reports / "classification_report.txt").read_text()
    assert "Container_Big_Tractor_B" in report and "macro avg" in report
    lines = (reports / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,actual,predicted,confidence" and len(lines) == 13
    html = (reports / "eval_report.html").read_text(encoding="utf-8")
    for line in lines[1:]:  # every test image has its cell in the report
        assert f'data-path="{line.split(",")[0]}"' in html
    pairs = {tuple(line.split(",")[1:3]) for line in lines[1:]}
    assert "<script" not in html and html.count('class="cell ') == len(pairs)  # non-empty cells
    # what `dvc plots show` draws: the classes of predictions.csv, no paths
    confusion = (reports / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted"
    assert [tuple(row.split(",")) for row in confusion[1:]] == [
        tuple(line.split(",")[1:3]) for line in lines[1:]
    ]


def test_audit_reports_reach_the_html_report_and_the_run(done):
    """Label issues for every train+val photo, near-duplicate pairs, the sufficiency curve (CSV,
    figure, one sentence per curve): on disk, in audit.json, in the HTML report, on the run."""
    cfg, reports = done["cfg"], Path(done["cfg"].paths.reports)
    dataset = PreparedDataset(cfg.paths.prepared)
    trainval = len(dataset.manifest("train")) + len(dataset.manifest("val"))
    issues = (reports / "label_issues.csv").read_text().splitlines()
    summary = read_json(reports / "audit.json")
    assert len(issues) == 1 + trainval == 1 + summary["label_issues"]["photos"]
    assert len(summary["sentences"]) == 1 + dataset.num_classes  # "all", then each class
    curve = (reports / "sufficiency.csv").read_text().splitlines()
    assert curve[0] == "images_per_class,seed,class,accuracy" and ",all," in curve[1]
    assert (reports / "audit_figures" / "sufficiency.png").read_bytes()[:4] == b"\x89PNG"
    html = (reports / "eval_report.html").read_text(encoding="utf-8")
    for section in ("Label issues", "Near-duplicates", "Data sufficiency"):
        assert f"<h2>{section}</h2>" in html
    assert '<h2>Accuracy vs coverage ("none of these")</h2>' in html  # the reject option
    assert "No reject rule is stored (train.reject.target=none)" in html
    run_id = read_json(Path(cfg.paths.run_file))["run_id"]
    run = client_for(cfg).get_run(run_id)
    assert run.data.metrics["audit_label_issues_photos"] == trainval
    logged = {a.path for a in client_for(cfg).list_artifacts(run_id, "audit")}
    assert {"audit/label_issues.csv", "audit/sufficiency.csv", "audit/audit.json"} <= logged


def test_the_audit_alone_writes_the_same_reports(done):
    """`python -m pipeline.audit` (after changing audit.*): the reports evaluate wrote, byte for
    byte, and its figures on the same MLflow run."""
    reports = Path(done["cfg"].paths.reports)
    names = ["label_issues.csv", "near_duplicates.csv", "sufficiency.csv", "audit.json"]
    before = {name: (reports / name).read_bytes() for name in names}
    summary = audit(done["cfg"])
    assert {name: (reports / name).read_bytes() for name in names} == before
    assert summary == {
        k: v for k, v in read_json(reports / "audit.json").items() if k != "sentences"
    }


def test_the_console_lists_only_photos_another_class_fits_better(done, caplog):
    """The label-issue lines name photos whose out-of-fold class differs from their label (or
    that cleanlab flags), never 'labelled X, looks like X'; their count is in the header."""
    import csv
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="pipeline.lib.audit.steps"):
        audit(done["cfg"])
    text = next(r.getMessage() for r in caplog.records if "Label issues:" in r.getMessage())
    with open(Path(done["cfg"].paths.reports) / "label_issues.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    other = [r for r in rows if r["flagged"] == "True" or r["suggested_label"] != r["given_label"]]
    assert f"; {len(other)} flagged or closer to another class out of fold" in text, text
    listed = re.findall(r"labelled (\S+), looks like (\S+) \(", text)
    assert len(listed) == min(len(other), done["cfg"].audit.show)
    shown = [(r["given_label"], r["suggested_label"]) for r in other][: len(listed)]
    assert listed == shown


def test_evaluate_ends_with_a_summary_and_logs_its_report_with_provenance(done, caplog):
    """The last line: accuracy with its interval, the report, the MLflow run's URL. The run's
    copy of the report names the run and the data; the DVC output names no run (reproducible)."""
    import logging
    import re

    cfg = done["cfg"]
    with caplog.at_level(logging.INFO, logger="pipeline.evaluate"):
        evaluate(cfg)
    last = caplog.records[-1].getMessage()
    run_id = read_json(Path(cfg.paths.run_file))["run_id"]
    summary = r"Test accuracy \d\.\d{4} \(95 % interval \d\.\d{4}-\d\.\d{4}\) on 12 images"
    assert re.match(summary + r"; report: \S*eval_report\.html\n", last), last
    assert re.search(
        rf"MLflow run: http://127\.0\.0\.1:5000/#/experiments/\d+/runs/{run_id} ", last
    )
    local = (Path(cfg.paths.reports) / "eval_report.html").read_text(encoding="utf-8")
    assert run_id not in local and "data: synthetic" in local
    logged = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="reports/eval_report.html", tracking_uri=cfg.tracking.uri
    )
    html = Path(logged).read_text(encoding="utf-8")
    assert f"MLflow run: {run_id}" in html and "data: synthetic" in html and "git commit: " in html


def test_one_run_for_train_and_evaluate(done):
    client = client_for(done["cfg"])
    run_id = read_json(Path(done["cfg"].paths.run_file))["run_id"]
    experiment = client.get_experiment_by_name(done["cfg"].tracking.experiment)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(done["metrics"]["test"]["accuracy"])
    assert "final_val_accuracy" in metrics and "final_loss" in metrics


def test_training_is_deterministic(done, tmp_path):
    cfg = tiny_config(
        tmp_path,
        **{
            "data.synthetic.dir": done["cfg"].data.synthetic.dir,
            "paths.prepared": done["cfg"].paths.prepared,
            "paths.features": done["cfg"].paths.features,
        },
    )
    again = train(cfg)
    assert again == pytest.approx(done["val_accuracy"], abs=0)
    a = json.loads((Path(done["cfg"].paths.reports) / "train_metrics.json").read_text())
    b = json.loads((Path(cfg.paths.reports) / "train_metrics.json").read_text())
    assert a["train"] == b["train"] and a["val"] == b["val"]


def test_failing_run_ends_failed_not_running(done, tmp_path, monkeypatch):
    import pipeline.train as train_module

    def broken_fit(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_module, "_fit_lbfgs", broken_fit)
    cfg = tiny_config(
        tmp_path,
        **{
            "data.synthetic.dir": done["cfg"].data.synthetic.dir,
            "paths.prepared": done["cfg"].paths.prepared,
            "paths.features": done["cfg"].paths.features,
        },
    )
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    client = client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    statuses = [r.info.status for r in client.search_runs([experiment.experiment_id])]
    assert statuses == ["FAILED"]
    assert not Path(cfg.paths.models).exists()  # no half-written outputs


def test_interrupted_run_ends_killed(done, tmp_path, monkeypatch):
    import pipeline.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_fit_lbfgs", interrupted)
    cfg = tiny_config(
        tmp_path,
        **{
            "data.synthetic.dir": done["cfg"].data.synthetic.dir,
            "paths.prepared": done["cfg"].paths.prepared,
            "paths.features": done["cfg"].paths.features,
        },
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    client = client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert [r.info.status for r in client.search_runs([experiment.experiment_id])] == ["KILLED"]


def test_stale_features_are_not_used(done, tmp_path):
    """Features of another backbone are refused (one error naming them and what to run)
    rather than misused; nothing is written."""
    from pipeline.lib.errors import StageInputError

    cfg = tiny_config(
        tmp_path,
        **{
            "data.synthetic.dir": done["cfg"].data.synthetic.dir,
            "paths.prepared": done["cfg"].paths.prepared,
            "paths.features": done["cfg"].paths.features,
            "model.init_seed": 1,
        },
    )
    with pytest.raises(StageInputError, match="holds no features.*run the featurize stage"):
        train(cfg)
    assert not Path(cfg.paths.models).exists()


def test_multirun_gives_each_job_its_own_run_outside_dvc_paths(done, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_overrides(
        tmp_path,
        **{
            "data.synthetic.dir": done["cfg"].data.synthetic.dir,
            "paths.prepared": done["cfg"].paths.prepared,
            "paths.features": done["cfg"].paths.features,
        },
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "-m",
            *overrides,
            "tracking.log_model=false",
            "train.C=0.1,10.0",
            "train.save_model=always",  # sweep jobs save no model unless asked
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("toy-trucks")
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("sweep") != "parent"
    ]
    assert sorted(r.data.params["train.C"] for r in runs) == ["0.1", "10.0"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert model_md5(sweep_dir / "0" / "models") is not None  # a whole model folder
    assert (sweep_dir / "1" / "reports" / "train_history.csv").is_file()
    assert not (tmp_path / "models").exists()  # the DVC-tracked paths were not touched


def test_missing_imagenet_weights_say_what_to_do(tmp_path):
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "empty-keras-home"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.featurize",
            *tiny_overrides(tmp_path),
            "model.weights=imagenet",
            "model.alpha=1.0",
            "data.image_size=224",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in proc.stderr
    assert "model.weights=null" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_tracking_server_fails_before_training(done, tmp_path):
    import socket

    from pipeline.lib.tracking.runs import TrackingError

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tiny_config(
        tmp_path,
        **{
            "data.synthetic.dir": done["cfg"].data.synthetic.dir,
            "paths.prepared": done["cfg"].paths.prepared,
            "paths.features": done["cfg"].paths.features,
            "tracking.uri": f"http://127.0.0.1:{port}",
            "tracking.timeout_s": 2,
        },
    )
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}.*does not answer"):
        train(cfg)
    assert not Path(cfg.paths.models).exists() and not Path(cfg.paths.reports).exists()


def test_prepare_counts_as_skipped_only_what_may_be_a_lost_photo(tmp_path, caplog):
    """The generator's own marker (.synthetic.json), .DS_Store and Thumbs.db stay in the report
    with their reason but are not "skipped" in the summary line; a non-image file among the
    photos and a broken link are counted and named."""
    import logging

    from pipeline.lib.config.schema import validate
    from tests.conftest import compose

    with caplog.at_level(logging.INFO, logger="pipeline"):
        report = prepare(tiny_config(tmp_path))
    assert {"file": ".synthetic.json", "reason": "hidden/system file"} in report["skipped"]
    assert "rejected 0, skipped 0" in caplog.text and "files/folders skipped" not in caplog.text
    photos = tmp_path / "photos"
    shutil.copytree(tmp_path / "raw", photos)  # the marker included
    label = sorted((photos / "training").iterdir())[0]
    (photos / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (label / "Thumbs.db").write_bytes(b"x")
    (label / "notes.txt").write_text("not a photo")
    shutil.copytree(label, label / ".album")  # hidden photos: counted and named
    (label / "lost.png").symlink_to(tmp_path / "nowhere.png")
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.synthetic")]
    overrides += ["data=folder", f"data.path={photos}", f"paths.prepared={tmp_path / 'mine'}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        report = prepare(validate(compose(overrides)))
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    hidden = [".DS_Store", ".synthetic.json", f"training/{label.name}/Thumbs.db"]
    assert all(reasons[f] == "hidden/system file" for f in hidden) and len(reasons) == 6
    assert "rejected 0, skipped 3" in caplog.text
    assert "1 hidden folder(s) with image files skipped (rename them" in caplog.text
    assert f"leading dot to use them): training/{label.name}/.album" in caplog.text
    lost = f"training/{label.name}/lost.png, training/{label.name}/notes.txt"
    assert "2 files/folders skipped" in caplog.text and lost in caplog.text
