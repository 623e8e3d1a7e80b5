"""The embedded default dataset: deterministic toy-truck photos in the six classes of the study
(`toy_truck.render`), written as image files into the generator's own folder.

Every image has its own `numpy.random.Generator`, seeded from `(seed, split, class, index)`
through `numpy.random.SeedSequence`, so a configuration always writes byte-identical files,
whatever the order or thread they are made in.

    python -m pipeline.lib.data.sources.synthetic OUT_DIR [--per-class-train N --per-class-val N
        --per-class-test N --size S --difficulty D --seed K --format png|jpg --workers W]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.lib.config.schema import SyntheticConfig
from pipeline.lib.data.sources.toy_truck import CLASSES, check_size_and_difficulty, render
from pipeline.lib.errors import UserError

#: Config split name -> the study's folder name.
SPLIT_DIRS = {"train": "training", "val": "validation", "test": "test"}
FORMATS = ("png", "jpg")
#: The file in the generator's folder that lists the files it wrote (relative, posix).
MARKER = ".synthetic.json"


class SyntheticDirError(UserError, ValueError):
    """`data.synthetic.dir` holds files the generator did not write: it is not the generator's."""


def owned_files(out: Path) -> set[str]:
    """The files (posix paths relative to `out`) the marker in `out` says the generator wrote;
    empty when `out` has no (readable) marker."""
    try:
        listed = json.loads((out / MARKER).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in listed if isinstance(f, str) and ".." not in Path(f).parts}


def _write_marker(out: Path, files: set[str]) -> None:
    marker = {"generator": __name__, "files": sorted(files)}
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MARKER)


def claim(out: Path) -> set[str]:
    """The files the generator wrote into `out` before, once `out` is checked to be its own: it
    does not exist, is empty, or holds only files listed in its marker (`.synthetic.json`).
    Raises `SyntheticDirError` (naming a few foreign files) otherwise, changing nothing."""
    if not out.exists() and not out.is_symlink():
        return set()
    if not out.is_dir():
        raise SyntheticDirError(
            f"data.synthetic.dir '{out}' is a file, not a folder: the synthetic generator "
            "writes into a folder of its own; set data.synthetic.dir to a new folder."
        )
    owned = owned_files(out)
    foreign = sorted(
        rel
        for rel in (p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
        if rel not in owned and rel not in (MARKER, f"{MARKER}.tmp")
    )
    if foreign:
        raise SyntheticDirError(
            f"data.synthetic.dir '{out}' holds {len(foreign)} file(s) the synthetic generator "
            f"did not write (e.g. {', '.join(repr(f) for f in foreign[:3])}); it never deletes "
            "or overwrites them. Set data.synthetic.dir to a new or empty folder (for your own "
            "photos use data=folder: `python -m pipeline.params --use-folder PATH`); images an "
            "earlier version generated there carry no marker: delete that folder yourself."
        )
    return owned


def _settings(cfg: SyntheticConfig) -> tuple[dict[str, int], int, float, int, str]:
    """(images per split, size, difficulty, seed, format) of `cfg`, checked; ValueError if bad."""
    counts = {s: int(getattr(cfg, f"{s}_per_class")) for s in SPLIT_DIRS}
    size, difficulty, seed = int(cfg.size), float(cfg.difficulty), int(cfg.seed)
    fmt = str(cfg.format).lower()
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"{split}_per_class must be >= 0, got {n}")
    check_size_and_difficulty(size, difficulty)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return counts, size, difficulty, seed, fmt


