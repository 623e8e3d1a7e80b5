"""Backbone features, computed once with LiteRT: the expensive, unchanging part of frozen transfer
learning, and the runtime every later stage and the served model run the backbone with.

The backbone (scaling + frozen MobileNetV2 + global pooling) runs as a LiteRT flatbuffer in
`ShardedTFLite` (one single-threaded XNNPACK interpreter per core over shards of each batch):

- converting the Keras graph takes tens of seconds, so the flatbuffer is cached on disk
  (`tflite_cache_path`), keyed by a hash of what determines it, computed without TensorFlow
  (`backbone_key`: the weights file's md5 or the init seed, alpha, image size, the TensorFlow and
  Keras versions, the conversion settings, the source of `build.py` and of `convert_to_tflite`);
  on a warm cache featurize imports neither TensorFlow nor Keras;
- the conversion is deterministic (same extractor -> same flatbuffer bytes), and a cached file is
  used only when its content hash (kept beside it) matches; so a warm cache only saves time;
- the features do not depend on `featurize.batch_size` or `featurize.num_threads` either (checked
  by tests/test_featurize.py), which is why these two are not DVC parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.lib.data.prepared import SPLITS, iter_batches
from pipeline.lib.files import md5_file, read_json
from pipeline.lib.model import build
from pipeline.lib.model.tflite import TFLiteRunner

log = logging.getLogger(__name__)

#: What the converter is asked for; part of the cache key (a change must miss the old files).
CONVERSION = "tflite:float32:default-ops"
#: The distributions whose versions are part of `backbone_key` (the converter and the model code).
KEYED_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "keras")
#: The file holding the features' identity (`feature_key`) in `paths.features`.
META_FILE = "meta.json"
#: The exact flatbuffer the features were computed with, in `paths.features`.
BACKBONE_FILE = "backbone.tflite"


def default_cache_dir() -> Path:
    """$TRUCK_CACHE_DIR, else $XDG_CACHE_HOME/truck-pipeline, else ~/.cache/truck-pipeline."""
    base = os.environ.get("TRUCK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "truck-pipeline"
    )
    return Path(base)


def backbone_key(alpha: float, weights: str | None, image_size: int, init_seed: int = 0) -> str:
    """32 hex digits naming the converted feature extractor `build_feature_extractor(alpha,
    weights, image_size, init_seed)` in the conversion cache, computed without importing
    TensorFlow or Keras, from what determines it: the weights (the sha256 of the ImageNet file in
    Keras' cache or of the user's file; the init seed when there are none), alpha, the image size,
    the installed TensorFlow and Keras versions and Keras' dtype and layout settings,
    `CONVERSION`, the source text of `pipeline/lib/model/build.py` and of `convert_to_tflite`
    (a change to how the extractor is built or converted misses the old entries).

    Raises:
        WeightsNotFoundError: `weights` is `imagenet` without the file in Keras' cache, or a
            path that is not a file (`build.resolve_weights`).
    """
    path = weights_file(weights, alpha, image_size)
    origin = "imagenet" if weights == "imagenet" else "file"
    source = f"init_seed={int(init_seed)}" if path is None else f"{origin}:{md5_file(path)}"
    parts = {
        "weights": source,
        "alpha": float(alpha),
        "image_size": int(image_size),
        "versions": _distribution_versions(),
        "keras_settings": _keras_settings(build.keras_home()),
        "conversion": CONVERSION,
        "build_py": md5_file(build.__file__),
        "converter": hashlib.sha256(inspect.getsource(convert_to_tflite).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def weights_file(weights: str | None, alpha: float, image_size: int) -> Path | None:
    """The backbone's weights file (the ImageNet file in Keras' cache, or the user's), None for
    random weights.

    Raises:
        WeightsNotFoundError: the file is not there (`build.resolve_weights`).
    """
    resolved = build.resolve_weights(weights, alpha, image_size)
    if resolved is None:
        return None
    return (
        build.imagenet_weights_path(alpha, image_size) if resolved == "imagenet" else Path(resolved)
    )


def _distribution_versions() -> dict[str, str | None]:
    """{name: installed version or None} of `KEYED_DISTRIBUTIONS` (package metadata: no import)."""
    versions: dict[str, str | None] = {}
    for name in KEYED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _keras_settings(home: Path) -> dict[str, str]:
    """The Keras settings that change the built model (`floatx`, `image_data_format`, `backend`)
    as Keras will read them: $KERAS_BACKEND, else `<home>/keras.json`, else Keras' defaults (which
    it writes there on first import, so an absent and a default file give the same key)."""
    settings = {"floatx": "float32", "image_data_format": "channels_last", "backend": "tensorflow"}
    try:
        saved = json.loads((home / "keras.json").read_text())
    except (OSError, ValueError):
        saved = {}
    if isinstance(saved, dict):
        settings.update({k: str(saved[k]) for k in settings if k in saved})
    if os.environ.get("KERAS_BACKEND"):
        settings["backend"] = os.environ["KERAS_BACKEND"]
    return settings


def tflite_cache_path(key: str, cache_dir: Path | None = None) -> Path:
    """`<cache_dir>/tflite/<key>.tflite` (key: `backbone_key`; cache_dir: `default_cache_dir()`); its sha256 is kept in the same path with the suffix
    `.sha256`."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache_dir / "tflite" / f"{key}.tflite"


