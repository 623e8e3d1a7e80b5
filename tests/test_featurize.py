"""Stage `featurize`: its output `data/features` is a pure function of its declared inputs (the
prepared data, the backbone's settings): the same bytes whether the TFLite
conversion cache is empty or warm, whatever `featurize.batch_size` and `featurize.num_threads`;
on a warm cache without importing TensorFlow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.featurize import featurize
from pipeline.lib.data.prepared import SPLITS
from pipeline.prepare import prepare
from tests.conftest import ROOT, tiny_config, tiny_overrides


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("featurize-data")
    cfg = tiny_config(tmp)
    prepare(cfg)
    return {"data.synthetic.dir": tmp / "raw", "paths.prepared": cfg.paths.prepared}


def test_features_are_the_same_bytes_with_an_empty_or_a_warm_conversion_cache(
    prepared, tmp_path, monkeypatch
):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("TRUCK_CACHE_DIR", str(cache))
    cold = tiny_config(tmp_path / "cold", **prepared)
    featurize(cold)
    converted = list((cache / "tflite").glob("*.tflite"))
    assert len(converted) == 1  # it was converted, once
    shutil.rmtree(cache / "features")  # the per-image store: computed again, not reused
    warm = tiny_config(
        tmp_path / "warm",
        **prepared,
        **{"featurize.batch_size": 5, "featurize.num_threads": 1},
    )
    featurize(warm)  # the cached conversion, other batches and threads
    got, want = file_bytes(warm.paths.features), file_bytes(cold.paths.features)
    assert sorted(want) == sorted([f"{s}.npy" for s in SPLITS] + ["meta.json", "backbone.tflite"])
    assert want["backbone.tflite"] == converted[0].read_bytes()  # the exact flatbuffer used
    assert got == want
    assert np.load(Path(cold.paths.features) / "train.npy").any()  # not trivially equal
    assert list((cache / "tflite").glob("*.tflite")) == converted  # found, not converted again

    # the stage as DVC runs it, on the warm cache (features from the per-image store): the same
    # bytes, TensorFlow (and Ray) never imported
    imports = _featurize_process(tmp_path / "process", prepared, cache)
    assert file_bytes(tmp_path / "process" / "data/features") == want
    assert "ai_edge_litert" in imports  # the interpreter (and the -X importtime parsing works)
    assert not {m for m in imports if m.split(".")[0] in ("tensorflow", "keras", "ray")}


def _featurize_process(tmp: Path, prepared: dict[str, object], cache: Path) -> set[str]:
    """Run `python -X importtime -m pipeline.featurize` (tiny config) with the
    conversion cache `cache`; return the modules it imported."""
    # no MLflow store: featurize does not track (tiny_overrides would make one)
    extra = {"tracking.uri": f"sqlite:///{tmp}/mlflow.db"}
    overrides = tiny_overrides(tmp, **prepared, **extra)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.featurize", *overrides,
         f"hydra.run.dir={tmp / 'hydra'}"],
        cwd=ROOT, env={**os.environ, "TRUCK_CACHE_DIR": str(cache)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(re.findall(r"^import time:.*\|\s+(\S+)\s*$", proc.stderr, re.M))


def test_meta_json_holds_what_the_features_are_and_no_timings(prepared, tmp_path):
    cfg = tiny_config(tmp_path, **prepared)
    meta = featurize(cfg)
    text = (Path(cfg.paths.features) / "meta.json").read_text()
    assert set(meta) == {"key", "feature_dim"} and meta["feature_dim"] == 1280
    assert meta["key"]["prepared_md5"].endswith(".dir") and "backend" not in meta["key"]
    assert "second" not in text and "per_s" not in text
    featurize(cfg)  # rerun, as `dvc repro -f featurize` does: the same bytes, so train won't rerun
    assert (Path(cfg.paths.features) / "meta.json").read_text() == text


def test_sharded_interpreters_give_the_bytes_of_one_batched_interpreter(tmp_path, monkeypatch):
    """The TFLite layout (`ShardedTFLite`: batch 1 per single-threaded interpreter, contiguous
    shards in threads) gives each image's features bit for bit as one multi-threaded interpreter
    running the whole batch, whatever the number of workers (uneven shards included)."""
    from pipeline.lib.model.features import ShardedTFLite, backbone_flatbuffer
    from pipeline.lib.model.tflite import TFLiteRunner

    monkeypatch.setenv("TRUCK_CACHE_DIR", str(tmp_path))
    flatbuffer = backbone_flatbuffer(0.35, None, 32, 0)
    images = np.random.default_rng(0).uniform(0, 255, (7, 32, 32, 3)).astype(np.float32)
    batched = TFLiteRunner(flatbuffer, num_threads=2)(images)
    assert batched.any()
    for workers in (1, 3, 8):
        sharded = ShardedTFLite(flatbuffer, workers)
        assert sharded(images).tobytes() == batched.tobytes(), workers
        assert sharded(images[:1]).tobytes() == batched[:1].tobytes()
