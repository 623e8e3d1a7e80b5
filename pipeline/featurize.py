"""Stage `featurize`: pooled MobileNetV2 features of every prepared image, computed once with the
LiteRT backbone, so that training runs and sweeps over the head reuse them.

`data/features`: {split}.npy (float32 (N, D)), `backbone.tflite` (the flatbuffer that computed
them, which train copies into the model folder) and `meta.json` (what they were computed from):
byte-identical on every run, whatever the conversion cache holds; timings go to the log only.
On a warm conversion cache the stage does not import TensorFlow.

    python -m pipeline.featurize featurize.num_threads=2
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.prepared import SPLITS, PreparedDataset, open_prepared
from pipeline.lib.files import atomic_dir, dvc_md5, write_json
from pipeline.lib.model.build import resolve_weights
from pipeline.lib.model.features import (
    BACKBONE_FILE,
    META_FILE,
    ShardedTFLite,
    backbone_flatbuffer,
    feature_key,
    featurize_array,
)

log = logging.getLogger(__name__)


def featurize(cfg: Config) -> dict:
    """Write `paths.features` ({split}.npy float32 (N, D), D = 1280 for alpha <= 1;
    backbone.tflite; meta.json {"key": `feature_key`, "feature_dim": D}); return the meta.

    Raises:
        WeightsNotFoundError: `model.weights` is not available offline.
        StageInputError: the prepared data is missing or was prepared for another image size.
    """
    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    start = time.perf_counter()
    m = cfg.model
    flatbuffer = backbone_flatbuffer(m.alpha, m.weights, dataset.image_size, m.init_seed)
    featurizer = ShardedTFLite(flatbuffer, cfg.featurize.num_threads)
    log.info("Backbone ready in %.1f s", time.perf_counter() - start)
    meta = {
        "key": feature_key(cfg, dvc_md5(cfg.paths.prepared)),
        "feature_dim": featurizer.feature_dim,
    }
    with atomic_dir(cfg.paths.features) as tmp:
        timings = [_featurize_split(cfg, featurizer, dataset, split, tmp) for split in SPLITS]
        (tmp / BACKBONE_FILE).write_bytes(flatbuffer)
        write_json(tmp / META_FILE, meta)
    images, seconds = (sum(column) for column in zip(*timings, strict=True))
    per_split = ", ".join(
        f"{s} {n} in {t:.1f} s" for s, (n, t) in zip(SPLITS, timings, strict=True)
    )
    rate = images / seconds if seconds else 0.0
    log.info(
        "Featurized %d images (%.0f img/s: %s) into %s", images, rate, per_split, cfg.paths.features
    )
    return meta


def _featurize_split(
    cfg: Config, featurizer: ShardedTFLite, dataset: PreparedDataset, split: str, folder: Path
) -> tuple[int, float]:
    """Write `folder/<split>.npy` through a memory map; return (images, seconds)."""
    images = dataset.images(split)
    dim = featurizer.feature_dim
    out = np.lib.format.open_memmap(
        folder / f"{split}.npy", mode="w+", dtype=np.float32, shape=(len(images), dim)
    )
    start = time.perf_counter()
    featurize_array(
        featurizer, images, cfg.featurize.batch_size, dim, out, progress=f"featurize {split}"
    )
    out.flush()
    return len(images), time.perf_counter() - start


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `featurize` on conf/ composed with the command-line overrides."""
    run_step(featurize, cfg)


main = entry_point(hydra_main, __doc__, sections=("featurize", "model"))

if __name__ == "__main__":
    main()
