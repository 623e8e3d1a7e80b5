"""Predict the class of new images with a trained model: a local one, one from MLflow, or TFLite.

    python -m pipeline.predict photos/ --model models --output predictions.csv
    python -m pipeline.predict a.jpg b.png --model models/model.keras --output out.json --top-k 3
    python -m pipeline.predict photos/ --model models:/toy-truck-classifier@champion --output p.csv
    python -m pipeline.predict photos/ --model runs:/<run_id>/model --output p.csv
    python -m pipeline.predict photos/ --model model.tflite --classes classes.json --output p.csv

A tool users point at files, so plain argparse (no Hydra). Every image is decoded as `prepare`
decodes training images (`pipeline.lib.data.images.load_rgb`: EXIF orientation, RGB, transparency on white,
resized to the model's input size with `--resize`, by default the mode the model was trained with:
`preprocessing.json` beside the models/ folder, .keras or .tflite file, or the data report of an
MLflow model's run; `stretch` with a warning when the model carries none). Folders are searched
recursively; files that cannot be used are reported
(one warning line each, and a count) and skipped. One line per image goes to stdout; the full
scores to a CSV or JSON file, by the `--output` extension, written atomically.

Exit status: 0 when at least one image was predicted; 2 (one message, no stack trace) when the
model cannot be loaded, the output has an unknown extension, or no image could be predicted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.config.schema import DEFAULT_TRACKING_URI as DEFAULT_URI

OUTPUT_FORMATS = {".csv": "csv", ".json": "json"}
MLFLOW_SCHEMES = ("models:/", "runs:/")
MODEL_FILE = "model.keras"  # what the train stage writes (pipeline.train.MODEL_FILE)
CLASSES_FILE = "classes.json"
#: How the model's input images were made (pipeline.lib.model.saving.PREPROCESSING_FILE).
PREPROCESSING_FILE = "preprocessing.json"
#: Artifact of the training run that records the prepared data's classes and resize mode.
RUN_DATA_REPORT = "data/report.json"


class PredictError(Exception):
    """A user error: shown as one message, exit status 2."""


@dataclass
class Predictor:
    """A loaded model: what it is, its classes and input size, and images (N, S, S, 3) uint8 ->
    probabilities (N, C)."""

    source: str
    kind: str
    classes: list[str]
    image_size: int
    predict: Callable[[np.ndarray], np.ndarray]
    resize: str | None = None  # the resize mode recorded with the model, if any


# -- loading -----------------------------------------------------------------------------------


def is_mlflow_uri(model: str) -> bool:
    """True when `model` is an MLflow URI (`models:/...` or `runs:/...`) rather than a path."""
    return model.startswith(MLFLOW_SCHEMES)


def read_classes(path: Path, what: str) -> list[str]:
    """The class names in the JSON file `path` (a non-empty list of strings), label-index order.

    Raises PredictError (prefixed with `what`) when it cannot be read, is not JSON, or is not
    such a list.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            classes = json.load(fh)
    except OSError as exc:
        raise PredictError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise PredictError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise PredictError(f"{what}: {path} must hold a JSON list of class names")
    return list(classes)


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 400 else first[:397] + "..."


def _fixed_size(shape: Sequence[Any] | None, source: str) -> int:
    """The square input side of a (batch, S, S, 3) shape."""
    dims = list(shape or [])
    if len(dims) != 4 or dims[3] != 3 or not dims[1] or dims[1] != dims[2] or int(dims[1]) < 1:
        raise PredictError(
            f"model {source}: expects inputs of shape {tuple(dims)}, not square "
            "RGB images (batch, size, size, 3)"
        )
    return int(dims[1])


