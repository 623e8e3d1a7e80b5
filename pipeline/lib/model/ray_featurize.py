"""`featurize.engine=ray`: the photos missing from the feature store, decoded (`read_photo`) and
run through the LiteRT backbone in Ray Data actors, one single-threaded interpreter each: the same
calls as the local path, so the same bytes. Photos are read by path: on a cluster, the photo
folder must be at the same absolute path on every node (shared storage), and every node needs the
project installed (`pip install -e '.[ray]'`); s3:// URLs are not read by this path yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import numpy as np
import ray.data

from pipeline.lib.config.schema import FeaturizeConfig
from pipeline.lib.data.prepared import MANIFEST_FIELDS, ManifestRow, SourceImages, read_photo
from pipeline.lib.errors import StageInputError, UserError
from pipeline.lib.model.features import ShardedTFLite


class _Backbone:
    """A Ray Data actor: one row batch {manifest field: array} -> {"sha256", "features" (B, D)}."""

    def __init__(self, flatbuffer: bytes, root: str, size: int, resize: str) -> None:
        self.run, self.root = ShardedTFLite(flatbuffer, 1), Path(root)
        self.size, self.resize = size, resize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [ManifestRow(*v) for v in zip(*(batch[f] for f in MANIFEST_FIELDS), strict=True)]
        photos = [read_photo(self.root, r, self.size, self.resize) for r in rows]
        return {"sha256": batch["sha256"], "features": self.run(np.stack(photos).astype("f4"))}


def ray_feature_batches(
    cfg: FeaturizeConfig, flatbuffer: bytes, photos: SourceImages
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(sha256s, float32 (B, D)) of `photos`, in any order, computed by `cfg.ray_actors` actors
    (0: one per CPU) on the Ray instance at `cfg.ray_address` (None: a local one, started here)."""
    if not ray.is_initialized():
        try:
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0]
            raise UserError(
                f"featurize.ray_address={cfg.ray_address}: no Ray cluster there ({reason}); start "
                "one (`ray start --head`), fix the address, or use featurize.engine=local"
            ) from None
    ray.data.DataContext.get_current().raise_original_map_exception = True  # ChangedPhotoError
    actors = cfg.ray_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    items = [dict(zip(MANIFEST_FIELDS, astuple(row), strict=True)) for row in photos.rows]
    # the workers' cwd may differ
    args = (flatbuffer, str(photos.root.absolute()), photos.size, photos.resize)
    blocks = -(-len(items) // cfg.batch_size)  # one per batch: all actors get work
    batches = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _Backbone, fn_constructor_args=args, concurrency=actors, batch_size=cfg.batch_size
    )
    try:
        for batch in batches.iter_batches(batch_size=None, batch_format="numpy"):
            yield [str(sha) for sha in batch["sha256"]], batch["features"]
    except ray.exceptions.RayTaskError as exc:  # a changed photo: the stage's one-line error
        raise exc.cause if isinstance(exc.cause, StageInputError) else exc from None
