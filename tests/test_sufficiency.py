"""The data-sufficiency curve (issue 24): on real photos (../shared/data/flowers12, featurized once
per session by the pipeline's own prepare + featurize into a temporary folder) and on tiny
synthetic features for the edge cases."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pipeline.lib.audit.sufficiency import FLAT_GAIN, sentence, sufficiency_curve
from pipeline.lib.errors import UserError
from pipeline.lib.training.head import choose_c, fit_head
from tests.conftest import ROOT, compose

FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"


@dataclass
class Flowers:
    """flowers12's features float32 (N, 1280) and int labels per split, class names, and the C
    that `train.C=auto` chooses on the full training split."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    names: list[str]
    C: float


@pytest.fixture(scope="session")
def flowers(tmp_path_factory: pytest.TempPathFactory) -> Flowers:
    from pipeline.featurize import featurize
    from pipeline.lib.config.schema import validate
    from pipeline.lib.data.prepared import PreparedDataset
    from pipeline.prepare import prepare

    if not FLOWERS.is_dir():
        pytest.skip(f"the real photos are not at {FLOWERS}")
    work = tmp_path_factory.mktemp("flowers12")
    overrides = [f"paths.{p}={work}/{p}" for p in ("raw", "prepared", "features", "models")]
    overrides += ["data=folder", f"data.path={FLOWERS}", "data.leakage=warn"]
    cfg = validate(compose(overrides))
    prepare(cfg)
    featurize(cfg)
    data = PreparedDataset(cfg.paths.prepared)
    x = {s: np.load(Path(cfg.paths.features) / f"{s}.npy") for s in ("train", "test")}
    y = {s: data.labels(s) for s in x}
    with threadpool_limits(1):
        c, _ = choose_c(x["train"], y["train"], data.num_classes, seed=0)
    return Flowers(x, y, data.classes, c)


def accuracy(f: Flowers, idx: np.ndarray, c: float) -> float:
    """Test accuracy of the head fitted on training photos `idx` at `c`."""
    with threadpool_limits(1):
        head = fit_head(f.x["train"][idx], f.y["train"][idx], len(f.names), c, track=False).head
    return float((head.probabilities(f.x["test"]).argmax(1) == f.y["test"]).mean())


def test_the_flowers12_curve_rises_to_the_full_accuracy(flowers: Flowers, tmp_path: Path):
    f = flowers
    start = time.perf_counter()
    curve = sufficiency_curve(
        f.x["train"], f.y["train"], f.x["test"], f.y["test"], 12, f.C, f.names
    )
    seconds = time.perf_counter() - start
    means = curve.scores[:, :, 0].mean(axis=1)
    print(
        f"\nflowers12 curve in {seconds:.1f} s (C = {f.C:g}): "
        + ", ".join(f"{n}: {m:.4f}" for n, m in zip(curve.sizes, means, strict=True))
    )
    sentences = {name: sentence(name, fit) for name, fit in curve.fits.items()}
    print("\n".join(sentences.values()))
    assert curve.sizes == (1, 2, 5, 10, 20, 48)
    assert curve.scores.shape == (6, 5, 13) and np.isfinite(curve.scores).all()
    assert (np.diff(means) > -0.01).all() and means[-1] - means[0] > 0.2  # rises, roughly
    assert (curve.scores[-1] == curve.scores[-1, 0]).all()  # all photos: one fit for every seed
    assert means[-1] == pytest.approx(accuracy(f, np.arange(len(f.y["train"])), f.C))
    assert set(curve.fits) == {"all", *f.names} and curve.fits["all"] is not None
    assert curve.fits["all"].at_double[0] >= means[-1] - 0.01  # more photos do not hurt
    assert sentences["all"].startswith("about +")  # flowers12 is not saturated yet
    assert sentences["all"].endswith("every class (48 -> 96 per class).")
    assert curve.fits["all"].n == 48 and len(sentences) == 13
    gains = [n for n, said in sentences.items() if n != "all" and "expected from" in said]
    assert gains  # some classes still gain; their recall grew with every class's photos
    for name in gains:
        said = sentences[name]
        assert said.startswith(f"class {name}: its recall about ") and "of every class (" in said
    png = tmp_path / "sufficiency.png"
    curve.figure(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = tmp_path / "sufficiency.csv"
    curve.write_csv(csv)
    lines = csv.read_text().splitlines()
    assert lines[0] == "images_per_class,seed,class,accuracy" and len(lines) == 1 + 6 * 5 * 13
    assert lines[1] == f"1,0,all,{curve.scores[0, 0, 0]:.6f}"


def test_half_the_photos_predict_the_full_accuracy_within_the_interval(flowers: Flowers):
    f = flowers
    rng = np.random.default_rng(1)
    half = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(f.y["train"] == k))[:24] for k in range(12)])
    )
    with threadpool_limits(1):
        c_half, _ = choose_c(f.x["train"][half], f.y["train"][half], 12, seed=0)
    curve = sufficiency_curve(
        f.x["train"][half], f.y["train"][half], f.x["test"], f.y["test"], 12, c_half, f.names
    )
    expected, low, high = curve.fits["all"].at_double
    actual = accuracy(f, np.arange(len(f.y["train"])), f.C)  # what train.C=auto gives on all
    print(
        f"\nfrom 24 per class (C = {c_half:g}): {expected:.4f} [{low:.4f}, {high:.4f}] expected "
        f"at 48; measured {actual:.4f} (C = {f.C:g})"
    )
    assert low <= actual <= high
    assert high - low < 0.1  # an interval that says something


