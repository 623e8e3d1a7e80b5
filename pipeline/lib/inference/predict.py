"""`python -m pipeline.predict`: predict the classes of new images with a trained model:

    python -m pipeline.predict photos/ --model models --output predictions.csv
    python -m pipeline.predict photos/ --model models:/toy-truck-classifier@champion --output p.csv
    python -m pipeline.predict photos/ --model exports/model_int8.tflite --output p.json --top-k 3

A models/ folder or an MLflow model (runs:/, models:/) runs as the `Classifier` evaluate uses; an
exported `.tflite`/`.keras` file with the classes and resize mode of the model.json beside it (or
`--classes`). Images decode as in `prepare`, in threads; folders are searched recursively; unusable
files are skipped with a warning. Exit status 0; 2 (one line) when the model cannot be loaded,
`--output` cannot be written (checked first) or no image was predicted; 130 when interrupted."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.lib.config.schema import DEFAULT_TRACKING_URI, MAX_PIXELS, PILLOW_MAX_PIXELS
from pipeline.lib.data.images import CANDIDATE_EXTENSIONS, RESIZE_POLICIES, RejectedImage, load_rgb
from pipeline.lib.data.sources.folder import is_ignored
from pipeline.lib.errors import StageInputError, UserError
from pipeline.lib.files import atomic_file, read_json, write_json
from pipeline.lib.model import build
from pipeline.lib.model.classifier import CARD_FILE, Classifier, ModelCard, hflip
from pipeline.lib.model.features import read_ahead, usable_cores
from pipeline.lib.model.reject import UNKNOWN
from pipeline.lib.model.tflite import TFLiteRunner
from pipeline.lib.tracking.compare import check_store
from pipeline.lib.tracking.store import TrackingError, first_line

OUTPUT_FORMATS = (".csv", ".json")


class PredictError(UserError):
    """A user error of this tool: shown as one message, exit status 2 (as any UserError)."""


@dataclass
class Predictor:
    """A loaded model: kind, classes, input side, resize mode (None: not recorded), and (images
    (N, S, S, 3), tta) -> (float64 probabilities (N, C), bool (N,) accepted by its reject rule)."""

    kind: str
    classes: list[str]
    image_size: int
    classify: Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray]]
    resize: str | None


def _classifier(folder: Path, source: str, kind: str) -> Predictor:
    try:
        c = Classifier.load(folder)
        c.backbone  # noqa: B018  (load the interpreters now: a bad file is a PredictError here)
    except StageInputError as exc:
        raise PredictError(f"model {source}: {first_line(exc)}") from None
    return Predictor(kind, c.classes, c.image_size, c.classify, c.card.resize)


def _from_mlflow(uri: str, tracking_uri: str | None) -> Predictor:
    import mlflow  # ~1 s: only for MLflow URIs

    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        check_store(store)  # a missing store is reported, never created
    except TrackingError as exc:
        raise PredictError(f"model {uri}: {exc}") from None
    try:  # models:/ URIs resolve in the registry of this store
        where = {"dst_path": tempfile.mkdtemp(), "tracking_uri": store, "registry_uri": store}
        local = Path(mlflow.artifacts.download_artifacts(uri, **where))
    except Exception as exc:  # noqa: BLE001 (any lookup failure is reported with its reason)
        hint = (
            " (`python -m pipeline.registry list` names this project's model; `promote` sets @champion)"
            if "@" in uri
            else ""
        )
        raise PredictError(f"model {uri}: not found in {store} ({first_line(exc)}){hint}") from None
    cards = sorted(local.rglob(CARD_FILE))
    if not cards:
        raise PredictError(f"model {uri}: not a model logged by the train stage (no {CARD_FILE})")
    return _classifier(cards[0].parent, uri, "mlflow")


def _from_file(path: Path, source: str, classes_file: str | None) -> Predictor:
    """An exported model (no reject rule); classes and resize from the model.json beside it (or
    beside `--classes`)."""
    try:
        if path.suffix.lower() == ".tflite":
            model, kind = TFLiteRunner(path), "tflite"
        else:  # imports TensorFlow: only for .keras files
            model, kind = build.load_model(path), "keras"
        size = int(model.input_shape[1])
    except Exception as exc:  # noqa: BLE001 (any load failure is reported with its reason)
        raise PredictError(f"model {source}: cannot load {path} ({first_line(exc)})") from None
    places = [path.parent] + ([Path(classes_file).parent] if classes_file else [])
    card = next((ModelCard.load(p / CARD_FILE) for p in places if (p / CARD_FILE).is_file()), None)
    if card is not None and card.image_size != size:
        raise PredictError(
            f"model {source}: {CARD_FILE} beside it says {card.image_size} px, but the model "
            f"takes {size} px images: they are not from one training"
        )
    if card is None and classes_file is None:
        raise PredictError(
            f"model {source}: no {CARD_FILE} next to it; pass the class names with "
            "--classes classes.json"
        )

    def predict(images: np.ndarray) -> np.ndarray:
        if kind == "tflite":
            return model(images)
        return np.asarray(model(images.astype(np.float32), training=False), dtype=np.float64)

    def classify(images: np.ndarray, tta: bool) -> tuple[np.ndarray, np.ndarray]:
        probs = predict(images)
        probs = (probs + predict(hflip(images))) / 2 if tta else probs
        return probs, np.ones(len(probs), dtype=bool)

    return Predictor(kind, card.classes if card else [], size, classify, card and card.resize)


def _load_predictor(model: str, tracking_uri: str | None, classes_file: str | None) -> Predictor:
    path = Path(model).expanduser()
    if model.startswith(("models:/", "runs:/")):
        predictor = _from_mlflow(model, tracking_uri)
    elif not path.exists():
        raise PredictError(f"model {model}: no such file or folder")
    elif path.is_dir():
        predictor = _classifier(path, model, "model folder")
    elif path.suffix.lower() in (".tflite", ".keras"):
        predictor = _from_file(path, model, classes_file)
    else:
        raise PredictError(
            f"model {model}: unknown model type (expected a models/ folder, a .tflite or .keras "
            "export, or a models:/... or runs:/... URI)"
        )
    if classes_file:
        try:
            classes = predictor.classes = read_json(classes_file)
        except (OSError, ValueError) as exc:
            raise PredictError(
                f"--classes: cannot read {classes_file} ({first_line(exc)})"
            ) from None
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise PredictError(f"--classes: {classes_file} must hold a JSON list of class names")
    size = predictor.image_size
    width = predictor.classify(np.zeros((1, size, size, 3), dtype=np.uint8), False)[0].shape[-1]
    if width != len(predictor.classes):
        raise PredictError(
            f"model {model}: it has {width} outputs but {len(predictor.classes)} class names "
            f"({', '.join(predictor.classes)})"
        )
    return predictor


def _collect(paths: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files, [(path, why skipped)]): folders searched recursively, in sorted order, for
    the extensions `prepare` takes (hidden and system files left out silently); files named
    directly are always tried, whatever their extension."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []

    def unreadable(error: OSError) -> None:
        skipped.append((error.filename, f"unreadable folder ({error.strerror})"))

    for name in paths:
        path = Path(name)
        if not path.is_dir():
            if path.exists():
                files.append(path)
            else:
                skipped.append((name, "no such file or folder"))
            continue
        found: list[Path] = []
        for root, dirs, names in os.walk(path, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not is_ignored(d))
            for file in (Path(root) / n for n in sorted(names) if not is_ignored(n)):
                suffix = file.suffix.lower()
                if suffix in CANDIDATE_EXTENSIONS:
                    found.append(file)
                else:
                    skipped.append((str(file), f"not an image file ({suffix or 'no extension'})"))
        if not found:
            skipped.append((str(path), "folder with no image files"))
        files.extend(sorted(found))
    return files, skipped


def _decoded_batches(
    files: list[Path], size: int, resize: str, batch_size: int, max_pixels: int
) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    """Batches of (file, image or why not); the next batch decodes while the caller predicts."""

    def decode(file: Path) -> np.ndarray | str:
        try:
            return load_rgb(file, size, resize, max_pixels)
        except RejectedImage as exc:
            return exc.reason.replace("data.max_pixels", "--max-pixels")
        except OSError as exc:
            return f"cannot read file ({exc.strerror or exc})"

    with ThreadPoolExecutor(usable_cores()) as pool:
        chunks = (files[i : i + batch_size] for i in range(0, len(files), batch_size))
        yield from read_ahead(list(zip(c, pool.map(decode, c), strict=True)) for c in chunks)


def _check_output(path: str) -> None:
    """PredictError unless `path` is a .csv/.json name whose folder exists (created) and takes a
    new file."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in OUTPUT_FORMATS or target.is_dir():
        what = "is a folder" if target.is_dir() else f"unknown extension {suffix or '(none)'!r}"
        raise PredictError(f"--output {path}: {what}; name a {' or '.join(OUTPUT_FORMATS)} file")
    folder, step = target.parent, "create"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        step = "write in"
        tempfile.TemporaryFile(dir=folder).close()  # what atomic_file will need
    except OSError as exc:
        raise PredictError(
            f"--output {path}: cannot {step} {folder} ({exc.strerror or exc})"
        ) from None


