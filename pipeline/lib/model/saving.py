"""The trained-model folder (`paths.models`): what train writes, what evaluate and export read,
and `save_model`, which writes a `.keras` archive whose bytes depend only on the model.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from pipeline.lib.errors import StageInputError
from pipeline.lib.files import md5_file, read_json, write_json

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
#: How images are turned into the model's input: {"image_size": int (px), "resize": str}.
#: Written by train; predict reads it so that inference resizes exactly as training did.
PREPROCESSING_FILE = "preprocessing.json"
#: The trained Dense head alone, as one float32 (D + 1, C) `.npy` array: the kernel's D rows, then
#: the bias row (temperature folded in, as in model.keras). Evaluate and export score the cached
#: backbone features with it, with no TensorFlow; train checks model.keras agrees with it.
HEAD_FILE = "head.npy"
#: What train checked head.npy against: {"features_md5": the DVC hash of `paths.features` on
#: which the whole model agreed with the head (null: no cached features matched, so later stages
#: run the whole model), "head_md5" / "model_md5": the md5s of head.npy and model.keras as
#: saved}. Evaluate and export use the head only on those very features, with that very pair.
HEAD_RECORD_FILE = "head.json"


def trained_model_folder(cfg: Any, dataset: Any) -> tuple[Path, list[str]]:
    """(`paths.models`, its classes) once it holds a model trained on `dataset`'s classes; else a
    StageInputError saying to run train. For the stages after train (evaluate, export)."""
    models = Path(cfg.paths.models)
    if not (models / MODEL_FILE).is_file():
        raise StageInputError(
            f"No trained model at {models / MODEL_FILE}: run the train stage "
            "first (`dvc repro train` or `python -m pipeline.train`)."
        )
    classes = list(read_json(models / CLASSES_FILE))
    if classes != dataset.classes:
        raise StageInputError(
            f"The model in {models} was trained on classes {classes}, but the "
            f"prepared data has {dataset.classes}: rerun train (`dvc repro`)."
        )
    return models, classes


def write_head(
    folder: str | os.PathLike[str], kernel: Any, bias: Any, features_md5: str | None
) -> Path:
    """Write the head `kernel` (D, C) and `bias` (C,) into `folder` as `HEAD_FILE`'s float32
    (D + 1, C) array (`np.save`: the bytes depend only on the values) and `HEAD_RECORD_FILE`
    ({"features_md5": `features_md5`}); return the head file's path."""
    import numpy as np

    array = np.vstack([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)[None, :]])
    path = Path(folder) / HEAD_FILE
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    record = {
        "features_md5": features_md5,
        "head_md5": md5_file(path),
        "model_md5": md5_file(Path(folder) / MODEL_FILE),
    }
    write_json(Path(folder) / HEAD_RECORD_FILE, record)
    return path


def head_record(models: str | os.PathLike[str]) -> dict[str, Any]:
    """`models`/`HEAD_RECORD_FILE` ({} when there is none: a models/ folder of an older version).

    Raises:
        StageInputError: the file is not a JSON object (naming it).
    """
    path = Path(models) / HEAD_RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise StageInputError(
            f"{path} is not the JSON object train writes: rerun the train stage "
            "(`dvc repro -f train`)."
        )
    return record