def test_the_same_seed_writes_the_same_bytes(flowers: Flowers, tmp_path: Path):
    f = flowers
    args = (f.x["train"], f.y["train"], f.x["test"], f.y["test"], 12, f.C, f.names, (1, 2, 5))
    for name, seed in (("a", 0), ("b", 0), ("c", 7)):
        sufficiency_curve(*args, seeds=2, seed=seed).write_csv(tmp_path / f"{name}.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def blobs(per_class: list[int], spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 features (N, 8) around one random centre per class (unit normal noise / spread)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(len(per_class), 8))
    y = np.repeat(np.arange(len(per_class)), per_class)
    return (centres[y] * spread + rng.normal(size=(len(y), 8))).astype(np.float32), y


def test_edge_cases_one_photo_two_classes_and_a_class_missing_from_eval(tmp_path: Path):
    x, y = blobs([30, 30, 1], spread=1.5)
    xe, ye = blobs([10, 10, 0], spread=1.5, seed=1)  # no evaluation photo of class c
    curve = sufficiency_curve(x, y, xe, ye, 3, 1.0, ["a", "b", "c"], seeds=3)
    assert curve.sizes == (1, 2, 5, 10, 20, 30)
    assert np.isnan(curve.scores[:, :, 3]).all() and np.isfinite(curve.scores[:, :, :3]).all()
    assert set(curve.fits) == {"all", "a", "b"}  # nothing to say about c without its photos
    curve.write_csv(tmp_path / "s.csv")
    assert ",c," not in (tmp_path / "s.csv").read_text()
    x, y = blobs([30, 1], spread=1.5)
    curve = sufficiency_curve(x, y, *blobs([10, 10], 1.5, seed=1), 2, 1.0, ["a", "b"], seeds=2)
    assert curve.fits["b"] is None  # one photo: one size, no curve
    assert sentence("b", curve.fits["b"]) == "class b: too few sizes to fit a curve; add photos."
    assert curve.scores.shape == (6, 2, 3)


def test_a_flat_curve_says_so_and_empty_splits_are_refused():
    x, y = blobs([20, 20], spread=20.0)  # far apart: every size separates them
    curve = sufficiency_curve(x, y, *blobs([10, 10], 20.0, seed=1), 2, 1.0, ["a", "b"], seeds=2)
    assert (curve.scores == 1).all()
    assert curve.fits["all"].gain[2] < FLAT_GAIN
    assert sentence("all", curve.fits["all"]).startswith("every class: flat")
    assert sentence("all", None) == "every class: too few sizes to fit a curve; add photos."
    with pytest.raises(UserError, match="a split is empty"):
        sufficiency_curve(x, y, x[:0], y[:0], 2, 1.0, ["a", "b"])
    with pytest.raises(UserError, match="lengths differ"):
        sufficiency_curve(x, y, x, y, 2, 1.0, ["a"])
