"""Finding the image files of a folder dataset and giving each a class and a split.

Layouts: **splits**, root/{training,validation (optional),test}/<class>/... (aliases in
`SPLIT_ALIASES`), or **single**, root/<class>/..., each class split by `data.split` with a fixed
seed. Nested folders belong to their class; hidden/system files are ignored; symbolic links are
followed inside the folder, and those to outside it are skipped (DVC tracks the folder's content).
What is seen but not used is returned in `Discovery.skipped`, with the reason."""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.lib.config.schema import SplitRatios
from pipeline.lib.data.class_names import case_collisions, class_name, name_collisions
from pipeline.lib.data.images import CANDIDATE_EXTENSIONS, IMAGE_EXTENSIONS
from pipeline.lib.data.prepared import SPLITS, display_path
from pipeline.lib.errors import UserError

#: Top-level folder names (case-insensitive) that mark the split layout.
SPLIT_ALIASES: dict[str, str] = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("val", "valid", "validation"), "val"),
    **dict.fromkeys(("test", "testing"), "test"),
}
#: The folder names to suggest in messages, per split.
_SPLIT_NAMES = {
    "train": "training/ (or train/)",
    "val": "validation/ (or val/, valid/)",
    "test": "test/ (or testing/)",
}

#: Names (lower-case) that operating systems leave behind (dot names are hidden anyway).
_SYSTEM = "__macosx thumbs.db ehthumbs.db desktop.ini @eadir $recycle.bin __pycache__ icon\r"
_DOT_TOOLS = ".ipynb_checkpoints .thumbnails .trashes .@__thumb"  # caches/copies, not photos
SYSTEM_NAMES = frozenset([*f"{_SYSTEM} {_DOT_TOOLS}".split(" "), "system volume information"])
HIDDEN_REASON = "hidden/system file"
HIDDEN_PHOTOS_REASON = "hidden folder with image files"  # maybe lost photos: counted and warned
NOT_IMAGE_REASON = "not an image file extension"
_ARCHIVES = (".zip", ".tar", ".gz", ".tgz", ".7z", ".rar", ".bz2", ".xz")
OUTSIDE_REASON = "symbolic link to outside the data folder"


class DataError(UserError, ValueError):
    """The dataset folder cannot be used as it is; the message names the path and what to do.
    `report`: the report built so far, when `ingest` raised it after decoding."""

    report: dict | None = None


@dataclass(frozen=True)
class Candidate:
    """An image file to decode: its path, class name and split (train, val or test)."""

    path: Path
    label: str
    split: str


@dataclass
class Discovery:
    """What `discover` found: sorted `classes` (label index = position), `candidates` (by split,
    class, path), `skipped` (file, reason), `layout` (`splits` or `single`), the absolute `root`,
    `class_folders` (split -> class -> its folders, relative to root)."""

    classes: list[str]
    candidates: list[Candidate]
    skipped: list[tuple[str, str]]
    layout: str
    root: Path
    class_folders: dict[str, dict[str, list[str]]]


