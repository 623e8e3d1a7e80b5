"""The MLflow model users load and serve: raw images in, class probabilities and a label out.

`ImageClassifier` is an `mlflow.pyfunc.PythonModel` around the train stage's `models/` folder
(`model.keras`, `classes.json`, `preprocessing.json`, logged as the model's artifacts). Its
`predict` takes images as users have them:

- an array (N, H, W, 3) or (H, W, 3) of any real numeric dtype (uint8 from a decoder, float32,
  float64, int64 from JSON), RGB values 0..255; at the model's input size it is used as is
  (cast to float32), at any other size each image is resized as training resized
  (`preprocessing.json`: the same Pillow LANCZOS `stretch`/`pad`/`crop` as `prepare`);
- encoded image files (JPEG, PNG, ... as `prepare` takes them), as bytes or base64 text: a
  pandas DataFrame with one column (e.g. `image`, what `mlflow models serve` builds from
  `{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}`), a list, a 1-D array,
  or `{"inputs": ["<base64>", ...]}` over HTTP. Each file is decoded by
  `pipeline.lib.data.images.load_rgb`, exactly as `prepare` and `pipeline.predict` decode.

It returns a DataFrame, one row per image: `label` (the most probable class, str),
`probability` (its probability, float) and `scores` ({class: probability}, in the order of
`classes.json`). Bad input raises `MlflowException` (HTTP 400 from `mlflow models serve`) saying
what was expected. The model's code is logged with it (`code_paths`: the `pipeline` package), so
a serving process needs only the logged artifacts and the pinned requirements.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

#: Artifact keys of the logged model (files of the train stage's `models/` folder).
ARTIFACTS = ("model", "classes", "preprocessing")
#: Images per forward pass: bounds the memory of a large request.
BATCH = 32
#: Leading bytes of the formats most clients send raw (not base64).
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def _input_error(message: str) -> Exception:
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier:
    """Body of the pyfunc model; see the module docstring. `model` is the Keras model (images
    (N, S, S, 3) float32 0..255 -> probabilities (N, C)), `classes` its C class names,
    `image_size` S (px) and `resize` the training resize policy."""

    def __init__(self, model: Any, classes: list[str], image_size: int, resize: str) -> None:
        self.model, self.classes = model, list(classes)
        self.image_size, self.resize = int(image_size), resize

    @classmethod
    def from_files(cls, model_file: str, classes_file: str, preprocessing_file: str) -> Any:
        """Load the Keras model (safe mode) and its classes.json and preprocessing.json."""
        from pipeline.lib.model.build import load_model

        classes = json.loads(Path(classes_file).read_text(encoding="utf-8"))
        record = json.loads(Path(preprocessing_file).read_text(encoding="utf-8"))
        return cls(load_model(model_file), classes, record["image_size"], record["resize"])

    def images(self, data: Any) -> np.ndarray:
        """`data` (see the module docstring) as float32 (N, S, S, 3), RGB 0..255."""
        import pandas as pd

        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
        if isinstance(data, pd.DataFrame):
            if data.shape[1] != 1:
                raise _input_error(
                    f"expected a DataFrame with one column of encoded images (base64 or bytes), "
                    f"got columns {list(data.columns)}"
                )
            data = data.iloc[:, 0].tolist()
        elif isinstance(data, pd.Series):
            data = data.tolist()
        if isinstance(data, list | tuple) and data and isinstance(data[0], str | bytes):
            return self._decode(data)
        array = np.asarray(data)
        if array.dtype.kind in "OSU" and array.ndim == 1:
            return self._decode(array.tolist())
        return self._pixels(array)

    def _pixels(self, array: np.ndarray) -> np.ndarray:
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
                f"expected images of shape (N, height, width, 3) or (height, width, 3), RGB "
                f"0..255, got shape {array.shape}"
            )
        size = self.image_size
        if array.shape[1:3] == (size, size):
            return array.astype(np.float32)
        from PIL import Image

        from pipeline.lib.data.images import _resize

        images = np.clip(np.rint(np.asarray(array, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.stack(
            [np.asarray(_resize(Image.fromarray(i), size, self.resize)) for i in images]
        ).astype(np.float32)

    def _decode(self, items: Sequence[str | bytes]) -> np.ndarray:
        from pipeline.lib.data.images import RejectedImage, load_rgb

        out = []
        with tempfile.TemporaryDirectory(prefix="pyfunc-images-") as tmp:
            for i, item in enumerate(items):
                file = Path(tmp) / f"image-{i}"
                file.write_bytes(_image_bytes(item, i))
                try:
                    out.append(load_rgb(file, self.image_size, resize=self.resize))
                except RejectedImage as exc:
                    raise _input_error(f"image {i}: {exc.reason}") from None
        return np.stack(out).astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, C) float64 probabilities of float32 images (N, S, S, 3), in batches of `BATCH`."""
        if not len(images):
            return np.zeros((0, len(self.classes)))
        parts = [
            np.asarray(self.model(images[i : i + BATCH], training=False), dtype=np.float64)
            for i in range(0, len(images), BATCH)
        ]
        return np.concatenate(parts)

    def predict(self, data: Any) -> Any:
        """A DataFrame: `label`, `probability`, `scores` ({class: probability}) per image."""
        import pandas as pd

        probs = self.probabilities(self.images(data))
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        return pd.DataFrame(
            {
                "label": [self.classes[i] for i in best],
                "probability": [float(p[i]) for p, i in zip(probs, best, strict=True)],
                "scores": [
                    {c: float(v) for c, v in zip(self.classes, p, strict=True)} for p in probs
                ],
            }
        )


def _image_bytes(item: str | bytes, index: int) -> bytes:
    """An encoded image file's bytes from raw bytes or base64 text (a data: URL prefix is
    allowed)."""
    if isinstance(item, bytes) and item.startswith(_MAGIC):
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


class KerasImageClassifier(mlflow.pyfunc.PythonModel):
    """The logged model: raw images -> label, probability, scores (see the module docstring).
    Its artifacts `model`, `classes`, `preprocessing` are the models/ folder's files."""

    # MLflow inspects `predict`'s type hints as the class is defined, to validate inputs against
    # them, and warns (under its own "once" filter, which no user filter can silence) when there
    # are none. This model takes any of several input kinds on purpose and states its signature
    # at log time (`runs.log_model`): MLflow's own switch for subclasses that skip that check.
    _skip_type_hint_validation = True

    def load_context(self, context):  # noqa: ANN001, ANN201
        """Load the Keras model, class names and preprocessing record from the logged artifacts."""
        a = context.artifacts
        self.classifier = ImageClassifier.from_files(a["model"], a["classes"], a["preprocessing"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """Classify `model_input` (see `ImageClassifier.predict`): a DataFrame of label, probability
        and scores per image.
        """
        return self.classifier.predict(model_input)
