"""`pipeline.lib.data.sources.folder.discover` and `pipeline.lib.data.ingest.ingest`, on folders built in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.lib.config.schema import DataConfig, SplitRatios
from pipeline.lib.data import ingest as ingest_mod
from pipeline.lib.data.images import load_rgb
from pipeline.lib.data.ingest import ingest
from pipeline.lib.data.prepared import SPLITS, PreparedDataset
from pipeline.lib.data.sources.folder import DataError, discover, split_counts

SIZE = 32
_counter = iter(range(10**9))


def img(path: Path, color=None, size=(20, 16), fmt=None) -> Path:
    """A small image with unique random content (so no two files share a hash) or a solid color."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        rng = np.random.default_rng(next(_counter))
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    else:
        im = Image.new("RGB", size, color)
    im.save(path, format=fmt)
    return path


def tree(root: Path, spec: dict[str, int], ext: str = "png") -> Path:
    """spec: {'train/cats': 3, ...} -> that many unique images in each folder."""
    for folder, n in spec.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img(root / folder / f"img{i}.{ext}")
    return root


def cfg(**kw) -> DataConfig:
    return DataConfig(source="folder", path="unused", image_size=SIZE, **kw)


def run(root: Path, tmp_path: Path, **kw) -> dict:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return ingest(root, cfg(**kw), out, progress=False)


def fails(root: Path, tmp_path: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        run(root, tmp_path, **kw)
    return str(info.value)


def check_invariants(report: dict, out: Path) -> None:
    assert report["files_found"] == report["accepted"] + len(report["rejected"]) + len(
        report["skipped"]
    )
    assert report["accepted"] == sum(report["totals"].values())
    for s in SPLITS:
        assert report["totals"][s] == sum(report["counts"][s].values())
        assert set(report["counts"][s]) == set(report["classes"])
    ds = PreparedDataset(out)
    assert ds.classes == report["classes"] == sorted(report["classes"])
    for s in SPLITS:
        rows = ds.manifest(s)
        assert ds.size(s) == len(rows) == report["totals"][s]
        assert [r.index for r in rows] == list(range(len(rows)))
        assert all(r.label_index == ds.classes.index(r.label) for r in rows)
        assert Counter(r.label for r in rows) == {c: n for c, n in report["counts"][s].items() if n}
    json.dumps(report)  # JSON-serialisable
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report


SPLIT_SPEC = {
    "training/cats": 3,
    "training/dogs": 3,
    "validation/cats": 2,
    "validation/dogs": 2,
    "test/cats": 2,
    "test/dogs": 2,
}


# --- layouts ------------------------------------------------------------------------------------


def test_split_layout_writes_the_prepared_format(tmp_path):
    root = tree(tmp_path / "ds", SPLIT_SPEC)
    report = run(root, tmp_path)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "manifest.csv",
        "report.json",
    ]  # no pixels: later stages decode the photos, checked against manifest.csv
    assert report["layout"] == "splits" and report["classes"] == ["cats", "dogs"]
    assert report["counts"] == {
        "train": {"cats": 3, "dogs": 3},
        "val": {"cats": 2, "dogs": 2},
        "test": {"cats": 2, "dogs": 2},
    }
    assert report["image_size"] == SIZE and report["root"] == str(root)  # outside the cwd
    assert report["rejected"] == [] and report["skipped"] == [] and report["leakage"] == []
    # 3 training images per class: the one warning is the small-class one, also in the report
    assert report["small_classes"] == {"cats": 3, "dogs": 3}
    assert len(report["warnings"]) == 1 and "fewer than 5 training images" in report["warnings"][0]
    check_invariants(report, out)
    ds = PreparedDataset(out)
    for s in SPLITS:  # each row holds exactly the image its manifest row names
        images = ds.images(s)
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        for r in ds.manifest(s):
            assert r.path.startswith(
                {"train": "training/", "val": "validation/", "test": "test/"}[s]
            )
            assert np.array_equal(images[r.index], load_rgb(root / r.path, SIZE))
            data = (root / r.path).read_bytes()
            assert r.sha256 == hashlib.sha256(data).hexdigest() and r.bytes == len(data)


