"""`pipeline.predict` on a model trained by the real stages (tiny synthetic data,
32 px), loaded from every source: the models/ folder, `runs:/` and `models:/...@champion` from the
MLflow SQLite store (all three the LiteRT `Classifier`, which gives evaluate's probabilities), and
the export stage's files (`model.keras`, float32 and full-int8 `.tflite`).

The backbone uses the ImageNet weights file (`make weights`; `model.weights=<path>` so 32 px is
allowed): with random weights MobileNetV2's pooled features are ~1e-12 for every image, the model
predicts the same probabilities for all of them, and "every source agrees with the model" would
hold even for a source that mixed the images up.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import predict
from pipeline.evaluate import evaluate
from pipeline.export import export
from pipeline.featurize import featurize
from pipeline.lib.data.images import load_rgb
from pipeline.lib.files import write_json
from pipeline.lib.model.build import imagenet_weights_path
from pipeline.lib.model.classifier import CARD_FILE, Classifier, ModelCard
from pipeline.lib.model.saving import trained_run_id
from pipeline.lib.model.tflite import TFLiteRunner
from pipeline.lib.tracking.registry import promote
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, WEIGHTS_FILE, tiny_config

# trains an ImageNet model and exports it in three formats first (about a minute)
pytestmark = pytest.mark.slow

MODEL = "toy-truck-classifier"
SIZE = 32
BAD = {
    "notes.txt": "not an image file",
    "broken.png": "corrupt or truncated",
    "fake.jpg": "not an image",
}


def weights_file() -> Path:
    for path in (imagenet_weights_path(1.0, 224), ROOT.parent / "shared" / "models" / WEIGHTS_FILE):
        if path.is_file():
            return path
    pytest.fail(f"the MobileNetV2 ImageNet weights file {WEIGHTS_FILE} is needed (`make weights`)")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """prepare -> featurize -> train -> evaluate -> export (keras, float32, int8 with int8 I/O)
    once (registered in MLflow, promoted to @champion); a folder of the test images (one
    sub-folder per class) with three bad files; the model folder's own probabilities on them and
    evaluate's predictions.csv rows for them."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = tiny_config(
        tmp,
        **{
            "model.alpha": 1.0,
            "model.weights": weights_file(),
            "paths.exports": tmp / "exports",
            "export.formats": "[keras,float32,int8]",
            "export.int8_io": "int8",
            "export.latency_runs": 2,
            "export.latency_warmup": 1,
        },
    )
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    evaluate(cfg)  # registers the model (a run with test metrics)
    export(cfg)
    models, exports = Path(cfg.paths.models), Path(cfg.paths.exports)
    run_id = trained_run_id(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    promote(client, MODEL, metric="final_val_accuracy", echo=None)

    photos = tmp / "photos"
    evaluated = pd.read_csv(Path(cfg.paths.reports) / "predictions.csv")
    evaluated["path"] = [str(photos / Path(p).relative_to("test")) for p in evaluated["path"]]
    for file in sorted((tmp / "raw" / "test").rglob("*.png")):
        (photos / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, photos / file.parent.name / file.name)
    images = sorted(photos.rglob("*.png"))
    assert len(images) == 12 and set(evaluated["path"]) == set(map(str, images))
    (photos / "notes.txt").write_text("shopping list\n")
    (photos / "broken.png").write_bytes(images[0].read_bytes()[:120])  # truncated PNG
    (photos / images[1].parent.name / "fake.jpg").write_text("text, not a JPEG\n")

    classifier = Classifier.load(models)
    classes = classifier.classes
    pixels = np.stack([load_rgb(p, SIZE) for p in images])
    probs = classifier.predict_proba(pixels)
    assert len(set(probs.argmax(axis=1))) >= 2, "degenerate model: one class for every image"
    reference = {str(p): row for p, row in zip(images, probs, strict=True)}
    classes_file = tmp / "classes.json"
    write_json(classes_file, classes)
    assert (exports / CARD_FILE).read_bytes() == (models / CARD_FILE).read_bytes()
    return {
        "tmp": tmp,
        "cfg": cfg,
        "uri": cfg.tracking.uri,
        "run_id": run_id,
        "models": models,
        "photos": photos,
        "classes": classes,
        "classes_file": classes_file,
        "reference": reference,
        "evaluated": evaluated.set_index("path"),
        "keras": exports / "model.keras",
        "tflite": exports / "model_float32.tflite",
        "int8": exports / "model_int8.tflite",
    }


def run_predict(world, tmp_path, capsys, model: str, *extra: str, output: str = "out.json"):
    out = tmp_path / output
    rc = predict.main(
        [
            str(world["photos"]),
            "--model",
            model,
            "--output",
            str(out),
            "--tracking-uri",
            world["uri"],
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return rc, out, captured.out, captured.err


def check_agreement(world, out: Path, quantized: bool = False, atol: float = 1e-6) -> None:
    """The output holds the 12 good images (found recursively), with the model folder's scores
    (to `atol`: 1e-6 for the same runtime, 1e-4 for an export)."""
    rows = {r["path"]: r for r in json.loads(out.read_text())}
    reference, classes = world["reference"], world["classes"]
    assert set(rows) == set(reference)
    got = np.array([[rows[p]["scores"][c] for c in classes] for p in reference])
    expected = np.array(list(reference.values()))
    assert all(list(rows[p]["scores"]) == classes for p in reference)
    if quantized:
        # int8 activations and a 1/256-step output are lossy (measured: mean error 0.03, 10 of 12
        # top-1 equal), but the scores must be dequantized probabilities: a wrong zero point would
        # add 0.5 to each, a wrongly quantized input would give chance-level agreement
        assert np.all((got >= 0) & (got <= 1)) and np.allclose(got.sum(axis=1), 1, atol=0.05)
        assert np.abs(got - expected).mean() < 0.08
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).sum() >= 8
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
        assert [rows[p]["predicted"] for p in reference] == [
            classes[i] for i in expected.argmax(axis=1)
        ]


def check_reports(stdout: str, stderr: str) -> None:
    """One stdout line per predicted image; each bad file named once, with why; a summary."""
    assert len(stdout.strip().splitlines()) == 12
    for name, why in BAD.items():
        [line] = [
            line for line in stderr.splitlines() if line.startswith("warning:") and name in line
        ]
        assert why in line, line
    assert "Predicted 12 image(s)" in stderr and "3 file(s) skipped" in stderr


SOURCES = {
    "models_folder": lambda w: [str(w["models"])],
    "runs_uri": lambda w: [f"runs:/{w['run_id']}/model"],
    "champion": lambda w: [f"models:/{MODEL}@champion"],
    "keras_file": lambda w: [str(w["keras"])],  # the export, model.json beside it
    "tflite_int8": lambda w: [str(w["int8"]), "--classes", str(w["classes_file"])],
    # the float .tflite file (model.json beside it): see the subprocess test
}
#: The sources that run the model folder's own runtime (`Classifier`): evaluate's numbers.
SAME_RUNTIME = ("models_folder", "runs_uri", "champion")


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_source_agrees_with_the_model(world, tmp_path, capsys, source):
    model, *extra = SOURCES[source](world)
    rc, out, stdout, stderr = run_predict(world, tmp_path, capsys, model, *extra)
    assert rc == 0, stderr
    atol = 1e-6 if source in SAME_RUNTIME else 1e-4
    check_agreement(world, out, quantized=source == "tflite_int8", atol=atol)
    check_reports(stdout, stderr)
    kind = {"champion": "mlflow", "runs_uri": "mlflow", "keras_file": "keras"}.get(source)
    if kind:
        assert f"({kind}, {SIZE} px, resize stretch)" in stderr  # resize read from model.json


def test_predict_returns_the_probabilities_evaluate_wrote(world, tmp_path, capsys):
    """`pipeline.predict` on the model folder, for the test images as files: the labels and
    confidences of the evaluate stage's reports/predictions.csv, to 1e-6."""
    rc, out, _, stderr = run_predict(world, tmp_path, capsys, str(world["models"]))
    assert rc == 0, stderr
    rows = {r["path"]: r for r in json.loads(out.read_text())}
    evaluated = world["evaluated"]
    assert set(rows) == set(evaluated.index)
    paths = list(evaluated.index)
    assert [rows[p]["predicted"] for p in paths] == list(evaluated["predicted"])
    np.testing.assert_allclose(
        [rows[p]["probability"] for p in paths], evaluated["confidence"], rtol=0, atol=1e-6
    )


def test_int8_model_really_has_quantized_io(world):
    runner = TFLiteRunner(world["int8"])
    assert runner.input_dtype == np.int8 and runner.output_dtype == np.int8
    assert runner.input_quantization[0] > 0 and runner.output_quantization[1] != 0


def test_csv_and_json_shapes_and_top_k_order(world, tmp_path, capsys):
    classes = world["classes"]
    rc, out, stdout, _ = run_predict(
        world,
        tmp_path,
        capsys,
        str(world["models"]),
        "--top-k",
        "2",
        "--batch-size",
        "5",
        output="p.csv",
    )
    assert rc == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "predicted", "probability", *classes]
    assert len(table) == 12 and set(table["path"]) == set(world["reference"])
    scores = table[classes].to_numpy()
    assert np.allclose(scores.sum(axis=1), 1, atol=1e-4)
    assert list(table["predicted"]) == [classes[i] for i in scores.argmax(axis=1)]
    assert np.allclose(table["probability"], scores.max(axis=1), atol=1e-6)
    for line in stdout.strip().splitlines():  # "path: class p, class p", most probable first
        path, rest = line.split(": ", 1)
        shown = re.findall(r"(\S+) (\d\.\d{4})", rest)
        assert len(shown) == 2 and shown[0][1] >= shown[1][1]
        assert shown[0][0] == table.set_index("path").loc[path, "predicted"]

    rc, out, _, _ = run_predict(
        world, tmp_path, capsys, str(world["models"]), "--top-k", "10", output="p.json"
    )
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 12
    for row in rows:
        assert set(row) == {"path", "predicted", "probability", "top_k", "scores"}
        assert len(row["top_k"]) == len(classes)  # k capped at the number of classes
        probs = [t["probability"] for t in row["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert row["top_k"][0] == {"class": row["predicted"], "probability": row["probability"]}
        assert row["scores"][row["predicted"]] == row["probability"] == max(row["scores"].values())
        assert {t["class"] for t in row["top_k"]} == set(classes)


def test_user_errors_exit_2_with_the_path(world, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images here\n")
    out = tmp_path / "out.json"
    assert predict.main([str(empty), "--model", str(world["models"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no image was predicted" in err and str(empty) in err and not out.exists()

    missing = tmp_path / "nowhere" / "model.keras"
    assert predict.main([str(world["photos"]), "--model", str(missing), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err and "Traceback" not in err

    not_a_model = tmp_path / "model.keras"
    not_a_model.write_text("not a zip\n")
    assert (
        predict.main([str(world["photos"]), "--model", str(not_a_model), "--output", str(out)]) == 2
    )
    assert str(not_a_model) in capsys.readouterr().err

    assert (
        predict.main(
            [
                str(world["photos"]),
                "--model",
                "models:/no-such-model@champion",
                "--output",
                str(out),
                "--tracking-uri",
                world["uri"],
            ]
        )
        == 2
    )
    assert "no-such-model" in capsys.readouterr().err

    # the extension is checked before any work: the (missing) model is never looked at
    assert (
        predict.main(
            [str(world["photos"]), "--model", str(missing), "--output", str(tmp_path / "out.xlsx")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "out.xlsx" in err and ".xlsx" in err and str(missing) not in err
    assert not out.exists() and not (tmp_path / "out.xlsx").exists()


def test_module_runs_as_a_command_with_a_float_tflite_model(world, tmp_path):
    out = tmp_path / "tflite.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.predict",
            str(world["photos"]),
            "--model",
            str(world["tflite"]),
            "--output",
            str(out),
            "--top-k",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    check_agreement(world, out)
    check_reports(done.stdout, done.stderr)
    assert "\r" not in done.stderr and "img/s" not in done.stderr  # no bar off a terminal
    first = sorted(world["reference"])[0]
    expected = world["classes"][int(world["reference"][first].argmax())]
    [line] = [line for line in done.stdout.splitlines() if line.startswith(f"{first}: ")]
    assert re.fullmatch(rf"{re.escape(first)}: {expected} \d\.\d{{4}}", line)


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """Case predict-output-not-writable: one line naming the output and why, exit 2, before the
    model is even looked at (here it does not exist); the same from the command line."""
    missing_model = str(tmp_path / "no-model")
    (tmp_path / "a-file").write_text("x\n")
    (tmp_path / "taken.csv").mkdir()
    cases = {
        "/proc/nope/p.csv": "cannot create /proc/nope (",
        str(tmp_path / "a-file" / "p.json"): f"cannot create {tmp_path / 'a-file'} (",
        str(tmp_path / "taken.csv"): "is a folder",
    }
    for output, why in cases.items():
        assert predict.main([str(tmp_path), "--model", missing_model, "--output", output]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"error: --output {output}: ")
        assert len(captured.err.splitlines()) == 1
        assert why in captured.err and missing_model not in captured.err
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(tmp_path), "--model", missing_model]
        + ["--output", "/proc/nope/p.csv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --output /proc/nope/p.csv: cannot create /proc/nope (")
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_the_progress_bar_goes_to_a_terminal_only_never_into_the_results(world, tmp_path):
    """stderr a terminal (a pty), stdout a pipe: the bar is drawn on the terminal, stdout holds
    the result lines only."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    terminal, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.predict", str(world["photos"])]
        + ["--model", str(world["tflite"]), "--top-k", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=child_end,
        text=True,
    )
    os.close(child_end)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout = proc.communicate(timeout=300)[0]
    os.close(terminal)
    assert proc.returncode == 0, shown.decode(errors="replace")
    assert "predict: 100%" in shown.decode(errors="replace")
    lines = stdout.splitlines()
    assert len(lines) == 12 and all(re.fullmatch(r"\S+\.png: \S+ \d\.\d{4}", x) for x in lines)


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    [target] = re.findall(r'^truck-predict = "([^"]+)"$', text, flags=re.M)
    module, func = target.split(":")
    assert getattr(importlib.import_module(module), func) is predict.main


def wide_images(root: Path, per_class: int = 6) -> None:
    """Case predict-resize-mismatch: 3:1 images, the class's colour in the centre square and the
    next class's colour in the side thirds, so a centre crop and a stretch see different things."""
    from PIL import Image, ImageDraw

    palette = [(220, 30, 30), (30, 160, 40), (30, 60, 220)]
    for i, name in enumerate(["red", "green", "blue"]):
        for k in range(per_class):
            h = 96
            im = Image.new("RGB", (3 * h, h), palette[(i + 1) % 3])
            draw = ImageDraw.Draw(im)
            draw.rectangle([h, 0, 2 * h - 1, h - 1], fill=(235, 235, 235))
            m = 6 + 2 * k
            draw.ellipse([h + m, m, 2 * h - m, h - m], fill=palette[i])
            im.putpixel((k, 0), (k * 20, i * 50, 3))  # every file distinct
            (root / name).mkdir(parents=True, exist_ok=True)
            im.save(root / name / f"w_{k:02d}.png")


def test_a_crop_trained_model_predicts_as_evaluate_did(tmp_path, capsys):
    """predict resizes as training did, read from models/model.json: the same test
    images get the same predictions and confidences as in the evaluate stage's predictions.csv
    (and a stretch, the old default, gives others: the check can fail)."""
    from pipeline.evaluate import evaluate
    from pipeline.lib.config.schema import validate
    from tests.conftest import compose, tiny_overrides

    photos = tmp_path / "wide"
    wide_images(photos)
    overrides = tiny_overrides(
        tmp_path,
        **{
            "data.path": photos,
            "data.resize": "crop",
            "data.split.val": 0.0,
            "data.leakage": "warn",  # generated look-alikes: the audit's near-duplicates
            "model.alpha": 1.0,
            "model.weights": weights_file(),
        },
    )
    cfg = validate(compose(["data=folder", *(o for o in overrides if "data.synthetic." not in o)]))
    prepare(cfg)
    featurize(cfg)
    train(cfg)
    evaluate(cfg)
    models = Path(cfg.paths.models)
    card = ModelCard.load(models / CARD_FILE)
    assert (card.image_size, card.resize) == (SIZE, "crop")
    expected = pd.read_csv(Path(cfg.paths.reports) / "predictions.csv")
    test_files = tmp_path / "test_files"
    for rel in expected["path"]:
        (test_files / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / rel, test_files / rel)

    def predicted(*extra: str) -> pd.DataFrame:
        out = tmp_path / "out.json"
        rc = predict.main([str(test_files), "--model", str(models), "--output", str(out), *extra])
        assert rc == 0, capsys.readouterr().err
        got = pd.DataFrame(json.loads(out.read_text()))
        got["path"] = [Path(p).relative_to(test_files).as_posix() for p in got["path"]]
        return got.set_index("path").loc[list(expected["path"])]

    got = predicted()
    assert "resize crop" in capsys.readouterr().err
    assert list(got["predicted"]) == list(expected["predicted"])
    np.testing.assert_allclose(got["probability"], expected["confidence"], rtol=0, atol=1e-6)
    stretched = predicted("--resize", "stretch")
    assert not np.allclose(stretched["probability"], expected["confidence"], atol=1e-3)


def test_without_output_the_predictions_go_to_stdout_only(world, tmp_path, capsys):
    """`--output` is optional: one line per image on stdout, no file written."""
    images = sorted(world["photos"].rglob("*.png"))[:3]
    rc = predict.main([*map(str, images), "--model", str(world["models"])])
    captured = capsys.readouterr()
    assert rc == 0
    assert len(captured.out.strip().splitlines()) == 3
    assert "wrote" not in captured.err and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, message",
    [
        (["--batch-size", "abc"], "argument --batch-size: invalid positive integer value: 'abc'"),
        (["--top-k", "0"], "argument --top-k: must be >= 1, not 0"),
        (  # Pillow refuses such images before our check: the limit could not take effect
            ["--max-pixels", "178956971"],
            "--max-pixels must be <= 178956970: Pillow refuses larger images",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_them(option, message, capsys):
    with pytest.raises(SystemExit) as info:
        predict.main(["x.png", "--model", "models", *option])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_max_pixels_is_an_option_named_in_the_skip_warning(world, tmp_path, capsys):
    """Issue 25: predict's decompression-bomb limit was fixed at 60 MP. `--max-pixels` sets it
    (as `data.max_pixels` does in training), and a skipped image's warning names the option."""
    images = sorted(world["photos"].rglob("*.png"))[:2]
    with Image.open(images[0]) as im:
        pixels = im.width * im.height
    args = [*map(str, images), "--model", str(world["models"])]
    assert predict.main([*args, "--max-pixels", str(pixels - 1)]) == 2  # nothing predicted
    err = capsys.readouterr().err
    assert err.count("--max-pixels=") == 2 and "data.max_pixels" not in err, err
    assert predict.main([*args, "--max-pixels", str(pixels)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


FULL_OUTPUT = """
import resource, sys
sys.path.insert(0, {root!r})
import numpy as np
from pipeline.lib.inference.predict import _records, _write_output
rows = _records([f"p{{i}}.png" for i in range(2000)], np.ones((2000, 2)) / 2, ["a", "b"], 2,
                np.ones(2000, bool))
resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))  # EFBIG past 10 kB, as a full disk
_write_output({target!r}, rows, ["a", "b"])
"""


@pytest.mark.parametrize("name", ["out.csv", "OUT.Json"])
def test_a_full_disk_under_output_names_the_option_not_a_config_key(tmp_path, name):
    """--output on a full disk: the advice names --output (predict has no paths.* key), no half
    file is left."""
    code = FULL_OUTPUT.format(root=str(ROOT), target=str(tmp_path / name))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pipeline.lib.files.NoSpaceError: No space left to write {tmp_path}")
    assert "or set --output to a folder on another one" in last and "paths." not in last
    assert list(tmp_path.iterdir()) == []
