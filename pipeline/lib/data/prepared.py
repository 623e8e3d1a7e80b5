"""The prepared dataset that `prepare` writes (one DVC output): classes.json (names in label
order), manifest.csv (one `ManifestRow` per image), report.json (counts, rejected files,
leakage). No pixels: `PreparedDataset.images(split)` decodes the photos themselves on demand,
each checked against its recorded sha256 (`read_photo`)."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np

from pipeline.lib.config.schema import DataConfig
from pipeline.lib.data.class_names import printable
from pipeline.lib.data.images import RejectedImage, load_rgb
from pipeline.lib.data.sources import synthetic
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import read_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("split", "index", "label", "label_index", "path", "sha256", "bytes")
_INTS = ("index", "label_index", "bytes")


@dataclass(frozen=True)
class ManifestRow:
    """One image in manifest.csv: split, `index` in the split (the row of data/features/<split>.npy),
    class name and index, path (relative to the data folder), the file's sha256 and size."""

    split: str
    index: int
    label: str
    label_index: int
    path: str
    sha256: str
    bytes: int


class ChangedPhotoError(StageInputError):
    """A photo differs from (or is gone since) what prepare recorded in manifest.csv."""


def read_photo(root: Path, row: ManifestRow, size: int, resize: str) -> np.ndarray:
    """uint8 (size, size, 3) of the photo `root/row.path`, decoded by `load_rgb` from the bytes
    whose sha256 is checked against the manifest: the one per-image step of every pixel reader.
    ChangedPhotoError: the file changed, is gone or no longer decodes."""
    path = _source_path(root, row.path)
    again = "rerun prepare (`dvc repro`), or restore the file"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ChangedPhotoError(f"{path}: cannot read it ({exc.strerror}): {again}.") from None
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise ChangedPhotoError(f"{path} changed after prepare (sha256 in manifest.csv): {again}.")
    try:
        return load_rgb(path, size, resize, 2**62, data=data)  # prepare checked data.max_pixels
    except RejectedImage as exc:
        raise ChangedPhotoError(f"{path}: {exc.reason} since prepare: {again}.") from None


def _source_path(root: Path, shown: str) -> Path:
    path = root / shown  # undecodable bytes were shown as \xNN
    if "\\x" not in shown or path.exists():
        return path
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), shown.encode())
    return root / os.fsdecode(raw)


class SourceImages:
    """Array-like uint8 (N, size, size, 3) view of manifest rows: indexing (an int, a slice, an
    index array) decodes those photos with `read_photo`, in threads; `np.asarray` decodes all.
    Index it in batches when N is large: nothing is kept in memory."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, root: Path, rows: Sequence[ManifestRow], size: int, resize: str) -> None:
        self.root, self.rows, self.size, self.resize = Path(root), list(rows), size, resize
        self.shape = (len(self.rows), size, size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, row: ManifestRow) -> np.ndarray:
        return read_photo(self.root, row, self.size, self.resize)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self._read(self.rows[key])
        picked = self.rows[key] if isinstance(key, slice) else [self.rows[i] for i in key]
        out = np.empty((len(picked), self.size, self.size, 3), np.uint8)
        with ThreadPoolExecutor(min(len(picked), 8) or 1) as pool:
            for i, image in enumerate(pool.map(self._read, picked)):
                out[i] = image
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:].astype(np.uint8 if dtype is None else dtype, copy=False)


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(astuple(r) for r in rows)


class PreparedDataset:
    """Read access to a prepared folder; the images are read from the data folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not (self.folder / "classes.json").is_file():
            raise StageInputError(
                f"No prepared dataset at '{self.folder}' (classes.json missing). "
                "Run the prepare stage first: `dvc repro prepare` or `python -m pipeline.prepare`."
            )
        self.classes: list[str] = list(read_json(self.folder / "classes.json"))
        self.num_classes = len(self.classes)
        self.report: dict = read_json(self.folder / "report.json")
        self.root = Path(self.report["root"])  # the data folder the manifest's paths start from
        self.image_size: int = int(self.report["image_size"])
        self.resize: str = self.report["resize"]
        self._rows: list[ManifestRow] | None = None

    def images(self, split: str) -> SourceImages:
        """uint8 (N, size, size, 3) of the split's photos, decoded when indexed (`SourceImages`,
        each photo checked against the manifest); index it in batches."""
        return SourceImages(self.root, self.manifest(split), self.image_size, self.resize)

    def manifest(self, split: str | None = None) -> list[ManifestRow]:
        """The rows of manifest.csv (of `split`, or all), sorted by split and row index."""
        if self._rows is None:
            with open(self.folder / "manifest.csv", newline="", encoding="utf-8") as fh:
                rows = [
                    ManifestRow(**{k: int(v) if k in _INTS else v for k, v in r.items()})
                    for r in csv.DictReader(fh)
                ]
            self._rows = sorted(rows, key=lambda r: (SPLITS.index(r.split), r.index))
        return [r for r in self._rows if split is None or r.split == split]

    def labels(self, split: str) -> np.ndarray:
        """int label indices of a split, aligned with `images(split)`."""
        return np.array([r.label_index for r in self.manifest(split)], dtype=np.int64)

    def size(self, split: str) -> int:
        """The number of images in `split` (no pixels are read)."""
        return len(self.manifest(split))


