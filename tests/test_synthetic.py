"""The deterministic toy-truck generator: layout, determinism, clean-up, image form, variation,
and that the six classes are told apart by something as simple as colour histograms."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from pipeline.lib.data.sources import synthetic
from pipeline.lib.data.sources.synthetic import (
    CLASSES,
    MARKER,
    SPLIT_DIRS,
    SyntheticDirError,
    generate,
    owned_files,
    render,
)

REPO = Path(__file__).resolve().parents[1]

EXPECTED_CLASSES = (
    "Container_Big_Tractor_B",
    "Container_Big_Tractor_Y",
    "Container_Small_B",
    "Container_Small_Gy",
    "Loader_Tractor_R",
    "Loader_Tractor_Y",
)


def cfg(**over):
    base = dict(
        train_per_class=2,
        val_per_class=1,
        test_per_class=3,
        size=64,
        difficulty=0.5,
        seed=7,
        format="png",
    )
    base.update(over)
    return SimpleNamespace(**base)


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(1234, spawn_key=key))


def test_constants():
    assert CLASSES == EXPECTED_CLASSES
    assert SPLIT_DIRS == {"train": "training", "val": "validation", "test": "test"}


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_layout_and_counts(tmp_path, fmt):
    out = generate(tmp_path / "raw", cfg(format=fmt))
    assert out == tmp_path / "raw" and isinstance(out, Path)
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLIT_DIRS.values(), MARKER])
    counts = {"training": 2, "validation": 1, "test": 3}
    for folder, n in counts.items():
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(CLASSES)
        for label in CLASSES:
            names = sorted(p.name for p in (out / folder / label).iterdir())
            assert names == [f"{label}_{i:03d}.{fmt}" for i in range(n)]
            assert all(re.fullmatch(rf"{label}_\d{{3}}\.{fmt}", nm) for nm in names)
    assert len(files_of(out)) == 6 * (2 + 1 + 3)
    assert owned_files(out) == set(files_of(out))  # the marker lists exactly what was written


def test_generate_accepts_omegaconf_and_the_schema(tmp_path):
    from pipeline.lib.config.schema import SyntheticConfig

    node = OmegaConf.merge(
        OmegaConf.structured(SyntheticConfig),
        {"train_per_class": 1, "val_per_class": 1, "test_per_class": 1, "size": 48},
    )
    generate(tmp_path / "a", node)
    plain = OmegaConf.create(
        dict(
            train_per_class=1,
            val_per_class=1,
            test_per_class=1,
            size=48,
            difficulty=node.difficulty,
            seed=node.seed,
            format=node.format,
        )
    )
    generate(tmp_path / "b", plain)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert len(files_of(tmp_path / "a")) == 18


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_same_config_gives_byte_identical_files(tmp_path, fmt):
    a = files_of(generate(tmp_path / "a", cfg(format=fmt)))
    b = files_of(generate(tmp_path / "b", cfg(format=fmt)))
    assert a.keys() == b.keys() and len(a) == 36
    assert a == b


def test_thread_count_does_not_change_files(tmp_path):
    a = files_of(generate(tmp_path / "a", cfg(), workers=1))
    b = files_of(generate(tmp_path / "b", cfg(), workers=3))
    assert a == b


def test_different_seeds_differ(tmp_path):
    a = files_of(generate(tmp_path / "a", cfg(seed=1)))
    b = files_of(generate(tmp_path / "b", cfg(seed=2)))
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_no_two_images_identical_even_at_difficulty_zero(tmp_path):
    # identical files in two splits are leakage for prepare: a generation must not make one
    files = files_of(generate(tmp_path / "raw", cfg(difficulty=0.0)))
    digests = {hashlib.sha256(v).hexdigest() for v in files.values()}
    assert len(digests) == len(files)


def test_files_of_an_earlier_generation_are_replaced(tmp_path):
    out = tmp_path / "raw"
    generate(out, cfg(train_per_class=3, val_per_class=2, test_per_class=4))
    generate(out, cfg(train_per_class=1, val_per_class=1, test_per_class=1))
    fresh = generate(tmp_path / "fresh", cfg(train_per_class=1, val_per_class=1, test_per_class=1))
    assert files_of(out) == files_of(fresh)


def photos(root: Path) -> dict[str, bytes]:
    """A user's photo folder in the README's layout: distinct files in split/class folders."""
    for k, rel in enumerate(["training/a/my_photo_1.png", "training/b/x.jpg", "test/a/y.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"photo {k}".encode())
    (root / "notes.txt").write_text("mine")
    return files_of(root)


@pytest.mark.parametrize("first_generate", [False, True])
def test_a_folder_with_other_files_is_refused_and_left_byte_for_byte(tmp_path, first_generate):
    """Case synthetic-wipes-photo-folder: the generator never deletes or overwrites a file it
    did not write, also in a folder where it generated before (the marker lists its files)."""
    out = tmp_path / "raw"
    if first_generate:
        generate(out, cfg(train_per_class=1, val_per_class=1, test_per_class=1))
    before = photos(out)
    marker = (out / MARKER).read_bytes() if first_generate else None
    with pytest.raises(SyntheticDirError) as info:
        generate(out, cfg())
    assert files_of(out) == before
    assert ((out / MARKER).read_bytes() if first_generate else None) == marker
    message = str(info.value)
    assert "\n" not in message and str(out) in message and "did not write" in message
    assert "my_photo_1.png" in message


def test_a_killed_generation_can_be_redone(tmp_path):
    """The marker lists the new files before they are written: leftovers stay the generator's."""
    out = tmp_path / "raw"
    generate(out, cfg(train_per_class=2))
    owned = owned_files(out)
    victim = sorted(owned)[0]
    (out / victim).unlink()  # as if killed half-way through a generation
    generate(out, cfg(train_per_class=1))
    assert files_of(out) == files_of(generate(tmp_path / "fresh", cfg(train_per_class=1)))


