"""Ingesting a folder of images into the prepared-dataset format (see `pipeline.lib.data.prepared`).

`ingest(root, data_cfg, out_dir)` discovers the files (`pipeline.lib.data.sources.folder.discover`), decodes
each one once (`pipeline.lib.data.images.load_rgb`) in a thread pool, streams the arrays in order into
`train.npy` / `val.npy` / `test.npy`, and writes `manifest.csv`, `classes.json` and `report.json`.
Problems that make the dataset unusable raise one `DataError` that lists all of them and says what
to do; everything else (rejected files, skipped files, duplicates, ...) is listed in the report and
summarised in its `warnings`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.lib.data.images import RejectedImage, load_rgb, sha256_file
from pipeline.lib.data.prepared import (
    SPLITS,
    ManifestRow,
    SplitWriter,
    write_classes,
    write_manifest,
)
from pipeline.lib.data.sources.folder import Candidate, DataError, Discovery, discover, display_path
from pipeline.lib.files import write_json

__all__ = ["DataError", "ingest", "MAX_LISTED"]

#: How many items an error message lists before "... and N more".
MAX_LISTED = 20
_SPLIT_WORD = {"train": "training", "val": "validation", "test": "test"}


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    value = getattr(cfg, name, default)
    return default if value is None else value


def ingest(
    root: str | os.PathLike[str],
    data_cfg: Any,
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Decode every image under `root` into `out_dir`; return the report (also in report.json).

    `data_cfg` is a `DataConfig` (dataclass or DictConfig, or a mapping with the same keys).
    Raises `DataError` (the report is attached as `.report`) when the dataset cannot be used.
    """
    size = int(_cfg(data_cfg, "image_size", 224))
    resize = str(_cfg(data_cfg, "resize", "stretch"))
    max_pixels = int(_cfg(data_cfg, "max_pixels", 60_000_000))
    min_train = int(_cfg(data_cfg, "min_images_per_class", 1))
    leakage_mode = str(_cfg(data_cfg, "leakage", "fail"))
    max_rejected = float(_cfg(data_cfg, "max_rejected_fraction", 0.2))
    ratios = _cfg(data_cfg, "split", {"train": 0.2, "val": 0.4, "test": 0.4})
    seed = int(_cfg(data_cfg, "seed", 42))
    if leakage_mode not in ("fail", "warn"):
        raise ValueError(f"data.leakage must be 'fail' or 'warn', not {leakage_mode!r}")

    disc = discover(root, ratios, seed)
    root_path = disc.root
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = disc.classes
    if len(classes) < 2:
        raise DataError(_single_class_message(disc))
    label_index = {c: i for i, c in enumerate(classes)}

    found: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for c in disc.candidates:
        found[c.split][c.label] += 1
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in classes} for s in SPLITS}
    rejected: list[dict[str, str]] = []
    rejected_where: dict[str, Counter] = {s: Counter() for s in SPLITS}
    rows: list[ManifestRow] = []
    by_hash: dict[str, list[tuple[str, str, str]]] = defaultdict(
        list
    )  # sha -> (file, split, label)

    writers = {s: _TrimmingSplitWriter(out, s, sum(found[s].values()), size) for s in SPLITS}
    try:
        with (
            closing(_decode_all(disc.candidates, size, resize, max_pixels, workers)) as results,
            tqdm(
                total=len(disc.candidates),
                unit="img",
                desc="prepare: decoding images",
                file=sys.stderr,
                disable=not progress,
                dynamic_ncols=True,
                mininterval=0.5,
            ) as bar,
        ):
            for cand, array, sha, reason in results:
                bar.update(1)
                rel = display_path(cand.path, root_path)
                if array is None:
                    rejected.append({"file": rel, "reason": str(reason)})
                    rejected_where[cand.split][cand.label] += 1
                    bar.set_postfix(rejected=len(rejected), refresh=False)
                    continue
                index = writers[cand.split].append(array)
                counts[cand.split][cand.label] += 1
                rows.append(
                    ManifestRow(cand.split, index, cand.label, label_index[cand.label], rel, sha)
                )
                by_hash[sha].append((rel, cand.split, cand.label))
    finally:
        for writer in writers.values():
            writer.close()

    rejected.sort(key=lambda r: r["file"])
    totals = {s: sum(counts[s].values()) for s in SPLITS}
    accepted = sum(totals.values())
    warnings: list[str] = []
    problems: list[str] = []

    # --- duplicates and leakage -----------------------------------------------------------------
    leakage: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    for sha, entries in by_hash.items():
        if len(entries) < 2:
            continue
        files = [e[0] for e in entries]
        splits = [s for s in SPLITS if any(e[1] == s for e in entries)]
        labels = sorted({e[2] for e in entries})
        if len(labels) > 1:
            warnings.append(
                f"the same image is labelled with different classes {labels}: {', '.join(files)}; "
                "keep it in the one right class folder"
            )
        if len(splits) > 1:
            leakage.append({"sha256": sha, "files": files, "splits": splits})
        else:
            duplicates.append({"sha256": sha, "files": files, "split": splits[0]})
    for dup in duplicates[:MAX_LISTED]:
        warnings.append(
            f"duplicate images within the {dup['split']} split (kept): {', '.join(dup['files'])}"
        )
    if len(duplicates) > MAX_LISTED:
        warnings.append(
            f"... and {len(duplicates) - MAX_LISTED} more groups of duplicate images "
            "within one split (see 'duplicates' in report.json)"
        )
    if leakage:
        pairs = [
            f"{a} ({sa}) == {b} ({sb})"
            for group in leakage
            for (a, sa, _), (b, sb, _) in _cross_pairs(by_hash[group["sha256"]])
        ]
        advice = (
            "The same photo is in more than one split, so test accuracy would be inflated. "
            + (
                "Remove the copies from all but one split"
                if disc.layout == "splits"
                else "The folder holds copies of the same photo, which the random split put into "
                "different splits: remove the copies"
            )
            + ", or set data.leakage=warn to go on anyway."
        )
        if leakage_mode == "fail":
            problems.append(
                f"{len(leakage)} image(s) appear in more than one split ({len(pairs)} pairs of "
                "identical files):\n" + "\n".join(f"      {p}" for p in pairs) + f"\n    {advice}"
            )
        else:
            for p in pairs:
                warnings.append(f"leakage (data.leakage=warn): identical files in two splits: {p}")

    # --- rejected files -------------------------------------------------------------------------
    n_candidates = len(disc.candidates)
    fraction = len(rejected) / n_candidates if n_candidates else 0.0
    if rejected and fraction > max_rejected:
        listed = "\n".join(f"      {r['file']}: {r['reason']}" for r in rejected[:MAX_LISTED])
        more = (
            f"\n      ... and {len(rejected) - MAX_LISTED} more (all in report.json)"
            if len(rejected) > MAX_LISTED
            else ""
        )
        problems.append(
            f"{len(rejected)} of {n_candidates} image files ({fraction:.0%}) could not be used, "
            f"more than data.max_rejected_fraction={max_rejected:g}:\n{listed}{more}\n    "
            "Fix or remove these files, or raise data.max_rejected_fraction to go on without them."
        )
    for split in SPLITS:
        for label, n in sorted(rejected_where[split].items()):
            warnings.append(
                f"{split}/{label}: {n} of {found[split][label]} files rejected and left out "
                "(see 'rejected' in report.json)"
            )

    # --- per-class coverage ---------------------------------------------------------------------
    hints = _case_hints(classes)
    for label in classes:
        n_train = counts["train"][label]
        if n_train < min_train:
            problems.append(
                f"class '{label}' has {n_train} usable training image(s), fewer than "
                f"data.min_images_per_class={min_train} "
                f"({_where(disc, 'train', label, found, rejected_where, counts)}). "
                f"{_add_advice(disc, 'train', label)}{hints.get(label, '')}"
            )
        if counts["test"][label] == 0:
            problems.append(
                f"class '{label}' has no usable test images "
                f"({_where(disc, 'test', label, found, rejected_where, counts)}). "
                f"{_add_advice(disc, 'test', label)}{hints.get(label, '')}"
            )
    if totals["val"] == 0:
        warnings.append(
            "no validation images: "
            + (
                "there is no validation/ (or val/) folder"
                if disc.layout == "splits" and not disc.class_folders["val"]
                else "the validation split is empty (data.split.val is 0 or the classes are small)"
            )
            + "; training runs without validation metrics"
        )
    else:
        for label in classes:
            if counts["val"][label] == 0:
                warnings.append(
                    f"class '{label}' has no validation images "
                    f"({_where(disc, 'val', label, found, rejected_where, counts)}); validation metrics "
                    "do not cover it"
                )
    if disc.skipped:
        warnings.append(
            f"{len(disc.skipped)} files/folders skipped (hidden/system files, non-image files, "
            "broken links; see 'skipped' in report.json)"
        )

    report: dict[str, Any] = {
        "image_size": size,
        "resize": resize,
        # relative to the project when inside it, so the prepared data (and its DVC hash) do not
        # depend on where the project is cloned
        "root": display_path(Path(root_path).absolute(), Path.cwd().absolute()),
        "layout": disc.layout,
        "classes": list(classes),
        "counts": counts,
        "totals": totals,
        "files_found": n_candidates + len(disc.skipped),
        "accepted": accepted,
        "rejected": rejected,
        "skipped": [{"file": f, "reason": r} for f, r in disc.skipped],
        "leakage": leakage,
        "duplicates": duplicates,
        "warnings": warnings,
    }
    if problems:
        message = (
            f"Cannot prepare the dataset at '{root_path}' ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n"
            + "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        )
        error = DataError(message)
        error.report = report
        raise error

    write_manifest(out / "manifest.csv", rows)
    write_classes(out, classes)
    write_json(out / "report.json", report)
    return report


# --- writing ------------------------------------------------------------------------------------


class _TrimmingSplitWriter(SplitWriter):
    """`SplitWriter` whose `close()` trims correctly when fewer rows than `capacity` were written.

    `pipeline.lib.data.prepared.SplitWriter.close` copies `full[start:start + 256]` into a `count`-row array,
    which fails with a shape error whenever `capacity - count` rows are unused inside the last
    block (i.e. whenever a file was rejected). Same on-disk result; remove once data.py is fixed.
    """

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
            stop = min(start + 256, self.count)
            out[start:stop] = full[start:stop]
        out.flush()
        del out, full
        os.replace(trimmed_path, self.path)


# --- decoding -------------------------------------------------------------------------------------


def _decode_one(
    cand: Candidate, size: int, resize: str, max_pixels: int
) -> tuple[Candidate, np.ndarray | None, str | None, str | None]:
    try:
        array = load_rgb(cand.path, size, resize=resize, max_pixels=max_pixels)
        sha = sha256_file(cand.path)
    except RejectedImage as exc:
        return cand, None, None, exc.reason
    except OSError as exc:  # read error while hashing
        return cand, None, None, f"cannot read file ({exc.strerror or exc})"
    return cand, array, sha, None


def _decode_all(
    candidates: list[Candidate], size: int, resize: str, max_pixels: int, workers: int | None
) -> Iterator[tuple[Candidate, np.ndarray | None, str | None, str | None]]:
    """Results in candidate order, with a bounded number of decodes in flight (flat memory)."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        for cand in candidates:
            yield _decode_one(cand, size, resize, max_pixels)
        return
    window: deque[Future] = deque()
    todo = iter(candidates)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        try:
            for cand in todo:
                window.append(pool.submit(_decode_one, cand, size, resize, max_pixels))
                if len(window) >= workers * 4:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


# --- messages -------------------------------------------------------------------------------------


def _cross_pairs(entries: list[tuple[str, str, str]]) -> Iterator[tuple[tuple, tuple]]:
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            if a[1] != b[1]:
                yield a, b


def _folders(disc: Discovery, split: str, label: str) -> list[str]:
    return disc.class_folders.get(split, {}).get(label, [])


def _where(
    disc: Discovery,
    split: str,
    label: str,
    found: dict[str, Counter],
    rejected: dict[str, Counter],
    counts: dict[str, dict[str, int]],
) -> str:
    folders = _folders(disc, split, label)
    if disc.layout == "splits" and not folders:
        split_folder = _split_folder_name(disc, split)
        return (
            f"there is no '{label}' folder in {split_folder}/"
            if split_folder
            else f"there is no {_SPLIT_WORD[split]} folder"
        )
    n_found, n_rejected = found[split][label], rejected[split][label]
    if disc.layout == "single":
        total = sum(found[s][label] for s in SPLITS)
        if total == 0:
            return f"the class folder '{folders[0]}/' has no image files"
        text = f"the class folder '{folders[0]}/' has {total} image file(s)"
        if total < 2:
            text += ", and at least 2 are needed to give both the training and the test split one"
        all_rejected = sum(rejected[s][label] for s in SPLITS)
        if all_rejected:
            # splits are assigned to files before decoding, so a rejected file leaves a gap
            usable = ", ".join(f"{s} {counts[s][label]}" for s in SPLITS)
            text += f", {all_rejected} rejected; usable images per split: {usable}"
        return text
    where = ", ".join(f"'{f}/'" for f in folders)
    if n_found == 0:
        return f"{where} has no image files"
    return f"{n_found} image file(s) in {where}" + (
        f", {n_rejected} rejected" if n_rejected else ""
    )


def _split_folder_name(disc: Discovery, split: str) -> str | None:
    for labels in disc.class_folders.get(split, {}).values():
        if labels:
            return labels[0].split("/")[0]
    return None


def _add_advice(disc: Discovery, split: str, label: str) -> str:
    folders = _folders(disc, split, label)
    if disc.layout == "single":
        return (
            f"Add more images to '{folders[0]}/' (or fix its rejected files), or remove the "
            "class folder."
        )
    if folders:
        return f"Add images to {', '.join(repr(f + '/') for f in folders)} (or fix its rejected files)."
    split_folder = _split_folder_name(disc, split) or {"train": "training", "test": "test"}[split]
    return (
        f"Create '{split_folder}/{label}/' with images of this class, or remove the class "
        "from the other splits."
    )


def _case_hints(classes: list[str]) -> dict[str, str]:
    """' Note: ...' for class names that differ only by case/spaces (likely one class)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for c in classes:
        groups[" ".join(c.casefold().replace("_", " ").replace("-", " ").split())].append(c)
    hints: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            for n in names:
                hints[n] = (
                    f" Note: class folders {names} differ only in case/spacing; if they are "
                    "the same class, give the folders the same name in every split."
                )
    return hints


def _single_class_message(disc: Discovery) -> str:
    if not disc.classes:
        return f"No class folders found under '{disc.root}'."
    label = disc.classes[0]
    message = (
        f"Only one class ('{label}') found under '{disc.root}': a single class cannot be "
        "classified; add at least one more class folder"
        + (" to every split folder." if disc.layout == "splits" else ".")
    )
    if disc.layout == "single":
        folder = disc.root / _folders(disc, "train", label)[0]
        try:
            subdirs = sorted(
                p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        except OSError:
            subdirs = []
        if subdirs:
            message += (
                f" '{folder.name}/' itself holds folders ({', '.join(subdirs[:5])}"
                f"{', ...' if len(subdirs) > 5 else ''}): if those are the classes or the split "
                f"folders, set data.path to '{folder}'."
            )
    return message
