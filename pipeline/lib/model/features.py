"""Backbone features computed with LiteRT, and the backbone runtime (`ShardedTFLite`) of every
later stage and the served model. The converted flatbuffer is cached (`tflite_cache_path`), keyed
by `backbone_key` (computed without TensorFlow) and used when its sha256 matches: on a warm cache
featurize imports neither TensorFlow nor Keras. Features do not depend on `featurize.batch_size`
or `featurize.num_threads` (tests/test_featurize.py), so these are not DVC parameters.
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
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.lib.data.prepared import SPLITS, iter_batches
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import atomic_file, cache_root, md5_file, read_json
from pipeline.lib.model import build
from pipeline.lib.model.tflite import ModelSource, TFLiteRunner

log = logging.getLogger(__name__)

#: What the converter is asked for; part of the cache key (a change must miss the old files).
CONVERSION = "tflite:float32:default-ops"
#: The distributions whose versions are part of `backbone_key` (the converter and the model code).
KEYED_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "keras")
#: In `paths.features`: the features' identity (`feature_key`), the flatbuffer that computed them.
META_FILE = "meta.json"
BACKBONE_FILE = "backbone.tflite"


def backbone_key(alpha: float, weights: str | None, image_size: int, init_seed: int = 0) -> str:
    """32 hex digits naming the converted `build_feature_extractor(...)`: the weights' md5 (or the
    seed), alpha, size, TensorFlow/Keras versions and settings, `CONVERSION`, build.py and the
    converter's source. Raises WeightsNotFoundError: the weights file is not there."""
    path = build.resolve_weights(weights, alpha, image_size)
    origin = "imagenet" if weights == "imagenet" else "file"
    versions = {}
    for name in KEYED_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    # Keras' settings: its defaults, those in keras.json, $KERAS_BACKEND
    keras = {"floatx": "float32", "image_data_format": "channels_last", "backend": "tensorflow"}
    with contextlib.suppress(OSError, ValueError, TypeError):
        saved = json.loads((build.keras_home() / "keras.json").read_text())
        keras.update({k: str(saved[k]) for k in keras if k in saved})
    keras["backend"] = os.environ.get("KERAS_BACKEND") or keras["backend"]
    parts = {
        "weights": f"init_seed={int(init_seed)}" if path is None else f"{origin}:{md5_file(path)}",
        "alpha": float(alpha),
        "image_size": int(image_size),
        "versions": versions,
        "keras_settings": keras,
        "conversion": CONVERSION,
        "build_py": md5_file(build.__file__),
        "converter": hashlib.sha256(inspect.getsource(convert_to_tflite).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def tflite_cache_path(key: str, cache_dir: Path | None = None) -> Path:
    """`<cache_dir or cache_root()>/tflite/<key>.tflite`, its sha256 beside it (`.sha256`)."""
    return Path(cache_dir or cache_root()) / "tflite" / f"{key}.tflite"


def convert_to_tflite(extractor: Any) -> bytes:
    """The Keras model as a float32 TFLite flatbuffer, the same bytes in any process."""
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
    """The LiteRT flatbuffer of `build_feature_extractor(...)`: the cached one when its sha256
    matches, else converted and cached. Raises WeightsNotFoundError: the weights do not load."""
    path = tflite_cache_path(backbone_key(alpha, weights, image_size, init_seed), cache_dir)
    digest = path.with_suffix(".sha256")
    with contextlib.suppress(OSError):
        flatbuffer = path.read_bytes()
        if hashlib.sha256(flatbuffer).hexdigest() == digest.read_text().strip():
            return flatbuffer
        log.warning("Ignoring the cached TFLite backbone %s: its content hash does not match", path)
    extractor = build.build_feature_extractor(alpha, weights, image_size, init_seed)
    start = time.perf_counter()
    flatbuffer = convert_to_tflite(extractor)
    log.info("Converted the backbone to TFLite in %.1f s", time.perf_counter() - start)
    try:
        with atomic_file(path, "wb") as fh:
            fh.write(flatbuffer)
        with atomic_file(digest) as fh:
            fh.write(hashlib.sha256(flatbuffer).hexdigest())
    except OSError as exc:
        warnings.warn(f"could not cache the converted backbone at {path}: {exc}", stacklevel=2)
    return flatbuffer


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ShardedTFLite:
    """The backbone runtime: `workers` (0 or None: `usable_cores()`) single-threaded interpreters
    over a flatbuffer (or its file), each running one image at a time over a shard of every batch,
    in threads (on 2 cores 1.5-2x one 2-thread interpreter, bit-identical). Calling it maps float32
    (B, H, W, 3), 0..255 -> float32 (B, D); `feature_dim` is D."""

    def __init__(self, flatbuffer: ModelSource, workers: int | None = None):
        self.workers = int(workers or usable_cores())
        self.runners = [TFLiteRunner(flatbuffer, num_threads=1) for _ in range(self.workers)]
        self.feature_dim = int(np.prod(self.runners[0].output["shape"][1:]))
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = np.empty((len(images), self.feature_dim), dtype=np.float32)
        bounds = np.linspace(0, len(images), self.workers + 1).astype(int)

        def run_shard(runner: TFLiteRunner, start: int, end: int) -> None:
            for i in range(start, end):
                out[i] = runner(images[i : i + 1])[0]

        run = map if self._pool is None else self._pool.map
        list(run(run_shard, self.runners, bounds[:-1], bounds[1:]))
        return out


def read_ahead(iterator: Iterator[Any]) -> Iterator[Any]:
    """The items of `iterator`, the next one computed in a thread while the caller works."""
    done = object()
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(next, iterator, done)
        while (item := ahead.result()) is not done:
            ahead = reader.submit(next, iterator, done)
            yield item


def feature_batches(
    featurizer: Callable[[np.ndarray], np.ndarray],
    images: Any,
    batch_size: int,
    progress: str | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 (B, D)) for consecutive batches of `images` (N, H, W, 3), any numeric
    dtype (an array, a memory map, `SourceImages`); `progress` labels a tqdm bar on a terminal."""
    done = 0
    off = None if progress else True  # None: tqdm draws only on a terminal
    with tqdm(total=len(images), desc=progress, unit="img", disable=off, leave=False) as bar:
        for batch in read_ahead(iter_batches(images, batch_size)):  # next batch read in a thread
            feats = featurizer(batch)
            yield done, feats
            done += len(feats)
            bar.update(len(feats))


def featurize_array(
    featurizer: Callable[[np.ndarray], np.ndarray],
    images: Any,
    batch_size: int,
    feature_dim: int,
    out: np.ndarray | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """float32 (N, feature_dim) features of `images` (as `feature_batches`), into `out` if given."""
    if out is None:
        out = np.empty((len(images), feature_dim), dtype=np.float32)
    for start, feats in feature_batches(featurizer, images, batch_size, progress):
        out[start : start + len(feats)] = feats
    return out


def feature_key(cfg: Any, prepared_md5: str) -> dict:
    """What determines the features (`meta.json`): the prepared images' DVC md5, the backbone's
    settings and its weights file's md5 (DVC sees only the `model.weights` string)."""
    try:
        path = build.resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)
    except build.WeightsNotFoundError:
        path = None
    return {
        "prepared_md5": prepared_md5,
        "model": cfg.model.name,
        "alpha": float(cfg.model.alpha),
        "weights": cfg.model.weights,
        "weights_md5": None if path is None else md5_file(path),
        "init_seed": cfg.model.init_seed if cfg.model.weights is None else None,
    }


def load_cached_features(cfg: Any, prepared_md5: str) -> dict[str, np.ndarray] | None:
    """{split: float32 (N, D)} from `paths.features` if its `meta.json` has this `feature_key`,
    else None (with a warning when features of other inputs are there). The splits are
    consecutive row views of one array (`stacked`), read from the files into it: no second copy."""
    folder = Path(cfg.paths.features)
    if not (folder / META_FILE).is_file():
        return None
    found, wanted = read_json(folder / META_FILE).get("key"), feature_key(cfg, prepared_md5)
    if found != wanted:
        log.warning(
            "Cached features in %s were computed for %s, not for this run (%s); computing them "
            "in memory. Run the featurize stage to cache them.",
            *(folder, found, wanted),
        )
        return None
    headers = {}
    for split in SPLITS:
        path = folder / f"{split}.npy"
        try:
            h = headers[split] = np.load(path, mmap_mode="r")  # the shape: rows are read below
            ok = h.dtype == np.float32 and h.ndim == 2 and h.shape[1] == headers["train"].shape[1]
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise StageInputError(
                f"{path}: not the float32 (N, D) array featurize writes: rerun featurize "
                "(`dvc repro -f featurize`)"
            )
    every = np.empty((sum(len(h) for h in headers.values()), headers["train"].shape[1]), "f4")
    features, start = {}, 0
    for split, header in headers.items():
        features[split] = every[start : start + len(header)]
        with open(header.filename, "rb") as f:
            f.seek(header.offset)
            f.readinto(memoryview(features[split].reshape(-1).view(np.uint8)))
        start += len(header)
    return features


def stacked(features: dict[str, np.ndarray]) -> np.ndarray:
    """All rows of `load_cached_features`' splits (train, val, test order) as one (N, D) array,
    without a copy."""
    return features[SPLITS[0]].base