def iter_batches(array: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive float32 batches of a (memory-mapped) array."""
    for start in range(0, len(array), batch_size):
        yield np.asarray(array[start : start + batch_size], dtype=np.float32)


def data_root(data: DataConfig) -> str:
    """The folder the images come from: `data.synthetic.dir` or `data.path`."""
    return str(data.synthetic.dir if data.source == "synthetic" else data.path)


def display_path(path: Path, root: Path) -> str:
    """`path` relative to `root` (when inside), posix separators, printable/encodable as UTF-8."""
    return printable((path.relative_to(root) if path.is_relative_to(root) else path).as_posix())


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as report.json records it: relative when inside the working directory (the DVC
    hash does not depend on where the project is cloned), else absolute."""
    return display_path(Path(os.path.abspath(os.fspath(path))), Path.cwd().absolute())


def data_tags(report: dict) -> dict[str, str]:
    """MLflow run tags from report.json: data_path, data_images, data_small_classes."""
    small = ", ".join(f"{c}={n}" for c, n in report["small_classes"].items()) or "none"
    tags = {"data_path": report["root"], "data_images": str(report["accepted"])}
    return tags | {"data_small_classes": small[:4000]}


def open_prepared(folder: str | os.PathLike[str], data: DataConfig) -> PreparedDataset:
    """The prepared dataset in `folder`, checked against `data` (image size, resize, source and
    folder). StageInputError: none there, or prepared with other settings."""
    dataset = PreparedDataset(folder)
    report, runs, root = dataset.report, "but this step runs with", shown_path(data_root(data))
    problems = [
        f"data.{key}={report[key]}, {runs} data.{key}={getattr(data, key)}"
        for key in ("image_size", "resize")
        if report[key] != getattr(data, key)
    ]
    if (report["source"], report["root"]) != (data.source, root):
        problems.append(
            f"data.source={report['source']} from '{report['root']}', {runs} "
            f"data.source={data.source} from '{root}'"
        )
    if problems:
        raise StageInputError(
            f"{dataset.folder} was prepared with {'; and with '.join(problems)}: rerun prepare "
            "(`dvc repro`, or `python -m pipeline.prepare` with the same settings)."
        )
    if data.source == "synthetic":
        root = dataset.root  # not a DVC output: a queued `dvc exp run` restores prepare's only
        if not all((root / row.path).is_file() for row in dataset.manifest()):
            log.info("Generating the synthetic photos again into %s (the same bytes)", root)
            synthetic.generate(root, data.synthetic)  # read_photo checks them against sha256
    return dataset