@pytest.mark.parametrize(
    "names",
    [("train", "val", "test"), ("Train", "VALID", "Testing"), ("TRAINING", "Validation", "TEST")],
)
def test_split_folder_aliases_case_insensitive(tmp_path, names):
    tr, va, te = names
    root = tree(
        tmp_path / "ds",
        {f"{tr}/a": 2, f"{tr}/b": 2, f"{va}/a": 1, f"{va}/b": 1, f"{te}/a": 1, f"{te}/b": 1},
    )
    report = run(root, tmp_path)
    assert report["layout"] == "splits" and report["totals"] == {"train": 4, "val": 2, "test": 2}


def test_missing_validation_split_is_allowed_with_a_warning(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    report = run(root, tmp_path)
    assert report["totals"]["val"] == 0
    assert PreparedDataset(tmp_path / "out").images("val").shape == (0, SIZE, SIZE, 3)
    assert any("no validation images" in w for w in report["warnings"])
    check_invariants(report, tmp_path / "out")


@pytest.mark.parametrize(
    "present, missing", [(("train", "val"), "test/"), (("val", "test"), "training/")]
)
def test_missing_required_split_is_named(tmp_path, present, missing):
    root = tree(tmp_path / "ds", {f"{s}/{c}": 1 for s in present for c in "ab"})
    message = str(pytest.raises(DataError, discover, root, SplitRatios(), 0).value)
    assert f"no {missing}" in message and str(root) in message


def test_duplicate_split_folder_aliases_are_refused(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 1, "training/a": 1, "test/a": 1})
    assert "more than one folder for the train split" in str(
        pytest.raises(DataError, discover, root, SplitRatios(), 0).value
    )


def test_mixed_split_and_class_folders_are_refused(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 1, "test/a": 1, "cats": 1})
    message = fails(root, tmp_path)
    assert "mixes split folders" in message and "'cats/'" in message and "'train/'" in message


def test_split_folder_without_class_folders(tmp_path):
    root = tree(tmp_path / "ds", {"train": 3, "test/a": 1})
    message = fails(root, tmp_path)
    assert "has no class sub-folders (3 image files lie directly in it)" in message


def test_single_folder_is_split_stratified_and_deterministic(tmp_path):
    root = tree(tmp_path / "ds", {"ants": 50, "bees": 30, "wasps": 7})
    ratios = SplitRatios(train=0.2, val=0.4, test=0.4)
    first = discover(root, ratios, seed=42)
    again = discover(root, ratios, seed=42)
    other = discover(root, ratios, seed=43)
    assert first.layout == "single" and first.classes == ["ants", "bees", "wasps"]
    assert first.candidates == again.candidates  # same seed, same split
    assert {(c.path, c.split) for c in first.candidates} != {
        (c.path, c.split) for c in other.candidates
    }
    n = Counter((c.label, c.split) for c in first.candidates)
    assert (n["ants", "train"], n["ants", "val"], n["ants", "test"]) == (10, 20, 20)
    assert (n["bees", "train"], n["bees", "val"], n["bees", "test"]) == (6, 12, 12)
    assert (
        sum(n["wasps", s] for s in SPLITS) == 7
        and n["wasps", "train"] >= 1
        and n["wasps", "test"] >= 1
    )
    assert len({c.path for c in first.candidates}) == 87  # each file in exactly one split
    # a file's split does not depend on the other classes
    (root / "zebras").mkdir()
    img(root / "zebras" / "z.png")
    with_zebras = discover(root, ratios, seed=42)
    assert {c for c in with_zebras.candidates if c.label != "zebras"} == set(first.candidates)


def test_single_folder_every_class_gets_train_and_test(tmp_path):
    root = tree(tmp_path / "ds", {"a": 2, "b": 3, "c": 4})
    report = run(root, tmp_path)
    for label in "abc":
        assert report["counts"]["train"][label] >= 1 and report["counts"]["test"][label] >= 1
    check_invariants(report, tmp_path / "out")


def test_single_folder_with_zero_val_ratio_has_no_val(tmp_path):
    root = tree(tmp_path / "ds", {"a": 10, "b": 10})
    report = run(root, tmp_path, split=SplitRatios(train=0.5, val=0.0, test=0.5))
    assert report["totals"] == {"train": 10, "val": 0, "test": 10}


