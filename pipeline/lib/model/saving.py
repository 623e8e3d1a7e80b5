"""`save_model`, which writes a `.keras` archive whose bytes depend only on the model (the
`keras` export), and the record of the MLflow run that trained the model folder.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from pipeline.lib.files import read_json, write_json
from pipeline.lib.model.classifier import model_md5

#: The model folder's file whose md5 `pipeline.lib.tracking.runs` tags the training run with
#: (kept for it; `classifier.model_md5` names the whole folder).

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
    "model_md5" (`classifier.model_md5` of the folder)}. Returns the file's path."""
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
    md5 = model_md5(cfg.paths.models)
    if not path.is_file() or md5 is None:
        return None
    record = read_json(path)
    if record.get("model_md5") != md5:
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
