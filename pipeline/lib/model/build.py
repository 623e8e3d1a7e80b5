"""The Keras network (images must flow: `train.solver=keras`, export): a frozen MobileNetV2
backbone on raw RGB pixels 0..255 scaled to [-1, 1], run with `training=False` (BatchNorm in
inference mode), global pooling, optional dropout and one Dense softmax layer."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.lib.errors import UserError

#: Keras' ImageNet weights file (no top) per alpha and size.
WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5"
IMAGENET_SIZES = (96, 128, 160, 192, 224)  # Keras loads the 224 px file for any other size

BACKBONE_NAME = "backbone"
HEAD_NAME = "classifier"


class WeightsNotFoundError(UserError, FileNotFoundError):
    """ImageNet weights were asked for, but no usable weights file is available offline."""


def keras_home() -> Path:
    """$KERAS_HOME, else ~/.keras (in the temporary folder when ~ is read-only)."""
    if home := os.environ.get("KERAS_HOME"):
        return Path(home).expanduser()
    base = Path("~").expanduser()
    return (base if os.access(base, os.W_OK) else Path(tempfile.gettempdir())) / ".keras"


def imagenet_weights_path(alpha: float, size: int) -> Path:
    """Keras' cached ImageNet weights file (no top) for `size` px: that size's if present, else
    the 224 px one (it fits any size)."""
    path = keras_home() / "models" / WEIGHTS_FILE.format(alpha=float(alpha), size=size)
    if size in IMAGENET_SIZES and (size == 224 or path.is_file()):
        return path
    return path.with_name(WEIGHTS_FILE.format(alpha=float(alpha), size=224))


def resolve_weights(weights: str | None, alpha: float, size: int) -> Path | None:
    """The weights file of `model.weights` (None: random, `imagenet`, or a path), checked to be
    whole HDF5 (nothing is downloaded). Raises WeightsNotFoundError (one line)."""
    if weights is None or str(weights).lower() in ("null", "none", ""):
        return None
    if weights == "imagenet":
        path = imagenet_weights_path(alpha, size)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"model.weights=imagenet: {path} is missing (nothing is downloaded): run `make "
                "weights` (or copy it there, or set KERAS_HOME), pass a MobileNetV2 weights file "
                "without top (model.weights=/path/to/file.h5), or set model.weights=null."
            )
        _check_hdf5(path, "imagenet", "delete it and run `make weights`")
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"model.weights={weights!r}: no such file. Pass an existing Keras weights file "
            "(.h5 / .weights.h5 of MobileNetV2 without top), `imagenet`, or null."
        )
    _check_hdf5(path, weights, "replace it")
    return path


def _check_hdf5(path: Path, weights: str, fix: str) -> None:
    import h5py

    try:
        h5py.File(path, "r").close()
    except OSError as exc:
        reason = str(exc).split("(", 1)[-1].rstrip(")")
        size = path.stat().st_size
        raise WeightsNotFoundError(
            f"model.weights={weights}: {path} is damaged ({reason}; {size} bytes): {fix}"
        ) from None


def build_feature_extractor(
    alpha: float, weights: str | None, image_size: int, init_seed: int = 0
) -> Any:
    """Images (0..255) -> pooled features of a frozen MobileNetV2 without top (the layer
    `BACKBONE_NAME`); `weights`: `imagenet` | path | None (then seeded by `init_seed`)."""
    import keras
    from keras import layers

    path = resolve_weights(weights, alpha, image_size)
    if path is None:
        keras.utils.set_random_seed(init_seed)
    shape = (image_size, image_size, 3)
    base = keras.applications.MobileNetV2(
        # named: Keras numbers an unnamed input per process, and the saved bytes would vary
        input_tensor=keras.Input(shape=shape, name=f"{BACKBONE_NAME}_input"),
        input_shape=shape,
        alpha=alpha,
        include_top=False,
        weights=None,  # loaded from `path`, as Keras loads its cached ImageNet file
        name=BACKBONE_NAME,
    )
    if path is not None:
        try:
            base.load_weights(path)
        except Exception as exc:  # a file that is not MobileNetV2 weights of this alpha/size
            raise WeightsNotFoundError(
                f"model.weights={weights!r}: could not load it into MobileNetV2 "
                f"(alpha {alpha}, {image_size} px, no top): {exc}"
            ) from exc
    base.trainable = False
    inputs = keras.Input(shape=shape, name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_minus1_1")(inputs)
    outputs = layers.GlobalAveragePooling2D(name="pooled_features")(base(x, training=False))
    return keras.Model(inputs, outputs, name="mobilenet_v2_features")


def build_head(
    feature_dim: int, num_classes: int, dropout: float, init: str = "zeros", l2: float = 0.0
) -> Any:
    """Features -> (dropout) -> Dense(num_classes, softmax), kernel initialiser `init`
    (`model.head_init`), L2 factor `l2`."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = layers.Dropout(dropout, name="dropout")(inputs) if dropout > 0 else inputs
    penalty = keras.regularizers.L2(l2) if l2 > 0 else None
    dense = layers.Dense(
        num_classes, "softmax", kernel_initializer=init, kernel_regularizer=penalty, name=HEAD_NAME
    )
    return keras.Model(inputs, dense(x), name="head")