def test_split_counts():
    r = (0.2, 0.4, 0.4)
    assert split_counts(0, r) == (0, 0, 0)
    assert split_counts(1, r) == (1, 0, 0)
    assert split_counts(2, r) == (1, 0, 1)
    assert split_counts(3, r) == (1, 1, 1)
    assert split_counts(10, r) == (2, 4, 4)
    assert split_counts(2, (0.9, 0.0, 0.1)) == (1, 0, 1)
    assert split_counts(5, (0.5, 0.0, 0.5))[1] == 0
    for n in range(2, 60):
        for ratios in (r, (0.7, 0.15, 0.15), (0.05, 0.05, 0.9), (0.9, 0.0, 0.1)):
            t, v, s = split_counts(n, ratios)
            assert t + v + s == n and t >= 1 and s >= 1 and v >= 0


# --- what is found and what is skipped ------------------------------------------------------------


def test_hidden_and_system_files_are_skipped_and_listed(tmp_path):
    root = tree(tmp_path / "ds", {"a": 2, "b": 2})
    img(root / "a" / "._img0.png")  # AppleDouble companion
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "b" / "Thumbs.db").write_bytes(b"x")
    (root / "b" / "desktop.ini").write_text("[.ShellClassInfo]")
    img(root / "__MACOSX" / "a" / "._img0.png")
    img(root / "a" / ".ipynb_checkpoints" / "x.png")
    img(root / "a" / ".appledouble_only" / "._y.png")
    (root / ".synthetic.json").write_text("{}")
    # hidden folders holding photos (a class folder among them): counted, named, what to do
    for name in ("h1.jpg", "h2.jpg", "h3.jpg", "._h1.jpg"):
        img(root / "a" / ".hidden_album" / name)
    img(root / ".secretclass" / "z.jpg")
    report = run(root, tmp_path)
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    fix = "rename it without the leading dot"
    assert skipped.pop("a/.hidden_album") == f"hidden folder with image files (3): {fix}"
    assert skipped.pop(".secretclass") == f"hidden folder with image files (1): {fix}"
    assert (
        "2 hidden folder(s) with image files skipped (rename them without the leading dot to use "
        "them): .secretclass, a/.hidden_album"
    ) in report["warnings"]
    assert not any("files/folders skipped" in w for w in report["warnings"])  # junk: not counted
    assert skipped == {
        p: "hidden/system file"
        for p in (
            "a/._img0.png",
            "a/.DS_Store",
            "b/Thumbs.db",
            "b/desktop.ini",
            "__MACOSX",
            "a/.ipynb_checkpoints",
            "a/.appledouble_only",
            ".synthetic.json",
        )
    }
    assert report["classes"] == ["a", "b"] and report["accepted"] == 4
    check_invariants(report, tmp_path / "out")


def test_non_image_files_are_skipped_with_reason(tmp_path):
    root = tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "a" / "notes.txt").write_text("hi")
    (root / "README.md").write_text("hi")
    img(root / "loose.png")
    report = run(root, tmp_path)
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert skipped["a/notes.txt"].startswith("not an image file extension")
    assert (
        "outside" in skipped["README.md"]
        and "move it into a class sub-folder" in skipped["loose.png"]
    )
    check_invariants(report, tmp_path / "out")


def test_nested_folders_unicode_spaces_and_upper_case_extensions(tmp_path):
    root = tmp_path / "my photos"
    img(root / "café au lait" / "2023" / "summer trip" / "Phöto 1.JPG", fmt="JPEG")
    img(root / "café au lait" / "IMG 0002.JpEg", fmt="JPEG")
    img(root / "日本" / "写真.PNG")
    img(root / "日本" / "deep" / "er" / "x.png")
    report = run(root, tmp_path, split=SplitRatios(train=0.5, val=0.0, test=0.5))
    assert report["classes"] == ["café au lait", "日本"] and report["accepted"] == 4
    assert report["skipped"] == [] and report["rejected"] == []
    paths = {r.path for r in PreparedDataset(tmp_path / "out").manifest()}
    assert "café au lait/2023/summer trip/Phöto 1.JPG" in paths and "日本/deep/er/x.png" in paths
    check_invariants(report, tmp_path / "out")


