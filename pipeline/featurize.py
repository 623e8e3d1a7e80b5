"""Stage `featurize`: pooled MobileNetV2 features of every prepared image, computed once.

DVC reruns this stage only when the prepared data or the backbone (`model.alpha`,
`model.weights`) change, so training runs and sweeps over head hyper-parameters reuse it.

    python -m pipeline.featurize featurize.backend=keras
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.config import Config
from pipeline.data import SPLITS, PreparedDataset
from pipeline.files import atomic_dir, dvc_md5, read_json, write_json
from pipeline.step import StageInputError, run_step

log = logging.getLogger(__name__)


def feature_key(cfg: Config, prepared_md5: str) -> dict:
    """What determines the features: the prepared images and the backbone's configuration."""
    return {
        "prepared_md5": prepared_md5,
        "model": cfg.model.name,
        "alpha": float(cfg.model.alpha),
        "weights": cfg.model.weights,
        "init_seed": cfg.model.init_seed if cfg.model.weights is None else None,
    }


def featurize(cfg: Config) -> dict:
    from pipeline.features import choose_backend, featurize_array, make_featurizer
    from pipeline.model import build_feature_extractor, resolve_weights

    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    dataset = open_prepared(cfg)
    extractor = build_feature_extractor(
        cfg.model.alpha, cfg.model.weights, dataset.image_size, cfg.model.init_seed
    )
    dim = int(extractor.output.shape[-1])
    start = time.perf_counter()
    backend = choose_backend(cfg.featurize.backend, extractor,
                             sum(dataset.size(s) for s in SPLITS))
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
    log.info("Featurized %d images (%s, %.0f img/s) into %s",
             total, backend, meta["images_per_second"] or 0, cfg.paths.features)
    return meta


def open_prepared(cfg: Config) -> PreparedDataset:
    try:
        return PreparedDataset(cfg.paths.prepared)
    except FileNotFoundError as exc:
        raise StageInputError(str(exc)) from None


def load_cached_features(cfg: Config, prepared_md5: str) -> dict[str, np.ndarray] | None:
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
            folder, meta.get("key"), feature_key(cfg, prepared_md5),
        )
        return None
    return {split: np.load(folder / f"{split}.npy") for split in SPLITS}


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_step(featurize, cfg)


if __name__ == "__main__":
    main()