def _records(
    paths: list[str], probs: np.ndarray, classes: list[str], k: int, accepted: np.ndarray
) -> list[dict[str, Any]]:
    """Per image: `path`, `predicted` (`unknown` where not `accepted`), its `probability`, the
    best `k` as `top_k` [{class, probability}] (ties: class order), `scores` {class: p}."""
    out = []
    for path, p, ok in zip(paths, probs, accepted, strict=True):
        best = [(classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]]
        out.append(
            {
                "path": path,
                "predicted": best[0][0] if ok else UNKNOWN,
                "probability": best[0][1],
                "top_k": [{"class": c, "probability": v} for c, v in best],
                "scores": {c: float(v) for c, v in zip(classes, p, strict=True)},
            }
        )
    return out


def _write_output(path: str, rows: list[dict[str, Any]], classes: list[str]) -> None:
    """JSON: the records as they are; CSV: path, predicted, probability, one column per class."""
    if path.lower().endswith(".json"):
        write_json(path, rows, key="--output")
        return
    with atomic_file(path, key="--output") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "predicted", "probability", *classes])
        for r in rows:
            scores = (round(r["scores"][c], 6) for c in classes)
            writer.writerow([r["path"], r["predicted"], round(r["probability"], 6), *scores])


def _format_line(row: dict[str, Any]) -> str:
    shown = ", ".join(f"{t['class']} {t['probability']:.4f}" for t in row["top_k"])
    return f"{row['path']}: {'unknown (rejected); ' * (row['predicted'] == UNKNOWN)}{shown}"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


