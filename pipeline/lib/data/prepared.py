"""The prepared dataset that `prepare` writes (one DVC output): classes.json (names in label
order), manifest.csv (one `ManifestRow` per image), report.json (counts, rejected files,
leakage) and <split>.npy, uint8 (N, size, size, 3), read as memory maps.
"""

from __future__ import annotations

import csv
import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np

from pipeline.lib.config.schema import DataConfig
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import read_json

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("split", "index", "label", "label_index", "path", "sha256")


@dataclass(frozen=True)
class ManifestRow:
    """One image in manifest.csv: split, row `index` in <split>.npy, class name and index, path
    (as in the report), sha256 of the file."""

    split: str
    index: int
    label: str
    label_index: int
    path: str
    sha256: str


#: The .npy header's length, padded so that it can be rewritten in place with the final count.
_NPY_HEADER_BYTES = 128


def _npy_header(shape: tuple[int, ...]) -> bytes:
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class SplitWriter:
    """Streams uint8 (size, size, 3) images of one split into `folder/<split>.npy` with plain
    writes (a memory map dies of SIGBUS on a full disk); `capacity` rows are reserved up front,
    so a full disk raises OSError at once. `close()` trims the file to the rows written."""

    def __init__(self, folder: Path, split: str, capacity: int, image_size: int) -> None:
        self.path = Path(folder) / f"{split}.npy"
        self.image_size = image_size
        self.capacity = max(int(capacity), 0)
        self.count = 0
        self._row_bytes = image_size * image_size * 3
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        try:
            self._fh.write(_npy_header((self.capacity, image_size, image_size, 3)))
            self._fh.flush()
            size = _NPY_HEADER_BYTES + self.capacity * self._row_bytes
            if size > _NPY_HEADER_BYTES and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(self._fh.fileno(), 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
        except OSError as exc:
            self._fh.close()
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        except BaseException:
            self._fh.close()
            raise

    def append(self, image: np.ndarray) -> int:
        """Write one image; return its row index. IndexError past capacity."""
        if self.count >= self.capacity:
            raise IndexError(f"{self.path}: more images than the capacity {self.capacity}")
        array = np.ascontiguousarray(image, dtype=np.uint8)
        if array.shape != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"{self.path}: image of shape {array.shape}, expected "
                f"{(self.image_size, self.image_size, 3)}"
            )
        self._fh.write(array.tobytes())
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            self._fh.truncate(_NPY_HEADER_BYTES + self.count * self._row_bytes)
            self._fh.seek(0)
            self._fh.write(_npy_header((self.count, self.image_size, self.image_size, 3)))
        finally:
            self._fh.close()


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(astuple(r) for r in rows)


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
        """The rows of manifest.csv (of `split`, or all), sorted by split and row index."""
        with open(self.folder / "manifest.csv", newline="", encoding="utf-8") as fh:
            ints = {"index", "label_index"}
            rows = [
                ManifestRow(**{k: int(v) if k in ints else v for k, v in r.items()})
                for r in csv.DictReader(fh)
            ]
        rows = [r for r in rows if split is None or r.split == split]
        return sorted(rows, key=lambda r: (SPLITS.index(r.split), r.index))

    def labels(self, split: str) -> np.ndarray:
        """int label indices of a split, aligned with `images(split)`."""
        return np.array([r.label_index for r in self.manifest(split)], dtype=np.int64)

    def size(self, split: str) -> int:
        """The number of images in `split` (no pixels are read)."""
        return int(self.images(split).shape[0])


def iter_batches(array: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive float32 batches of a (memory-mapped) array."""
    for start in range(0, len(array), batch_size):
        yield np.asarray(array[start : start + batch_size], dtype=np.float32)


def data_root(data: DataConfig) -> str:
    """The folder the images come from: `data.synthetic.dir` or `data.path`."""
    return str(data.synthetic.dir if data.source == "synthetic" else data.path)


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as report.json records it: relative when inside the working directory (the DVC
    hash does not depend on where the project is cloned), else absolute."""
    absolute = Path(os.path.abspath(os.fspath(path)))
    try:
        text = absolute.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        text = absolute.as_posix()
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def data_tags(report: dict) -> dict[str, str]:
    """MLflow run tags from report.json: data_path, data_images, data_small_classes."""
    small = report.get("small_classes") or {}
    return {
        "data_path": str(report.get("root", "?")),
        "data_images": str(report.get("accepted", "?")),
        "data_small_classes": (", ".join(f"{c}={n}" for c, n in small.items()) or "none")[:4000],
    }


def _mismatches(dataset: PreparedDataset, data: DataConfig) -> list[str]:
    report, found = dataset.report, []
    for key, recorded, wanted in (
        ("image_size", dataset.image_size, int(data.image_size)),
        ("resize", report.get("resize", data.resize), data.resize),
    ):
        if recorded != wanted:
            found.append(f"data.{key}={recorded}, but this step runs with data.{key}={wanted}")
    recorded = (report.get("source", data.source), report.get("root"))
    wanted = (str(data.source), shown_path(data_root(data)))
    if recorded[1] is not None and recorded != wanted:
        found.append(
            f"data.source={recorded[0]} from '{recorded[1]}', but this step runs with "
            f"data.source={wanted[0]} from '{wanted[1]}'"
        )
    return found


def open_prepared(
    folder: str | os.PathLike[str], data: DataConfig | None = None
) -> PreparedDataset:
    """The prepared dataset in `folder`, checked against `data` (image size, resize, source and
    folder; None: no check). StageInputError: none there, or prepared with other settings."""
    try:
        dataset = PreparedDataset(folder)
    except FileNotFoundError as exc:
        raise StageInputError(str(exc)) from None
    problems = _mismatches(dataset, data) if data is not None else []
    if problems:
        raise StageInputError(
            f"{dataset.folder} was prepared with {'; and with '.join(problems)}: rerun prepare "
            "(`dvc repro`, or `python -m pipeline.prepare` with the same settings)."
        )
    return dataset