def _keras_predict(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    # a direct (eager) call: `predict_on_batch` traces a graph per batch shape, which costs more
    # than it saves on the few batches a prediction run has
    def predict(images: np.ndarray) -> np.ndarray:
        """float64 (N, C) probabilities of uint8/float (N, S, S, 3) images, in inference mode."""
        return np.asarray(model(images.astype(np.float32), training=False), dtype=np.float64)

    return predict


def load_local_keras(path: Path, source: str) -> tuple[Any, Path]:
    """A `.keras` file, or a folder holding `model.keras` (the train stage's `models/`)."""
    from pipeline.lib.model.build import load_model

    file = path / MODEL_FILE if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise PredictError(
            f"model {source}: the folder has no {MODEL_FILE} (point --model at the "
            "train stage's models/ folder, a .keras or .tflite file, or an MLflow "
            "URI such as models:/toy-truck-classifier@champion)"
        )
    try:
        return load_model(file), file
    except Exception as exc:  # noqa: BLE001 (any load failure is reported with its reason)
        raise PredictError(
            f"model {source}: cannot load {file} as a Keras model ({_reason(exc)})"
        ) from None


def tflite_predict(
    path: Path, source: str, threads: int | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """Run a `.tflite` model (`pipeline.lib.model.tflite.TFLiteRunner`: float32 inputs/outputs,
    or quantized int8/uint8 ones converted with the tensors' scale and zero point). Returns
    (predict: images (N, S, S, 3) -> float32 probabilities (N, C), input size S)."""
    from pipeline.lib.model.tflite import TFLiteRunner

    try:
        runner = TFLiteRunner(path, threads)
    except ValueError as exc:
        raise PredictError(
            f"model {source}: cannot load it as a TensorFlow Lite model ({_reason(exc)})"
        ) from None
    return runner, _fixed_size(runner.input_shape, source)


def _tracking_uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def load_mlflow(
    uri: str, tracking_uri: str
) -> tuple[Callable[[np.ndarray], np.ndarray], int, Any, str]:
    """Load an MLflow model URI (the Keras flavour if it has one, else pyfunc) from the current
    tracking store. Returns (predict, input size, model info, flavour)."""
    import mlflow

    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as exc:  # noqa: BLE001
        raise PredictError(f"model {uri}: not found in {tracking_uri} ({_reason(exc)})") from None
    try:
        if "keras" in info.flavors:
            import mlflow.keras

            model = mlflow.keras.load_model(uri)
            return _keras_predict(model), _fixed_size(model.input_shape, uri), info, "keras"
        model = mlflow.pyfunc.load_model(uri)
    except PredictError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PredictError(
            f"model {uri}: cannot load it from {tracking_uri} ({_reason(exc)})"
        ) from None
    classifier = _image_classifier(model)
    if classifier is not None:  # the pipeline's own pyfunc model: its Keras model, as is
        return _keras_predict(classifier.model), classifier.image_size, info, "keras"
    specs = info.signature.inputs.inputs if info.signature and info.signature.inputs else []
    shape = getattr(specs[0], "shape", None) if len(specs) == 1 else None
    if shape is None:
        raise PredictError(
            f"model {uri}: its signature does not give the input shape (batch, size, size, 3)"
        )

    def predict(images: np.ndarray) -> np.ndarray:
        """float64 (N, C) probabilities of (N, S, S, 3) images, through the MLflow model."""
        return np.asarray(model.predict(images.astype(np.float32)), dtype=np.float64)

    return predict, _fixed_size(shape, uri), info, "pyfunc"


def _image_classifier(model: Any) -> Any | None:
    """The `ImageClassifier` inside a pyfunc model logged by train
    (`pipeline.lib.tracking.pyfunc_model`), else None."""
    try:
        return getattr(model.unwrap_python_model(), "classifier", None)
    except Exception:  # noqa: BLE001 (not a PythonModel)
        return None


def run_data_report(run_id: str | None) -> dict[str, Any] | None:
    """The training run's data report (classes, resize mode), or None when it has none."""
    if not run_id:
        return None
    import mlflow

    try:
        report = mlflow.artifacts.load_dict(f"runs:/{run_id}/{RUN_DATA_REPORT}")
    except Exception:  # noqa: BLE001 (no such artifact: the caller says what is missing)
        return None
    return report if isinstance(report, dict) else None


def read_preprocessing(path: Path, what: str) -> dict[str, Any] | None:
    """The preprocessing record `path` (models/preprocessing.json: {"image_size": int px,
    "resize": "stretch"|"pad"|"crop"}), or None when there is no such file.

    Raises PredictError when the file exists but is not such a record."""
    from pipeline.lib.data.images import RESIZE_POLICIES

    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as exc:
        raise PredictError(f"{what}: cannot read {path} ({_reason(exc)})") from None
    if not (
        isinstance(record, dict)
        and record.get("resize") in RESIZE_POLICIES
        and isinstance(record.get("image_size"), int)
    ):
        raise PredictError(
            f'{what}: {path} must hold {{"image_size": <px>, "resize": one of '
            f"{', '.join(RESIZE_POLICIES)}}}"
        )
    return record


def _from_mlflow(
    model: str, tracking_uri: str | None, classes: list[str] | None
) -> tuple[Callable[[np.ndarray], np.ndarray], int, str, list[str], str | None]:
    """(predict, input size, kind, classes, resize) of an MLflow model URI; the classes and the
    resize mode come from its training run's data report."""
    import mlflow

    from pipeline.lib.tracking.compare import StoreError, check_store

    uri = _tracking_uri(tracking_uri)
    try:
        check_store(uri)  # a missing store is reported, never created
    except StoreError as exc:
        raise PredictError(f"model {model}: {exc}") from None
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        predict, size, info, kind = load_mlflow(model, uri)
        report = run_data_report(info.run_id) or {}
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)
    if classes is None and isinstance(report.get("classes"), list):
        classes = [str(c) for c in report["classes"]]
    if classes is None:
        raise PredictError(
            f"model {model}: its run ({info.run_id}) has no {RUN_DATA_REPORT} "
            "with the class names; pass them with --classes classes.json"
        )
    return predict, size, f"mlflow {kind}", classes, report.get("resize")


def _from_file(
    model: str, classes_file: str | None, classes: list[str] | None, threads: int | None
) -> tuple[Callable[[np.ndarray], np.ndarray], int, str, list[str], str | None]:
    """(predict, input size, kind, classes, resize) of a models/ folder, .keras or .tflite file;
    classes.json and preprocessing.json are read from beside the model file (for a .tflite file
    also from beside `--classes`)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise PredictError(f"model {model}: no such file or folder")
    if path.suffix.lower() == ".tflite" and path.is_file():
        predict, size = tflite_predict(path, model, threads)
        kind, folder = "tflite", path.parent
    elif path.is_dir() or path.suffix.lower() == ".keras":
        net, file = load_local_keras(path, model)
        predict, size = _keras_predict(net), _fixed_size(net.input_shape, model)
        kind, folder = "keras", file.parent
    else:
        raise PredictError(
            f"model {model}: unknown model type (expected a models/ folder, a "
            ".keras or .tflite file, or models:/... or runs:/... URI)"
        )
    if classes is None:
        beside = folder / CLASSES_FILE
        if not beside.is_file():
            raise PredictError(
                f"model {model}: no {CLASSES_FILE} next to it ({beside}); pass "
                "the class names with --classes classes.json"
            )
        classes = read_classes(beside, f"model {model}")
    places = [folder] + ([Path(classes_file).parent] if classes_file else [])
    for place in places:
        record = read_preprocessing(place / PREPROCESSING_FILE, f"model {model}")
        if record is not None:
            if record["image_size"] != size:
                raise PredictError(
                    f"model {model}: {place / PREPROCESSING_FILE} says {record['image_size']} "
                    f"px, but the model takes {size} px images: they are not from one training"
                )
            return predict, size, kind, classes, record["resize"]
    return predict, size, kind, classes, None


def load_predictor(
    model: str,
    tracking_uri: str | None = None,
    classes_file: str | None = None,
    threads: int | None = None,
) -> Predictor:
    """Load `model` (a models/ folder, a .keras or .tflite file, or an MLflow model URI) with its
    class names and the resize mode it was trained with (`Predictor.resize`; None when the model
    carries none); PredictError names the model and the reason when it cannot be used."""
    classes = read_classes(Path(classes_file), "--classes") if classes_file else None
    if is_mlflow_uri(model):
        predict, size, kind, classes, resize = _from_mlflow(model, tracking_uri, classes)
    else:
        predict, size, kind, classes, resize = _from_file(model, classes_file, classes, threads)
    probe = predict(np.zeros((1, size, size, 3), dtype=np.uint8))
    if probe.ndim != 2 or probe.shape[1] != len(classes):
        raise PredictError(
            f"model {model}: it has {probe.shape[-1]} outputs but {len(classes)} "
            f"class names ({', '.join(classes)})"
        )
    return Predictor(
        source=model, kind=kind, classes=classes, image_size=size, predict=predict, resize=resize
    )


# -- inputs ------------------------------------------------------------------------------------


def collect(paths: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]], bool]:
    """(image files to predict, [(path, why skipped)], whether any input was a folder).

    Folders are searched recursively, in sorted order, for the extensions `prepare` takes
    (hidden and system files are left out silently; other files are reported as skipped);
    files named directly are always tried, whatever their extension."""
    from pipeline.lib.data.images import CANDIDATE_EXTENSIONS
    from pipeline.lib.data.sources.folder import is_ignored

    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    any_folder = False
    for name in paths:
        path = Path(name)
        if path.is_dir():
            any_folder = True
            found: list[Path] = []
            for root, dirs, names in os.walk(
                path,
                onerror=lambda e: skipped.append(
                    (e.filename, f"unreadable folder ({e.strerror or e})")
                ),
            ):
                dirs[:] = sorted(d for d in dirs if not is_ignored(d))
                for entry in sorted(names):
                    file = Path(root) / entry
                    if is_ignored(entry):
                        continue
                    if file.suffix.lower() in CANDIDATE_EXTENSIONS:
                        found.append(file)
                    else:
                        skipped.append(
                            (
                                str(file),
                                f"not an image file ({file.suffix.lower() or 'no extension'})",
                            )
                        )
            if not found:
                skipped.append((str(path), "folder with no image files"))
            files.extend(sorted(found))
        elif path.exists():
            files.append(path)
        else:
            skipped.append((name, "no such file or folder"))
    return files, skipped, any_folder


def decoded_batches(
    files: list[Path], size: int, resize: str, batch_size: int, on_bad: Callable[[Path, str], None]
) -> Iterator[tuple[list[Path], np.ndarray, int]]:
    """(files, images, files consumed) batches; undecodable files go to `on_bad`."""
    from pipeline.lib.data.images import RejectedImage, load_rgb

    batch: list[Path] = []
    arrays: list[np.ndarray] = []
    consumed = 0
    for file in files:
        consumed += 1
        try:
            arrays.append(load_rgb(file, size, resize=resize))
            batch.append(file)
        except RejectedImage as exc:
            on_bad(file, exc.reason)
        except OSError as exc:
            on_bad(file, f"cannot read file ({exc.strerror or exc})")
        if len(batch) == batch_size:
            yield batch, np.stack(arrays), consumed
            batch, arrays, consumed = [], [], 0
    if batch or consumed:
        yield (
            batch,
            (np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)),
            consumed,
        )


# -- outputs -----------------------------------------------------------------------------------


def output_format(path: str) -> str:
    """The output format (`csv` or `json`) for the --output path, from its extension.

    Raises PredictError for any other extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise PredictError(
            f"--output {path}: unknown extension {suffix or '(none)'!r}; use "
            f"{' or '.join(OUTPUT_FORMATS)}"
        )
    return OUTPUT_FORMATS[suffix]


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes, most probable first (ties: class order)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


def records(
    paths: list[str], probs: np.ndarray, classes: list[str], k: int
) -> list[dict[str, Any]]:
    """One record per image: `path`, `predicted` class, its `probability`, the best `k` as
    `top_k` [{class, probability}], and `scores` {class: probability} over all C classes.
    `probs` is (N, C), aligned with `paths`.
    """
    out = []
    for path, p in zip(paths, probs, strict=False):
        best = top_k(p, classes, k)
        out.append(
            {
                "path": path,
                "predicted": best[0][0],
                "probability": best[0][1],
                "top_k": [{"class": c, "probability": v} for c, v in best],
                "scores": {c: float(v) for c, v in zip(classes, p, strict=False)},
            }
        )
    return out


def write_output(path: str, fmt: str, rows: list[dict[str, Any]], classes: list[str]) -> None:
    """Write `rows` to `path` atomically: JSON (the records as they are) when `fmt` is `json`,
    else CSV with path, predicted, probability and one column per class (6 decimals).
    """
    from pipeline.lib.files import atomic_file, write_json

    if fmt == "json":
        write_json(path, rows)
        return
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "predicted", "probability", *classes])
        for row in rows:
            writer.writerow(
                [
                    row["path"],
                    row["predicted"],
                    round(row["probability"], 6),
                    *(round(row["scores"][c], 6) for c in classes),
                ]
            )