def generate(
    out_dir: str | os.PathLike[str], cfg: SyntheticConfig, *, workers: int | None = None
) -> Path:
    """Write cfg.train_per_class / cfg.val_per_class / cfg.test_per_class images per class as
    out_dir/training/<class>/<class>_<nnn>.<cfg.format>, out_dir/validation/..., out_dir/test/...
    and the marker out_dir/.synthetic.json listing them; return out_dir as a Path.

    `cfg`: a `SyntheticConfig` (or any object with its attributes). `out_dir` must be the
    generator's own folder (see `claim`): the files of an earlier generation (listed in its
    marker) are removed first, nothing else is ever deleted or overwritten. Deterministic: the
    same cfg gives byte-identical files. `workers`: threads to render with (default: the cores,
    at most 4).

    Raises ValueError for a bad cfg value, `SyntheticDirError` when out_dir holds other files.
    """
    out = Path(out_dir)
    counts, size, difficulty, seed, fmt = _settings(cfg)
    owned = claim(out)
    jobs: list[tuple[str, np.random.Generator, Path]] = []  # in split, class, index order
    for s_idx, (split, folder) in enumerate(SPLIT_DIRS.items()):
        width = max(3, len(str(counts[split] - 1)))
        for c_idx, label in enumerate(CLASSES):
            for i in range(counts[split]):
                key = np.random.SeedSequence(entropy=seed, spawn_key=(s_idx, c_idx, i))
                path = out / folder / label / f"{label}_{i:0{width}d}.{fmt}"
                jobs.append((label, np.random.Generator(np.random.PCG64(key)), path))
    new = {path.relative_to(out).as_posix() for _, _, path in jobs}
    out.mkdir(parents=True, exist_ok=True)
    # a killed run leaves only files the marker lists: the next run may remove them
    _write_marker(out, owned | new)
    # the files of an earlier generation, then the folders they leave empty
    for rel in sorted(owned):
        (out / rel).unlink(missing_ok=True)
    for folder in sorted({(out / rel).parent for rel in owned}, key=lambda p: -len(p.parts)):
        while folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    for folder in sorted({path.parent for _, _, path in jobs}):
        folder.mkdir(parents=True, exist_ok=True)

    def make(job: tuple[str, np.random.Generator, Path]) -> None:
        label, rng, path = job
        img = render(label, rng, size, difficulty)
        if fmt == "png":
            img.save(path, format="PNG", compress_level=1)
        else:
            img.save(path, format="JPEG", quality=95, subsampling=0, optimize=False)

    # Each image has its own generator, so the files do not depend on the order or thread that
    # makes them. Pillow's encoders and filters and numpy's large-array loops release the GIL,
    # so threads scale across cores (and stay safe to use in a process that imported TensorFlow).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_workers = int(workers) if workers else min(4, cores or 1)
    if n_workers <= 1 or len(jobs) < 8:
        for job in jobs:
            make(job)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            list(pool.map(make, jobs))  # raises the first error
    _write_marker(out, new)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the synthetic image files into OUT_DIR; return the exit status (0).
    Bad arguments (ValueError from `generate`) exit through argparse with status 2."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.lib.data.sources.synthetic",
        description="Write deterministic toy-truck images (six classes) as "
        "OUT_DIR/{training,validation,test}/<class>/<class>_<nnn>.<format>.",
    )
    ap.add_argument("out_dir", metavar="OUT_DIR")
    d = SyntheticConfig()  # the one place the defaults live
    for split in SPLIT_DIRS:
        field = f"{split}_per_class"
        default = getattr(d, field)
        ap.add_argument(f"--per-class-{split}", dest=field, type=int, default=default, metavar="N")
    ap.add_argument("--size", type=int, default=d.size, metavar="S", help="image side in pixels")
    ap.add_argument("--difficulty", type=float, default=d.difficulty, metavar="D", help="0 .. 1")
    ap.add_argument("--seed", type=int, default=d.seed, metavar="K")
    ap.add_argument("--format", choices=FORMATS, default=d.format)
    ap.add_argument("--workers", type=int, metavar="W", help="threads (default: cores, at most 4)")
    args = vars(ap.parse_args(argv))
    out_dir, workers = args.pop("out_dir"), args.pop("workers")
    cfg = SyntheticConfig(dir=out_dir, **args)
    t0 = time.perf_counter()
    try:
        out = generate(out_dir, cfg, workers=workers)
    except ValueError as exc:
        ap.error(str(exc))
    n = (cfg.train_per_class + cfg.val_per_class + cfg.test_per_class) * len(CLASSES)
    print(f"wrote {n} images to {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
