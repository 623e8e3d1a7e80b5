"""Class names (pipeline.lib.data.class_names): the folder rules and the one key function."""

from __future__ import annotations

import unicodedata

import pytest
from mlflow.utils.validation import _validate_metric_name

from pipeline.lib.config.schema import SplitRatios
from pipeline.lib.data.class_names import (
    MAX_KEY_LENGTH,
    case_collisions,
    class_key,
    class_name,
    name_collisions,
)
from pipeline.lib.data.sources.folder import DataError, discover


def folders(root, names):
    for split in ("training", "test"):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            (root / split / name / "x.png").write_bytes(name.encode() + split.encode())
    return root


def test_names_are_trimmed_and_nfc_normalised():
    assert class_name(" car\t") == "car"
    assert class_name(unicodedata.normalize("NFD", "café")) == "café"
    assert class_name("   ") == "   "  # nothing left to trim to


def test_folders_that_become_one_class_are_refused(tmp_path):
    """Case class-folder-trailing-space-merged: 'car' and 'car ' were merged silently."""
    root = folders(tmp_path / "ds", ["bus", "car", "car "])
    with pytest.raises(DataError) as info:
        discover(root, SplitRatios(), 42)
    message = str(info.value)
    assert "class folders 'car', 'car ' all become the class 'car'" in message
    assert "\n" not in message and "rename one of them" in message


def test_nfc_and_nfd_spellings_are_one_class_and_refused(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert name_collisions([nfc, nfd, "bus"]) == [
        f"class folders {', '.join(repr(n) for n in sorted([nfc, nfd]))} all become the class "
        f"{nfc!r}"
    ]


def test_names_differing_in_case_are_refused(tmp_path):
    root = folders(tmp_path / "ds", ["Car", "car", "bus"])
    with pytest.raises(DataError, match="classes 'Car', 'car' differ only in case"):
        discover(root, SplitRatios(), 42)
    assert case_collisions(["a", "b"]) == []


def test_keys_are_distinct_for_distinct_names():
    """Case metric-name-collision: 'red car', 'red,car' and 'red_car' shared one MLflow key."""
    names = ["red car", "red,car", "red_car", "red:car", "bus", "Bus", "x" * 240, "x" * 241]
    keys = [class_key(n) for n in names]
    assert len(set(keys)) == len(names)
    assert class_key("red_car") == "red_car" and class_key("bus") == "bus"  # plain names kept
    assert class_key("red car").startswith("red_car-")
    # a plain name that looks like a hashed key is hashed too: it cannot equal another key
    assert class_key(class_key("red car")) != class_key("red car")


@pytest.mark.parametrize("name", ["x" * 240, 'Ünïcödé ✓ / \\ : * ? " < > |', ".hidden", "-", "a/b"])
def test_keys_are_safe_and_bounded(name):
    key = class_key(name)
    assert 0 < len(key) <= MAX_KEY_LENGTH
    assert key.isascii() and "/" not in key and not key.startswith((".", "-"))
    _validate_metric_name(f"test_precision_{key}")  # MLflow accepts the metric built from it