def format_line(row: dict[str, Any]) -> str:
    """`path: class p, class p, ...`: an image's top classes with 4-decimal probabilities."""
    return f"{row['path']}: " + ", ".join(
        f"{t['class']} {t['probability']:.4f}" for t in row["top_k"]
    )


# -- command -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command-line parser of `python -m pipeline.predict`."""
    from pipeline.lib.data.images import RESIZE_POLICIES

    def positive(text: str) -> int:
        """argparse type: `text` as an int >= 1 (ArgumentTypeError otherwise)."""
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
        return value

    p = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Predict the classes of images (files or folders, searched recursively) with "
        "a trained model; print the top classes per image and write CSV or JSON.",
    )
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument(
        "--model",
        required=True,
        help="the train stage's models/ folder, a .keras or .tflite file, or an MLflow "
        "URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model",
    )
    p.add_argument(
        "--output",
        help="also write every image's scores to a .csv or .json file (stdout gets one line per "
        "image either way)",
    )
    p.add_argument("--top-k", type=positive, default=3, help="classes shown per image (default 3)")
    p.add_argument("--batch-size", type=positive, default=32, help="images per batch (default 32)")
    p.add_argument(
        "--resize",
        choices=RESIZE_POLICIES,
        default=None,
        help="how images are made square, as data.resize in prepare (default: the mode the "
        "model was trained with: preprocessing.json beside a models/ folder, .keras or .tflite "
        "file (or beside --classes), or an MLflow model's run; else stretch, with a warning)",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="JSON list of class names in output order (default: classes.json next to "
        "the model, or the MLflow run's data report)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each image's scores with its horizontal flip's "
        "(two model calls per image)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store for models:/ and runs:/ URIs (default $MLFLOW_TRACKING_URI, "
        f"else {DEFAULT_URI})",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Predict every image in `args.inputs` with `args.model`; return the exit status (0).

    Prints one line per image (its top `args.top_k` classes) to stdout as it goes, writes every
    prediction to `args.output` when given (CSV or JSON, by its extension) and a summary to
    stderr. Undecodable files and unusable paths are skipped with a warning.

    Raises PredictError: a bad output path or model, or no image could be predicted at all.
    """
    fmt = output_format(args.output) if args.output else None  # before any work
    predictor = load_predictor(args.model, args.tracking_uri, args.classes)
    resize = _resize_mode(args, predictor)
    files, skipped, any_folder = collect(args.inputs)
    for path, why in skipped:
        _warn_skipped(path, why)
    bad: list[tuple[str, str]] = []
    k = min(args.top_k, len(predictor.classes))
    done_paths, chunks = _predict_files(args, predictor, files, resize, k, any_folder, bad)
    if not done_paths:
        what = ", ".join(args.inputs)
        raise PredictError(
            f"no image was predicted from {what}: "
            + (f"{len(bad)} file(s) could not be decoded" if bad else "no image files found")
        )
    rows = records(done_paths, np.concatenate(chunks), predictor.classes, k)
    if args.output:
        write_output(args.output, fmt, rows, predictor.classes)
    problems = len(bad) + sum(1 for _, why in skipped if why != "folder with no image files")
    print(
        f"Predicted {len(rows)} image(s) with {args.model} ({predictor.kind}, "
        f"{predictor.image_size} px, resize {resize}); {problems} file(s) skipped"
        + (f"; wrote {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def _resize_mode(args: argparse.Namespace, predictor: Predictor) -> str:
    """The resize policy: --resize, else the model's recorded one, else "stretch" (warned)."""
    resize = args.resize or predictor.resize or "stretch"
    if args.resize is None and predictor.resize is None:
        print(
            f"warning: {args.model} carries no {PREPROCESSING_FILE} (nor an MLflow data report): "
            "images are resized with stretch; pass --resize as the model was trained "
            "(data.resize)",
            file=sys.stderr,
        )
    return resize


def _warn_skipped(path: str, why: str) -> None:
    """A warning on stderr that `path` was skipped, printed above the progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: skipped {path}: {why}", file=sys.stderr)


def _predict_files(
    args: argparse.Namespace,
    predictor: Predictor,
    files: list[Path],
    resize: str,
    k: int,
    any_folder: bool,
    bad: list[tuple[str, str]],
) -> tuple[list[str], list[np.ndarray]]:
    """Decode and predict `files` in batches, printing each image's top-`k` line as it goes.

    Returns the predicted paths and their probabilities, float (n_i, C) per batch (the flip
    averaged in with `args.tta`). Undecodable files are warned about and appended to `bad`.
    The progress bar shows only when an input was a folder.
    """
    from tqdm import tqdm

    def on_bad(file: Path, why: str) -> None:
        """Remember `file` as undecodable for `why`, and warn about it."""
        bad.append((str(file), why))
        _warn_skipped(str(file), why)

    done_paths: list[str] = []
    chunks: list[np.ndarray] = []
    with tqdm(
        total=len(files), unit="img", desc="predict", file=sys.stderr, disable=not any_folder
    ) as bar:
        for batch, images, consumed in decoded_batches(
            files, predictor.image_size, resize, args.batch_size, on_bad
        ):
            if batch:
                probs = predictor.predict(images)
                if args.tta:  # the flip of each image, averaged (pipeline.lib.model.tta)
                    from pipeline.lib.model.tta import hflip

                    probs = (probs + predictor.predict(hflip(images))) / 2
                for row in records([str(f) for f in batch], probs, predictor.classes, k):
                    tqdm.write(format_line(row), file=sys.stdout)
                done_paths.extend(str(f) for f in batch)
                chunks.append(probs)
            bar.update(consumed)
    return done_paths, chunks


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: predict, and return the exit status (0; 2 after a PredictError, printed as
    one line; 130 when interrupted).
    """
    args = parser().parse_args(argv)
    try:
        return run(args)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
