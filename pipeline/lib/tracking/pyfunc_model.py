"""The MLflow model users load and serve: raw images in, class probabilities and a label out.

`ClassifierModel` is an `mlflow.pyfunc.PythonModel` whose artifacts are the three files of the
model folder (backbone.tflite, head.npy, model.json); it loads them as the same `Classifier`
(`pipeline.lib.model.classifier`: LiteRT backbone + head) that evaluate and `pipeline.predict`
run, so served probabilities are evaluate's. No TensorFlow is imported. Its `predict` takes
images as users have them:

- an array (N, H, W, 3) or (H, W, 3) of any real numeric dtype (uint8 from a decoder, float32,
  float64, int64 from JSON), RGB values 0..255 (NaN, infinite or out-of-range values are refused
  at every size); at the model's input size it is used as is, at any other size each image is
  resized as training resized (the card's `resize`: the same Pillow LANCZOS `stretch`/`pad`/
  `crop` as `prepare`);
- encoded image files (JPEG, PNG, ... as `prepare` takes them), as bytes or base64 text: a
  pandas DataFrame with one column (e.g. `image`, what `mlflow models serve` builds from
  `{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}`), a list, a 1-D array,
  or `{"inputs": ["<base64>", ...]}` over HTTP. Each file is decoded by
  `pipeline.lib.data.images.load_rgb`, exactly as `prepare` and `pipeline.predict` decode.

It returns a DataFrame, one row per image: `label` (the most probable class, str; `unknown`
where the model's reject rule refuses the photo, `pipeline.lib.model.reject`),
`probability` (its probability, float) and `scores` ({class: probability}, in the card's class
order). Bad input raises `MlflowException` (HTTP 400 from `mlflow models serve`) saying what was
expected. The model's code is logged with it (`code_paths`: the `pipeline` package), so a serving
process needs only the logged artifacts and the pinned requirements.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
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
    """`data` (see the module docstring) as float32 (N, size, size, 3), RGB 0..255.

    Raises:
        MlflowException: input of another kind, shape or range, or a file that is no image.
    """
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, pd.DataFrame):
        if data.shape[1] != 1:
            raise _input_error(
                "expected a DataFrame with one column of encoded images (base64 or bytes), "
                f"got columns {list(data.columns)}"
            )
        data = data.iloc[:, 0].tolist()
    elif isinstance(data, pd.Series):
        data = data.tolist()
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
    with tempfile.TemporaryDirectory(prefix="pyfunc-images-") as tmp:
        for i, item in enumerate(items):
            file = Path(tmp) / f"image-{i}"
            file.write_bytes(_image_bytes(item, i))
            try:
                out.append(load_rgb(file, size, resize=resize))
            except RejectedImage as exc:
                raise _input_error(f"image {i}: {exc.reason}") from None
    return np.stack(out).astype(np.float32)


def _image_bytes(item: str | bytes, index: int) -> bytes:
    """An encoded image file's bytes from raw bytes or base64 text (a data: URL prefix is
    allowed)."""
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


def prediction_frame(
    probs: np.ndarray, classes: list[str], accepted: np.ndarray | None = None
) -> pd.DataFrame:
    """A DataFrame: `label` (`unknown` where not `accepted`), `probability`, `scores`
    ({class: probability}) per row of probs."""
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    known = np.ones(len(best), bool) if accepted is None else accepted
    return pd.DataFrame(
        {
            "label": [classes[i] if k else UNKNOWN for i, k in zip(best, known, strict=True)],
            "probability": [float(p[i]) for p, i in zip(probs, best, strict=True)],
            "scores": [{c: float(v) for c, v in zip(classes, p, strict=True)} for p in probs],
        }
    )


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """The logged model: raw images -> label, probability, scores (see the module docstring).
    Its artifacts `backbone`, `head`, `card` are the model folder's files (`ARTIFACTS`)."""

    # MLflow inspects `predict`'s type hints as the class is defined, to validate inputs against
    # them, and warns (under its own "once" filter, which no user filter can silence) when there
    # are none. This model takes any of several input kinds on purpose and states its signature
    # at log time (`runs.log_model`): MLflow's own switch for subclasses that skip that check.
    _skip_type_hint_validation = True

    def load_context(self, context):  # noqa: ANN001, ANN201
        """Load the `Classifier` from the logged artifacts."""
        a = context.artifacts
        self.classifier = Classifier(
            Head.load(a["head"]), ModelCard.load(a["card"]), Path(a["backbone"])
        )

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Classify `model_input`: a DataFrame of label, probability and scores per image."""
        c = self.classifier
        images = to_images(model_input, c.image_size, c.card.resize)
        probs, accepted = c.classify(images)
        return prediction_frame(probs, c.classes, accepted)