def _cached_flatbuffer(path: Path) -> bytes | None:
    """The cached flatbuffer at `path` if it is there and its content hash matches, else None."""
    try:
        flatbuffer = path.read_bytes()
        expected = path.with_suffix(".sha256").read_text().strip()
    except OSError:
        return None
    if hashlib.sha256(flatbuffer).hexdigest() != expected:
        log.warning("Ignoring the cached TFLite backbone %s: its content hash does not match", path)
        return None
    return flatbuffer


def _store_flatbuffer(path: Path, flatbuffer: bytes) -> None:
    """Write `flatbuffer` and its sha256 atomically; a read-only cache only costs time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, data in (
            (path, flatbuffer),
            (path.with_suffix(".sha256"), hashlib.sha256(flatbuffer).hexdigest().encode()),
        ):
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
    except OSError as exc:
        warnings.warn(f"could not cache the converted backbone at {path}: {exc}", stacklevel=3)


def convert_to_tflite(extractor: Any) -> bytes:
    """The Keras model converted to a float32 TFLite flatbuffer (no optimizations). Deterministic:
    the same model (config and weights) gives the same bytes, in any process."""
    import tensorflow as tf  # only to convert: a warm cache never gets here

    converter = tf.lite.TFLiteConverter.from_keras_model(extractor)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints every captured tensor
        return converter.convert()


def backbone_flatbuffer(
    alpha: float,
    weights: str | None,
    image_size: int,
    init_seed: int = 0,
    cache_dir: Path | None = None,
) -> bytes:
    """The LiteRT flatbuffer of `build_feature_extractor(alpha, weights, image_size, init_seed)`:
    from the conversion cache (`backbone_key`, no TensorFlow imported) when there and its content
    hash matches; else the Keras extractor is built and converted now (tens of seconds) and cached.

    Raises:
        WeightsNotFoundError: the weights are not available offline or do not load.
    """
    path = tflite_cache_path(backbone_key(alpha, weights, image_size, init_seed), cache_dir)
    flatbuffer = _cached_flatbuffer(path)
    if flatbuffer is None:
        extractor = build.build_feature_extractor(alpha, weights, image_size, init_seed)
        start = time.perf_counter()
        flatbuffer = convert_to_tflite(extractor)
        log.info("Converted the backbone to TFLite in %.1f s", time.perf_counter() - start)
        _store_flatbuffer(path, flatbuffer)
    return flatbuffer


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ShardedTFLite:
    """The TFLite featurizer: `workers` single-threaded XNNPACK interpreters, each running one
    image at a time over a contiguous shard of every batch, in threads (`invoke` releases the
    GIL). Measured on 2 cores, MobileNetV2 224: batch 1 per single-threaded interpreter ran
    1.5-2x the images per second of one 2-thread interpreter on batches of 32 (its activations
    stay in cache), and the features are bit-identical in every layout (an image's output does
    not depend on its batch or the interpreter's threads: tests/test_featurize.py).

    Args:
        flatbuffer: the converted extractor (`backbone_flatbuffer`), or its file's path.
        workers: interpreters (and threads); None or 0 = `usable_cores()`.

    Calling it maps float32 (B, H, W, 3), 0..255 -> float32 (B, D); `feature_dim` is D.
    """

    def __init__(self, flatbuffer: bytes | str | os.PathLike[str], workers: int | None = None):
        self.workers = int(workers or usable_cores())
        self.runners = [TFLiteRunner(flatbuffer, num_threads=1) for _ in range(self.workers)]
        self.feature_dim = int(np.prod(self.runners[0].output["shape"][1:]))
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def _run_shard(self, runner: TFLiteRunner, images: np.ndarray, out: np.ndarray) -> None:
        for i in range(len(images)):
            out[i] = runner(images[i : i + 1])[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        out = np.empty((n, self.feature_dim), dtype=np.float32)
        bounds = np.linspace(0, n, min(self.workers, max(n, 1)) + 1).astype(int)
        shards = [
            (r, images[a:b], out[a:b])
            for r, a, b in zip(self.runners, bounds, bounds[1:], strict=False)
        ]
        if self._pool is None or len(shards) == 1:
            for shard in shards:
                self._run_shard(*shard)
        else:
            for future in [self._pool.submit(self._run_shard, *shard) for shard in shards]:
                future.result()
        return out


def backbone_featurizer(
    alpha: float,
    weights: str | None,
    image_size: int,
    init_seed: int = 0,
    num_threads: int = 0,
    cache_dir: Path | None = None,
) -> tuple[ShardedTFLite, int]:
    """(featurizer, D): `ShardedTFLite` (`num_threads` interpreters, 0 = one per core) over
    `backbone_flatbuffer(...)`, and the features' width D (1280 for alpha <= 1)."""
    sharded = ShardedTFLite(
        backbone_flatbuffer(alpha, weights, image_size, init_seed, cache_dir), num_threads
    )
    return sharded, sharded.feature_dim


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce items in a background thread (reading the next batch while this one computes)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    errors: list[BaseException] = []

    def worker() -> None:
        """Put every item of `iterator` on the queue, then the end marker; an exception is kept
        for the consumer to re-raise.
        """
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
    """float32 features (N, feature_dim) of an image array (N, H, W, 3), any numeric dtype
    (uint8 memory-mapped prepared images), computed `batch_size` images at a time, the next batch
    read in a background thread.

    `out` may be a (memory-mapped) float32 array (N, feature_dim) to write into, so memory stays
    flat however many images; it is returned. `progress` labels a tqdm bar, drawn on a terminal
    only (None: no bar)."""
    if out is None:
        out = np.empty((len(images), feature_dim), dtype=np.float32)
    done = 0
    off = None if progress else True  # None: tqdm draws only on a terminal
    with tqdm(total=len(images), desc=progress, unit="img", disable=off, leave=False) as bar:
        for batch in prefetch(iter_batches(images, batch_size)):
            feats = featurizer(batch)
            out[done : done + len(feats)] = feats
            done += len(feats)
            bar.update(len(feats))
    return out


def feature_key(cfg: Any, prepared_md5: str) -> dict:
    """What determines the features (kept in `meta.json` beside them): the prepared images (their
    DVC md5), the backbone's configuration, the md5 of its weights file (a file changed in place
    is another backbone: DVC only sees the `model.weights` string)."""
    return {
        "prepared_md5": prepared_md5,
        "model": cfg.model.name,
        "alpha": float(cfg.model.alpha),
        "weights": cfg.model.weights,
        "weights_md5": _weights_md5(cfg),
        "init_seed": cfg.model.init_seed if cfg.model.weights is None else None,
    }


def _weights_md5(cfg: Any) -> str | None:
    """The md5 of the backbone's weights file (None: no weights, or the file is not there, so
    no cached features match and the model runs on the images)."""
    try:
        path = weights_file(cfg.model.weights, cfg.model.alpha, int(cfg.data.image_size))
    except build.WeightsNotFoundError:
        return None
    return None if path is None else md5_file(path)


def load_cached_features(cfg: Any, prepared_md5: str) -> dict[str, np.ndarray] | None:
    """{"train" | "val" | "test": float32 (N, D)} from `paths.features`, if `meta.json` there
    says they were computed from these images with this backbone; else None (with a
    warning when features of other inputs are there)."""
    folder = Path(cfg.paths.features)
    meta_path = folder / META_FILE
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
