"""The logged MLflow model (`pipeline.lib.tracking.pyfunc_model`) takes raw images as users have
them, through `mlflow.pyfunc.load_model(...).predict` and through `mlflow models serve`, and
answers with the probabilities the evaluate stage computed for the same images (the one LiteRT
runtime, `Classifier`), without importing TensorFlow or Keras.

One tiny pipeline (32 px, the ImageNet backbone so that images get different classes) is trained
and evaluated by the real stages into a real SQLite store, and its registered model promoted to
@champion.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
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
from pipeline.lib.model.build import imagenet_weights_path
from pipeline.lib.model.classifier import Classifier
from pipeline.lib.tracking.registry import promote
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, WEIGHTS_FILE, tiny_config

MODEL = "toy-truck-classifier"
SIZE = 32
CHAMPION = f"models:/{MODEL}@champion"


def _weights() -> Path:
    for path in (imagenet_weights_path(1.0, 224), ROOT.parent / "shared" / "models" / WEIGHTS_FILE):
        if path.is_file():
            return path
    pytest.fail(f"the MobileNetV2 ImageNet weights file {WEIGHTS_FILE} is needed (`make weights`)")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The tiny pipeline run (registered, @champion), its test PNGs, the model folder's
    probabilities for them (decoded as prepare decodes) and evaluate's predictions.csv rows."""
    tmp = tmp_path_factory.mktemp("serving")
    cfg = tiny_config(
        tmp,
        **{
            "model.alpha": 1.0,
            "model.weights": _weights(),
            "tracking.registered_model": MODEL,
            # "none of these": the rule accepts the 60 % best-scored val photos, so the served
            # model must answer `unknown` for some test PNGs and a class for others
            "train.reject.target": "coverage",
            "train.reject.value": 0.6,
        },
    )
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    evaluate(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    promote(client, MODEL, metric="final_val_accuracy", echo=None)
    raw = tmp / "raw"
    files = sorted((raw / "test").rglob("*.png"))
    classifier = Classifier.load(cfg.paths.models)
    pixels = np.stack([load_rgb(f, SIZE) for f in files])
    probs, accepted = classifier.classify(pixels)
    assert len(set(probs.argmax(axis=1))) >= 2, "degenerate model: one class for every image"
    assert 0 < accepted.sum() < len(accepted), "the reject rule should reject some, not all"
    labels = [
        classifier.classes[i] if a else "unknown"
        for i, a in zip(probs.argmax(1), accepted, strict=True)
    ]
    evaluated = pd.read_csv(Path(cfg.paths.reports) / "predictions.csv").set_index("path")
    evaluated = evaluated.loc[[f.relative_to(raw).as_posix() for f in files]]
    assert len(evaluated) == len(files) == 12
    # the reference is evaluate's: same labels, same confidences (rounded to 6 digits there)
    assert list(evaluated["predicted"]) == [classifier.classes[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(evaluated["confidence"], probs.max(axis=1), rtol=0, atol=1e-6)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    pyfunc = mlflow.pyfunc.load_model(CHAMPION)
    return {
        "cfg": cfg,
        "tmp": tmp,
        "files": files,
        "pixels": pixels,
        "probs": probs,
        "evaluated": evaluated,
        "classes": classifier.classes,
        "labels": labels,
        "pyfunc": pyfunc,
    }


def _check(served: dict, frame: pd.DataFrame, rows: slice = slice(None), atol: float = 1e-6):
    probs, classes = served["probs"][rows], served["classes"]
    assert list(frame.columns) == ["label", "probability", "scores"]
    assert list(frame["label"]) == served["labels"][rows]  # `unknown` where the rule rejects
    got = np.array([[s[c] for c in classes] for s in frame["scores"]])
    np.testing.assert_allclose(got, probs, rtol=0, atol=atol)
    np.testing.assert_allclose(frame["probability"], probs.max(axis=1), rtol=0, atol=atol)


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


@pytest.mark.parametrize("size", [SIZE, 48])  # at the model's input size and at one it resizes
def test_pyfunc_refuses_nan_and_out_of_range_pixels_at_every_size(served, size):
    """Case pyfunc-nan-pixels-answered: NaN, infinite or out-of-0..255 values are an input error
    (never a label from argmax of NaN, never pixels used or clipped silently)."""
    from mlflow.exceptions import MlflowException

    for value, kind in ((np.nan, "NaN"), (np.inf, "infinite"), (1e30, "out of range"),
                        (-1.0, "out of range"), (255.5, "out of range")):  # fmt: skip
        image = np.full((1, size, size, 3), 100.0)
        image[0, 3, 4, 1] = value
        with pytest.raises(MlflowException, match=rf"{kind}.*expected RGB values in 0\.\.255"):
            served["pyfunc"].predict(image)
    edge = np.zeros((1, size, size, 3))
    edge[0, 0, 0] = 255.0  # the bounds themselves are valid pixels
    assert served["pyfunc"].predict(edge)["scores"].map(lambda s: sum(s.values())).iloc[0] == (
        pytest.approx(1.0)
    )


IMPORT_PROBE = textwrap.dedent(
    """
    import json, sys
    import mlflow.pyfunc
    import numpy as np
    model = mlflow.pyfunc.load_model(sys.argv[1])
    frame = model.predict(np.full((2, 32, 32, 3), 120, np.uint8))
    assert len(frame) == 2, frame
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    """
)


def test_the_served_model_imports_neither_tensorflow_nor_keras(served, tmp_path):
    """`mlflow.pyfunc.load_model` + `predict` in a fresh process (what `mlflow models serve`
    runs): the top-level modules it imported hold the LiteRT interpreter, and no `tensorflow`
    or `keras` (MLflow's own `mlflow.data.tensorflow_dataset` is not TensorFlow)."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, CHAMPION],
        cwd=tmp_path,  # not the project: the model's own code (code_paths) is what runs
        env={**os.environ, "MLFLOW_TRACKING_URI": served["cfg"].tracking.uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    top_level = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert {"mlflow", "ai_edge_litert", "pipeline"} <= top_level  # the probe saw the model run
    assert not top_level & {"tensorflow", "keras", "tf_keras"}, sorted(top_level)


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


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer {url} within {timeout_s} s")


def _strict_json(text: str):
    """`text` parsed as RFC 8259 JSON: NaN / Infinity (which Python's json accepts) refused."""

    def refuse(constant: str):
        raise ValueError(f"not valid JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def server(served, tmp_path_factory: pytest.TempPathFactory):
    """`mlflow models serve --env-manager local` of models:/NAME@champion on 127.0.0.1 (a free
    port), ready; its process group is killed at the end."""
    folder = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": served["cfg"].tracking.uri,
        # MLflow starts `uvicorn` by name: this interpreter's scripts first (an unactivated venv)
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    log = (folder / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION,
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder,  # not the project: the logged code serves
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, timeout_s=180, log=folder / "serve.log")
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # already gone
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        assert proc.poll() is not None  # not left running


@pytest.mark.slow
def test_mlflow_models_serve_answers_what_evaluate_and_predict_computed(served, server, tmp_path):
    """Every test PNG posted base64-encoded (as the README's curl line does): the labels and
    probabilities evaluate wrote in reports/predictions.csv (1e-6), the scores of
    `pipeline.predict` on the same model; the body is strict JSON."""
    body = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(f.read_bytes()).decode()] for f in served["files"]],
        }
    }
    response = requests.post(server, json=body, timeout=120)
    assert response.status_code == 200, response.text[:500]
    answers = _strict_json(response.text)["predictions"]
    evaluated = served["evaluated"]
    assert [a["label"] for a in answers] == served["labels"]  # some `unknown`: the fixture
    known = [label != "unknown" for label in served["labels"]]  # evaluate's top class elsewhere
    assert [a["label"] for a, k in zip(answers, known, strict=True) if k] == list(
        evaluated["predicted"][known]
    )
    np.testing.assert_allclose(
        [a["probability"] for a in answers], evaluated["confidence"], rtol=0, atol=1e-6
    )
    got = np.array([[a["scores"][c] for c in served["classes"]] for a in answers])
    np.testing.assert_allclose(got, served["probs"], rtol=0, atol=1e-6)

    out = tmp_path / "p.json"
    files = [str(f) for f in served["files"]]
    uri = served["cfg"].tracking.uri
    assert predict.main([*files, "--model", CHAMPION, "--output", str(out),
                         "--tracking-uri", uri]) == 0  # fmt: skip
    rows = {r["path"]: r for r in json.loads(out.read_text())}
    for file, answer in zip(files, answers, strict=True):
        assert answer["label"] == rows[file]["predicted"]
        for name, value in rows[file]["scores"].items():
            assert answer["scores"][name] == pytest.approx(value, abs=1e-6)


@pytest.mark.slow
def test_mlflow_models_serve_refuses_nan_and_out_of_range_pixels_with_a_4xx(server):
    """Case pyfunc-nan-pixels-answered, over HTTP: the exact NaN request of the case, infinite
    and out-of-range pixels at the model's size and at another one: a 4xx whose message says
    what is expected, never HTTP 200; the server stays up."""
    nan_body = (
        '{"inputs": ['
        + json.dumps(np.full((SIZE, SIZE, 3), 100).tolist()).replace("100", "NaN", 5)
        + "]}"
    )
    bodies = {
        "nan": nan_body,
        "infinity": nan_body.replace("NaN", "Infinity"),
        "huge": json.dumps({"inputs": np.full((1, SIZE, SIZE, 3), 1e30).tolist()}),
        "negative": json.dumps({"inputs": np.full((1, SIZE, SIZE, 3), -5.0).tolist()}),
        "huge_other_size": json.dumps({"inputs": np.full((1, 7, 9, 3), 300.0).tolist()}),
    }
    headers = {"Content-Type": "application/json"}
    for name, data in bodies.items():
        response = requests.post(server, data=data, headers=headers, timeout=120)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        message = _strict_json(response.text)["message"]
        assert "expected RGB values in 0..255" in message, (name, message)
    ok = json.dumps({"inputs": np.full((1, SIZE, SIZE, 3), 100.0).tolist()})
    response = requests.post(server, data=ok, headers=headers, timeout=120)
    assert response.status_code == 200, response.text[:300]
    [answer] = _strict_json(response.text)["predictions"]
    assert answer["label"] in [*answer["scores"], "unknown"] and sum(answer["scores"].values()) == (
        pytest.approx(1.0)
    )


def test_raw_heic_bytes_are_taken_as_an_image_file_not_as_base64():
    """iPhone photos (HEIC, an ISO BMFF file: `ftyp` at byte 4) sent as raw bytes are decoded
    like the other formats, as `pipeline.predict` does."""
    import io

    import pillow_heif
    from PIL import Image

    from pipeline.lib.tracking.pyfunc_model import to_images

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="HEIF")
    raw = buffer.getvalue()
    assert raw[4:8] == b"ftyp"
    images = to_images([raw], 32, "stretch")
    assert images.shape == (1, 32, 32, 3)
    assert abs(float(images[0, 16, 16, 0]) - 200) < 12  # red survives the HEVC round trip