def is_ignored(name: str) -> bool:
    """True for a hidden name (leading dot) or an operating-system file (`SYSTEM_NAMES`)."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def split_ratios(ratios: SplitRatios) -> tuple[float, float, float]:
    """(train, val, test) fractions of `data.split` (bounds checked by the schema), summing to 1."""
    total = ratios.train + ratios.val + ratios.test
    return ratios.train / total, ratios.val / total, ratios.test / total


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) counts of `n` images: largest-remainder rounding of `n * ratios`; from
    n = 2 on, train and test get one at least; a single image goes to train."""
    if n <= 0:
        return 0, 0, 0
    if n == 1:
        return 1, 0, 0
    quotas = [n * r for r in ratios]
    counts = [int(q) for q in quotas]
    order = sorted(range(3), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    train, val, test = counts
    if test < 1:  # from validation when it is the larger, else from training
        test, (val, train) = 1, (val - 1, train) if 0 < val >= train else (val, train - 1)
    if train < 1:
        train, (val, test) = 1, (val - 1, test) if val > 0 else (val, test - 1)
    return train, val, test


def discover(root: str | os.PathLike[str], ratios: SplitRatios, seed: int) -> Discovery:
    """Find the image files under `root` (read only), each with a class and a split (`ratios` and
    `seed` split the single layout). DataError: the folder cannot be used."""
    root = _checked_root(root)
    walker = _Walker(root)
    top_dirs, top_files = walker.list_dir(root)
    split_dirs, other_dirs = _top_level(root, top_dirs)
    if split_dirs:
        candidates, class_folders, classes = _discover_splits(walker, split_dirs, top_files)
    else:
        candidates, class_folders, classes = _discover_single(
            walker, other_dirs, top_files, ratios, seed
        )
    clashes = case_collisions(classes)
    if clashes:
        raise DataError(
            f"Data path '{root}': {'; '.join(clashes)} (one folder on macOS and Windows): rename "
            "or merge those folders."
        )
    if not candidates:
        others = [f"'{f}' ({r})" for f, r in walker.skipped if r != HIDDEN_REASON]
        examples, n = ", ".join(others[:5]), len(others)
        raise DataError(
            f"No image files found under '{root}'"
            + (f" ({n} other files skipped, e.g. {examples})" if examples else "")
            + f". Supported extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}."
        )
    candidates.sort(key=lambda c: (SPLITS.index(c.split), c.label, display_path(c.path, root)))
    layout = "splits" if split_dirs else "single"
    return Discovery(sorted(classes), candidates, walker.skipped, layout, root, class_folders)


def _checked_root(root: str | os.PathLike[str]) -> Path:
    root = Path(os.path.abspath(os.fspath(root)))
    if not os.path.lexists(root):
        raise DataError(
            f"Data path '{root}' does not exist. Set data.path to the folder of your class "
            "sub-folders (or of training/ validation/ test/ folders of class sub-folders)."
        )
    if not root.exists():
        raise DataError(f"Data path '{root}' is a broken symbolic link; fix data.path.")
    if not root.is_dir():
        archive = root.suffix.lower() in _ARCHIVES
        raise DataError(
            f"Data path '{root}' is a file, not a folder: "
            + ("extract it and set data.path to " if archive else "set data.path to ")
            + "the folder of your class sub-folders."
        )
    return root


def _top_level(root: Path, top_dirs: list[Path]) -> tuple[dict[str, Path], list[Path]]:
    split_dirs: dict[str, list[Path]] = {}
    other_dirs: list[Path] = []
    for d in top_dirs:
        alias = SPLIT_ALIASES.get(d.name.lower())
        (split_dirs.setdefault(alias, []) if alias else other_dirs).append(d)
    if split_dirs and other_dirs:
        splits = _names(d for ds in split_dirs.values() for d in ds)
        raise DataError(
            f"Data path '{root}' mixes split folders ({splits}) with other folders "
            f"({_names(other_dirs)}): use either split folders of class folders, or only class "
            "folders. Move the others into the split folders or out (rename a class called "
            "like a split)."
        )
    for split, ds in split_dirs.items():
        if len(ds) > 1:
            raise DataError(
                f"Data path '{root}' has more than one folder for the {split} split: "
                f"{_names(ds)}. Merge them into one."
            )
    return {split: ds[0] for split, ds in split_dirs.items()}, other_dirs


def _labels(parent: Path, class_dirs: list[Path]) -> list[str]:
    clashes = name_collisions(d.name for d in class_dirs)
    if clashes:
        raise DataError(
            f"Folder '{parent}': {'; '.join(clashes)} (names are trimmed and Unicode-normalised): "
            "rename one of them, or merge them."
        )
    return [class_name(d.name) for d in class_dirs]


_Found = tuple[list[Candidate], dict[str, dict[str, list[str]]], set[str]]


def _discover_splits(walker: _Walker, split_dirs: dict[str, Path], top_files: list[Path]) -> _Found:
    root = walker.root
    for f in top_files:
        walker.skip(f, "file outside the split folders (not inside a class folder)")
    missing = [s for s in ("train", "test") if s not in split_dirs]
    if missing:
        raise DataError(
            f"Data path '{root}' has split folders ({_names(split_dirs.values())}) but no "
            f"{' and no '.join(_SPLIT_NAMES[s] for s in missing)} folder: add it (validation is "
            "optional), or use only class sub-folders (split by data.split)."
        )
    candidates: list[Candidate] = []
    class_folders: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    classes: set[str] = set()
    for split in (s for s in SPLITS if s in split_dirs):
        split_dir = split_dirs[split]
        class_dirs, loose = walker.list_dir(split_dir)
        name = split_dir.name
        loose_file = f"file directly in split folder '{name}/' (move it into {name}/<class>/)"
        for f in loose:
            walker.skip(f, loose_file)
        if not class_dirs and split != "val":
            raise _no_class_folders(f"Split folder '{split_dir}'", loose, f"{name}/<class>/<image>")
        for class_dir, label in zip(class_dirs, _labels(split_dir, class_dirs), strict=True):
            classes.add(label)
            class_folders[split].setdefault(label, []).append(display_path(class_dir, root))
            candidates.extend(Candidate(p, label, split) for p in walker.walk_class(class_dir))
    return candidates, class_folders, classes


def _discover_single(
    walker: _Walker, class_dirs: list[Path], top_files: list[Path], ratios: SplitRatios, seed: int
) -> _Found:
    root = walker.root
    loose_image = "image outside any class folder (move it into a class sub-folder)"
    for f in top_files:
        image = f.suffix.lower() in CANDIDATE_EXTENSIONS
        walker.skip(f, loose_image if image else "file outside the class folders")
    if not class_dirs:
        raise _no_class_folders(f"Data path '{root}'", top_files, "root/<class>/<image>")
    labels = dict(zip(class_dirs, _labels(root, class_dirs), strict=True))  # distinct labels
    shown = {label: [display_path(d, root)] for d, label in labels.items()}
    per_class = {label: walker.walk_class(d) for d, label in labels.items()}
    candidates: list[Candidate] = []
    for label in sorted(per_class):
        paths = sorted(per_class[label], key=lambda p: display_path(p, root))
        # a fixed permutation per (seed, class): adding a class does not reshuffle the others
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(paths))
        n_train, n_val, _ = split_counts(len(paths), split_ratios(ratios))
        for rank, i in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            candidates.append(Candidate(path=paths[i], label=label, split=split))
    return candidates, {s: dict(shown) for s in SPLITS}, set(per_class)


