"""Backbone features, computed once: the expensive, unchanging part of frozen transfer learning.

The feature extractor (scaling + frozen MobileNetV2 + global pooling) is run through TensorFlow
Lite with XNNPACK, which is several times faster than Keras `predict` on a CPU. Converting the
Keras graph to TFLite takes tens of seconds, so the converted flatbuffer is cached on disk, keyed
by the extractor's architecture and weights, and each backbone is converted once per machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.data.prepared import SPLITS, iter_batches
from pipeline.lib.files import read_json

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("TRUCK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "truck-pipeline"
    )
    return Path(base)


def extractor_fingerprint(extractor: Any) -> str:
    """A hash of what determines the features: input shape, layer config and every weight."""
    import tensorflow as tf

    h = hashlib.sha256()
    h.update(f"tf={tf.__version__};input={tuple(extractor.input.shape)}".encode())
    h.update(str([(layer.name, layer.__class__.__name__) for layer in extractor.layers]).encode())
    for weight in extractor.weights:
        array = np.ascontiguousarray(weight.numpy())
        h.update(f"{weight.path}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:32]


#: Below this many images, converting an uncached backbone to TFLite (about 20 s on 2 cores)
#: costs more than it saves over Keras `predict` (about 2.5x slower per image).
AUTO_TFLITE_MIN_IMAGES = 1500


def tflite_cache_path(extractor: Any, cache_dir: Path | None = None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache_dir / "tflite" / f"{extractor_fingerprint(extractor)}.tflite"


def choose_backend(
    backend: str, extractor: Any, num_images: int, cache_dir: Path | None = None
) -> str:
    """`auto`: TFLite when its conversion is already cached or pays for itself, else Keras."""
    if backend != "auto":
        return backend
    if num_images >= AUTO_TFLITE_MIN_IMAGES or tflite_cache_path(extractor, cache_dir).is_file():
        return "tflite"
    return "keras"


def tflite_model(extractor: Any, cache_dir: Path | None = None) -> bytes:
    """The extractor as a TFLite flatbuffer, converted once and cached by fingerprint."""
    import tensorflow as tf

    path = tflite_cache_path(extractor, cache_dir)
    if path.is_file():
        return path.read_bytes()
    converter = tf.lite.TFLiteConverter.from_keras_model(extractor)
    flatbuffer = converter.convert()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(flatbuffer)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs time
        warnings.warn(f"could not cache the converted backbone at {path}: {exc}", stacklevel=2)
    return flatbuffer


class TFLiteRunner:
    """Runs a TFLite flatbuffer with XNNPACK on batches of images."""

    def __init__(self, flatbuffer: bytes, num_threads: int = 0) -> None:
        import tensorflow as tf

        threads = num_threads or os.cpu_count() or 1
        with warnings.catch_warnings():  # tf.lite.Interpreter's own deprecation notice
            warnings.simplefilter("ignore")
            self._interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:
            self._interpreter.resize_tensor_input(self._input, batch.shape, strict=False)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(batch, dtype=np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


def make_featurizer(
    extractor: Any, backend: str = "tflite", num_threads: int = 0, cache_dir: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A function: float32 image batch (B, H, W, 3) in 0..255 -> features (B, D).

    `backend` is `tflite` or `keras` (resolve `auto` first with `choose_backend`).
    """
    if backend == "tflite":
        return TFLiteRunner(tflite_model(extractor, cache_dir), num_threads)
    if backend == "keras":
        return lambda batch: extractor.predict_on_batch(batch)
    raise ValueError(f"featurize.backend={backend!r}: must be auto, tflite or keras")


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce items in a background thread (reading the next batch while this one computes)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for item in iterator:
                q.put(item)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer)
            errors.append(exc)
        finally:
            q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        yield item
    if errors:
        raise errors[0]


def featurize_array(
    featurizer: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int,
    feature_dim: int,
    out: np.ndarray | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """Features (N, feature_dim) of a (memory-mapped) uint8 image array, one batch at a time.

    `out` may be a memory-mapped array to write into, so memory stays flat however many images.
    """
    from tqdm import tqdm

    if out is None:
        out = np.empty((len(images), feature_dim), dtype=np.float32)
    done = 0
    bar = tqdm(total=len(images), desc=progress, unit="img", disable=progress is None, leave=False)
    start = time.perf_counter()
    for batch in prefetch(iter_batches(images, batch_size)):
        feats = featurizer(batch)
        out[done : done + len(feats)] = feats
        done += len(feats)
        bar.update(len(feats))
        bar.set_postfix(img_per_s=f"{done / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    return out


def feature_key(cfg: Any, prepared_md5: str) -> dict:
    """What determines the features: the prepared images and the backbone's configuration."""
    return {
        "prepared_md5": prepared_md5,
        "model": cfg.model.name,
        "alpha": float(cfg.model.alpha),
        "weights": cfg.model.weights,
        "init_seed": cfg.model.init_seed if cfg.model.weights is None else None,
    }


def load_cached_features(cfg: Any, prepared_md5: str) -> dict[str, np.ndarray] | None:
    """The cached features, if they were computed from these images with this backbone."""
    folder = Path(cfg.paths.features)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    if meta.get("key") != feature_key(cfg, prepared_md5):
        log.warning(
            "Cached features in %s were computed for %s, not for this run (%s); computing them "
            "in memory. Run the featurize stage to cache them.",
            folder,
            meta.get("key"),
            feature_key(cfg, prepared_md5),
        )
        return None
    return {split: np.load(folder / f"{split}.npy") for split in SPLITS}
