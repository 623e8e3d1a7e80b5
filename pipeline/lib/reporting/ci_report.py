"""What a pull request changes, as Markdown: `dvc metrics diff --all` (headline metric first,
with a verdict; unchanged ones folded) and `dvc params diff`, McNemar's test, the photos that
changed, each revision's test confusion matrix (PNG and Markdown table) from the git-tracked
predictions.csv. An unknown revision or a failing git/dvc command exits 2 with its message.

    python -m pipeline.ci_report --base origin/main [--head REV|workspace] --output report.md
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.lib.files import REPRODUCED_WITHIN
from pipeline.lib.reporting.figures import confusion_figure, save_figure
from pipeline.lib.reporting.metrics import significance_text
from pipeline.lib.reporting.photo_changes import (
    DEFAULT_PREDICTIONS,
    WORKSPACE,
    PhotoDiff,
    diff_predictions,
    markdown,
    read_at_revision,
)

DEFAULT_METRIC = "test.accuracy"
METRICS_FILE = "reports/metrics.json"
TEXT_MATRIX_MAX_CLASSES = 12  # above: no Markdown table of the confusion matrix
TOLERANCE = REPRODUCED_WITHIN  # metric values this close are "unchanged"

#: counts[i][j] = images of true class i predicted as class j, and the class names in order
Confusion = tuple[list[list[int]], list[str]]


class CIReportError(RuntimeError):
    """A revision that does not exist, a failing git/dvc command, unreadable predictions."""


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Change:
    """One row of `dvc metrics/params diff`: its JSON value at each revision (None: absent)."""

    file: str
    name: str  # e.g. 'test.accuracy'
    base: object
    head: object

    @property
    def change(self) -> float | None:  # head - base, None unless both are numbers (not NaN)
        a, b = _number(self.base), _number(self.head)
        return b - a if a is not None and b is not None and not math.isnan(b - a) else None

    @property
    def changed(self) -> bool:  # numbers: by more than TOLERANCE; NaN -> NaN is unchanged
        if (change := self.change) is not None:
            return abs(change) > TOLERANCE
        both_nan = self.base != self.base and self.head != self.head  # NaN: unequal to itself
        return self.base != self.head and not both_nan


class Moved(NamedTuple):  # a confusion-matrix cell whose count differs
    actual: str
    predicted: str
    base: int
    head: int


def _dvc(repo: Path, *args: str) -> tuple[str, list[str]]:
    """dvc's stdout, and the warnings it printed (it warns, and exits 0, on unreadable files)."""
    cmd = [sys.executable, "-m", "dvc", *args]  # dvc and what it spawns from this environment
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"PATH": path}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or "(no output)")[-4000:]
        raise CIReportError(
            f"dvc {args[0]} {args[1]} failed (exit {proc.returncode}): {' '.join(cmd)}\n{detail}"
        )
    prefixes = ("WARNING", "ERROR", "DVC failed")
    return proc.stdout, [s.strip() for s in proc.stderr.splitlines() if s.startswith(prefixes)]


def resolve_revision(repo: Path, rev: str) -> str:
    """The short SHA of `rev` (any git revision); WORKSPACE stays 'workspace'."""
    if rev == WORKSPACE:
        return WORKSPACE
    git = ["git", "rev-parse", "--verify", "--quiet", "--short", f"{rev}^{{commit}}"]
    short = subprocess.run(git, cwd=repo, capture_output=True, text=True)
    if short.returncode == 0 and short.stdout.strip():
        return short.stdout.strip()
    inside = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=repo, capture_output=True)
    if inside.returncode != 0:
        raise CIReportError(f"{repo} is not a git repository: {inside.stderr.decode().strip()}")
    raise CIReportError(
        f"unknown git revision {rev!r} in {repo} (is it fetched? CI checkouts "
        "need `fetch-depth: 0` for the base branch)"
    )


