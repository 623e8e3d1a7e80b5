"""`featurize.engine=ray`: real photos featurized through Ray Data on a local Ray instance (2
actors) give the same bytes as the single-machine path, both from an empty feature store.

Ray is imported, not `importorskip`ped: CI installs the `ray` extra, so a missing Ray fails here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import ray

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import ChangedPhotoError, PreparedDataset
from pipeline.lib.model import features
from pipeline.prepare import prepare
from tests.conftest import tiny_config
from tests.flowers12 import FLOWERS
from tests.test_featurize import file_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_instance():
    """The Ray instance that featurize starts (`featurize.ray_address=null`), stopped at the end."""
    yield
    ray.shutdown()


def copy_photos(dest: Path, per_split: dict[str, int], classes: int = 3) -> Path:
    """The first photos of the first `classes` flowers12 classes, in its split layout."""
    for split, count in per_split.items():
        for folder in sorted((FLOWERS / split).iterdir())[:classes]:
            (dest / split / folder.name).mkdir(parents=True)
            for photo in sorted(folder.glob("*.jpg"))[:count]:
                shutil.copy(photo, dest / split / folder.name / photo.name)
    return dest


def test_ray_features_are_the_local_bytes(ray_instance, tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # an empty feature store (and conversion cache)
    monkeypatch.setenv("TRUCK_CACHE_DIR", str(cache))
    photos = copy_photos(tmp_path / "photos", {"training": 8, "validation": 3, "test": 3})
    data = {"data.source": "folder", "data.path": photos, "data.image_size": 64}
    local = tiny_config(tmp_path / "local", **data)
    prepare(local)
    assert len(PreparedDataset(local.paths.prepared).manifest()) == 42
    featurize(local)
    assert not ray.is_initialized()  # the default path never starts (or imports) Ray
    shutil.rmtree(cache / "features")  # computed again, by Ray

    def not_here(*args, **kwargs):
        raise AssertionError("engine=ray featurized in the driver")

    monkeypatch.setattr(features, "feature_batches", not_here)
    settings = {"featurize.engine": "ray", "featurize.ray_actors": 2, "featurize.batch_size": 5}
    on_ray = tiny_config(
        tmp_path / "ray", **data, **settings, **{"paths.prepared": local.paths.prepared}
    )
    featurize(on_ray)
    assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) >= 1
    got, want = file_bytes(on_ray.paths.features), file_bytes(local.paths.features)
    assert sorted(want) == ["backbone.tflite", "meta.json", "test.npy", "train.npy", "val.npy"]
    assert got == want
    assert np.load(Path(local.paths.features) / "train.npy").std(axis=0).max() > 0
    assert len(list((cache / "features").glob("*.sqlite"))) == 1  # Ray's results were stored

    # a photo changed since prepare: the stage's one-line error, not a Ray traceback
    shutil.rmtree(cache / "features")
    victim = sorted(photos.glob("training/*/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ChangedPhotoError, match=f"{victim.name} changed after prepare"):
        featurize(on_ray)


def test_a_bad_ray_address_is_one_line_naming_the_key():
    """No cluster at featurize.ray_address: a UserError (exit 2) naming the key and what to do,
    not Ray's traceback."""
    from pipeline.lib.config.schema import FeaturizeConfig
    from pipeline.lib.data.prepared import SourceImages
    from pipeline.lib.errors import UserError
    from pipeline.lib.model.ray_featurize import ray_feature_batches

    ray.shutdown()
    cfg = FeaturizeConfig(engine="ray", ray_address="nonsense")
    with pytest.raises(UserError, match=r"featurize.ray_address=nonsense: no Ray cluster") as info:
        next(ray_feature_batches(cfg, b"", SourceImages(Path("."), [], 224, "stretch")))
    assert "\n" not in str(info.value) and "featurize.engine=local" in str(info.value)