def _no_class_folders(what: str, files: list[Path], layout: str) -> DataError:
    images = sum(1 for f in files if f.suffix.lower() in CANDIDATE_EXTENSIONS)
    lying = f" ({images} image files lie directly in it)" if images else ""
    return DataError(
        f"{what} has no class sub-folders{lying}. Put the images in one sub-folder per class: "
        f"{layout}."
    )


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(f"'{p.name}/'" for p in sorted(paths, key=lambda p: p.name))


def _hidden_reason(entry: os.DirEntry[str]) -> str:
    if entry.name.lower() in SYSTEM_NAMES or not entry.is_dir(follow_symlinks=False):
        return HIDDEN_REASON
    files = Path(entry.path).rglob("*")
    n = sum(f.suffix.lower() in CANDIDATE_EXTENSIONS and f.name[:2] != "._" for f in files)
    return (
        f"{HIDDEN_PHOTOS_REASON} ({n}): rename it without the leading dot" if n else HIDDEN_REASON
    )


class _Walker:
    """Directory listing that follows symbolic links within the data folder (not those leading
    out of it), detects loops and records what it skips."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inside = os.path.join(os.path.realpath(root), "")
        self.skipped: list[tuple[str, str]] = []

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((display_path(path, self.root), reason))

    def list_dir(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """(sub-folders, files) of `folder`, sorted; hidden/system/broken entries are skipped."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if folder == self.root:
                message = f"Cannot read data path '{folder}': {exc.strerror or exc}."
                raise DataError(message + " Check its permissions.") from None
            self.skip(folder, f"unreadable folder ({exc.strerror or exc})")
            return [], []
        dirs: list[Path] = []
        files: list[Path] = []
        for entry in entries:
            path = Path(entry.path)
            if is_ignored(entry.name):
                self.skip(path, _hidden_reason(entry))
                continue
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self.skip(path, "symbolic link loop (the link points back to itself)")
                elif entry.is_symlink():
                    self.skip(path, "broken symbolic link (its target does not exist)")
                else:
                    self.skip(path, f"unreadable ({exc.strerror or exc})")
                continue
            target = os.path.realpath(path) if entry.is_symlink() else self.inside
            if not os.path.join(target, "").startswith(self.inside):
                self.skip(path, f"{OUTSIDE_REASON} ({target}): copy it in to use it")
                continue
            if stat.S_ISDIR(st.st_mode):
                dirs.append(path)
            elif stat.S_ISREG(st.st_mode):
                files.append(path)
            else:
                self.skip(path, "not a regular file (device, socket or pipe)")
        return dirs, files

    def walk_class(self, class_dir: Path) -> list[Path]:
        """Every image-extension file below `class_dir`, recursively; others are skipped."""
        found: list[Path] = []
        visited: set[str] = set()
        stack: list[tuple[Path, str]] = [(class_dir, os.path.realpath(class_dir.parent))]
        while stack:
            folder, parent_real = stack.pop()
            real = os.path.realpath(folder)
            if real == parent_real or parent_real.startswith(real.rstrip(os.sep) + os.sep):
                self.skip(folder, "symbolic link loop (the link points to a folder containing it)")
                continue
            if real in visited:
                self.skip(folder, "second link to a folder already read for this class (skipped)")
                continue
            visited.add(real)
            dirs, files = self.list_dir(folder)
            for f in files:
                if f.suffix.lower() in CANDIDATE_EXTENSIONS:
                    found.append(f)
                else:
                    suffix = f.suffix.lower() or "no extension"
                    self.skip(f, f"{NOT_IMAGE_REASON} ({suffix})")
            stack.extend((d, real) for d in reversed(dirs))
        return found