def dvc_diff(repo: Path, kind: str, base: str, head: str, warnings: list[str]) -> list[Change]:
    """`dvc metrics diff --all` (every metric) or `dvc params diff` (the changed params); dvc's
    warnings (files it could not read) are appended to `warnings`."""
    revs = [base] if head == WORKSPACE else [base, head]
    out, warned = _dvc(repo, kind, "diff", *revs, "--json", *(["--all"] * (kind == "metrics")))
    warnings.extend(w for w in warned if w not in warnings)
    try:
        diff = json.loads(out or "{}")
    except json.JSONDecodeError as exc:
        raise CIReportError(f"dvc {kind} diff printed no JSON: {out[:500]!r}") from exc
    return [
        Change(path, name, (entry or {}).get("old"), (entry or {}).get("new"))
        for path, entries in (diff or {}).items()
        for name, entry in (entries or {}).items()
    ]


def confusion_from_predictions(csv_text: str, classes: Sequence[str] | None = None) -> Confusion:
    """The confusion matrix of a predictions.csv text, classes in the order `classes`, others
    appended sorted. CIReportError: no column `actual` or `predicted`."""
    reader = csv.DictReader(io.StringIO(csv_text))
    missing = {"actual", "predicted"} - set(reader.fieldnames or [])
    if missing:
        raise CIReportError(
            f"predictions CSV lacks column(s) {sorted(missing)}; has {reader.fieldnames}"
        )
    pairs = [(row["actual"], row["predicted"]) for row in reader]
    order = list(dict.fromkeys(classes or []))
    order += sorted({label for pair in pairs for label in pair} - set(order))
    index = {name: i for i, name in enumerate(order)}
    matrix = [[0] * len(order) for _ in order]
    for actual, predicted in pairs:
        matrix[index[actual]][index[predicted]] += 1
    return matrix, order


