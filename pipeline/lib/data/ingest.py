"""Ingesting a folder of images into the prepared-dataset format (see `pipeline.lib.data.prepared`).

`ingest(root, data_cfg, out_dir)` discovers the files (`pipeline.lib.data.sources.folder.discover`), decodes
each one once (`pipeline.lib.data.images.load_rgb`) in a thread pool, streams the arrays in order into
`train.npy` / `val.npy` / `test.npy`, and writes `manifest.csv`, `classes.json` and `report.json`.
Problems that make the dataset unusable raise one `DataError` that lists all of them and says what
to do; everything else (rejected files, skipped files, duplicates, ...) is listed in the report and
summarised in its `warnings`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.lib.config.schema import DataConfig
from pipeline.lib.data.images import RejectedImage, load_rgb, sha256_file
from pipeline.lib.data.prepared import (
    SPLITS,
    ManifestRow,
    SplitWriter,
    shown_path,
    write_classes,
    write_manifest,
)
from pipeline.lib.data.sources.folder import (
    HIDDEN_REASON,
    Candidate,
    DataError,
    Discovery,
    _ratios,
    discover,
    display_path,
)
from pipeline.lib.files import write_json

log = logging.getLogger(__name__)

__all__ = ["DataError", "ingest", "MAX_LISTED", "SMALL_CLASS"]

#: How many items an error message lists before "... and N more".
MAX_LISTED = 20
#: A class with fewer training images than this gets a warning (and the MLflow tag
#: `data_small_classes`): a handful of photos per class is the least a model learns from.
SMALL_CLASS = 5
_SPLIT_WORD = {"train": "training", "val": "validation", "test": "test"}


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    value = getattr(cfg, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class _Settings:
    """The `data` config keys ingest uses (defaults: the schema's `DataConfig`)."""

    source: str
    size: int
    resize: str
    max_pixels: int
    min_train: int
    leakage: str
    max_rejected: float
    ratios: Any
    seed: int

    @classmethod
    def of(cls, data_cfg: Any) -> _Settings:
        """The settings read from `data_cfg` (a DataConfig, DictConfig or mapping; missing keys take
        the schema's defaults, `source` defaults to `folder`).

        Raises ValueError: `leakage` is neither `fail` nor `warn`.
        """
        d = DataConfig()
        leakage = str(_cfg(data_cfg, "leakage", d.leakage))
        if leakage not in ("fail", "warn"):
            raise ValueError(f"data.leakage must be 'fail' or 'warn', not {leakage!r}")
        return cls(
            source=str(_cfg(data_cfg, "source", "folder")),
            size=int(_cfg(data_cfg, "image_size", d.image_size)),
            resize=str(_cfg(data_cfg, "resize", d.resize)),
            max_pixels=int(_cfg(data_cfg, "max_pixels", d.max_pixels)),
            min_train=int(_cfg(data_cfg, "min_images_per_class", d.min_images_per_class)),
            leakage=leakage,
            max_rejected=float(_cfg(data_cfg, "max_rejected_fraction", d.max_rejected_fraction)),
            ratios=_cfg(data_cfg, "split", d.split),
            seed=int(_cfg(data_cfg, "seed", d.seed)),
        )


@dataclass
class _Tally:
    """What decoding found: per split and class, files found / accepted / rejected."""

    found: dict[str, Counter]
    counts: dict[str, dict[str, int]]
    rejected: list[dict[str, str]] = field(default_factory=list)
    rejected_where: dict[str, Counter] = field(
        default_factory=lambda: {s: Counter() for s in SPLITS}
    )
    rows: list[ManifestRow] = field(default_factory=list)
    #: sha256 -> [(file, split, label)]
    by_hash: dict[str, list[tuple[str, str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )


def ingest(
    root: str | os.PathLike[str],
    data_cfg: Any,
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Decode every image under `root` into `out_dir`; return the report (also in report.json).

    Args:
        root: the image folder (read only).
        data_cfg: a `DataConfig` (dataclass or DictConfig, or a mapping with the same keys;
            missing keys take the schema's defaults).
        out_dir: an existing or new folder; receives `<split>.npy` (uint8 (N, S, S, 3), S =
            `data_cfg.image_size` px), `manifest.csv`, `classes.json` and `report.json`.
        workers: decoding threads (default: the cores, at most 8); progress: show a bar.

    Raises:
        DataError: the dataset cannot be used (the report is attached as `.report`).
        OSError: writing `out_dir` failed (e.g. ENOSPC, a full disk).
    """
    settings = _Settings.of(data_cfg)
    disc = discover(root, settings.ratios, settings.seed)
    _log_discovery(disc)
    if len(disc.classes) < 2:
        raise DataError(_single_class_message(disc))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tally = _decode_into(out, disc, settings, workers, progress)
    warnings: list[str] = []
    problems: list[str] = []
    leakage, duplicates = _check_duplicates(disc, tally, settings, warnings, problems)
    _check_rejected(disc, tally, settings, warnings, problems)
    small = _check_coverage(disc, tally, settings, warnings, problems)
    report = _report(disc, tally, settings, small, leakage, duplicates, warnings)
    if problems:
        raise _problems_error(disc, problems, report)
    write_manifest(out / "manifest.csv", tally.rows)
    write_classes(out, disc.classes)
    write_json(out / "report.json", report)
    return report


def _log_discovery(disc: Discovery) -> None:
    """Log what discovery found: the number of files and classes, the folder and its layout."""
    log.info(
        "Found %d image files in %d classes under %s (%s)",
        len(disc.candidates),
        len(disc.classes),
        disc.root,
        "split folders" if disc.layout == "splits" else "class folders, split by data.split",
    )


def _report(
    disc: Discovery,
    tally: _Tally,
    settings: _Settings,
    small: dict[str, int],
    leakage: list[dict[str, Any]],
    duplicates: list[dict[str, Any]],
    warnings: list[str],
) -> dict[str, Any]:
    """The ingest report (the content of report.json) from the discovery, the decode tally and
    the checks' findings."""
    totals = {s: sum(tally.counts[s].values()) for s in SPLITS}
    return {
        "source": settings.source,
        "image_size": settings.size,
        "resize": settings.resize,
        # relative to the project when inside it, so the prepared data (and its DVC hash) do not
        # depend on where the project is cloned
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
        "warnings": warnings,
    }


def _problems_error(disc: Discovery, problems: list[str], report: dict[str, Any]) -> DataError:
    """One DataError listing every problem, numbered, with the report attached as `.report`."""
    error = DataError(
        f"Cannot prepare the dataset at '{disc.root}' ({len(problems)} problem"
        f"{'s' if len(problems) > 1 else ''}):\n"
        + "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
    )
    error.report = report
    return error


def _decode_into(
    out: Path, disc: Discovery, settings: _Settings, workers: int | None, progress: bool
) -> _Tally:
    """Decode every candidate in order and stream the accepted ones into `<split>.npy`."""
    found: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for c in disc.candidates:
        found[c.split][c.label] += 1
    tally = _Tally(found=found, counts={s: {c: 0 for c in disc.classes} for s in SPLITS})
    label_index = {c: i for i, c in enumerate(disc.classes)}
    writers: dict[str, SplitWriter] = {}
    try:
        for s in SPLITS:
            writers[s] = SplitWriter(out, s, sum(found[s].values()), settings.size)
        results = _decode_all(
            disc.candidates, settings.size, settings.resize, settings.max_pixels, workers
        )
        with closing(results), _progress_bar(len(disc.candidates), progress) as bar:
            for cand, array, sha, reason in results:
                bar.update(1)
                rel = display_path(cand.path, disc.root)
                if array is None:
                    tally.rejected.append({"file": rel, "reason": str(reason)})
                    tally.rejected_where[cand.split][cand.label] += 1
                    bar.set_postfix(rejected=len(tally.rejected), refresh=False)
                    continue
                index = writers[cand.split].append(array)
                tally.counts[cand.split][cand.label] += 1
                tally.rows.append(
                    ManifestRow(cand.split, index, cand.label, label_index[cand.label], rel, sha)
                )
                tally.by_hash[sha].append((rel, cand.split, cand.label))
    finally:
        for writer in writers.values():
            writer.close()
    tally.rejected.sort(key=lambda r: r["file"])
    return tally


def _progress_bar(total: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        unit="img",
        desc="prepare: decoding images",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def _check_duplicates(
    disc: Discovery, tally: _Tally, settings: _Settings, warnings: list[str], problems: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(leakage groups, duplicate groups): identical files across splits / within one split."""
    leakage: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    for sha, entries in tally.by_hash.items():
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
        _leakage_message(disc, tally, settings, leakage, warnings, problems)
    return leakage, duplicates


def _leakage_message(
    disc: Discovery,
    tally: _Tally,
    settings: _Settings,
    leakage: list[dict[str, Any]],
    warnings: list[str],
    problems: list[str],
) -> None:
    pairs = [
        f"{a} ({sa}) == {b} ({sb})"
        for group in leakage
        for (a, sa, _), (b, sb, _) in _cross_pairs(tally.by_hash[group["sha256"]])
    ]
    advice = (
        "The same photo is in more than one split, so test accuracy would be inflated. "
        + (
            "Remove the copies from all but one split"
            if disc.layout == "splits"
            else "The folder holds copies of the same photo, which the random split put into "
            "different splits: remove the copies"
        )
        + ", or set data.leakage=warn to go on anyway (for good: `leakage: warn` in the data"
        " config you use, e.g. conf/data/photos.yaml after --use-folder)."
    )
    if settings.leakage == "fail":
        problems.append(
            f"{len(leakage)} image(s) appear in more than one split ({len(pairs)} pairs of "
            "identical files):\n" + "\n".join(f"      {p}" for p in pairs) + f"\n    {advice}"
        )
    else:
        for p in pairs:
            warnings.append(f"leakage (data.leakage=warn): identical files in two splits: {p}")


def _check_rejected(
    disc: Discovery, tally: _Tally, settings: _Settings, warnings: list[str], problems: list[str]
) -> None:
    """A problem when more than data.max_rejected_fraction of the files could not be used."""
    rejected = tally.rejected
    n_candidates = len(disc.candidates)
    fraction = len(rejected) / n_candidates if n_candidates else 0.0
    if rejected and fraction > settings.max_rejected:
        listed = "\n".join(f"      {r['file']}: {r['reason']}" for r in rejected[:MAX_LISTED])
        more = (
            f"\n      ... and {len(rejected) - MAX_LISTED} more (all in report.json)"
            if len(rejected) > MAX_LISTED
            else ""
        )
        problems.append(
            f"{len(rejected)} of {n_candidates} image files ({fraction:.0%}) could not be used, "
            f"more than data.max_rejected_fraction={settings.max_rejected:g}:\n{listed}{more}\n"
            "    Fix or remove these files, or raise data.max_rejected_fraction to go on without "
            "them."
        )
    for split in SPLITS:
        for label, n in sorted(tally.rejected_where[split].items()):
            warnings.append(
                f"{split}/{label}: {n} of {tally.found[split][label]} files rejected and left out "
                "(see 'rejected' in report.json)"
            )


def _check_coverage(
    disc: Discovery, tally: _Tally, settings: _Settings, warnings: list[str], problems: list[str]
) -> dict[str, int]:
    """Per-class coverage of the splits; returns {class: training images} for the classes with
    fewer than `SMALL_CLASS` (but at least data.min_images_per_class) training images."""
    counts = tally.counts
    where = _Where(disc, tally)
    hints = _case_hints(disc.classes)
    small: dict[str, int] = {}
    for label in disc.classes:
        n_train = counts["train"][label]
        if n_train < settings.min_train:
            problems.append(
                f"class '{label}' has {n_train} usable training image(s), fewer than "
                f"data.min_images_per_class={settings.min_train} ({where('train', label)}). "
                f"{_add_advice(disc, 'train', label)}{hints.get(label, '')}"
            )
        elif n_train < SMALL_CLASS:
            small[label] = n_train
        if counts["test"][label] == 0:
            problems.append(
                f"class '{label}' has no usable test images ({where('test', label)}). "
                f"{_add_advice(disc, 'test', label)}{hints.get(label, '')}"
            )
    if small:
        listed = ", ".join(f"'{c}' {n}" for c, n in small.items())
        warnings.append(
            f"{len(small)} class(es) have fewer than {SMALL_CLASS} training images ({listed}): "
            "a model learns little from so few and its scores are unreliable; add photos"
            + (
                f", or give training a larger share (data.split.train, now {_train_share(settings)})"
                if disc.layout == "single"
                else ""
            )
        )
    _check_validation(disc, tally, where, warnings)
    # hidden and system files (.DS_Store, the generator's own .synthetic.json) are listed in
    # report.json but are not worth a warning
    unexpected = [s for s in disc.skipped if s[1] != HIDDEN_REASON]
    if unexpected:
        warnings.append(
            f"{len(unexpected)} files/folders skipped (non-image files, broken links, ...; "
            "see 'skipped' in report.json)"
        )
    return small


def _train_share(settings: _Settings) -> str:
    train, _, _ = _ratios(settings.ratios)
    return f"{train:.0%}"


def _check_validation(disc: Discovery, tally: _Tally, where: _Where, warnings: list[str]) -> None:
    if sum(tally.counts["val"].values()) == 0:
        warnings.append(
            "no validation images: "
            + (
                "there is no validation/ (or val/) folder"
                if disc.layout == "splits" and not disc.class_folders["val"]
                else "the validation split is empty (data.split.val is 0 or the classes are small)"
            )
            + "; training runs without validation metrics"
        )
        return
    for label in disc.classes:
        if tally.counts["val"][label] == 0:
            warnings.append(
                f"class '{label}' has no validation images ({where('val', label)}); validation "
                "metrics do not cover it"
            )


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


class _Where:
    """Says where a class's images of a split are (or why there are none), for messages."""

    def __init__(self, disc: Discovery, tally: _Tally) -> None:
        self.disc, self.tally = disc, tally

    def __call__(self, split: str, label: str) -> str:
        disc, found, rejected = self.disc, self.tally.found, self.tally.rejected_where
        folders = _folders(disc, split, label)
        if disc.layout == "splits" and not folders:
            split_folder = _split_folder_name(disc, split)
            return (
                f"there is no '{label}' folder in {split_folder}/"
                if split_folder
                else f"there is no {_SPLIT_WORD[split]} folder"
            )
        if disc.layout == "single":
            return self._single(folders[0], label)
        n_found, n_rejected = found[split][label], rejected[split][label]
        where = ", ".join(f"'{f}/'" for f in folders)
        if n_found == 0:
            return f"{where} has no image files"
        return f"{n_found} image file(s) in {where}" + (
            f", {n_rejected} rejected" if n_rejected else ""
        )

    def _single(self, folder: str, label: str) -> str:
        found, rejected = self.tally.found, self.tally.rejected_where
        total = sum(found[s][label] for s in SPLITS)
        if total == 0:
            return f"the class folder '{folder}/' has no image files"
        text = f"the class folder '{folder}/' has {total} image file(s)"
        if total < 2:
            text += ", and at least 2 are needed to give both the training and the test split one"
        all_rejected = sum(rejected[s][label] for s in SPLITS)
        if all_rejected:
            # splits are assigned to files before decoding, so a rejected file leaves a gap
            usable = ", ".join(f"{s} {self.tally.counts[s][label]}" for s in SPLITS)
            text += f", {all_rejected} rejected; usable images per split: {usable}"
        return text


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