_positive.__name__ = "positive integer"  # argparse: "invalid positive integer value: 'abc'"


def _parser() -> argparse.ArgumentParser:
    about = "Predict the classes of images (files or folders, searched recursively) with a "
    about += "trained model; print the top classes per image and write CSV or JSON."
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description=about)
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders")
    models = "a models/ folder, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
    p.add_argument("--model", required=True, help=models + "or an exported .tflite/.keras file")
    p.add_argument("--output", help="also write every image's scores to a .csv or .json file")
    p.add_argument("--top-k", type=_positive, default=3, help="classes shown per image (3)")
    p.add_argument("--batch-size", type=_positive, default=32, help="images per batch (32)")
    p.add_argument("--resize", choices=RESIZE_POLICIES, help="as data.resize (default: model's)")
    p.add_argument("--classes", help="JSON list of class names (default: the model's model.json)")
    p.add_argument("--tta", action="store_true", help="average with the horizontal flip's scores")
    pixels = f"larger images are skipped, as data.max_pixels in training ({MAX_PIXELS:,})"
    p.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, help=pixels)
    uri = f"for MLflow URIs ($MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})"
    p.add_argument("--tracking-uri", help=uri)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.output:
        _check_output(args.output)  # before any work
    predictor = _load_predictor(args.model, args.tracking_uri, args.classes)
    resize = args.resize or predictor.resize or "stretch"
    if args.resize is None and predictor.resize is None:
        warn = f"warning: {args.model} carries no {CARD_FILE}: images are resized with stretch; "
        print(warn + "pass --resize as the model was trained (data.resize)", file=sys.stderr)
    files, skipped = _collect(args.inputs)
    for path, why in skipped:
        tqdm.write(f"warning: skipped {path}: {why}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    bad, k, size = 0, min(args.top_k, len(predictor.classes)), predictor.image_size
    # a bar on stderr if an input was a folder and stderr is a terminal (tqdm's `disable=None`)
    disable = None if any(Path(name).is_dir() for name in args.inputs) else True
    with tqdm(total=len(files), unit="img", desc="predict", disable=disable) as bar:
        for batch in _decoded_batches(files, size, resize, args.batch_size, args.max_pixels):
            good = [(f, image) for f, image in batch if isinstance(image, np.ndarray)]
            for f, why in ((f, x) for f, x in batch if isinstance(x, str)):
                tqdm.write(f"warning: skipped {f}: {why}", file=sys.stderr)
                bad += 1
            if good:
                probs, accepted = predictor.classify(np.stack([i for _, i in good]), args.tta)
                new = _records([str(f) for f, _ in good], probs, predictor.classes, k, accepted)
                for row in new:  # each image's line as it goes
                    tqdm.write(_format_line(row), file=sys.stdout)
                rows.extend(new)
            bar.update(len(batch))
    if not rows:
        what = ", ".join(args.inputs)
        found = f"{bad} file(s) could not be decoded" if bad else "no image files found"
        raise PredictError(f"no image was predicted from {what}: {found}")
    if args.output:
        try:
            _write_output(args.output, rows, predictor.classes)
        except OSError as exc:
            raise PredictError(
                f"--output {args.output}: not written ({first_line(exc)}); the lines above are the "
                "predictions"
            ) from None
    problems = bad + sum(1 for _, why in skipped if why != "folder with no image files")
    done = f"Predicted {len(rows)} image(s) with {args.model} ({predictor.kind}, "
    done += f"{predictor.image_size} px, resize {resize}); {problems} file(s) skipped"
    print(done + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: the exit status (see the module; 141, quietly, when stdout closes early)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_pixels > PILLOW_MAX_PIXELS:
        parser.error(f"--max-pixels must be <= {PILLOW_MAX_PIXELS}: Pillow refuses larger images")
    try:
        return _run(args)
    except UserError as exc:  # e.g. a malformed model.json beside an exported model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