def test_class_names_in_nfd_and_nfc_are_one_class(tmp_path):
    nfd, nfc = "cafe\u0301", "caf\u00e9"  # macOS writes NFD
    root = tree(
        tmp_path / "ds", {f"train/{nfd}": 2, f"test/{nfc}": 1, "train/tea": 2, "test/tea": 1}
    )
    report = run(root, tmp_path)
    assert report["classes"] == [nfc, "tea"] and report["counts"]["test"][nfc] == 1


def test_undecodable_file_name_bytes_are_reported_readably(tmp_path):
    root = tree(tmp_path / "ds", {"a": 2, "b": 2})
    try:
        bad = root / "a" / os.fsdecode(b"caf\xe9.png")  # Latin-1 name on a UTF-8 file system
        img(bad)
    except (UnicodeError, OSError):
        pytest.skip("this file system refuses non-UTF-8 names")
    report = run(root, tmp_path)
    assert report["accepted"] == 5
    assert "a/caf\\xe9.png" in {r.path for r in PreparedDataset(tmp_path / "out").manifest()}


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_links_inside_the_folder_are_followed_loops_and_broken_links_skipped(tmp_path):
    root = tree(tmp_path / "ds", {"a": 2, "b": 2, ".pool/more": 2})
    os.symlink(root / ".pool" / "more", root / "a" / "linked dir")  # a folder link: 2 images count
    os.symlink(root / ".pool" / "more" / "img0.png", root / "b" / "linked.png")  # a file link
    os.symlink(root / "a", root / "a" / "loop")  # a folder that contains itself
    os.symlink(root, root / "b" / "up")  # a link to the data root (an ancestor)
    os.symlink(root / "b" / "self", root / "b" / "self")  # a link to itself
    os.symlink(tmp_path / "missing.png", root / "b" / "gone.png")  # broken
    report = run(root, tmp_path, leakage="warn")  # linked.png duplicates linked dir/img0.png
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "loop" in skipped["a/loop"] and "loop" in skipped["b/up"] and "loop" in skipped["b/self"]
    assert skipped["b/gone.png"].startswith("broken symbolic link")
    assert report["accepted"] == 7  # 2 + 2 linked in a, 2 + 1 linked in b
    paths = {r.path for r in PreparedDataset(tmp_path / "out").manifest()}
    assert {"a/linked dir/img0.png", "a/linked dir/img1.png", "b/linked.png"} <= paths
    assert any("b/linked.png" in w and "a/linked dir/img0.png" in w for w in report["warnings"])
    check_invariants(report, tmp_path / "out")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_a_link_to_another_photo_of_the_folder_is_that_photo_again(tmp_path):
    root = tree(tmp_path / "ds", SPLIT_SPEC)
    os.symlink(root / "training/cats/img0.png", root / "training/cats/again.png")
    report = run(root, tmp_path)  # the same split: a duplicate, kept and reported
    assert any("training/cats/again.png" in w for w in report["warnings"])
    os.symlink(root / "training/dogs/img0.png", root / "test/dogs/copy.png")  # another split
    assert "training/dogs/img0.png (train) == test/dogs/copy.png (test)" in fails(root, tmp_path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_links_to_outside_the_folder_are_left_out_and_reported(tmp_path):
    elsewhere = tree(tmp_path / "elsewhere", {"more": 2, "cats": 3})
    root = tree(tmp_path / "ds", {"a": 2, "b": 2})
    os.symlink(elsewhere / "more", root / "a" / "linked dir")  # a folder link
    os.symlink(elsewhere / "more" / "img0.png", root / "b" / "linked.png")  # a file link
    os.symlink(elsewhere / "cats", root / "cats")  # a whole class folder
    os.symlink(Path("..") / ".." / "elsewhere" / "more" / "img1.png", root / "b" / "rel.png")
    report = run(root, tmp_path)
    assert report["accepted"] == 4 and report["classes"] == ["a", "b"]
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    outside = ["a/linked dir", "b/linked.png", "b/rel.png", "cats"]
    for name in outside:
        assert skipped[name].startswith("symbolic link to outside the data folder")
    assert str(elsewhere / "cats") in skipped["cats"]
    (warning,) = [w for w in report["warnings"] if "outside the data folder" in w]
    assert warning.startswith("4 symbolic link(s)") and all(name in warning for name in outside)
    paths = {r.path for r in PreparedDataset(tmp_path / "out").manifest()}
    assert paths == {"a/img0.png", "a/img1.png", "b/img0.png", "b/img1.png"}
    check_invariants(report, tmp_path / "out")
    via_link = tmp_path / "link to ds"  # the data path itself may be a link
    os.symlink(root, via_link)
    assert run(via_link, tmp_path)["accepted"] == 4


def test_a_broken_colour_profile_is_a_warning_and_the_photo_is_used(tmp_path):
    root = tree(tmp_path / "ds", {"a": 2, "b": 2})
    Image.new("RGB", (20, 16), (200, 30, 30)).save(root / "a" / "p.png", icc_profile=b"broken")
    report = run(root, tmp_path)
    assert report["accepted"] == 5 and report["rejected"] == []
    (warning,) = [w for w in report["warnings"] if "colour profile" in w]
    assert (
        warning.startswith("1 image(s) used without their colour profile") and "a/p.png" in warning
    )


# --- data errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    message = fails(tmp_path / "nope", tmp_path)
    assert (
        "does not exist" in message and str(tmp_path / "nope") in message and "data.path" in message
    )


def test_path_is_a_file(tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"PK\3\4")
    message = fails(tmp_path / "photos.zip", tmp_path)
    assert "is a file, not a folder" in message and "extract" in message


def test_folder_without_images(tmp_path):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "notes.txt").write_text("x")
    message = fails(root, tmp_path)
    assert "No image files found" in message and "notes.txt" in message and ".jpg" in message