def test_cli_defaults_are_the_schema_defaults():
    from pipeline.lib.config.schema import SyntheticConfig

    d = SyntheticConfig()
    args = synthetic_parser_defaults()
    assert args == {
        "per_class_train": d.train_per_class,
        "per_class_val": d.val_per_class,
        "per_class_test": d.test_per_class,
        "size": d.size,
        "difficulty": d.difficulty,
        "seed": d.seed,
        "format": d.format,
    }
    conf = yaml.safe_load((REPO / "conf/data/synthetic.yaml").read_text())["synthetic"]
    assert conf == {k: getattr(d, k) for k in conf} and set(conf) == set(vars(d))


def synthetic_parser_defaults() -> dict:
    seen = {}

    def fake_generate(out_dir, cfg, workers=None):
        seen.update(
            per_class_train=cfg.train_per_class,
            per_class_val=cfg.val_per_class,
            per_class_test=cfg.test_per_class,
            size=cfg.size,
            difficulty=cfg.difficulty,
            seed=cfg.seed,
            format=cfg.format,
        )
        return Path(out_dir)

    real = synthetic.generate
    synthetic.generate = fake_generate
    try:
        synthetic.main(["unused"])
    finally:
        synthetic.generate = real
    return seen


def test_images_are_rgb_of_the_asked_size(tmp_path):
    out = generate(tmp_path / "raw", cfg(size=72, format="jpg"))
    for path in out.rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (72, 72)
    for size in (33, 64, 101):
        for label in CLASSES:
            im = render(label, rng(size), size, 0.7)
            assert isinstance(im, Image.Image)
            assert im.mode == "RGB" and im.size == (size, size)


def test_render_is_a_function_of_its_generator():
    for label in CLASSES:
        a = np.asarray(render(label, rng(5), 64, 0.5))
        b = np.asarray(render(label, rng(5), 64, 0.5))
        c = np.asarray(render(label, rng(6), 64, 0.5))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_render_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown class"):
        render("Container_Huge", rng(0), 64, 0.5)
    with pytest.raises(ValueError, match="difficulty"):
        render(CLASSES[0], rng(0), 64, 1.5)
    with pytest.raises(ValueError, match="format"):
        generate(tmp_path / "x", cfg(format="gif"))
    assert not (tmp_path / "x").exists()


