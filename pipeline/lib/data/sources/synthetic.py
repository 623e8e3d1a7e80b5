"""The embedded default dataset: toy-truck photos (`toy_truck.render`) of the study's six
classes, written as image files into the generator's own folder; each image is seeded from
(seed, split, class, index), so a configuration always writes byte-identical files.

    python -m pipeline.lib.data.sources.synthetic OUT_DIR [--per-class-train N ...] (see --help)"""

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

SPLIT_DIRS = {"train": "training", "val": "validation", "test": "test"}
FORMATS = ("png", "jpg")
#: Lists the files the generator wrote into its folder (relative, posix).
MARKER = ".synthetic.json"


class SyntheticDirError(UserError, ValueError):
    """`data.synthetic.dir` holds files the generator did not write: it is not the generator's."""


def owned_files(out: Path) -> set[str]:
    """The files (posix, relative to `out`) its marker lists; empty without a readable marker."""
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
    """The files the generator wrote into `out` before; SyntheticDirError (changing nothing) when
    `out` holds files its marker does not list."""
    if not out.exists() and not out.is_symlink():
        return set()
    if not out.is_dir():
        raise SyntheticDirError(f"data.synthetic.dir '{out}' is a file: set it to a new folder.")
    owned = owned_files(out)
    foreign = sorted(
        rel
        for rel in (p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
        if rel not in owned and rel not in (MARKER, f"{MARKER}.tmp")
    )
    if foreign:
        raise SyntheticDirError(
            f"data.synthetic.dir '{out}' holds {len(foreign)} file(s) the generator did not write "
            f"(e.g. {', '.join(repr(f) for f in foreign[:3])}): set it to a new or empty folder "
            "(your own photos: `python -m pipeline.params --use-folder PATH`)."
        )
    return owned


def generate(
    out_dir: str | os.PathLike[str], cfg: SyntheticConfig, *, workers: int | None = None
) -> Path:
    """Write cfg.<split>_per_class images per class as out_dir/{training,validation,test}/<class>/
    <class>_<nnn>.<cfg.format> and the marker listing them; return out_dir. Removes the files of
    an earlier generation first, nothing else. `workers`: threads (default: cores, at most 4).
    Raises ValueError for a bad cfg value, `SyntheticDirError` when out_dir holds other files."""
    counts = {s: int(getattr(cfg, f"{s}_per_class")) for s in SPLIT_DIRS}
    size, difficulty, seed = int(cfg.size), float(cfg.difficulty), int(cfg.seed)
    if (fmt := cfg.format) not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if min(counts.values()) < 0 or seed < 0:
        raise ValueError(f"images per class and seed must be >= 0, got {counts}, seed {seed}")
    check_size_and_difficulty(size, difficulty)
    out = Path(out_dir)
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

    # Pillow and numpy release the GIL: threads scale (and are safe next to TensorFlow)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_workers = (int(workers) if workers else min(4, cores or 1)) if len(jobs) >= 8 else 1
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        list(pool.map(make, jobs))  # raises the first error
    _write_marker(out, new)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the images into OUT_DIR; 0, or exit status 2 for bad arguments."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.lib.data.sources.synthetic",
        description="Write deterministic toy-truck images (six classes) as "
        "OUT_DIR/{training,validation,test}/<class>/<class>_<nnn>.<format>.",
    )
    ap.add_argument("out_dir", metavar="OUT_DIR")
    d = SyntheticConfig()  # the one place the defaults live
    for split in SPLIT_DIRS:
        field = f"{split}_per_class"
        ap.add_argument(f"--per-class-{split}", dest=field, type=int, default=getattr(d, field))
    ap.add_argument("--size", type=int, default=d.size, metavar="S", help="image side in pixels")
    ap.add_argument("--difficulty", type=float, default=d.difficulty, metavar="D", help="0 .. 1")
    ap.add_argument("--seed", type=int, default=d.seed, metavar="K")
    ap.add_argument("--format", choices=FORMATS, default=d.format)
    ap.add_argument("--workers", type=int, metavar="W", help="threads (default: cores, at most 4)")
    args = vars(ap.parse_args(argv))
    out_dir, workers, t0 = args.pop("out_dir"), args.pop("workers"), time.perf_counter()
    cfg = SyntheticConfig(dir=out_dir, **args)
    try:
        out = generate(out_dir, cfg, workers=workers)
    except ValueError as exc:
        ap.error(str(exc))
    n = (cfg.train_per_class + cfg.val_per_class + cfg.test_per_class) * len(CLASSES)
    print(f"wrote {n} images to {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
