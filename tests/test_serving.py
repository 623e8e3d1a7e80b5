"""The logged MLflow model (`pipeline.lib.tracking.pyfunc_model`) takes raw images as users have
them, through `mlflow.pyfunc.load_model(...).predict` and through `mlflow models serve`, and
answers as `pipeline.predict` does.

One tiny pipeline (32 px, the ImageNet backbone so that images get different classes) is trained
and evaluated by the real stages into a real SQLite store, and its registered model promoted to
@champion.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from pipeline import predict
from pipeline.evaluate import evaluate
from pipeline.featurize import featurize
from pipeline.lib.data.images import load_rgb
from pipeline.lib.files import read_json
from pipeline.lib.model.build import imagenet_weights_path, load_model
from pipeline.lib.tracking.registry import promote
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, WEIGHTS_FILE, tiny_config

MODEL = "toy-truck-classifier"
SIZE = 32


def _weights() -> Path:
    for path in (imagenet_weights_path(1.0, 224), ROOT.parent / "shared" / "models" / WEIGHTS_FILE):
        if path.is_file():
            return path
    pytest.fail(f"the MobileNetV2 ImageNet weights file {WEIGHTS_FILE} is needed (`make weights`)")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The tiny pipeline run (registered, @champion), its test PNGs and the Keras model's
    probabilities for them (decoded as prepare decodes)."""
    tmp = tmp_path_factory.mktemp("serving")
    cfg = tiny_config(
        tmp,
        **{
            "model.alpha": 1.0,
            "model.weights": _weights(),
            "train.learning_rate": 0.05,
            "train.epochs": 8,
            "tracking.registered_model": MODEL,
        },
    )
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    evaluate(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    promote(client, MODEL, metric="final_val_accuracy", echo=None)
    files = sorted((tmp / "raw" / "test").rglob("*.png"))
    models = Path(cfg.paths.models)
    keras_model = load_model(models / "model.keras")
    pixels = np.stack([load_rgb(f, SIZE) for f in files])
    probs = np.asarray(keras_model(pixels.astype(np.float32), training=False), np.float64)
    assert len(set(probs.argmax(axis=1))) >= 2, "degenerate model: one class for every image"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    return {
        "cfg": cfg,
        "tmp": tmp,
        "files": files,
        "pixels": pixels,
        "probs": probs,
        "classes": read_json(models / "classes.json"),
        "pyfunc": pyfunc,
    }


def _check(served: dict, frame: pd.DataFrame, rows: slice = slice(None), atol: float = 1e-5):
    probs, classes = served["probs"][rows], served["classes"]
    assert list(frame.columns) == ["label", "probability", "scores"]
    assert list(frame["label"]) == [classes[i] for i in probs.argmax(axis=1)]
    got = np.array([[s[c] for c in classes] for s in frame["scores"]])
    np.testing.assert_allclose(got, probs, atol=atol)
    np.testing.assert_allclose(frame["probability"], probs.max(axis=1), atol=atol)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int64, np.int32])
def test_pyfunc_takes_image_arrays_of_any_numeric_dtype(served, dtype):
    frame = served["pyfunc"].predict(served["pixels"].astype(dtype))
    _check(served, frame)


def test_pyfunc_takes_one_image_and_resizes_other_sizes_as_training(served):
    one = served["pyfunc"].predict(served["pixels"][0])  # (H, W, 3)
    _check(served, one, slice(0, 1))
    # the raw 48 px PNGs as arrays: resized by the model exactly as prepare resized them
    raw = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in served["files"]])
    assert raw.shape[1:3] == (48, 48)
    _check(served, served["pyfunc"].predict(raw))


def test_pyfunc_takes_encoded_images_base64_or_bytes(served):
    data = [f.read_bytes() for f in served["files"]]
    encoded = [base64.b64encode(b).decode("ascii") for b in data]
    _check(served, served["pyfunc"].predict(pd.DataFrame({"image": encoded})))
    _check(served, served["pyfunc"].predict(data))  # raw file bytes, as a list
    _check(served, served["pyfunc"].predict(np.array(encoded)))


def test_pyfunc_rejects_bad_input_with_what_it_expects(served):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"shape \(N, height, width, 3\)"):
        served["pyfunc"].predict(np.zeros((2, SIZE, SIZE), np.uint8))
    with pytest.raises(MlflowException, match="image 0: not base64"):
        served["pyfunc"].predict(pd.DataFrame({"image": ["not an image!"]}))
    with pytest.raises(MlflowException, match="image 0: not an image"):
        served["pyfunc"].predict([base64.b64encode(b"plain text, no image").decode()])
    with pytest.raises(MlflowException, match="one column"):
        served["pyfunc"].predict(pd.DataFrame({"a": ["x"], "b": ["y"]}))


def test_logged_model_is_a_pyfunc_with_code_artifacts_and_output_signature(served):
    info = mlflow.models.get_model_info(f"models:/{MODEL}@champion")
    assert set(info.flavors) == {"python_function"}
    assert info.signature.inputs is None  # any dtype: MLflow enforces tensor dtypes exactly
    assert info.signature.outputs.input_names() == ["label", "probability", "scores"]
    assert info.metadata["classes"] == served["classes"] and info.metadata["image_size"] == SIZE
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion"))
    assert (local / "code" / "pipeline" / "lib" / "tracking" / "pyfunc_model.py").is_file()
    assert not list(local.rglob("__pycache__"))
    assert not (local / "input_example.json").exists()  # no costly validation run at log time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer {url} within {timeout_s} s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_png_as_truck_predict_does(served, tmp_path, capsys):
    """`mlflow models serve --env-manager local` of models:/NAME@champion on loopback; a real PNG
    posted base64-encoded, as the README's curl line does."""
    cfg, file = served["cfg"], served["files"][-1]
    out = tmp_path / "p.json"
    assert (
        predict.main(
            [
                str(file),
                "--model",
                f"models:/{MODEL}@champion",
                "--output",
                str(out),
                "--tracking-uri",
                cfg.tracking.uri,
            ]
        )
        == 0
    )
    expected = read_json(out)[0]
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,  # not the project: the model's own code (code_paths) is what serves
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, timeout_s=120)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(file.read_bytes()).decode()]],
            }
        }
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text[:500]
        [answer] = response.json()["predictions"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert answer["label"] == expected["predicted"]
    assert answer["scores"].keys() == expected["scores"].keys()
    for name, value in expected["scores"].items():
        assert answer["scores"][name] == pytest.approx(value, abs=1e-5)
    assert answer["probability"] == pytest.approx(expected["probability"], abs=1e-5)
