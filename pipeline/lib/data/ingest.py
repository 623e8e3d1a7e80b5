"""Ingesting a folder of images into the prepared dataset (`pipeline.lib.data.prepared`): every
file is decoded once to check it (at `CHECK_SIZE`: JPEGs at 1/8 scale), hashed and recorded.
Problems that make it unusable raise one `DataError` listing them all; the rest (rejected and
skipped files, duplicates, ...) goes into the report and its `warnings`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.lib.config.schema import DataConfig
from pipeline.lib.data.images import RejectedImage, load_rgb
from pipeline.lib.data.prepared import SPLITS, ManifestRow, display_path, shown_path, write_manifest
from pipeline.lib.data.sources.folder import (
    HIDDEN_PHOTOS_REASON,
    HIDDEN_REASON,
    OUTSIDE_REASON,
    Candidate,
    DataError,
    Discovery,
    discover,
    split_ratios,
)
from pipeline.lib.data.sources.synthetic import SPLIT_DIRS
from pipeline.lib.files import write_json

log = logging.getLogger(__name__)

#: How many items an error message lists before "... and N more".
MAX_LISTED = 20
#: A class with fewer training images than this gets a warning (and the tag data_small_classes).
SMALL_CLASS = 5
#: The side prepare decodes to, to check a file (featurize decodes at `data.image_size`).
CHECK_SIZE = 16
_BAR = dict(unit="img", desc="prepare: checking images", dynamic_ncols=True)
#: A checked file: candidate, (size in bytes, sha256, None) or (0, None, reason), decoder notes.
_Checked = tuple[Candidate, int, str | None, str | None, list[str]]
#: A group of identical files in report.json: sha256, files, and their split(s).
_Group = dict[str, str | list[str]]


def ingest(
    root: str | os.PathLike[str],
    data: DataConfig,
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Check every image under `root` (read only) and record them in the prepared dataset in
    the folder `out_dir`; return the report. `workers`: decoding threads (default: cores, at most 8).
    Raises DataError (with the report as `.report`), OSError."""
    disc = discover(root, data.split, data.seed)
    how = "split folders" if disc.layout == "splits" else "class folders, split by data.split"
    found = (len(disc.candidates), len(disc.classes), disc.root, how)
    log.info("Found %d image files in %d classes under %s (%s)", *found)
    if len(disc.classes) < 2:
        raise DataError(_single_class_message(disc))
    tally = _Tally(disc, data)
    tally.check(workers, progress)
    leakage, duplicates = tally.duplicates()
    tally.check_rejected()
    small = tally.coverage()
    totals = {s: sum(tally.counts[s].values()) for s in SPLITS}
    report = {
        "source": data.source,
        "image_size": data.image_size,
        "resize": data.resize,
        "root": shown_path(disc.root),
        "layout": disc.layout,
        "classes": list(disc.classes),
        "counts": tally.counts,
        "totals": totals,
        "files_found": len(disc.candidates) + len(disc.skipped),
        "accepted": sum(totals.values()),
        "small_classes": small,
        "rejected": tally.rejected,
        "skipped": [{"file": f, "reason": r} for f, r in disc.skipped],
        "leakage": leakage,
        "duplicates": duplicates,
        "warnings": tally.warnings,
    }
    if tally.problems:
        head = f"Cannot prepare the dataset at '{disc.root}' ({len(tally.problems)} problem(s)):"
        error = DataError(head + "".join(f"\n  {i}. {p}" for i, p in enumerate(tally.problems, 1)))
        error.report = report
        raise error
    out = Path(out_dir)
    write_manifest(out / "manifest.csv", tally.rows)
    write_json(out / "classes.json", list(disc.classes))
    write_json(out / "report.json", report)
    return report


def _check_one(cand: Candidate, resize: str, max_pixels: int) -> _Checked:
    notes: list[str] = []
    try:
        data = cand.path.read_bytes()
        load_rgb(cand.path, CHECK_SIZE, resize, max_pixels, notes=notes, data=data)
    except RejectedImage as exc:
        return cand, 0, None, exc.reason, []
    except OSError as exc:
        return cand, 0, None, f"cannot read file ({exc.strerror or exc})", []
    return cand, len(data), hashlib.sha256(data).hexdigest(), None, notes


def _check_all(
    candidates: list[Candidate], data: DataConfig, workers: int | None
) -> Iterator[_Checked]:
    """Results in candidate order, a bounded number of files in flight (flat memory)."""
    workers = workers or min(8, os.cpu_count() or 1)
    window: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        try:
            for cand in candidates:
                window.append(pool.submit(_check_one, cand, data.resize, data.max_pixels))
                if len(window) >= workers * 4:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


