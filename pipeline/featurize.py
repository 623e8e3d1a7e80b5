"""Stage `featurize`: pooled MobileNetV2 features of every prepared image, computed once.

DVC reruns this stage only when the prepared data or the backbone (`model.alpha`,
`model.weights`) change, so training runs and sweeps over head hyper-parameters reuse it.

    python -m pipeline.featurize featurize.backend=keras
"""

from __future__ import annotations

import logging
import time

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import run_step
from pipeline.lib.data.prepared import SPLITS, open_prepared
from pipeline.lib.files import atomic_dir, dvc_md5, write_json

log = logging.getLogger(__name__)


def featurize(cfg: Config) -> dict:
    from pipeline.lib.model.build import build_feature_extractor, resolve_weights
    from pipeline.lib.model.features import (
        choose_backend,
        feature_key,
        featurize_array,
        make_featurizer,
    )

    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    extractor = build_feature_extractor(
        cfg.model.alpha, cfg.model.weights, dataset.image_size, cfg.model.init_seed
    )
    dim = int(extractor.output.shape[-1])
    start = time.perf_counter()
    backend = choose_backend(cfg.featurize.backend, extractor, sum(dataset.size(s) for s in SPLITS))
    featurizer = make_featurizer(extractor, backend, cfg.featurize.num_threads)
    setup_s = time.perf_counter() - start
    timings = {}
    with atomic_dir(cfg.paths.features) as tmp:
        for split in SPLITS:
            images = dataset.images(split)
            out = np.lib.format.open_memmap(
                tmp / f"{split}.npy", mode="w+", dtype=np.float32, shape=(len(images), dim)
            )
            t0 = time.perf_counter()
            featurize_array(featurizer, images, cfg.featurize.batch_size, dim, out, progress=split)
            out.flush()
            timings[split] = {"images": len(images), "seconds": round(time.perf_counter() - t0, 3)}
            del out
        total = sum(t["images"] for t in timings.values())
        seconds = sum(t["seconds"] for t in timings.values())
        meta = {
            "key": feature_key(cfg, dvc_md5(cfg.paths.prepared)),
            "feature_dim": dim,
            "backend": backend,
            "setup_seconds": round(setup_s, 3),
            "images_per_second": round(total / seconds, 1) if seconds else None,
            "splits": timings,
        }
        write_json(tmp / "meta.json", meta)
    log.info(
        "Featurized %d images (%s, %.0f img/s) into %s",
        total,
        backend,
        meta["images_per_second"] or 0,
        cfg.paths.features,
    )
    return meta


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_step(featurize, cfg)


if __name__ == "__main__":
    main()
