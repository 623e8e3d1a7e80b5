"""Stage `featurize`: pooled MobileNetV2 features of every prepared image, computed once with the
LiteRT backbone for every training run and sweep to reuse. Photos are decoded here (checked
against the manifest); each photo's features are kept in a content-addressed store
(`feature_store`), so a rerun computes only new photos (`featurize.engine=ray`: in Ray actors).

`data/features`: {split}.npy (float32 (N, D)), `backbone.tflite` (the flatbuffer that computed
them; train copies it into the model folder) and `meta.json` (their inputs), byte-identical on
every run. On a warm conversion cache the stage does not import TensorFlow.

    python -m pipeline.featurize featurize.num_threads=2
"""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.prepared import (
    SPLITS,
    ManifestRow,
    PreparedDataset,
    SourceImages,
    open_prepared,
)
from pipeline.lib.files import atomic_dir, dvc_md5, write_json
from pipeline.lib.model import features
from pipeline.lib.model.build import resolve_weights
from pipeline.lib.model.feature_store import FeatureStore, RowWriter, store_key

log = logging.getLogger(__name__)


def featurize(cfg: Config) -> dict:
    """Write `paths.features` ({split}.npy float32 (N, D), D = 1280 for alpha <= 1;
    backbone.tflite; meta.json {"key": `feature_key`, "feature_dim": D}); return the meta.
    Raises WeightsNotFoundError: `model.weights` is not available offline; StageInputError: the
    prepared data is missing, of another image size, or a photo changed since."""
    resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.data.image_size)  # fail fast
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    start = time.perf_counter()
    m = cfg.model
    flatbuffer = features.backbone_flatbuffer(m.alpha, m.weights, dataset.image_size, m.init_seed)
    ray = cfg.featurize.engine == "ray"  # the driver only needs feature_dim then
    featurizer = features.ShardedTFLite(flatbuffer, 1 if ray else cfg.featurize.num_threads)
    log.info("Backbone ready in %.1f s", time.perf_counter() - start)
    dim = featurizer.feature_dim
    meta = {"key": features.feature_key(cfg, dvc_md5(cfg.paths.prepared)), "feature_dim": dim}
    store = FeatureStore(store_key(flatbuffer, dataset.image_size, dataset.resize), dim)
    with atomic_dir(cfg.paths.features, "paths.features") as tmp:
        outs = {s: RowWriter(tmp / f"{s}.npy", dataset.size(s), dim) for s in SPLITS}
        start = time.perf_counter()
        computed = _assemble(cfg, (featurizer, flatbuffer), dataset, store, outs)
        for out in outs.values():
            out.close()
        (tmp / features.BACKBONE_FILE).write_bytes(flatbuffer)
        write_json(tmp / features.META_FILE, meta)
    store.close()
    seconds, total = time.perf_counter() - start, sum(len(o) for o in outs.values())
    rate = f" ({computed / max(seconds, 1e-9):.0f} img/s)" if computed else ""
    log.info(
        "Featurized %d images into %s: %d computed%s, %d from the feature store %s; %.1f s",
        *(total, cfg.paths.features, computed, rate, total - computed, store.path, seconds),
    )
    return meta


def _assemble(
    cfg: Config,
    backbone: tuple[features.ShardedTFLite, bytes],
    dataset: PreparedDataset,
    store: FeatureStore,
    outs: dict[str, RowWriter],
) -> int:
    """Fill `outs` {split: (N, D)} from the store, then featurize one photo per missing sha256
    (here, or in Ray) into `outs` and the store; return how many."""
    by_sha: dict[str, list[ManifestRow]] = {}
    for row in dataset.manifest():
        by_sha.setdefault(row.sha256, []).append(row)
    shas, todo = list(by_sha), []
    for i in range(0, len(shas), 1024):  # bounded memory
        found = store.get(shas[i : i + 1024])
        todo += [by_sha[sha][0] for sha in shas[i : i + 1024] if sha not in found]
        for sha, x in found.items():
            for row in by_sha[sha]:
                outs[row.split][row.index] = x
    images = SourceImages(dataset.root, todo, dataset.image_size, dataset.resize)
    if cfg.featurize.engine == "ray" and todo:
        # function-level import: Ray (the `ray` extra) is imported only when asked for
        from pipeline.lib.model.ray_featurize import ray_feature_batches

        batches = ray_feature_batches(cfg.featurize, backbone[1], images)
    else:
        batches = (
            ([row.sha256 for row in todo[start : start + len(feats)]], feats)
            for start, feats in features.feature_batches(
                backbone[0], images, cfg.featurize.batch_size, "featurize"
            )
        )
    for done, feats in batches:
        for sha, x in zip(done, feats, strict=True):
            for same in by_sha[sha]:
                outs[same.split][same.index] = x
        store.put(zip(done, feats, strict=True))
    return len(todo)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    run_step(featurize, cfg)


main = entry_point(hydra_main, __doc__, sections=("featurize", "model"))

if __name__ == "__main__":
    main()