def compose(extractor: Any, head: Any, augmentation: list[Any] | None = None) -> Any:
    """One Keras model images -> (augmentation ->) extractor -> head, sharing their weights."""
    import keras

    if augmentation is None:
        inputs, x = extractor.input, extractor.output
    else:
        inputs = x = keras.Input(shape=tuple(extractor.input.shape[1:]), name="image")
        for layer in augmentation:
            x = layer(x)
        x = extractor(x)
    for layer in head.layers[1:]:
        x = layer(x)
    suffix = "" if augmentation is None else "_augmented"
    return keras.Model(inputs, x, name=f"mobilenet_v2_classifier{suffix}")


def build_augmentation(augment: Any, seed: int) -> list[Any]:
    """Keras' random layers for `train.augment` (factor 0: left out) on 0..255 images, seeded
    from `seed`."""
    from keras import layers

    a, reflect, pixels = augment, {"fill_mode": "reflect"}, {"value_range": (0, 255)}
    wanted = [
        (a.flip != "none", layers.RandomFlip, (a.flip,), {}),
        (a.rotation > 0, layers.RandomRotation, (a.rotation,), reflect),
        (a.zoom > 0, layers.RandomZoom, (a.zoom,), reflect),
        (a.translation > 0, layers.RandomTranslation, (a.translation, a.translation), reflect),
        (a.contrast > 0, layers.RandomContrast, (a.contrast,), pixels),
        (a.brightness > 0, layers.RandomBrightness, (a.brightness,), pixels),
    ]
    chosen = [(cls, args, kwargs) for on, cls, args, kwargs in wanted if on]
    return [
        cls(*args, seed=seed + i, name=f"augment_{i}_{cls.__name__}", **kwargs)
        for i, (cls, args, kwargs) in enumerate(chosen)
    ]


def unfreeze_top(backbone: Any, n: int) -> list[str]:
    """Make the backbone's last `n` layers but BatchNormalization trainable (Keras' fine-tuning
    guide); return the names of those with weights."""
    import keras

    backbone.trainable = True  # sets every sub-layer; then freeze all but the top n
    top = backbone.layers[max(len(backbone.layers) - n, 0) :]
    for layer in backbone.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not is_bn and any(layer is t for t in top)
    return [layer.name for layer in backbone.layers if layer.trainable and layer.weights]


def make_optimizer(name: str, learning_rate: Any) -> Any:
    """A Keras optimizer by `train.optimizer` name; `learning_rate` a float or a schedule."""
    import keras

    classes = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}
    return getattr(keras.optimizers, classes[name])(learning_rate=learning_rate)


def count_params(model: Any) -> dict[str, int]:
    trainable = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(math.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable": trainable, "non_trainable": frozen, "total": trainable + frozen}


def load_model(path: str | os.PathLike[str]) -> Any:
    """Load a `.keras` model with Keras' safe mode on (no arbitrary code)."""
    import keras

    return keras.models.load_model(path, safe_mode=True)