def _roughness(a: np.ndarray) -> float:
    """Mean absolute difference of horizontally neighbouring pixels: noise raises it."""
    return float(np.abs(np.diff(a.astype(np.float64), axis=1)).mean())


def test_difficulty_changes_images():
    clean, hard = [], []
    for k, label in enumerate(CLASSES):
        for i in range(3):
            clean.append(np.asarray(render(label, rng(k, i), 96, 0.0), dtype=np.float64))
            hard.append(np.asarray(render(label, rng(k, i), 96, 1.0), dtype=np.float64))
    # the same generator state gives a different picture once the knob is turned
    assert all(np.abs(c - h).mean() > 2.0 for c, h in zip(clean, hard, strict=False))
    # clean shots: no sensor noise; hard ones: visibly noisy on average
    assert np.mean([_roughness(h) for h in hard]) > 1.5 * np.mean([_roughness(c) for c in clean])


def _hue_hist(img: Image.Image, bins: int = 12) -> np.ndarray:
    """Hue histogram of the coloured (saturated) pixels: the plastic, not the backdrop."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.int64)
    coloured = hsv[..., 1] > 90
    h = np.bincount((hsv[..., 0][coloured] * bins) // 256, minlength=bins).astype(np.float64)
    return h / max(h.sum(), 1.0)


@pytest.mark.parametrize("difficulty", [0.5, 1.0])
def test_classes_are_told_apart_by_colour_histograms(difficulty):
    """A nearest-centroid classifier on hue histograms beats chance (1/6) by far.

    (The two big-container classes share their colours and differ in where they are, so they
    are partly confused here; the other four separate well.)
    """
    n_train, n_test = 6, 6
    train, test = [], []
    for k, label in enumerate(CLASSES):
        train.append(
            [_hue_hist(render(label, rng(0, k, i), 64, difficulty)) for i in range(n_train)]
        )
        test.append([_hue_hist(render(label, rng(1, k, i), 64, difficulty)) for i in range(n_test)])
    centroids = np.stack([np.mean(t, axis=0) for t in train])
    # the class means are not all the same
    assert (
        min(np.abs(centroids[i] - centroids[j]).sum() for i in range(6) for j in range(i + 1, 6))
        > 0.01
    )
    correct = 0
    for k, feats in enumerate(test):
        for f in feats:
            correct += int(np.argmin(((centroids - f) ** 2).sum(axis=1)) == k)
    accuracy = correct / (6 * n_test)
    assert accuracy >= 0.5, accuracy


def test_cli_writes_the_files(tmp_path, capsys):
    rc = synthetic.main(
        [
            str(tmp_path / "cli"),
            "--per-class-train",
            "1",
            "--per-class-val",
            "1",
            "--per-class-test",
            "2",
            "--size",
            "40",
            "--difficulty",
            "0.3",
            "--seed",
            "3",
            "--format",
            "jpg",
        ]
    )
    assert rc == 0
    got = files_of(tmp_path / "cli")
    assert len(got) == 6 * 4 and all(k.endswith(".jpg") for k in got)
    same = files_of(
        generate(
            tmp_path / "api",
            cfg(
                train_per_class=1,
                val_per_class=1,
                test_per_class=2,
                size=40,
                difficulty=0.3,
                seed=3,
                format="jpg",
            ),
        )
    )
    assert got == same
    with pytest.raises(SystemExit):
        synthetic.main([str(tmp_path / "bad"), "--difficulty", "2"])


def test_cli_runs_as_a_module(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.lib.data.sources.synthetic",
            str(tmp_path / "m"),
            "--per-class-train",
            "1",
            "--per-class-val",
            "1",
            "--per-class-test",
            "1",
            "--size",
            "32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "m").rglob("*.png"))) == 18
