"""The trained model, one representation for every stage and runtime: the model folder
(`paths.models`, written by train; its bytes depend only on the values):

    backbone.tflite   the LiteRT flatbuffer of the training features (or the fine-tuned backbone)
    head.npy          float32 (D + 1, C): the kernel's D rows, then the bias; temperature folded in
    model.json        `ModelCard`: classes, image_size, resize, temperature, backbone identity,
                      the reject rule (`reject.RejectRule`, None: every photo gets a class)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from pipeline.lib.data.images import RESIZE_POLICIES
from pipeline.lib.data.prepared import iter_batches
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import md5_file, read_json, write_json
from pipeline.lib.model.features import ShardedTFLite
from pipeline.lib.model.reject import RejectRule, energy

BACKBONE_FILE = "backbone.tflite"
HEAD_FILE = "head.npy"
CARD_FILE = "model.json"
#: float64 elements cast per block of a product of the features (8 MB).
CAST_BLOCK = 1 << 20


def dot64(
    x: np.ndarray, w: np.ndarray, transpose: bool = False, index: np.ndarray | None = None
) -> np.ndarray:
    """float64 x @ w, or x.T @ w (`transpose`), of features `x` (N, D) (or of its rows `index`,
    without copying them), cast `CAST_BLOCK` elements at a time in blocks of 64 rows / columns:
    memory does not grow with N, and on one BLAS thread the bits are those of one product
    (OpenBLAS' kernels tile by <= 16)."""
    m = len(x) if index is None else len(index)
    n, width = (x.shape[1], m) if transpose else (m, x.shape[1])
    step = max(64, CAST_BLOCK // max(width, 1) // 64 * 64)
    edges = [*range(0, max(n - step, 1), step), n]  # no 1-row block: numpy's gemv
    spans = zip(edges, edges[1:], strict=False)
    if index is None:
        blocks = (x[:, a:b].T if transpose else x[a:b] for a, b in spans)
    else:
        blocks = (x[index, a:b].T if transpose else x[index[a:b]] for a, b in spans)
    return np.concatenate([block.astype(np.float64) @ w for block in blocks])


@dataclass(frozen=True)
class Head:
    """softmax(features @ kernel + bias); kernel float32 (D, C), bias float32 (C,)."""

    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float64 (N, C) of float (N, D) features."""
        return dot64(np.asarray(features), self.kernel.astype(np.float64)) + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """float64 (N, C), rows summing to 1, of float (N, D) features."""
        return softmax(self.logits(features), axis=1)

    def scaled(self, temperature: float) -> Head:
        """This head with temperature T folded in: W / T, b / T."""
        return Head(
            (self.kernel / temperature).astype(np.float32),
            (self.bias / temperature).astype(np.float32),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Head:
        """The head saved at `path`. Raises StageInputError: missing or not float (D + 1, C)."""
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
        if not np.isfinite(array).all():
            raise StageInputError(f"{path}: the head holds NaN or infinite weights: rerun train.")
        return cls(array[:-1].astype(np.float32), array[-1].astype(np.float32))


@dataclass(frozen=True)
class ModelCard:
    """`model.json`: the classes in the head's column order, the input side (px), `data.resize`,
    the temperature folded into the head (1.0: none), the backbone's identity, the reject rule."""

    classes: list[str]
    image_size: int
    resize: str
    temperature: float = 1.0
    backbone: dict = field(default_factory=dict)
    reject: dict | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        """The card at `path`. Raises StageInputError: missing or not the object train writes."""
        try:
            card = cls(**read_json(path))
            RejectRule.from_card(card.reject)  # ValueError, TypeError: malformed
            ok = (
                isinstance(card.classes, list)
                and all(isinstance(c, str) and c for c in card.classes)
                and len(set(card.classes)) == len(card.classes) >= 2
                and card.resize in RESIZE_POLICIES
                and isinstance(card.image_size, int)
                and card.image_size >= 32
            )
        except (OSError, ValueError, TypeError):
            ok = False
        if not ok:
            raise StageInputError(
                f"{path}: missing or not the model card train writes (classes, image_size, "
                "resize, reject): rerun the train stage (`dvc repro train`)."
            )
        return card


def save_model_folder(
    folder: str | os.PathLike[str], head: Head, card: ModelCard, backbone: bytes
) -> None:
    """Write the backbone's flatbuffer, `head` (one float32 (D + 1, C) array: the kernel's rows,
    then the bias) and `card` into the existing `folder`."""
    folder = Path(folder)
    (folder / BACKBONE_FILE).write_bytes(backbone)
    kernel_and_bias = np.vstack([head.kernel, head.bias]).astype(np.float32)
    np.save(folder / HEAD_FILE, kernel_and_bias, allow_pickle=False)
    write_json(folder / CARD_FILE, asdict(card))


def model_md5(folder: str | os.PathLike[str]) -> str | None:
    """32 hex digits naming the model in `folder` (the md5 of its files' md5s); None: no model."""
    files = [Path(folder) / name for name in (BACKBONE_FILE, HEAD_FILE, CARD_FILE)]
    if not all(f.is_file() for f in files):
        return None
    digests = " ".join(md5_file(f) for f in files).encode()
    return hashlib.md5(digests, usedforsecurity=False).hexdigest()


def check_pixels(images: Any) -> np.ndarray:
    """`images` (N, S, S, 3) as float32. Raises ValueError: NaN, infinite or out of 0..255."""
    array = np.asarray(images)
    bad = ~np.isfinite(array) | (array < 0) | (array > 255)
    if bad.any():
        values = array[bad]
        kinds = "NaN" if np.isnan(values).any() else "infinite" if np.isinf(values).any() else ""
        raise ValueError(
            f"{int(bad.sum())} pixel value(s) are {kinds or 'out of range'} (e.g. "
            f"{values.flat[0]!r}): expected RGB values in 0..255"
        )
    return array.astype(np.float32)


class Classifier:
    """A model folder as a function on images (evaluate, predict, the served model): the LiteRT
    backbone file (one interpreter per core, built on first use), then the head."""

    BATCH = 32  # images per backbone call (bounds the memory of a large request)

    def __init__(self, head: Head, card: ModelCard, backbone: Path):
        self.head, self.card, self.backbone_source = head, card, backbone
        self.classes, self.image_size = list(card.classes), int(card.image_size)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Classifier:
        """The model in `folder`. Raises StageInputError: a file missing, malformed or not of
        one model."""
        folder = Path(folder)
        backbone = folder / BACKBONE_FILE
        if not backbone.is_file():
            raise StageInputError(
                f"No trained model at {folder} ({BACKBONE_FILE} missing): run the train stage "
                "first (`dvc repro train` or `python -m pipeline.train`)."
            )
        head, card = Head.load(folder / HEAD_FILE), ModelCard.load(folder / CARD_FILE)
        if head.kernel.shape[1] != len(card.classes):
            raise StageInputError(
                f"{folder / HEAD_FILE} has {head.kernel.shape[1]} classes but "
                f"{folder / CARD_FILE} names {len(card.classes)}: rerun the train stage."
            )
        return cls(head, card, backbone)

    @cached_property
    def backbone(self) -> ShardedTFLite:
        """Raises StageInputError: it does not load, or does not give the head's width."""
        try:
            backbone = ShardedTFLite(self.backbone_source)
        except ValueError as exc:
            raise StageInputError(f"{BACKBONE_FILE}: {exc}: rerun the train stage.") from None
        side = backbone.runners[0].input_shape[1:3]
        if tuple(side) != (self.image_size, self.image_size):
            raise StageInputError(
                f"{BACKBONE_FILE} takes {side[0]} px images, {CARD_FILE} says {self.image_size}: "
                "they are not from one training; rerun train."
            )
        if backbone.feature_dim != self.head.kernel.shape[0]:
            raise StageInputError(
                f"{BACKBONE_FILE} gives {backbone.feature_dim} features, the head takes "
                f"{self.head.kernel.shape[0]}: they are not from one training; rerun train."
            )
        return backbone

    def features(self, images: np.ndarray, flip: bool = False) -> np.ndarray:
        """float32 (N, D) features of images (N, S, S, 3), RGB 0..255 (any real dtype), read one
        batch at a time; with `flip`, of their mirror images."""
        batches = iter_batches(images, self.BATCH)
        parts = [self.backbone(hflip(batch) if flip else batch) for batch in batches]
        return np.concatenate(parts) if parts else np.zeros((0, self.head.kernel.shape[0]))

    def predict_proba(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """The probabilities of `classify`."""
        return self.classify(images, tta)[0]

    def classify(self, images: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(float64 (N, C) probabilities of images (N, S, S, 3), RGB 0..255 (with `tta`: averaged
        with their mirror images'), bool (N,): accepted by the card's reject rule, all without one)."""
        views = [self.features(images)] + ([self.features(images, flip=True)] if tta else [])
        probs, scores = self.scores(views)
        rule = RejectRule.from_card(self.card.reject)
        return probs, np.ones(len(probs), dtype=bool) if rule is None else rule.accepts(scores)

    def scores(self, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(float64 (N, C) probabilities, float64 (N,) energies), each the mean over `views`
        (features (N, D) of the images, and of their mirror images)."""
        logits = [self.head.logits(f) for f in views]
        probs = sum(softmax(z, axis=1) for z in logits) / len(views)
        return probs, sum(energy(z) for z in logits) / len(views)


def hflip(images: np.ndarray) -> np.ndarray:
    """`images` (N, H, W, C) mirrored left-right (a copy, same dtype)."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1, :])


def trained_classifier(models: str | os.PathLike[str], classes: list[str]) -> Classifier:
    """The model in `models`. Raises StageInputError: none, or trained on other classes."""
    classifier = Classifier.load(models)
    if classifier.classes != list(classes):
        raise StageInputError(
            f"The model in {models} was trained on classes {classifier.classes}, but the "
            f"prepared data has {list(classes)}: rerun train (`dvc repro`)."
        )
    return classifier