def confusion_table(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    rows = [
        " | ".join(
            [_md(name), *(f"**{v}**" if i == j and v else str(v) for j, v in enumerate(row))]
        )
        for i, (name, row) in enumerate(zip(classes, matrix, strict=False))
    ]
    header = " | ".join(["true \\ predicted", *map(_md, classes)])
    return _table(header, " | ".join(["---"] + ["---:"] * len(classes)), rows)


def confusion_changes(base: Confusion, head: Confusion) -> list[Moved]:
    """The cells whose count differs (0 where a side lacks the class), row by row."""
    b, h = (
        {(a, p): m[i][j] for i, a in enumerate(names) for j, p in enumerate(names)}
        for m, names in (base, head)
    )
    order = list(dict.fromkeys([*base[1], *head[1]]))
    cells = [(a, p, b.get((a, p), 0), h.get((a, p), 0)) for a in order for p in order]
    return [Moved(*cell) for cell in cells if cell[2] != cell[3]]


def _md(value: object) -> str:
    """A Markdown table cell; "<" and "&" as entities (a class "<!--" would hide the comment)."""
    if value is None:
        return "—"
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return text.replace("|", "\\|").replace("\n", " ")


def _change_cell(row: Change) -> str:
    if row.base is None and row.head is not None:
        return "new"
    if row.head is None and row.base is not None:
        return "removed"
    if (change := row.change) is None:
        return "changed" if row.changed else ""
    text = "0" if abs(change) <= TOLERANCE else f"{change:+.4g}"
    base = _number(row.base)
    if base and text != "0":
        text += f" ({100 * change / abs(base):+.2g} %)"
    return text


def find_metric(rows: Sequence[Change], metric: str) -> Change | None:
    """The row of `metric`, from reports/metrics.json when that file has it."""
    named = sorted((r for r in rows if r.name == metric), key=lambda r: r.file != METRICS_FILE)
    return named[0] if named else None


def verdict(row: Change | None, metric: str = DEFAULT_METRIC) -> str:
    """One line on the headline metric: up / down / unchanged (or missing)."""
    label = metric.replace(".", " ").replace("_", " ")
    label = label[:1].upper() + label[1:]
    if row is None:
        return f"❔ **{label}**: not found in the metrics of either revision."
    old, new = _number(row.base), _number(row.head)
    if old is None and new is None:
        return f"❔ **{label}**: not a number ({_md(row.base)} → {_md(row.head)})."
    if old is None:
        return f"🆕 **{label}**: {_md(new)} (the base has none)."
    if new is None:
        return f"❔ **{label}**: missing at the head (was {_md(old)} at the base)."
    if not row.changed:  # within TOLERANCE, or NaN -> NaN
        return f"➖ **{label} unchanged**: {_md(new)}."
    if math.isnan(new):  # a number becoming NaN is a regression
        return f"⚠️ **{label} became NaN**: {_md(old)} → nan."
    if math.isnan(old):
        return f"🆕 **{label}**: {_md(new)} (was nan at the base)."
    word, icon = ("up", "✅") if new > old else ("down", "⚠️")
    return f"{icon} **{label} {word}**: {_md(old)} → {_md(new)} ({_change_cell(row)})."


def _table(header: str, aligns: str, rows: list[str]) -> str:
    return "\n".join(f"| {line} |" for line in [header, aligns, *rows])


def _metrics_table(rows: Sequence[Change]) -> str:
    cells = [f"`{_md(r.name)}` | {_md(r.base)} | {_md(r.head)} | {_change_cell(r)}" for r in rows]
    return _table("metric | base | head | change", "--- | ---: | ---: | ---:", cells)


def render_metrics(rows: Sequence[Change], metric: str = DEFAULT_METRIC) -> str:
    """Per metrics file: the changed metrics (headline first); unchanged ones in <details>."""
    if not rows:
        return "_No metrics in either revision._"
    parts = []
    for path in sorted({r.file for r in rows}):
        in_file = [r for r in rows if r.file == path]
        in_file.sort(key=lambda r: (r.name != metric, r.name))
        shown = [r for r in in_file if r.changed or r.name == metric]
        hidden = [r for r in in_file if r not in shown]
        parts += [f"**`{path}`**\n", _metrics_table(shown) if shown else "_No metric changed._"]
        if hidden:
            summary = f"{len(hidden)} unchanged metric{'s' if len(hidden) != 1 else ''}"
            parts.append(f"\n<details><summary>{summary}</summary>\n\n{_metrics_table(hidden)}")
            parts.append("\n</details>")
        parts.append("")
    return "\n".join(parts).rstrip()


def render_params(rows: Sequence[Change]) -> str:
    if not rows:
        return "_No params changed._"
    several = len({r.file for r in rows}) > 1
    cells = [
        f"`{_md(f'{r.file}: {r.name}' if several else r.name)}` | {_md(r.base)} | {_md(r.head)}"
        for r in sorted(rows, key=lambda r: (r.file, r.name))
    ]
    return _table("param | base | head", "--- | ---: | ---:", cells)


@dataclass
class Side:
    """A revision as given, its short SHA, its test matrix and PNG (relative), or why none."""

    rev: str
    short: str
    confusion: Confusion | None = None
    image: str | None = None
    note: str | None = None

    @property
    def title(self) -> str:
        return "workspace" if self.short == WORKSPACE else f"`{self.short}`"

    @property
    def named(self) -> str:  # ' (`origin/main`)' when given by name, not by SHA
        given, short = self.rev.lower(), self.short.lower()
        return "" if given.startswith(short) or short.startswith(given) else f" (`{self.rev}`)"


@dataclass
class Report:
    base: Side
    head: Side
    metrics: list[Change] = field(default_factory=list)
    params: list[Change] = field(default_factory=list)
    metric: str = DEFAULT_METRIC
    predictions: str = DEFAULT_PREDICTIONS
    warnings: list[str] = field(default_factory=list)
    photos: PhotoDiff | None = None  # the test predictions paired by photo


def render_confusion(side: Side, label: str) -> str:
    heading = f"#### {label}: {side.title}\n\n"
    if side.confusion is None:
        return f"{heading}_{side.note or 'No predictions.'}_"
    matrix, classes = side.confusion
    total, right = sum(map(sum, matrix)), sum(matrix[i][i] for i in range(len(matrix)))
    parts = [f"{total} test images, {right / total:.1%} right." if total else "No test images."]
    if side.image:
        parts.append(f"![confusion matrix, {label.lower()}]({side.image})")
    if len(classes) <= TEXT_MATRIX_MAX_CLASSES:
        parts.append(confusion_table(matrix, classes))
    else:
        parts.append(f"_{len(classes)} classes: too many for a text table, see the image._")
    return heading + "\n\n".join(parts)


def render_report(report: Report) -> str:
    base, head = report.base, report.head
    head_named = head.named if head.short != WORKSPACE else " (the pipeline's current outputs)"
    sections = [
        f"## Pipeline report: {base.title} → {head.title}",
        f"Base {base.title}{base.named}, head {head.title}{head_named}.",
        verdict(find_metric(report.metrics, report.metric), report.metric),
    ]
    if report.warnings:
        warned = "".join(f"\n> - `{w}`" for w in report.warnings)
        sections.append(f"> [!WARNING]\n> dvc could not read everything:\n>{warned}")
    sections += [
        "### Metrics",
        render_metrics(report.metrics, report.metric),
        "### Params",
        render_params(report.params),
        f"### Confusion matrices (test set, from `{report.predictions}`)",
        render_confusion(base, "Base"),
        render_confusion(head, "Head"),
    ]
    if report.photos is not None:
        sections += ["#### Is the difference real?", significance_text(report.photos.mcnemar)]
        sections += ["#### Photos that changed", markdown(report.photos)]
    if base.confusion and head.confusion:
        moved = [
            f"{_md(c.actual)} | {_md(c.predicted)} | {c.base} | {c.head}"
            for c in confusion_changes(base.confusion, head.confusion)
        ]
        table = _table("true | predicted | base | head", "--- | --- | ---: | ---:", moved)
        sections += ["#### What moved", table if moved else "_Same confusion matrix._"]
    return "\n\n".join(sections) + "\n"


def build_report(
    repo: Path | str,
    base: str,
    head: str,
    output: Path | str,
    images_dir: Path | str | None = None,
    metric: str = DEFAULT_METRIC,
    predictions: str = DEFAULT_PREDICTIONS,
) -> Report:
    """Run the diffs; draw both confusion matrices into `images_dir` (default: by `output`)."""
    repo, output = Path(repo).resolve(), Path(output).resolve()
    images = Path(images_dir).resolve() if images_dir else output.parent
    revs = {"Base": base, "Head": head}
    sides = {label: Side(rev, resolve_revision(repo, rev)) for label, rev in revs.items()}
    warnings: list[str] = []
    metrics = dvc_diff(repo, "metrics", base, head, warnings)
    params = dvc_diff(repo, "params", base, head, warnings)
    texts = {label: read_at_revision(repo, predictions, s.rev) for label, s in sides.items()}
    # one class order for both sides (so the two matrices line up)
    classes = sorted({c for t in texts.values() if t for c in confusion_from_predictions(t)[1]})
    for label, side in sides.items():
        text, image = texts[label], images / f"confusion_{label.lower()}.png"
        if text is None:
            where = "in the workspace" if side.rev == WORKSPACE else f"at {side.short}"
            side.note = f"No `{predictions}` {where}."
            image.unlink(missing_ok=True)  # not a stale one from an earlier report
        else:
            side.confusion = matrix, names = confusion_from_predictions(text, classes)
            if names:
                title = f"Confusion matrix, {label.lower()} {side.short}"
                save_figure(confusion_figure(matrix, names, title=title), image)
                side.image = Path(os.path.relpath(image, output.parent)).as_posix()
    photos = None
    with contextlib.suppress(ValueError):  # predictions paired by photo
        if texts["Base"] and texts["Head"]:
            photos = diff_predictions(texts["Base"], texts["Head"])
    return Report(*sides.values(), metrics, params, metric, predictions, warnings, photos)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; exit status 0, or 2 with one message when git or DVC fails."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.ci_report",
        description="Markdown report of what changed between two revisions of the pipeline: "
        "dvc metrics/params diff and the test confusion matrices.",
    )
    add = parser.add_argument
    add("--base", required=True, help="git revision to compare against (e.g. origin/main)")
    add("--head", default=WORKSPACE, help="git revision, or 'workspace' (default: files on disk)")
    add("--output", required=True, type=Path, help="Markdown file to write")
    add("--images-dir", type=Path, help="where the confusion-matrix PNGs go (default: by --output)")
    add("--repo", type=Path, default=Path("."), help="the DVC project (default: .)")
    add("--metric", default=DEFAULT_METRIC, help="headline metric for the verdict (%(default)s)")
    add("--predictions", default=DEFAULT_PREDICTIONS, help="git-tracked CSV (%(default)s)")
    args = parser.parse_args(argv)
    try:
        report = build_report(**vars(args))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render_report(report), encoding="utf-8")
    except CIReportError as exc:
        print(f"ci_report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    print(verdict(find_metric(report.metrics, report.metric), report.metric))
    return 0
