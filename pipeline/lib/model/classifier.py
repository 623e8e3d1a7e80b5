"""The trained model, one representation for every stage and runtime: a LiteRT backbone
(`backbone.tflite`, images -> pooled features) and a Dense softmax head (`head.npy`), with the
classes and the preprocessing they were trained with (`model.json`).

The model folder (`paths.models`, written by train, read by evaluate, export, predict and the
served MLflow model):

    backbone.tflite   the LiteRT flatbuffer that computed the training features (copied from
                      `paths.features`), or the fine-tuned backbone converted after training
    head.npy          float32 (D + 1, C): the kernel's D rows, then the bias row; the
                      temperature is folded in (kernel / T, bias / T)
    model.json        `ModelCard`: classes, image_size, resize, temperature, backbone identity

Every file's bytes depend only on the values (no dates, no run ids).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from pipeline.lib.errors import StageInputError
from pipeline.lib.files import md5_file, read_json, write_json

BACKBONE_FILE = "backbone.tflite"
HEAD_FILE = "head.npy"
CARD_FILE = "model.json"


@dataclass(frozen=True)
class Head:
    """A Dense softmax layer: probabilities = softmax(features @ kernel + bias).

    kernel: float32 (D, C); bias: float32 (C,).
    """

    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float64 (N, C) logits of float (N, D) features."""
        x = np.asarray(features, dtype=np.float64)
        return x @ self.kernel.astype(np.float64) + self.bias.astype(np.float64)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float64 (N, C) class probabilities (rows sum to 1) of float (N, D) features."""
        return softmax(self.logits(features), axis=1)

    def scaled(self, temperature: float) -> Head:
        """This head with temperature T folded in: softmax((xW + b) / T) = softmax(x W/T + b/T)."""
        return Head(
            (self.kernel / temperature).astype(np.float32),
            (self.bias / temperature).astype(np.float32),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `path` as one float32 (D + 1, C) `.npy` (`np.save`: bytes depend on values)."""
        array = np.vstack([np.asarray(self.kernel, np.float32), np.asarray(self.bias, np.float32)])
        with open(path, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Head:
        """The head saved at `path`.

        Raises:
            StageInputError: the file is missing or not a float (D + 1, C) array (naming it).
        """
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StageInputError(
                f"{path}: cannot read the trained head ({exc.__class__.__name__}): rerun the "
                "train stage (`dvc repro train`)."
            ) from None
        if array.ndim != 2 or array.shape[0] < 2 or array.dtype.kind != "f":
            raise StageInputError(
                f"{path}: expected a float (D + 1, C) array, found {array.dtype} {array.shape}: "
                "rerun the train stage (`dvc repro train`)."
            )
        return cls(array[:-1].astype(np.float32), array[-1].astype(np.float32))


@dataclass(frozen=True)
class ModelCard:
    """`model.json`: what a model folder's head and backbone mean.

    classes: the class names, in the head's column order; image_size: the backbone's input
    (px, square); resize: how photos were brought to it (`data.resize`); temperature: the T
    folded into the head (1.0: not calibrated); backbone: its identity
    ({"name", "alpha", "weights", "weights_md5", "fine_tuned"}).
    """

    classes: list[str]
    image_size: int
    resize: str
    temperature: float = 1.0
    backbone: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write it as sorted, indented JSON."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        """The card at `path`. Raises StageInputError: missing or not the object train writes."""
        try:
            data = read_json(path)
            return cls(**data)
        except (OSError, ValueError, TypeError):
            raise StageInputError(
                f"{path}: missing or not the model card train writes: rerun the train stage "
                "(`dvc repro train`)."
            ) from None


def save_model_folder(
    folder: str | os.PathLike[str], head: Head, card: ModelCard, backbone: bytes
) -> None:
    """Write `backbone` (a LiteRT flatbuffer), `head` and `card` into `folder` (which exists)."""
    folder = Path(folder)
    (folder / BACKBONE_FILE).write_bytes(backbone)
    head.save(folder / HEAD_FILE)
    card.save(folder / CARD_FILE)


def load_model_folder(folder: str | os.PathLike[str]) -> tuple[Head, ModelCard, Path]:
    """(head, card, path of backbone.tflite) of a model folder.

    Raises:
        StageInputError: a file is missing or malformed (naming it and saying to rerun train).
    """
    folder = Path(folder)
    backbone = folder / BACKBONE_FILE
    if not backbone.is_file():
        raise StageInputError(
            f"No trained model at {folder} ({BACKBONE_FILE} missing): run the train stage "
            "first (`dvc repro train` or `python -m pipeline.train`)."
        )
    return Head.load(folder / HEAD_FILE), ModelCard.load(folder / CARD_FILE), backbone


def model_md5(folder: str | os.PathLike[str]) -> str | None:
    """The identity of the model in `folder`: md5 of its three files' md5s (None: no model)."""
    folder = Path(folder)
    names = (BACKBONE_FILE, HEAD_FILE, CARD_FILE)
    if not all((folder / name).is_file() for name in names):
        return None
    return hashlib.md5(  # noqa: S324 - an identity, not security
        "".join(md5_file(folder / name) for name in names).encode()
    ).hexdigest()
