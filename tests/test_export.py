"""The export stage on tiny data (32 px, alpha 0.35, no weights): a Keras whole model and TFLite
files in three formats, their parity with the model folder (the LiteRT `Classifier`), the metrics
file and the MLflow run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.export import export
from pipeline.featurize import featurize
from pipeline.lib.config.schema import ConfigError
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import read_json
from pipeline.lib.model.build import load_model
from pipeline.lib.model.classifier import CARD_FILE, Classifier
from pipeline.lib.model.export import HEADLINE_KEYS, representative_images, split_timings
from pipeline.lib.model.tflite import TFLiteRunner
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, compose, tiny_config, tiny_overrides

TFLITE = ["float32", "int8", "float16"]
FORMATS = ["keras", *TFLITE]
FILES = {"keras": "model.keras", **{f: f"model_{f}.tflite" for f in TFLITE}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """prepare -> featurize -> train -> export once, all four formats."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(
        tmp,
        **{
            "paths.exports": tmp / "exports",
            "export.formats": "[" + ",".join(FORMATS) + "]",
            "export.representative_samples": 16,
            "export.latency_runs": 10,
            "export.latency_warmup": 2,
        },
    )
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    metrics = export(cfg)
    return {"tmp": tmp, "cfg": cfg, "metrics": metrics}


def interpreter(path: Path):
    it = TFLiteRunner(path, num_threads=1).interpreter
    it.allocate_tensors()
    return it


def test_files_exist_and_run_in_the_interpreter(exported):
    exports = Path(exported["cfg"].paths.exports)
    assert sorted(p.name for p in exports.iterdir()) == sorted([*FILES.values(), CARD_FILE])
    models = Path(exported["cfg"].paths.models)
    assert (exports / CARD_FILE).read_bytes() == (models / CARD_FILE).read_bytes()
    image = PreparedDataset(exported["cfg"].paths.prepared).images("test")[:1]  # decoded photos
    for fmt in TFLITE:
        it = interpreter(exports / FILES[fmt])
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        assert tuple(inp["shape"]) == (1, 32, 32, 3) and tuple(out["shape"]) == (1, 6)
        it.set_tensor(inp["index"], image.astype(inp["dtype"]))  # uint8 pixels as they are
        it.invoke()
        probs = it.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] != np.float32:
            scale, zero_point = out["quantization"]
            probs = (probs - zero_point) * scale
        assert probs.sum() == pytest.approx(1.0, abs=0.05), fmt


