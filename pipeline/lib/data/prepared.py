"""The prepared dataset: what `prepare` writes and every later stage reads (one DVC output).

    classes.json    the class names, in label-index order
    manifest.csv    one row per accepted image: split, index, label, label_index, path, sha256
    report.json     counts per split and class, rejected files with reasons, leakage pairs
    train.npy val.npy test.npy    uint8 (N, size, size, 3): decoded, RGB, resized once

Arrays are written with plain file writes and read as memory maps, so no stage holds a whole
split in memory.
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
    """One accepted image in manifest.csv: its split and row `index` in `<split>.npy`, its class
    name and index, its path (as shown in the report) and the sha256 of the file's bytes.
    """

    split: str
    index: int
    label: str
    label_index: int
    path: str
    sha256: str


#: Bytes reserved for the .npy header: magic, version, length, and the header dict padded with
#: spaces, so the header can be rewritten in place with the final row count.
_NPY_HEADER_BYTES = 128


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy (format 1.0) header for a C-ordered uint8 array of `shape`, `_NPY_HEADER_BYTES` long."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class SplitWriter:
    """Streams uint8 (image_size, image_size, 3) images of one split into `folder/<split>.npy`.

    Plain file writes (never a memory map, whose failed page writes on a full disk kill the
    process with SIGBUS); room for `capacity` rows (an upper bound) is reserved up front with
    `posix_fallocate` where the file system supports it, so a full disk raises OSError (ENOSPC,
    or EFBIG over a file-size limit) at once. `close()` trims the file to the rows written and
    writes the final header; `np.load` then gives uint8 (count, size, size, 3).
    """

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
        """Write one uint8 (size, size, 3) image; return its row index. IndexError past capacity."""
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
        """Trim the file to the rows written and write the final header (idempotent)."""
        if self._fh.closed:
            return
        try:
            self._fh.truncate(_NPY_HEADER_BYTES + self.count * self._row_bytes)
            self._fh.seek(0)
            self._fh.write(_npy_header((self.count, self.image_size, self.image_size, 3)))
        finally:
            self._fh.close()


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    """Write `rows` to `path` as CSV with the `MANIFEST_FIELDS` header, in the order given."""
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
        """The number of classes, C."""
        return len(self.classes)

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, size, size, 3), memory-mapped: index it in batches."""
        return np.load(self.folder / f"{split}.npy", mmap_mode="r")

    def manifest(self, split: str | None = None) -> list[ManifestRow]:
        """The rows of manifest.csv (those of `split`, or all when None), sorted by split
        (train, val, test) and then row index. Raises OSError when it cannot be read."""
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
        """The number of images N in `split` (from `<split>.npy`'s header; no pixels are read)."""
        return int(self.images(split).shape[0])


def iter_batches(array: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive float32 batches of a (memory-mapped) array, one batch in memory at a time."""
    for start in range(0, len(array), batch_size):
        yield np.asarray(array[start : start + batch_size], dtype=np.float32)


def data_root(data: DataConfig) -> str:
    """The folder the images of the `data` config come from: `data.synthetic.dir` for the
    synthetic source (the generator's own folder), `data.path` (your photos) otherwise."""
    if data.source == "synthetic":
        return str(data.synthetic.dir)
    return str(data.path)


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as recorded in report.json: relative (posix) when inside the working directory, so
    the prepared data (and its DVC hash) do not depend on where the project is cloned; else
    absolute. Symlinks are not resolved."""
    absolute = Path(os.path.abspath(os.fspath(path)))
    try:
        text = absolute.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        text = absolute.as_posix()
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def data_tags(report: dict) -> dict[str, str]:
    """MLflow run tags that say what a run trained on, from the prepared data's report.json:
    `data_path` (the folder the images came from), `data_images` (accepted images, all splits)
    and `data_small_classes` (`class=n, ...` for classes with few training images; `none`)."""
    small = report.get("small_classes") or {}
    return {
        "data_path": str(report.get("root", "?")),
        "data_images": str(report.get("accepted", "?")),
        "data_small_classes": (", ".join(f"{c}={n}" for c, n in small.items()) or "none")[:4000],
    }


def _mismatches(dataset: PreparedDataset, data: DataConfig) -> list[str]:
    """'<recorded> vs <configured>' for every setting the prepared data differs in from `data`."""
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
    """The prepared dataset in `folder` (`paths.prepared`), checked against the `data` config of
    the step that reads it (None: no check): `image_size`, `resize`, and the data source and
    folder as recorded in report.json.

    Raises StageInputError: `folder` holds no prepared dataset (run the prepare stage), or it was
    prepared with other settings than `data` (both values named).
    """
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
