"""Featurize straight from the photos (no decoded copy) and the per-image feature store: the bytes
of the old decoded-copy path, only new photos computed, damaged entries recomputed, a photo
changed after prepare one error."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.featurize import featurize
from pipeline.lib.data.images import load_rgb
from pipeline.lib.data.prepared import SPLITS, PreparedDataset
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import dvc_md5
from pipeline.lib.model.feature_store import RowWriter
from pipeline.lib.model.features import (
    ShardedTFLite,
    featurize_array,
    load_cached_features,
    stacked,
)
from pipeline.prepare import prepare
from tests.conftest import ROOT, tiny_config, tiny_overrides
from tests.test_prepared import folder_config, write_photos


def fresh_cache(monkeypatch, folder: Path) -> None:
    """A cache without a feature store, with the session's converted backbones (no conversion)."""
    session = Path(os.environ["TRUCK_CACHE_DIR"]) / "tflite"
    if not (folder / "tflite").exists() and session.is_dir():
        shutil.copytree(session, folder / "tflite")
    monkeypatch.setenv("TRUCK_CACHE_DIR", str(folder))


def features(cfg) -> dict[str, bytes]:
    return {s: (Path(cfg.paths.features) / f"{s}.npy").read_bytes() for s in SPLITS}


def computed(caplog) -> int:
    """How many photos the last featurize computed (its log line), the log then cleared."""
    found = re.findall(r"(\d+) computed", caplog.text)
    caplog.clear()
    return int(found[-1])


def test_featurize_from_photos_gives_the_bytes_of_the_decoded_copy_path(tmp_path, monkeypatch):
    """Tolerance 0: the old path decoded each photo once into <split>.npy (`load_rgb` at the
    image size) and featurized those arrays; featurize from the photos gives the same bytes."""
    fresh_cache(monkeypatch, tmp_path / "cache")
    cfg = tiny_config(tmp_path, **{"data.resize": "pad"})
    prepare(cfg)
    featurize(cfg)
    dataset = PreparedDataset(cfg.paths.prepared)
    backbone = ShardedTFLite(Path(cfg.paths.features) / "backbone.tflite", 2)
    for split in SPLITS:
        rows = dataset.manifest(split)
        old = np.zeros((len(rows), 32, 32, 3), np.uint8)
        for r in rows:
            old[r.index] = load_rgb(dataset.root / r.path, 32, "pad")
        want = featurize_array(backbone, old, 32, backbone.feature_dim)
        got = np.load(Path(cfg.paths.features) / f"{split}.npy")
        assert want.any() and got.tobytes() == want.tobytes(), split