def test_the_keras_export_is_the_model_folder_as_one_keras_model(exported):
    """model.keras loads as a whole Keras model (images 0..255 -> probabilities) and gives the
    model folder's probabilities on the test images (the Keras backbone vs its LiteRT
    conversion: float rounding only)."""
    cfg = exported["cfg"]
    model = load_model(Path(cfg.paths.exports) / "model.keras")
    images = PreparedDataset(cfg.paths.prepared).images("test")[:].astype(np.float32)
    got = np.asarray(model(images, training=False), np.float64)
    want = Classifier.load(cfg.paths.models).predict_proba(images)
    assert got.shape == want.shape == (12, 6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert exported["metrics"]["keras"]["max_abs_prob_diff"] == pytest.approx(
        np.abs(got - want).max(), abs=1e-5
    )


def test_parity_figures_are_present_and_sane(exported):
    m = exported["metrics"]
    n = m["test_images"]
    assert n == 12
    for fmt in FORMATS:
        r = m[fmt]
        assert 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0, fmt
        assert r["disagreements"] == round((1 - r["agreement"]) * n)
        assert r["target_met"] == (r["agreement"] >= r["target_agreement"])
        assert r["latency_ms"] > 0 and r["size_bytes"] > 10_000
        assert r["size_mib"] == pytest.approx(r["size_bytes"] / 2**20, abs=1e-4)
    for fmt in ("keras", "float32"):
        assert m[fmt]["agreement"] >= 0.99 and m[fmt]["target_met"], fmt
        assert m[fmt]["max_abs_prob_diff"] < 1e-3, fmt
    assert m["float16"]["size_bytes"] < 0.7 * m["float32"]["size_bytes"]
    assert m["int8"]["size_bytes"] < 0.5 * m["float32"]["size_bytes"]
    model = m["model"]
    assert model["latency_ms"] > 0 and 0.0 <= model["accuracy"] <= 1.0
    assert model["files"] == ["backbone.tflite", "head.npy", "model.json"]
    assert m["float32"]["accuracy"] == pytest.approx(model["accuracy"], abs=1 / n)
    assert m["latency"]["threads"] >= 1 and m["latency"]["runs"] == 10
    assert m["int8"]["representative_samples"] == 16


def test_int8_model_is_full_integer_with_uint8_io(exported):
    r = exported["metrics"]["int8"]
    assert r["input"]["dtype"] == "uint8" and r["output"]["dtype"] == "uint8"
    assert r["output"]["scale"] == pytest.approx(1 / 256) and r["output"]["zero_point"] == 0
    it = interpreter(Path(exported["cfg"].paths.exports) / "model_int8.tflite")
    dtypes = [np.dtype(d["dtype"]).name for d in it.get_tensor_details()]
    assert dtypes.count("int8") > 50  # weights and activations
    assert "float32" not in dtypes and r["tensor_dtypes"]["int8"] == dtypes.count("int8")
    assert exported["metrics"]["float32"]["tensor_dtypes"].get("int8", 0) == 0


def test_details_file_is_what_the_stage_returned_less_the_timings(exported):
    """The DVC outputs hold no timings (same inputs, same bytes): latencies go to an untracked
    file beside the run file, and to MLflow."""
    path = Path(exported["cfg"].paths.reports) / "export_details.json"
    on_disk = read_json(path)
    stable, timings = split_timings(exported["metrics"])
    assert on_disk == stable
    assert set(on_disk) == {"model", *FORMATS, "test_images"}
    assert on_disk["int8"]["file"] == "model_int8.tflite"
    assert "convert_seconds" not in on_disk["int8"] and "latency_ms" not in on_disk["int8"]
    latency = read_json(Path(exported["cfg"].paths.run_file).parent / "export_latency.json")
    assert latency == timings and latency["int8"]["latency_ms"] > 0


def test_metrics_file_holds_only_the_headline_numbers(exported):
    """`dvc metrics show` gets a few numbers per model, no strings, no tensor internals."""
    on_disk = read_json(Path(exported["cfg"].paths.reports) / "export_metrics.json")
    details = exported["metrics"]
    assert set(on_disk) == {"model", *FORMATS}
    assert set(on_disk["model"]) == {"accuracy", "size_mib"}
    for fmt in FORMATS:
        assert set(on_disk[fmt]) == set(HEADLINE_KEYS)
        assert on_disk[fmt] == {k: details[fmt][k] for k in HEADLINE_KEYS}
    leaves = [v for record in on_disk.values() for v in record.values()]
    assert all(isinstance(v, float | int) for v in leaves) and len(leaves) == 2 + 3 * len(FORMATS)


def test_mlflow_run_has_export_artifacts_and_metrics(exported):
    cfg = exported["cfg"]
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = read_json(Path(cfg.paths.run_file))["run_id"]
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for fmt in FORMATS:
        assert run.data.metrics[f"export_{fmt}_agreement"] == pytest.approx(
            exported["metrics"][fmt]["agreement"]
        )
        assert (
            run.data.metrics[f"export_{fmt}_size_bytes"] == exported["metrics"][fmt]["size_bytes"]
        )
    assert "export_model_latency_ms" in run.data.metrics  # in the run that holds train's metrics
    assert "final_val_accuracy" in run.data.metrics
    logged = {a.path: a.file_size for a in client.list_artifacts(run_id, "exports")}
    assert logged == {f"exports/{FILES[f]}": exported["metrics"][f]["size_bytes"] for f in FORMATS}
    assert "reports/export_metrics.json" in {
        a.path for a in client.list_artifacts(run_id, "reports")
    }


def test_representative_samples_cover_the_split():
    assert list(representative_images(np.arange(10) * 10, 4)) == [0, 30, 60, 90]
    assert list(representative_images(np.arange(3), 100)) == [0, 1, 2]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("export.formats=[float32,int4]", "export.formats"),
        ("export.formats=[int8,int8]", "export.formats"),
        ("export.int8_io=float32", "export.int8_io"),
        ("export.representative_samples=0", "export.representative_samples"),
        ("export.targets.int8=1.5", "export.targets.int8"),
        ("+export.formatz=[int8]", "export.formatz"),
    ],
)
def test_bad_export_config_names_the_key(override, key):
    from pipeline.lib.config.schema import validate

    with pytest.raises(ConfigError) as info:
        validate(compose([override]))
    assert key in str(info.value)
    if "int4" in override:
        assert "int4" in str(info.value) and "float16" in str(info.value)


def test_export_is_opt_in_and_then_costs_no_tensorflow(exported, tmp_path):
    from pipeline.lib.config.schema import validate

    cfg = validate(compose())
    assert list(cfg.export.formats) == [] and cfg.export.int8_io == "uint8"
    assert cfg.paths.exports == "exports"
    # the stage with the default formats, on the trained model: empty reports, no TensorFlow
    overrides = tiny_overrides(
        exported["tmp"],
        **{"paths.exports": tmp_path / "exports", "paths.reports": tmp_path / "reports"},
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.export", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = set(re.findall(r"^import time:.*\|\s+(\S+)\s*$", proc.stderr, re.M))
    assert "pipeline.lib.model.classifier" in imported  # the -X importtime parsing works
    top_level = {name.split(".")[0] for name in imported}
    assert not top_level & {"tensorflow", "keras", "tf_keras", "mlflow"}, sorted(top_level)
    assert "nothing exported" in proc.stdout + proc.stderr
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["NOTHING_EXPORTED.txt"]
    assert json.loads((tmp_path / "reports" / "export_metrics.json").read_text()) == {}
    assert json.loads((tmp_path / "reports" / "export_details.json").read_text()) == {"formats": []}