def read_head(models: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(kernel float32 (D, C), bias float32 (C,)) from `models`/`HEAD_FILE`.

    Raises:
        StageInputError: the file is missing or not a (D + 1, C) float array (naming it).
    """
    import numpy as np

    path = Path(models) / HEAD_FILE
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StageInputError(
            f"{path}: cannot read the trained head ({exc.__class__.__name__}): rerun the train "
            "stage (`dvc repro train`)."
        ) from None
    if array.ndim != 2 or array.shape[0] < 2 or array.dtype.kind != "f":
        raise StageInputError(
            f"{path}: expected a float (D + 1, C) array, found {array.dtype} {array.shape}: rerun "
            "the train stage (`dvc repro train`)."
        )
    return array[:-1].astype(np.float32), array[-1].astype(np.float32)


#: Written into a saved archive's metadata.json instead of the time of saving (Keras' `date_saved`,
#: kept as a field because `keras.saving.KerasFileEditor` reads it), and the time of every zip entry.
FIXED_DATE = "1980-01-01@00:00:00"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_model(model: Any, path: str | os.PathLike[str]) -> Path:
    """Save `model` as a `.keras` archive at `path` (atomically) whose bytes are a function of the
    model alone: the same architecture, weights (and optimizer state) give the same file.

    Keras writes the time of saving twice (`date_saved` in metadata.json, the zip entry time of
    the weights file) and, in config.json, the memory address of each object shared by several
    layers (`shared_object_id`). `normalise_keras_archive` replaces them with fixed values; the
    entries are written in sorted order, uncompressed, as Keras does. The archive loads with
    `keras.models.load_model` as any other.

    Raises:
        ValueError: `path` does not end with `.keras`.
    """
    import tempfile

    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a Keras archive must end with .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".save-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        model.save(raw)
        normalised = normalise_keras_archive(raw.read_bytes())
        out = Path(tmp) / f"normalised-{path.name}"
        out.write_bytes(normalised)
        os.replace(out, path)
    return path


def normalise_keras_archive(archive: bytes) -> bytes:
    """A `.keras` zip archive rewritten without what depends on the time or the process:
    metadata.json's `date_saved` set to `FIXED_DATE`, config.json's `shared_object_id`s (memory
    addresses) renumbered 1, 2, ..., every entry dated 1980-01-01 with fixed permissions, entries
    sorted."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in sorted(src.namelist()):
            data = src.read(name)
            if name == "metadata.json":
                metadata = json.loads(data)
                metadata["date_saved"] = FIXED_DATE
                data = json.dumps(metadata, sort_keys=True).encode()
            elif name == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            dst.writestr(info, data)
    return out.getvalue()


def write_run_record(cfg: Any, run: Any) -> Path:
    """Record, in `paths.run_file` (outside the DVC output `models`), the MLflow `run` that
    trained the model now in `paths.models`: {"run_id", "experiment_id", "tracking_uri",
    "model_md5" (`classifier.model_md5`)}. Returns the file's path."""
    from pipeline.lib.model.classifier import model_md5

    path = Path(cfg.paths.run_file)
    write_json(
        path,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": cfg.tracking.uri,
            "model_md5": model_md5(cfg.paths.models),
        },
    )
    return path


def trained_run_id(cfg: Any) -> str | None:
    """The id of the MLflow run that trained the model in `paths.models`, from `paths.run_file`;
    None when the file is missing or records another model (e.g. `models` came from the DVC
    cache after another training), so that evaluate and export then start a run of their own
    instead of logging into the wrong one."""
    path = Path(cfg.paths.run_file)
    model = Path(cfg.paths.models) / MODEL_FILE
    if not path.is_file() or not model.is_file():
        return None
    record = read_json(path)
    if record.get("model_md5") != md5_file(model):
        return None
    return record.get("run_id")


def _renumber_shared_objects(config: Any) -> Any:
    """`config` with every `shared_object_id` (Keras writes the object's `id()`, a memory address
    that differs on every run) replaced by 1, 2, ... in order of first appearance: the same
    objects stay shared, and the bytes no longer depend on the process."""
    numbers: dict[int, int] = {}

    def walk(node: Any) -> Any:
        """`node` with its `shared_object_id`s renumbered (dicts and lists copied, recursively)."""
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if "shared_object_id" in node:
                out["shared_object_id"] = numbers.setdefault(
                    node["shared_object_id"], len(numbers) + 1
                )
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(config)


def summary_text(model: Any) -> str:
    """Keras' `model.summary()` as text (one line per layer, parameter counts), newline-ended."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=False)
    return "\n".join(lines) + "\n"
