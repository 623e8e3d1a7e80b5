"""The prepared dataset: what `prepare` writes and every later stage reads.

Layout of the prepared folder (one DVC output):

    classes.json        the class names, in label-index order
    manifest.csv        one row per accepted image: split, index, label, label_index, path, sha256
    report.json         counts per split and class, rejected files with reasons, leakage pairs
    train.npy val.npy test.npy
                        uint8 arrays (N, size, size, 3): decoded, RGB, resized once

Arrays are written and read as memory maps, so no stage holds a whole split in memory.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.errors import StageInputError
from pipeline.lib.files import read_json, write_json

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("split", "index", "label", "label_index", "path", "sha256")


@dataclass(frozen=True)
class ManifestRow:
    split: str
    index: int
    label: str
    label_index: int
    path: str
    sha256: str


class SplitWriter:
    """Streams images of one split into `<split>.npy` without holding them in memory.

    `capacity` is an upper bound (the number of candidate files); `close()` trims the array to the
    rows actually written.
    """

    def __init__(self, folder: Path, split: str, capacity: int, image_size: int) -> None:
        self.path = folder / f"{split}.npy"
        self.image_size = image_size
        self.capacity = max(capacity, 1)
        self.count = 0
        self._array = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.uint8, shape=(self.capacity, image_size, image_size, 3)
        )

    def append(self, image: np.ndarray) -> int:
        if self.count >= self.capacity:
            raise IndexError(f"{self.path}: more images than the capacity {self.capacity}")
        self._array[self.count] = image
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        self._array.flush()
        del self._array
        if self.count == self.capacity:
            return
        full = np.load(self.path, mmap_mode="r")
        trimmed_path = self.path.with_suffix(".trim.npy")
        out = np.lib.format.open_memmap(
            trimmed_path, mode="w+", dtype=np.uint8, shape=(self.count, *full.shape[1:])
        )
        for start in range(0, self.count, 256):
            out[start : start + 256] = full[start : start + 256]
        out.flush()
        del out, full
        os.replace(trimmed_path, self.path)


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        for r in rows:
            writer.writerow([r.split, r.index, r.label, r.label_index, r.path, r.sha256])


class PreparedDataset:
    """Read access to a prepared folder; arrays are memory-mapped."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not (self.folder / "classes.json").is_file():
            raise FileNotFoundError(
                f"No prepared dataset at '{self.folder}' (classes.json missing). "
                "Run the prepare stage first: `dvc repro prepare` or `python -m pipeline.prepare`."
            )
        self.classes: list[str] = list(read_json(self.folder / "classes.json"))
        self.report: dict = read_json(self.folder / "report.json")
        self.image_size: int = int(self.report["image_size"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, size, size, 3), memory-mapped: index it in batches."""
        return np.load(self.folder / f"{split}.npy", mmap_mode="r")

    def manifest(self, split: str | None = None) -> list[ManifestRow]:
        with open(self.folder / "manifest.csv", newline="", encoding="utf-8") as fh:
            rows = [
                ManifestRow(
                    split=r["split"],
                    index=int(r["index"]),
                    label=r["label"],
                    label_index=int(r["label_index"]),
                    path=r["path"],
                    sha256=r["sha256"],
                )
                for r in csv.DictReader(fh)
            ]
        rows = [r for r in rows if split is None or r.split == split]
        return sorted(rows, key=lambda r: (SPLITS.index(r.split), r.index))

    def labels(self, split: str) -> np.ndarray:
        """int label indices of a split, aligned with `images(split)`."""
        return np.array([r.label_index for r in self.manifest(split)], dtype=np.int64)

    def size(self, split: str) -> int:
        return int(self.images(split).shape[0])


def iter_batches(array: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive float32 batches of a (memory-mapped) array, one batch in memory at a time."""
    for start in range(0, len(array), batch_size):
        yield np.asarray(array[start : start + batch_size], dtype=np.float32)


def write_classes(folder: Path, classes: Sequence[str]) -> None:
    write_json(folder / "classes.json", list(classes))


def open_prepared(folder: str | os.PathLike[str], data: Any = None) -> PreparedDataset:
    """The prepared dataset in `folder`, checked against the `data` config it is used with.

    Args:
        folder: the prepare stage's output (`paths.prepared`).
        data: the `data` config section of the step that reads it (None: no check).

    Raises:
        StageInputError: `folder` holds no prepared dataset (run the prepare stage), or it was
            prepared with other settings than `data` (both values named).
    """
    try:
        dataset = PreparedDataset(folder)
    except FileNotFoundError as exc:
        raise StageInputError(str(exc)) from None
    if data is not None and int(data.image_size) != dataset.image_size:
        raise StageInputError(
            f"{dataset.folder} was prepared at data.image_size={dataset.image_size}, but this "
            f"step runs with data.image_size={data.image_size}: rerun prepare (`dvc repro`)."
        )
    return dataset
