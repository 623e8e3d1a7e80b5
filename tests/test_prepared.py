"""The prepared dataset (pipeline.lib.data.prepared) and the prepare stage's guards: writing on a
full disk, stale prepared data, data that is never the user's photo folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.errors import StageInputError, UserError
from pipeline.prepare import prepare
from tests.conftest import ROOT, compose, tiny_config, tiny_overrides


def folder_config(tmp: Path, photos: Path, **extra: object):
    """The tiny test settings with the folder source on `photos`."""
    from pipeline.lib.config.schema import validate

    overrides = tiny_overrides(tmp, **{"data.path": photos, **extra})
    return validate(compose(["data=folder", *(o for o in overrides if "data.synthetic." not in o)]))


def write_photos(root: Path, per_class: dict[str, int], size=(40, 30)) -> dict[str, bytes]:
    """Distinct small PNGs in class folders; returns {relative path: bytes}."""
    rng = np.random.default_rng(0)
    for label, n in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.png")
    return snapshot(root)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_prepare_writes_no_pixels_and_readers_refuse_a_changed_photo(tmp_path):
    """No decoded copy: the prepared folder is the manifest, classes and report (a few hundred
    bytes per photo); a photo changed after prepare is one error naming it, not other pixels."""
    photos = tmp_path / "photos"
    write_photos(photos, {"a": 6, "b": 6})
    cfg = folder_config(tmp_path, photos)
    prepare(cfg)
    out = Path(cfg.paths.prepared)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "manifest.csv", "report.json"]
    assert sum(p.stat().st_size for p in out.iterdir()) < 400 * 12
    dataset = open_prepared(out, cfg.data)
    first = dataset.manifest("train")[0]
    assert dataset.images("train")[:2].shape == (2, 32, 32, 3)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(photos / first.path)
    with pytest.raises(StageInputError) as info:
        dataset.images("train")[:2]
    message = str(info.value)
    assert "\n" not in message and str(photos / first.path) in message
    assert "changed after prepare" in message and "rerun prepare" in message
    (photos / first.path).unlink()
    with pytest.raises(StageInputError, match="cannot read it .* rerun prepare"):
        dataset.images("train")[0]


DISK_FULL_SCRIPT = """
import resource, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_prepared import folder_config
from pipeline.prepare import prepare
cfg = folder_config(Path({tmp!r}), Path({photos!r}), **{{"data.image_size": 224,
                                                         "paths.prepared": {out!r}}})
{limit}
prepare(cfg)
"""


def run_disk_full(tmp_path: Path, out: Path, limit: str) -> subprocess.CompletedProcess:
    photos = tmp_path / "photos"
    write_photos(photos, {"a": 8, "b": 8})
    script = DISK_FULL_SCRIPT.format(
        root=str(ROOT), tmp=str(tmp_path), photos=str(photos), out=str(out), limit=limit
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_disk_full(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]  # an exception, not a signal (SIGBUS: -7)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.lib.files.NoSpaceError: No space left to write"), last
    assert str(out) in last and "paths.prepared" in last
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_a_file_size_limit_during_prepare_is_one_message_and_leaves_nothing(tmp_path):
    """Case disk-full-prepare-sigbus, with a real limit any user can set: RLIMIT_FSIZE makes
    writes past 1 kB fail with EFBIG, as a full disk fails them with ENOSPC (prepare writes no
    pixels: its largest file is the manifest, ~2.5 kB here)."""
    out = tmp_path / "data" / "prepared"
    limit = "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))"
    check_disk_full(run_disk_full(tmp_path, out, limit), out)


def test_a_full_tmpfs_during_prepare_is_one_message_and_leaves_nothing(tmp_path):
    """Case disk-full-prepare-sigbus as reported: a tmpfs too small, here 8 kB (needs root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = mount / "prepared"
        check_disk_full(run_disk_full(tmp_path, out, ""), out)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def prepared(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, {"a": 6, "b": 6})
    prepare(folder_config(tmp_path, photos))
    return tmp_path, photos


@pytest.mark.parametrize(
    ("change", "recorded", "wanted"),
    [
        ({"data.image_size": 96}, "data.image_size=32", "data.image_size=96"),
        ({"data.resize": "crop"}, "data.resize=stretch", "data.resize=crop"),
        ({"data.path": "OTHER"}, "from '{photos}'", "from '{other}'"),
    ],
)
def test_prepared_data_that_does_not_match_the_config_is_refused(
    prepared, change, recorded, wanted
):
    """Case stale-prepared-image-size: train / evaluate / export open the prepared data with
    their data config; every setting it was made with is checked, both values named."""
    tmp, photos = prepared
    other = tmp / "other"
    values = {k: (str(other) if v == "OTHER" else v) for k, v in change.items()}
    cfg = folder_config(tmp, photos, **values)
    with pytest.raises(StageInputError) as info:
        open_prepared(cfg.paths.prepared, cfg.data)
    message = str(info.value)
    assert recorded.format(photos=photos) in message and wanted.format(other=other) in message
    assert "rerun prepare" in message and "\n" not in message
    same = folder_config(tmp, photos)
    assert open_prepared(same.paths.prepared, same.data).image_size == 32


def test_the_synthetic_source_is_refused_for_prepared_photos(prepared):
    tmp, _ = prepared
    cfg = tiny_config(tmp)
    with pytest.raises(StageInputError, match="data.source=folder from .*data.source=synthetic"):
        open_prepared(cfg.paths.prepared, cfg.data)


def test_the_synthetic_source_never_touches_a_photo_folder(tmp_path):
    """Case synthetic-wipes-photo-folder: pointing the generator's folder at photos (the only
    way left, since data.path is refused with the synthetic source) changes no byte."""
    photos = tmp_path / "photos"
    before = write_photos(photos / "training", {"a": 2, "b": 2})
    write_photos(photos / "test", {"a": 1, "b": 1})
    before = snapshot(photos)
    cfg = tiny_config(tmp_path, **{"data.synthetic.dir": photos})
    with pytest.raises(UserError, match="did not write"):
        prepare(cfg)
    assert snapshot(photos) == before


def test_prepared_output_inside_the_photo_folder_is_refused(tmp_path):
    photos = tmp_path / "photos"
    before = write_photos(photos, {"a": 3, "b": 3})
    cfg = folder_config(tmp_path, photos, **{"paths.prepared": photos / "prep"})
    with pytest.raises(UserError, match="overlap"):
        prepare(cfg)
    assert snapshot(photos) == before


def test_a_folder_of_class_folders_trains_on_most_of_it_and_small_classes_warn(tmp_path):
    """Case folder-autosplit-20pct-train: 32 photos in 6 classes (3-7 each), default split."""
    photos = tmp_path / "photos"
    before = write_photos(photos, {"c1": 3, "c2": 4, "c3": 5, "c4": 6, "c5": 7, "c6": 7})
    report = prepare(folder_config(tmp_path, photos))
    assert report["totals"]["train"] / report["accepted"] >= 0.6
    assert report["totals"]["train"] == 20  # was 6 (one per class) with the old 20/40/40
    assert report["small_classes"] == {"c1": 1, "c2": 2, "c3": 3, "c4": 4}
    assert any("fewer than 5 training images" in w for w in report["warnings"])
    assert report["source"] == "folder" and report["root"] == str(photos)
    assert snapshot(photos) == before


@pytest.mark.parametrize("how", ["symlink", "dotdot"])
def test_a_photo_folder_hidden_behind_a_link_or_dotdot_is_still_refused(tmp_path, how):
    """The same folder named another way (a symbolic link to it, or `sub/..`): still refused,
    the photos untouched byte for byte."""
    photos = tmp_path / "photos"
    before = write_photos(photos, {"a": 3, "b": 3})
    if how == "symlink":
        (tmp_path / "link").symlink_to(photos, target_is_directory=True)
        data, prepared = tmp_path / "link", photos
    else:
        data, prepared = photos / "a" / "..", photos / "prep"
    cfg = folder_config(tmp_path, data, **{"paths.prepared": prepared})
    with pytest.raises(UserError, match="overlap"):
        prepare(cfg)
    assert snapshot(photos) == before


def test_missing_synthetic_photos_are_generated_again_with_the_same_bytes(tmp_path):
    """The generated toy trucks are no DVC output: where DVC restored prepare's output without
    running it (a queued `dvc exp run`), the pixel readers find no photos; `open_prepared`
    writes them again, and each matches the manifest's sha256 (read_photo checks)."""
    cfg = tiny_config(tmp_path)
    prepare(cfg)
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    before = dataset.images("test")[:]
    for row in dataset.manifest():
        (dataset.root / row.path).unlink()
    again = open_prepared(cfg.paths.prepared, cfg.data)
    assert all((again.root / row.path).is_file() for row in again.manifest())
    np.testing.assert_array_equal(again.images("test")[:], before)
