"""The trained-model folder (`paths.models`): what train writes, what evaluate and export read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.lib.errors import StageInputError
from pipeline.lib.files import read_json

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
#: How images are turned into the model's input: {"image_size": int (px), "resize": str}.
#: Written by train; predict reads it so that inference resizes exactly as training did.
PREPROCESSING_FILE = "preprocessing.json"


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


def summary_text(model: Any) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=False)
    return "\n".join(lines) + "\n"