def test_folder_without_class_folders(tmp_path):
    root = tree(tmp_path / "ds", {".": 3})
    message = fails(root, tmp_path)
    assert "has no class sub-folders (3 image files lie directly in it)" in message


def test_single_class_is_refused(tmp_path):
    root = tree(tmp_path / "ds", {"only": 4})
    assert "a single class cannot be classified; add at least one more class folder" in fails(
        root, tmp_path
    )


def test_single_class_that_wraps_the_real_dataset_gets_a_hint(tmp_path):
    root = tree(tmp_path / "ds", {"MyData/cats": 2, "MyData/dogs": 2})
    message = fails(root, tmp_path)
    assert "single class" in message and f"set data.path to '{root / 'MyData'}'" in message


def test_empty_class_folder_is_a_class_and_is_reported(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    (root / "train" / "empty").mkdir()
    (root / "test" / "empty").mkdir()
    message = fails(root, tmp_path)
    assert "class 'empty' has 0 usable training image(s)" in message
    assert "'train/empty/' has no image files" in message
    assert "class 'empty' has no usable test images" in message


def test_class_missing_from_a_split_is_named(tmp_path):
    root = tree(
        tmp_path / "ds",
        {
            "train/a": 2,
            "train/b": 2,
            "train/c": 2,
            "val/a": 1,
            "val/b": 1,
            "test/a": 1,
            "test/b": 1,
        },
    )
    message = fails(root, tmp_path)
    assert "class 'c' has no usable test images (there is no 'c' folder in test/)" in message
    assert "Create 'test/c/'" in message
    assert "'a'" not in message and "'b'" not in message
    (root / "test" / "c").mkdir()
    img(root / "test" / "c" / "x.png")
    report = run(root, tmp_path)  # only val lacks c now: a warning
    assert any(
        "class 'c' has no validation images (there is no 'c' folder in val/)" in w
        for w in report["warnings"]
    )


def test_class_names_differing_in_case_are_refused(tmp_path):
    root = tree(tmp_path / "ds", {"train/Cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    message = fails(root, tmp_path)
    assert "classes 'Cat', 'cat' differ only in case" in message and "\n" not in message


def test_min_images_per_class(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 5, "train/b": 2, "test/a": 1, "test/b": 1})
    message = fails(root, tmp_path, min_images_per_class=3)
    assert (
        "class 'b' has 2 usable training image(s), fewer than data.min_images_per_class=3"
        in message
    )
    assert "Add images to 'train/b/'" in message and "class 'a'" not in message
    assert run(root, tmp_path, min_images_per_class=2)["totals"]["train"] == 7


# --- rejected files -------------------------------------------------------------------------------


def test_rejected_files_are_listed_and_the_stage_goes_on(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 8, "train/b": 8, "test/a": 2, "test/b": 2})
    (root / "train" / "a" / "empty.jpg").touch()
    (root / "train" / "a" / "text.jpg").write_text("not an image")
    (root / "test" / "b" / "IMG_1.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(40))
    report = run(root, tmp_path)  # 3 of 23 = 13% <= 20%
    reasons = {r["file"]: r["reason"] for r in report["rejected"]}
    assert reasons["train/a/empty.jpg"] == "empty file"
    assert reasons["train/a/text.jpg"].startswith("not an image")
    assert reasons["test/b/IMG_1.heic"].endswith("damaged HEIC image")
    assert "train/a: 2 of 10 files rejected" in " ".join(report["warnings"])
    assert "test/b: 1 of 3 files rejected" in " ".join(report["warnings"])
    assert report["accepted"] == 20 and report["files_found"] == 23
    check_invariants(report, tmp_path / "out")


def test_too_many_rejected_files_fail_with_a_list(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    for i in range(25):
        (root / "train" / "a" / f"bad{i:02d}.jpg").write_text("nope")
    message = fails(root, tmp_path)
    assert (
        "25 of 31 image files (81%) could not be used, more than data.max_rejected_fraction=0.2"
        in message
    )
    assert "train/a/bad00.jpg: not an image" in message and "train/a/bad19.jpg" in message
    assert "train/a/bad20.jpg" not in message and "... and 5 more" in message
    assert run(root, tmp_path, max_rejected_fraction=0.9)["accepted"] == 6


def test_error_carries_the_report(tmp_path):
    root = tree(tmp_path / "ds", {"train/a": 2, "train/b": 2, "test/a": 1})
    with pytest.raises(DataError) as info:
        run(root, tmp_path)
    report = info.value.report
    assert report["counts"]["test"]["b"] == 0 and report["files_found"] == 5


# --- leakage and duplicates -----------------------------------------------------------------------


def leaky(tmp_path: Path) -> Path:
    root = tree(tmp_path / "ds", SPLIT_SPEC)
    shutil.copy(root / "training/cats/img0.png", root / "test/cats/copy.png")
    shutil.copy(root / "training/dogs/img1.png", root / "validation/dogs/copy.png")
    shutil.copy(root / "training/dogs/img1.png", root / "test/dogs/copy.png")
    return root


def test_leakage_fails_by_default_naming_every_pair(tmp_path):
    message = fails(leaky(tmp_path), tmp_path)
    assert "2 image(s) appear in more than one split (4 pairs of identical files)" in message
    for pair in (
        "training/cats/img0.png (train) == test/cats/copy.png (test)",
        "training/dogs/img1.png (train) == validation/dogs/copy.png (val)",
        "training/dogs/img1.png (train) == test/dogs/copy.png (test)",
        "validation/dogs/copy.png (val) == test/dogs/copy.png (test)",
    ):
        assert pair in message
    assert "data.leakage=warn" in message


def test_leakage_warn_mode_goes_on_and_reports(tmp_path):
    report = run(leaky(tmp_path), tmp_path, leakage="warn")
    groups = {tuple(g["files"]): g["splits"] for g in report["leakage"]}
    assert groups == {
        ("training/cats/img0.png", "test/cats/copy.png"): ["train", "test"],
        ("training/dogs/img1.png", "validation/dogs/copy.png", "test/dogs/copy.png"): [
            "train",
            "val",
            "test",
        ],
    }
    assert all(len(g["sha256"]) == 64 for g in report["leakage"])
    assert sum("leakage" in w for w in report["warnings"]) == 4
    check_invariants(report, tmp_path / "out")


def test_duplicates_within_a_split_are_kept_with_a_warning(tmp_path):
    root = tree(tmp_path / "ds", SPLIT_SPEC)
    shutil.copy(root / "training/cats/img0.png", root / "training/cats/again.png")
    shutil.copy(root / "training/cats/img1.png", root / "training/dogs/mislabelled.png")
    report = run(root, tmp_path)
    assert report["counts"]["train"] == {"cats": 4, "dogs": 4} and report["leakage"] == []
    text = " ".join(report["warnings"])
    assert (
        "duplicate images within the train split (kept): training/cats/again.png, training/cats/img0.png"
        in text
    )
    assert "labelled with different classes ['cats', 'dogs']" in text


# --- streaming, progress --------------------------------------------------------------------------


def test_decoding_is_streamed_with_bounded_in_flight_work(tmp_path, monkeypatch):
    root = tree(tmp_path / "ds", {"a": 40, "b": 40})
    started, consumed, peak = [0], [0], [0]
    lock = threading.Lock()
    real = ingest_mod._check_one

    def counting(*args):
        with lock:
            started[0] += 1
            peak[0] = max(peak[0], started[0] - consumed[0])
        return real(*args)

    real_shown = ingest_mod.display_path  # called once per result the consumer takes

    def shown(*args):
        with lock:
            consumed[0] += 1
        return real_shown(*args)

    monkeypatch.setattr(ingest_mod, "_check_one", counting)
    monkeypatch.setattr(ingest_mod, "display_path", shown)
    out = tmp_path / "out"
    out.mkdir()
    report = ingest(root, cfg(), out, workers=2, progress=False)
    assert started[0] == 80 and report["accepted"] == 80
    assert peak[0] <= 2 * 4 + 1  # never the whole folder in memory


def test_progress_bar_on_stderr(tmp_path, capsys):
    root = tree(tmp_path / "ds", {"a": 2, "b": 2})
    out = tmp_path / "out"
    out.mkdir()
    ingest(root, cfg(), out)
    captured = capsys.readouterr()
    assert "img/s" in captured.err and captured.out == ""


def test_the_bar_redraws_every_30_s_off_a_terminal():
    """Off a terminal (a CI log, `dvc repro > log`) the console's 30 s redraw interval holds for
    prepare's bar too: an explicit 0.5 s interval wrote a bar twice a second into logs."""
    code = "import pipeline, tqdm; from pipeline.lib.data import ingest as m;"
    code += "print(tqdm.tqdm(total=1, **m._BAR).mininterval)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "PIPELINE_VERBOSE"))}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert float(run.stdout) == 30, run.stderr


def test_same_result_with_one_or_many_workers(tmp_path):
    root = tree(tmp_path / "ds", {"a": 9, "b": 7, "c": 5})
    results = []
    for workers in (1, 4):
        out = tmp_path / f"out{workers}"
        out.mkdir()
        ingest(root, cfg(), out, workers=workers, progress=False)
        results.append([(out / name).read_text() for name in ("manifest.csv", "report.json")])
    assert results[0] == results[1]


def test_accepts_the_validated_read_only_config(tmp_path):
    from pipeline.lib.config.schema import validate

    config = validate(
        {
            "data": {
                "source": "folder",
                "path": "x",
                "image_size": SIZE,
                "resize": "pad",
                "split": {"train": 0.5, "val": 0.0, "test": 0.5},
                "leakage": "warn",
            },
            "model": {"weights": None},
        }
    )
    root = tree(tmp_path / "ds", {"a": 4, "b": 4})
    out = tmp_path / "out"
    out.mkdir()
    report = ingest(root, config.data, out, progress=False)
    assert report["totals"] == {"train": 4, "val": 0, "test": 4} and report["resize"] == "pad"
    check_invariants(report, out)


def test_a_folder_inside_the_project_is_recorded_relative_so_clones_hash_the_same(
    tmp_path, monkeypatch
):
    tree(tmp_path / "project" / "data" / "ds", SPLIT_SPEC)
    monkeypatch.chdir(tmp_path / "project")
    assert run(Path("data/ds"), tmp_path)["root"] == "data/ds"
    assert run(tmp_path / "project" / "data" / "ds", tmp_path)["root"] == "data/ds"