def test_only_new_photos_are_computed_and_a_damaged_entry_is_recomputed(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level("INFO", logger="pipeline.featurize")
    fresh_cache(monkeypatch, tmp_path / "cache")
    photos = tmp_path / "photos"
    write_photos(photos, {"a": 50, "b": 50})
    cfg = folder_config(tmp_path / "run", photos, **{"data.leakage": "warn"})
    prepare(cfg)
    featurize(cfg)
    assert computed(caplog) == 100

    shutil.copy(photos / "a" / "a_0.png", tmp_path / "keep.png")
    new = np.random.default_rng(99).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(new).save(photos / "a" / "new.png")
    prepare(cfg)
    featurize(cfg)
    assert computed(caplog) == 1  # +1 %: only the new photo
    fresh_cache(monkeypatch, tmp_path / "cache2")
    assembled = features(cfg)
    featurize(cfg)  # an empty store: every photo computed now, the same bytes
    assert computed(caplog) == 101 and features(cfg) == assembled
    monkeypatch.setenv("TRUCK_CACHE_DIR", str(tmp_path / "cache"))

    (photos / "b" / "b_0.png").rename(photos / "a" / "a_from_b.png")  # relabelled
    shutil.copy(tmp_path / "keep.png", photos / "b" / "same_photo_twice.png")  # a duplicate
    prepare(cfg)
    featurize(cfg)
    assert computed(caplog) == 0

    shutil.rmtree(photos / "b")  # a class removed: no class 'b' left, so add another
    write_photos(photos, {"c": 1})  # c_0.png: the bytes of a_0.png (same generator and seed)
    (photos / "a" / "a_1.png").rename(photos / "c" / "c_1.png")
    prepare(cfg)
    featurize(cfg)
    assert computed(caplog) == 0

    # damaged store entries: a short blob, a flipped byte (CRC), NaNs: recomputed, same bytes
    (store,) = (tmp_path / "cache" / "features").glob("*.sqlite")
    shas = sorted({r.sha256 for r in PreparedDataset(cfg.paths.prepared).manifest()})[:3]
    with sqlite3.connect(store) as db:
        db.execute("UPDATE f SET x = substr(x, 1, 100) WHERE sha = ?", (shas[0],))
        db.execute("UPDATE f SET crc = crc + 1 WHERE sha = ?", (shas[1],))
        nan = np.full(1280, np.nan, np.float32).tobytes()
        db.execute("UPDATE f SET x = ? WHERE sha = ?", (nan, shas[2]))
    before = features(cfg)
    shutil.rmtree(cfg.paths.features)
    featurize(cfg)
    assert "3 damaged entries, recomputing them" in caplog.text
    assert computed(caplog) == 3 and features(cfg) == before
    featurize(cfg)
    assert computed(caplog) == 0 and features(cfg) == before  # stored again


def test_a_photo_changed_after_prepare_stops_featurize_with_one_line(tmp_path):
    cfg = tiny_config(tmp_path)
    prepare(cfg)
    row = PreparedDataset(cfg.paths.prepared).manifest("test")[0]
    photo = Path(cfg.data.synthetic.dir) / row.path
    Image.open(photo).rotate(90).save(photo)
    extra = {"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.featurize", *tiny_overrides(tmp_path, **extra),
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, env={**os.environ, "TRUCK_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert str(photo) in last and "changed after prepare" in last and "rerun prepare" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_the_store_file_itself_damaged_is_not_fatal(tmp_path, monkeypatch, damage):
    """A store that sqlite cannot read: featurize warns and computes in memory."""
    from pipeline.lib.model.feature_store import FeatureStore

    path = tmp_path / "s.sqlite"
    store = FeatureStore("k", 4, path)
    store.put([("x", np.arange(4, dtype=np.float32))])
    store.close()
    assert FeatureStore("k", 4, path).get(["x", "y"])["x"].tolist() == [0, 1, 2, 3]
    path.write_bytes(b"" if damage == "truncate" else b"not a database" * 100)
    store = FeatureStore("k", 4, path)
    assert store.get(["x"]) == {}
    store.put([("x", np.ones(4, np.float32))])
    assert store.get(["x"])["x"].tolist() == [1, 1, 1, 1]


def test_a_store_damaged_inside_its_pages_is_set_aside_and_started_again(tmp_path, caplog):
    """Pages overwritten inside the file (sqlite: "database disk image is malformed" on reading
    rows, not on opening): the file is set aside, a fresh store takes over, nothing raises."""
    from pipeline.lib.model.feature_store import FeatureStore

    path = tmp_path / "s.sqlite"
    store = FeatureStore("k", 256, path)
    rng = np.random.default_rng(0)
    shas = [f"{i:064x}" for i in range(400)]
    store.put((sha, rng.normal(size=256).astype(np.float32)) for sha in shas)
    store.close()
    with open(path, "r+b") as fh:  # page 1 (the schema) intact, the next pages garbage
        fh.seek(8192)
        fh.write(b"\xff" * 8192)
    store = FeatureStore("k", 256, path)
    assert store.get(shas) == {}
    assert "damaged" in caplog.text and (tmp_path / "s.sqlite.damaged").is_file()
    store.put([(shas[0], np.ones(256, np.float32))])
    assert FeatureStore("k", 256, path).get(shas[:1])[shas[0]].tolist() == [1.0] * 256


def test_rows_written_one_by_one_are_the_bytes_numpy_saves(tmp_path):
    """`RowWriter` (featurize's output: positional writes, no memory map held): any row order,
    the file `np.save` writes; an empty split too."""
    x = np.random.default_rng(0).normal(size=(37, 1280)).astype(np.float32)
    for n in (37, 0):
        out = RowWriter(tmp_path / "rows.npy", n, 1280)
        for i in np.random.default_rng(1).permutation(n):
            out[int(i)] = x[i]
        out.close()
        np.save(tmp_path / "saved.npy", x[:n])
        assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()


def test_cached_features_are_read_into_one_array_and_a_short_file_is_one_error(tmp_path):
    """The splits are views of one array (the audit uses all rows without a second copy); a
    truncated split file names itself and featurize."""
    cfg = tiny_config(tmp_path)
    prepare(cfg)
    featurize(cfg)
    md5 = dvc_md5(cfg.paths.prepared)
    loaded = load_cached_features(cfg, md5)
    every = stacked(loaded)
    assert every.shape == (sum(len(loaded[s]) for s in SPLITS), loaded["train"].shape[1])
    for split in SPLITS:
        assert np.shares_memory(loaded[split], every)
        np.testing.assert_array_equal(
            loaded[split], np.load(Path(cfg.paths.features) / f"{split}.npy")
        )
    test_file = Path(cfg.paths.features) / "test.npy"
    test_file.write_bytes(test_file.read_bytes()[:-4])
    with pytest.raises(
        StageInputError, match=r"test\.npy: not the float32 \(N, D\) array featurize writes"
    ):
        load_cached_features(cfg, md5)
