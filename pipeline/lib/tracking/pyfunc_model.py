"""The MLflow model users load and serve (`ClassifierModel`): the model folder's `Classifier`
(LiteRT, no TensorFlow) on raw images. `predict` takes an array (N, H, W, 3) or (H, W, 3) of any
real dtype, RGB 0..255 (resized as `prepare` resizes when not at the input size), or encoded image
files as bytes or base64 text (a one-column DataFrame as `mlflow models serve` builds, a list, a 1-D
array or `{"inputs": [...]}`), decoded as `prepare` decodes. It returns per image `label` (str;
`unknown` where the reject rule refuses it), `probability` (float), `scores` ({class: probability});
bad input raises `MlflowException` (HTTP 400 when served)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
from PIL import Image

from pipeline.lib.data.images import RejectedImage, _resize, load_rgb
from pipeline.lib.model.classifier import (
    BACKBONE_FILE,
    CARD_FILE,
    HEAD_FILE,
    Classifier,
    Head,
    ModelCard,
    check_pixels,
)
from pipeline.lib.model.reject import UNKNOWN

#: Artifact keys of the logged model: the files of the model folder.
ARTIFACTS = {"backbone": BACKBONE_FILE, "head": HEAD_FILE, "card": CARD_FILE}
#: Leading bytes of the formats most clients send raw (not base64).
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def _input_error(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def to_images(data: Any, size: int, resize: str) -> np.ndarray:
    """`data` (see the module docstring) as float32 (N, size, size, 3), RGB 0..255; an
    MlflowException for input of another kind, shape or range, or a file that is no image."""
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != 1:
            raise _input_error(
                "expected a DataFrame with one column of encoded images (base64 or bytes), "
                f"got columns {list(data.columns)}"
            )
        data = data.iloc[:, 0].tolist()
    if isinstance(data, list | tuple) and data and isinstance(data[0], str | bytes):
        return _decode(data, size, resize)
    array = np.asarray(data)
    if array.dtype.kind in "OSU" and array.ndim == 1:
        return _decode(array.tolist(), size, resize)
    return _pixels(array, size, resize)


def _pixels(array: np.ndarray, size: int, resize: str) -> np.ndarray:
    if array.dtype.kind == "O":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            raise _input_error("expected numbers (RGB 0..255) in the image array") from None
    if array.dtype.kind not in "biuf":
        raise _input_error(f"expected a numeric image array, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise _input_error(
            "expected images of shape (N, height, width, 3) or (height, width, 3), RGB "
            f"0..255, got shape {array.shape}"
        )
    try:
        pixels = check_pixels(array)
    except ValueError as exc:
        raise _input_error(str(exc)) from None
    if pixels.shape[1:3] == (size, size):
        return pixels
    images = np.rint(pixels).astype(np.uint8)
    resized = [np.asarray(_resize(Image.fromarray(i), size, resize)) for i in images]
    return np.stack(resized).astype(np.float32)


def _decode(items: Sequence[str | bytes], size: int, resize: str) -> np.ndarray:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(load_rgb(f"image-{i}", size, resize=resize, data=_image_bytes(item, i)))
        except RejectedImage as exc:
            raise _input_error(f"image {i}: {exc.reason}") from None
    return np.stack(out).astype(np.float32)


def _image_bytes(item: str | bytes, index: int) -> bytes:
    if isinstance(item, bytes) and (item.startswith(_MAGIC) or item[4:8] == b"ftyp"):
        return item
    text = item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _input_error(
            f"image {index}: not base64 text of an image file (send the file's bytes "
            "base64-encoded, e.g. `base64 -w0 photo.jpg`)"
        ) from None


def prediction_frame(probs: np.ndarray, classes: list[str], accepted: np.ndarray) -> pd.DataFrame:
    """Per row of probs: `label` (`unknown` where not `accepted`), `probability`, `scores`."""
    best = probs.argmax(axis=1)
    return pd.DataFrame(
        {
            "label": [classes[i] if k else UNKNOWN for i, k in zip(best, accepted, strict=True)],
            "probability": [float(p[i]) for p, i in zip(probs, best, strict=True)],
            "scores": [{c: float(v) for c, v in zip(classes, p, strict=True)} for p in probs],
        }
    )


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """The logged model (see the module docstring); its artifacts are `ARTIFACTS`."""

    # MLflow would validate inputs against `predict`'s type hints (and warn without them): this
    # model takes several input kinds on purpose; its signature is stated at log time.
    _skip_type_hint_validation = True

    def load_context(self, context):  # noqa: ANN001, ANN201
        """Load the `Classifier` from the logged artifacts."""
        a = context.artifacts
        head, card = Head.load(a["head"]), ModelCard.load(a["card"])
        self.classifier = Classifier(head, card, Path(a["backbone"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Classify `model_input`: a DataFrame of label, probability and scores per image."""
        c = self.classifier
        images = to_images(model_input, c.image_size, c.card.resize)
        probs, accepted = c.classify(images)
        return prediction_frame(probs, c.classes, accepted)