class _Tally:
    """Checks the discovered files, per split and class: files `found`, accepted
    (`counts`), rejected; the checks add `warnings` and `problems` (which make ingest fail)."""

    def __init__(self, disc: Discovery, data: DataConfig) -> None:
        self.disc, self.data = disc, data
        self.found = {s: Counter(c.label for c in disc.candidates if c.split == s) for s in SPLITS}
        self.counts = {s: dict.fromkeys(disc.classes, 0) for s in SPLITS}
        self.rejected: list[dict[str, str]] = []
        self.rejected_where: dict[str, Counter] = defaultdict(Counter)
        self.rows: list[ManifestRow] = []
        self.by_hash: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        self.warnings: list[str] = []
        self.problems: list[str] = []

    def check(self, workers: int | None, progress: bool) -> None:
        disc = self.disc
        label_index = {c: i for i, c in enumerate(disc.classes)}
        index: Counter = Counter()
        noted: list[str] = []
        results = _check_all(disc.candidates, self.data, workers)
        bar = tqdm(total=len(disc.candidates), file=sys.stderr, disable=not progress, **_BAR)
        with closing(results), bar:
            for cand, size, sha, reason, notes in results:
                bar.update(1)
                rel = display_path(cand.path, disc.root)
                if sha is None:
                    self.rejected.append({"file": rel, "reason": str(reason)})
                    self.rejected_where[cand.split][cand.label] += 1
                    bar.set_postfix(rejected=len(self.rejected), refresh=False)
                    continue
                noted += [f"{rel}: {note}" for note in notes]
                self.counts[cand.split][cand.label] += 1
                i, index[cand.split] = index[cand.split], index[cand.split] + 1
                number = label_index[cand.label]
                self.rows.append(ManifestRow(cand.split, i, cand.label, number, rel, sha, size))
                self.by_hash[sha].append((rel, cand.split, cand.label))
        self.rejected.sort(key=lambda r: r["file"])
        if noted:
            self.warnings.append(
                f"{len(noted)} image(s) used without their colour profile (decoded as sRGB; "
                f"re-export them as sRGB to be sure of their colours): {_listed(sorted(noted))}"
            )

    def duplicates(self) -> tuple[list[_Group], list[_Group]]:
        """(leakage groups, duplicate groups): identical files across splits / within one."""
        leakage: list[_Group] = []
        duplicates: list[_Group] = []
        pairs: list[str] = []
        for sha, entries in self.by_hash.items():
            files = [e[0] for e in entries]
            splits = [s for s in SPLITS if any(e[1] == s for e in entries)]
            if len(labels := sorted({e[2] for e in entries})) > 1:
                self.warnings.append(
                    f"the same image is labelled with different classes {labels}: "
                    f"{', '.join(files)}; keep it in the one right class folder"
                )
            if len(splits) > 1:
                leakage.append({"sha256": sha, "files": files, "splits": splits})
                for i, (a, sa, _) in enumerate(entries):
                    pairs += [
                        f"{a} ({sa}) == {b} ({sb})" for b, sb, _ in entries[i + 1 :] if sb != sa
                    ]
            elif len(files) > 1:
                duplicates.append({"sha256": sha, "files": files, "split": splits[0]})
        self.warnings += [
            f"duplicate images within the {dup['split']} split (kept): {', '.join(dup['files'])}"
            for dup in duplicates[:MAX_LISTED]
        ]
        if len(duplicates) > MAX_LISTED:
            more = len(duplicates) - MAX_LISTED
            self.warnings.append(f"... and {more} more groups of duplicate images (report.json)")
        if pairs and self.data.leakage != "fail":
            warn = "leakage (data.leakage=warn): identical files in two splits: "
            self.warnings += [warn + p for p in pairs]
        elif pairs:
            self.problems.append(
                f"{len(leakage)} image(s) appear in more than one split ({len(pairs)} pairs of "
                "identical files):\n"
                + "\n".join(f"      {p}" for p in pairs)
                + "\n    This inflates test accuracy: remove the copies from all but one split, or "
                "set data.leakage=warn (e.g. in conf/data/photos.yaml) to go on anyway."
            )
        return leakage, duplicates

    def check_rejected(self) -> None:
        rejected, n_candidates = self.rejected, len(self.disc.candidates)
        fraction = len(rejected) / n_candidates if n_candidates else 0.0
        limit = float(self.data.max_rejected_fraction)
        if rejected and fraction > limit:
            listed = _listed([f"{r['file']}: {r['reason']}" for r in rejected], "\n      ")
            self.problems.append(
                f"{len(rejected)} of {n_candidates} image files ({fraction:.0%}) could not be "
                f"used, more than data.max_rejected_fraction={limit:g}:\n      {listed}\n"
                "    Fix or remove these files, or raise data.max_rejected_fraction."
            )
        self.warnings += [
            f"{split}/{label}: {n} of {self.found[split][label]} files rejected and left out "
            "(see 'rejected' in report.json)"
            for split in SPLITS
            for label, n in sorted(self.rejected_where[split].items())
        ]

    def coverage(self) -> dict[str, int]:
        """Checks each class's images per split; returns {class: n} for the small classes."""
        disc, counts, min_train = self.disc, self.counts, int(self.data.min_images_per_class)
        hints = _case_hints(disc.classes)
        small: dict[str, int] = {}
        for label in disc.classes:
            n_train, hint = counts["train"][label], hints.get(label, "")
            if n_train < min_train:
                self.problems.append(
                    f"class '{label}' has {n_train} usable training image(s), fewer than "
                    f"data.min_images_per_class={min_train} ({self.where('train', label)}). "
                    f"{self.advice('train', label)}{hint}"
                )
            elif n_train < SMALL_CLASS:
                small[label] = n_train
            if counts["test"][label] == 0:
                self.problems.append(
                    f"class '{label}' has no usable test images ({self.where('test', label)}). "
                    f"{self.advice('test', label)}{hint}"
                )
        if small:
            listed = ", ".join(f"'{c}' {n}" for c, n in small.items())
            train = split_ratios(self.data.split)[0]
            share = f", or give training a larger share (data.split.train, now {train:.0%})"
            self.warnings.append(
                f"{len(small)} class(es) have fewer than {SMALL_CLASS} training images ({listed}):"
                " a model learns little from so few and its scores are unreliable; add photos"
                + (share if disc.layout == "single" else "")
            )
        if sum(counts["val"].values()) == 0:
            why = "the validation split is empty (data.split.val is 0 or the classes are small)"
            if disc.layout == "splits" and not disc.class_folders["val"]:
                why = "there is no validation/ (or val/) folder"
            self.warnings.append(
                f"no validation images: {why}; training runs without validation metrics"
            )
        else:
            self.warnings += [
                f"class '{label}' has no validation images ({self.where('val', label)}); "
                "validation metrics do not cover it"
                for label in disc.classes
                if counts["val"][label] == 0
            ]
        outside = [f for f, reason in disc.skipped if reason.startswith(OUTSIDE_REASON)]
        hidden = [f for f, reason in disc.skipped if reason.startswith(HIDDEN_PHOTOS_REASON)]
        skipped = {
            "symbolic link(s) point outside the data folder and are left out (DVC tracks the "
            "folder's content, not link targets; copy the photos in to use them)": outside,
            "hidden folder(s) with image files skipped (rename them without the leading dot to "
            "use them)": hidden,
            "files/folders skipped (non-image files, broken links, ...; why: 'skipped' in "
            "report.json)": [
                f for f, r in disc.skipped if r != HIDDEN_REASON and f not in outside + hidden
            ],
        }
        self.warnings += [f"{len(fs)} {what}: {_listed(fs)}" for what, fs in skipped.items() if fs]
        return small

    def split_folder(self, split: str) -> str | None:
        folders = self.disc.class_folders.get(split, {}).values()
        return next((labels[0].split("/")[0] for labels in folders if labels), None)

    def where(self, split: str, label: str) -> str:
        """Where a class's images of a split are (or why there are none), for messages."""
        folders = self.disc.class_folders.get(split, {}).get(label, [])
        found, rejected = self.found[split][label], self.rejected_where[split][label]
        if self.disc.layout == "splits":
            if not folders and (split_folder := self.split_folder(split)):
                return f"there is no '{label}' folder in {split_folder}/"
            if not folders:
                return f"there is no {SPLIT_DIRS[split]} folder"
            where = ", ".join(f"'{f}/'" for f in folders)
            if found == 0:
                return f"{where} has no image files"
            rejected_text = f", {rejected} rejected" if rejected else ""
            return f"{found} image file(s) in {where}{rejected_text}"
        total = sum(self.found[s][label] for s in SPLITS)
        text = f"the class folder '{folders[0]}/' has {total} image file(s)"
        if total < 2:
            text += " (at least 2 are needed: one for training, one for test)"
        if all_rejected := sum(self.rejected_where[s][label] for s in SPLITS):
            usable = ", ".join(f"{s} {self.counts[s][label]}" for s in SPLITS)
            text += f", {all_rejected} rejected; usable images per split: {usable}"
        return text

    def advice(self, split: str, label: str) -> str:
        if folders := self.disc.class_folders.get(split, {}).get(label, []):
            listed = ", ".join(repr(f + "/") for f in folders)
            return f"Add images to {listed} (or fix its rejected files), or remove the class."
        split_folder = self.split_folder(split) or SPLIT_DIRS[split]
        return f"Create '{split_folder}/{label}/' with images, or remove the class elsewhere."


def _listed(items: list[str], sep: str = ", ") -> str:
    more = [f"... and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else []
    return sep.join(items[:MAX_LISTED] + more)


def _case_hints(classes: list[str]) -> dict[str, str]:
    """' Note: ...' for class names that differ only by case/spaces (likely one class)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for c in classes:
        groups[" ".join(c.casefold().replace("_", " ").replace("-", " ").split())].append(c)
    note = " Note: class folders {} differ only in spacing; if they are one class, name them alike."
    return {n: note.format(names) for names in groups.values() if len(names) > 1 for n in names}


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
        folder = disc.root / disc.class_folders["train"][label][0]
        with contextlib.suppress(OSError):
            if any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
                message += f" If '{folder.name}/' holds the classes, set data.path to '{folder}'."
    return message
