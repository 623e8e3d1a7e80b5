"""`keras_archive`, a `.keras` archive whose bytes depend only on the model (the `keras` export), and
the record of the MLflow run that trained the model folder (`paths.run_file`)."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from pipeline.lib.files import read_json, write_json
from pipeline.lib.model.classifier import model_md5

#: metadata.json's `date_saved` in a saved archive (kept: `keras.saving.KerasFileEditor` reads it).
FIXED_DATE = "1980-01-01@00:00:00"


def keras_archive(model: Any) -> bytes:
    """`model` as `.keras` archive bytes that depend on the model alone (save times and
    config.json's `shared_object_id`s replaced, entries sorted)."""
    out = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="keras-archive-") as tmp:
        raw = Path(tmp) / "model.keras"
        model.save(raw)
        with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w") as dst:
            for name in sorted(src.namelist()):
                data = src.read(name)
                if name == "metadata.json":
                    data = json.dumps({**json.loads(data), "date_saved": FIXED_DATE}).encode()
                elif name == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
                dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def _renumber_shared_objects(node: Any, numbers: dict[int, int]) -> Any:
    if isinstance(node, list):
        return [_renumber_shared_objects(v, numbers) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _renumber_shared_objects(v, numbers) for k, v in node.items()}
    if "shared_object_id" in node:
        out["shared_object_id"] = numbers.setdefault(node["shared_object_id"], len(numbers) + 1)
    return out


def write_run_record(cfg: Any, run: Any) -> Path:
    """Write `paths.run_file` (outside the DVC output `models`): the MLflow `run` that trained the
    model in `paths.models` ({"run_id", "experiment_id", "tracking_uri", "model_md5"}); return it."""
    path = Path(cfg.paths.run_file)
    record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
    record |= {"tracking_uri": cfg.tracking.uri, "model_md5": model_md5(cfg.paths.models)}
    write_json(path, record)
    return path


def trained_run_id(cfg: Any) -> str | None:
    """The id of the MLflow run that trained the model in `paths.models` (`paths.run_file`); None
    when the file is missing or records another model (evaluate and export then start their own)."""
    path = Path(cfg.paths.run_file)
    md5 = model_md5(cfg.paths.models)
    if not path.is_file() or md5 is None:
        return None
    record = read_json(path)
    return record.get("run_id") if record.get("model_md5") == md5 else None
