"""What a pull request changes, as a Markdown report: metrics, params, confusion matrices.

    python -m pipeline.ci_report --base origin/main [--head REV|workspace] --output report.md \
        [--images-dir DIR] [--repo .] [--metric test.accuracy]

Compares two git revisions of a DVC project (the head defaults to the workspace, i.e. what
`dvc repro` just produced in CI):

- `dvc metrics diff <base> [<head>] --json --all` as a table per metrics file (changed metrics and
  the headline metric; unchanged ones folded away);
- `dvc params diff <base> [<head>] --json` as a table (changed params only);
- the test-set confusion matrix of each revision, recomputed from `reports/predictions.csv`
  (git-tracked, `cache: false`), as PNG images (linked with relative paths) and as Markdown tables
  of counts, so the report still says something where images are not rendered (PR comments);
- a header with both revisions (short SHAs) and a one-line verdict on the headline metric.

Every part is a pure function (`metrics_diff`, `params_diff`, `confusion_from_predictions`,
`render_report`, ...); `main` only parses arguments and wires them together. DVC runs as
`sys.executable -m dvc` in the repository; an unknown revision or a failing dvc command stops with
exit status 2 and the message (dvc's stderr included).
"""

from __future__ import annotations

import argparse
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
from typing import Any

WORKSPACE = "workspace"
DEFAULT_METRIC = "test.accuracy"
DEFAULT_METRICS_FILE = "reports/metrics.json"
DEFAULT_PREDICTIONS = "reports/predictions.csv"
#: above this many classes the confusion matrix is not written out as a Markdown table
TEXT_MATRIX_MAX_CLASSES = 12
#: two metric values closer than this are "unchanged"
TOLERANCE = 1e-12


class CIReportError(RuntimeError):
    """A revision that does not exist, a failing git/dvc command, unreadable predictions."""


# --------------------------------------------------------------------------------------------
# git and dvc


def _run(cmd: Sequence[str], repo: Path, what: str) -> tuple[str, str]:
    env = dict(os.environ)
    # dvc (and anything it spawns) from the same environment as this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise CIReportError(f"{what}: cannot run {cmd[0]!r}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or "(no output)")[-4000:]
        raise CIReportError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{detail}")
    return proc.stdout, proc.stderr


def _dvc(repo: Path, *args: str) -> tuple[str, list[str]]:
    """dvc's stdout, and the warnings it printed (it warns, and exits 0, on unreadable files)."""
    out, err = _run([sys.executable, "-m", "dvc", *args], repo, f"dvc {args[0]} {args[1]}")
    warnings = [
        line.strip()
        for line in err.splitlines()
        if line.startswith(("WARNING", "ERROR", "DVC failed"))
    ]
    return out, warnings


def resolve_revision(repo: Path, rev: str) -> str:
    """The short SHA of `rev` (any git revision); WORKSPACE stays 'workspace'."""
    if rev == WORKSPACE:
        return WORKSPACE
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "--short", f"{rev}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        inside = subprocess.run(
            ["git", "rev-parse", "--git-dir"], cwd=repo, capture_output=True, text=True
        )
        if inside.returncode != 0:
            raise CIReportError(f"{repo} is not a git repository: {inside.stderr.strip()}")
        raise CIReportError(
            f"unknown git revision {rev!r} in {repo} (is it fetched? CI checkouts "
            "need `fetch-depth: 0` for the base branch)"
        )
    return proc.stdout.strip()


def _diff_json(
    repo: Path,
    kind: str,
    base: str,
    head: str,
    extra: Sequence[str] = (),
    warnings: list[str] | None = None,
) -> dict:
    revs = [base] if head == WORKSPACE else [base, head]
    out, warned = _dvc(repo, kind, "diff", *revs, "--json", *extra)
    if warnings is not None:
        warnings.extend(w for w in warned if w not in warnings)
    try:
        return json.loads(out or "{}")
    except json.JSONDecodeError as exc:
        raise CIReportError(
            f"dvc {kind} diff printed something that is not JSON: {out[:500]!r}"
        ) from exc


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _rows(diff: dict, *, with_change: bool) -> list[dict]:
    rows = []
    for path, entries in (diff or {}).items():
        for name, entry in (entries or {}).items():
            entry = entry or {}
            old, new = entry.get("old"), entry.get("new")
            row = {"file": path, "name": name, "base": old, "head": new}
            if with_change:
                a, b = _number(old), _number(new)
                row["change"] = (b - a) if a is not None and b is not None else None
                if a is not None and b is not None:
                    row["changed"] = abs(b - a) > TOLERANCE
                else:
                    row["changed"] = old != new
            rows.append(row)
    return rows


def metrics_diff(
    repo: Path | str, base: str, head: str = WORKSPACE, warnings: list[str] | None = None
) -> list[dict]:
    """Every metric of both revisions (`dvc metrics diff --all`).

    One dict per metric: file, name (e.g. 'test.accuracy'), base, head (None where the revision
    lacks it), change (head - base, None unless both are numbers) and changed (bool). dvc's
    warnings (files it could not read at a revision) are appended to `warnings` when given.
    """
    diff = _diff_json(Path(repo), "metrics", base, head, ["--all"], warnings)
    return _rows(diff, with_change=True)


def params_diff(
    repo: Path | str, base: str, head: str = WORKSPACE, warnings: list[str] | None = None
) -> list[dict]:
    """The params that differ (`dvc params diff`): dicts with file, name, base, head."""
    return _rows(_diff_json(Path(repo), "params", base, head, (), warnings), with_change=False)


def read_at_revision(repo: Path | str, path: str, rev: str) -> str | None:
    """The text of `path` (relative to `repo`) at git revision `rev`, or the workspace file.

    None when the file does not exist there. Works for git-tracked files (e.g. outputs with
    `cache: false`); DVC-cached outputs are not in git.
    """
    repo = Path(repo)
    if rev == WORKSPACE:
        file = repo / path
        return file.read_text(encoding="utf-8") if file.is_file() else None
    proc = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=repo, capture_output=True)
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8")


# --------------------------------------------------------------------------------------------
# confusion matrix


def confusion_from_predictions(
    csv_text: str, classes: Sequence[str] | None = None
) -> tuple[list[list[int]], list[str]]:
    """Counts matrix[i][j] = images of true class i predicted as j, and the class order.

    `csv_text`: the pipeline's predictions.csv (columns include `actual` and `predicted`).
    `classes`: the order to use (default: sorted union of actual and predicted labels); labels not
    in it are appended, sorted.
    """
    reader = csv.DictReader(io.StringIO(csv_text))
    missing = {"actual", "predicted"} - set(reader.fieldnames or [])
    if missing:
        raise CIReportError(
            f"predictions CSV lacks column(s) {sorted(missing)}; has {reader.fieldnames}"
        )
    pairs = [(row["actual"], row["predicted"]) for row in reader]
    seen = {label for pair in pairs for label in pair}
    order = list(dict.fromkeys(classes or []))
    order += sorted(seen - set(order))
    index = {name: i for i, name in enumerate(order)}
    matrix = [[0] * len(order) for _ in order]
    for actual, predicted in pairs:
        matrix[index[actual]][index[predicted]] += 1
    return matrix, order


def _accuracy(matrix: Sequence[Sequence[int]]) -> float | None:
    total = sum(sum(row) for row in matrix)
    return sum(matrix[i][i] for i in range(len(matrix))) / total if total else None


def confusion_table(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """Markdown table: one row per true class, one column per predicted class."""
    header = "| true \\ predicted | " + " | ".join(_md(c) for c in classes) + " |"
    rule = "| --- |" + " ---: |" * len(classes)
    lines = [header, rule]
    for i, (name, row) in enumerate(zip(classes, matrix, strict=False)):
        cells = [f"**{v}**" if i == j and v else str(v) for j, v in enumerate(row)]
        lines.append(f"| {_md(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confusion_changes(
    base: tuple[list[list[int]], list[str]], head: tuple[list[list[int]], list[str]]
) -> list[dict]:
    """Cells whose count differs: dicts with actual, predicted, base, head (0 where absent)."""

    def cells(m: tuple[list[list[int]], list[str]]) -> dict[tuple[str, str], int]:
        """A confusion matrix as {(actual, predicted): count}."""
        matrix, classes = m
        return {(a, p): matrix[i][j] for i, a in enumerate(classes) for j, p in enumerate(classes)}

    b, h = cells(base), cells(head)
    order = list(dict.fromkeys([*base[1], *head[1]]))
    keys = sorted(set(b) | set(h), key=lambda k: (order.index(k[0]), order.index(k[1])))
    return [
        {"actual": a, "predicted": p, "base": b.get((a, p), 0), "head": h.get((a, p), 0)}
        for a, p in keys
        if b.get((a, p), 0) != h.get((a, p), 0)
    ]


# --------------------------------------------------------------------------------------------
# rendering


def _md(value: Any) -> str:
    """A value as Markdown table cell text."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _signed(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) <= TOLERANCE:
        return "0"
    return f"{value:+.4g}"


def _change_cell(row: dict) -> str:
    if row["base"] is None and row["head"] is not None:
        return "new"
    if row["head"] is None and row["base"] is not None:
        return "removed"
    if row.get("change") is None:
        return "changed" if row.get("changed") else ""
    text = _signed(row["change"])
    base = _number(row["base"])
    if base and text != "0":
        text += f" ({100 * row['change'] / abs(base):+.2g} %)"
    return text


def find_metric(
    rows: Sequence[dict], metric: str, file: str | None = DEFAULT_METRICS_FILE
) -> dict | None:
    """The row of `metric`, preferring `file` (any file when it has none)."""
    named = [r for r in rows if r["name"] == metric]
    return next((r for r in named if r["file"] == file), named[0] if named else None)


def verdict(row: dict | None, metric: str = DEFAULT_METRIC) -> str:
    """One line on the headline metric: up / down / unchanged (or missing)."""
    label = metric.replace(".", " ").replace("_", " ")
    label = label[:1].upper() + label[1:]
    if row is None:
        return f"❔ **{label}**: not found in the metrics of either revision."
    old, new = _number(row["base"]), _number(row["head"])
    if old is None and new is None:
        return f"❔ **{label}**: not a number ({_md(row['base'])} → {_md(row['head'])})."
    if old is None:
        return f"🆕 **{label}**: {_md(new)} (the base has none)."
    if new is None:
        return f"❔ **{label}**: missing at the head (was {_md(old)} at the base)."
    change = new - old
    if abs(change) <= TOLERANCE:
        return f"➖ **{label} unchanged**: {_md(new)}."
    word, icon = ("up", "✅") if change > 0 else ("down", "⚠️")
    return f"{icon} **{label} {word}**: {_md(old)} → {_md(new)} ({_change_cell(row)})."


def render_metrics(rows: Sequence[dict], metric: str = DEFAULT_METRIC) -> str:
    """Per metrics file: the changed metrics (headline first); unchanged ones in <details>."""
    if not rows:
        return "_No metrics in either revision._"
    parts = []
    for path in sorted({r["file"] for r in rows}):
        in_file = [r for r in rows if r["file"] == path]
        key = lambda r: (r["name"] != metric, r["name"])  # noqa: E731 (headline first)
        shown = sorted((r for r in in_file if r["changed"] or r["name"] == metric), key=key)
        hidden = sorted((r for r in in_file if not (r["changed"] or r["name"] == metric)), key=key)
        parts.append(f"**`{path}`**\n")
        if shown:
            parts.append(_metrics_table(shown))
        else:
            parts.append("_No metric changed._")
        if hidden:
            parts.append(
                f"\n<details><summary>{len(hidden)} unchanged metric"
                f"{'s' if len(hidden) != 1 else ''}</summary>\n\n"
                f"{_metrics_table(hidden)}\n\n</details>"
            )
        parts.append("")
    return "\n".join(parts).rstrip()


def _metrics_table(rows: Sequence[dict]) -> str:
    lines = ["| metric | base | head | change |", "| --- | ---: | ---: | ---: |"]
    lines += [
        f"| `{_md(r['name'])}` | {_md(r['base'])} | {_md(r['head'])} | {_change_cell(r)} |"
        for r in rows
    ]
    return "\n".join(lines)


def render_params(rows: Sequence[dict]) -> str:
    """The changed params (`params_diff` rows) as a Markdown table: param, base, head."""
    if not rows:
        return "_No params changed._"
    several = len({r["file"] for r in rows}) > 1
    lines = ["| param | base | head |", "| --- | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["file"], r["name"])):
        name = f"{r['file']}: {r['name']}" if several else r["name"]
        lines.append(f"| `{_md(name)}` | {_md(r['base'])} | {_md(r['head'])} |")
    return "\n".join(lines)


@dataclass
class Side:
    """One revision in the report: its label, predictions-derived matrix and image link."""

    rev: str
    short: str
    confusion: tuple[list[list[int]], list[str]] | None = None
    image: str | None = None  # relative to the report
    note: str | None = None  # why there is no matrix

    @property
    def title(self) -> str:
        """How the side is named in the report: `workspace` or the short revision."""
        return "workspace" if self.short == WORKSPACE else f"`{self.short}`"


@dataclass
class Report:
    """What the pull-request report shows: both sides, and the metric and param changes."""

    base: Side
    head: Side
    metrics: list[dict] = field(default_factory=list)
    params: list[dict] = field(default_factory=list)
    metric: str = DEFAULT_METRIC
    predictions: str = DEFAULT_PREDICTIONS
    warnings: list[str] = field(default_factory=list)
    #: McNemar's exact test on the paired test predictions (`metrics.mcnemar_exact`), or None.
    mcnemar: dict | None = None


def render_confusion(side: Side, label: str) -> str:
    """One side's test confusion matrix as a Markdown section (or the note why there is none)."""
    lines = [f"#### {label}: {side.title}", ""]
    if side.confusion is None:
        lines.append(f"_{side.note or 'No predictions.'}_")
        return "\n".join(lines)
    matrix, classes = side.confusion
    total = sum(map(sum, matrix))
    acc = _accuracy(matrix)
    lines.append(f"{total} test images, {acc:.1%} right." if acc is not None else "No test images.")
    lines.append("")
    if side.image:
        lines += [f"![confusion matrix, {label.lower()}]({side.image})", ""]
    if len(classes) <= TEXT_MATRIX_MAX_CLASSES:
        lines.append(confusion_table(matrix, classes))
    else:
        lines.append(f"_{len(classes)} classes: too many for a text table, see the image._")
    return "\n".join(lines)


def _named(side: Side) -> str:
    """' (`origin/main`)' when the revision was given by name, not by SHA."""
    given = side.rev.lower()
    is_sha = given.startswith(side.short.lower()) or side.short.lower().startswith(given)
    return "" if is_sha else f" (`{side.rev}`)"


def render_report(report: Report) -> str:
    """The whole Markdown report."""
    base, head = report.base, report.head
    headline = find_metric(report.metrics, report.metric)
    out = [
        f"## Pipeline report: {base.title} → {head.title}",
        "",
        f"Base {base.title}{_named(base)}, head {head.title}"
        + (_named(head) if head.short != WORKSPACE else " (the pipeline's current outputs)")
        + ".",
        "",
        verdict(headline, report.metric),
        "",
    ]
    if report.warnings:
        out += ["> [!WARNING]", "> dvc could not read everything:", ">"]
        out += [f"> - `{w}`" for w in report.warnings] + [""]
    out += [
        "### Metrics",
        "",
        render_metrics(report.metrics, report.metric),
        "",
        "### Params",
        "",
        render_params(report.params),
        "",
        f"### Confusion matrices (test set, from `{report.predictions}`)",
        "",
        render_confusion(base, "Base"),
        "",
        render_confusion(head, "Head"),
        "",
    ]
    if report.mcnemar is not None:
        from pipeline.lib.reporting.metrics import significance_text

        out += ["#### Is the difference real?", "", significance_text(report.mcnemar), ""]
    if base.confusion and head.confusion:
        changes = confusion_changes(base.confusion, head.confusion)
        out += ["#### What moved", ""]
        if changes:
            out += ["| true | predicted | base | head |", "| --- | --- | ---: | ---: |"]
            out += [
                f"| {_md(c['actual'])} | {_md(c['predicted'])} | {c['base']} | {c['head']} |"
                for c in changes
            ]
        else:
            out.append("_Same confusion matrix._")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# wiring


def _side(
    repo: Path,
    rev: str,
    short: str,
    predictions: str,
    classes: Sequence[str] | None,
    image: Path,
    output_dir: Path,
    label: str,
) -> Side:
    from pipeline.lib.reporting.figures import save_confusion_matrix

    side = Side(rev=rev, short=short)
    text = read_at_revision(repo, predictions, rev)
    if text is None:
        where = "in the workspace" if rev == WORKSPACE else f"at {short}"
        side.note = f"No `{predictions}` {where}."
        image.unlink(missing_ok=True)  # not a stale one from an earlier report
        return side
    side.confusion = confusion_from_predictions(text, classes)
    matrix, names = side.confusion
    if names:
        title = f"Confusion matrix, {label.lower()} {short}"
        save_confusion_matrix(matrix, names, image, title=title)
        side.image = Path(os.path.relpath(image, output_dir)).as_posix()
    return side


def build_report(
    repo: Path | str,
    base: str,
    head: str,
    output: Path | str,
    images_dir: Path | str | None = None,
    metric: str = DEFAULT_METRIC,
    predictions: str = DEFAULT_PREDICTIONS,
) -> Report:
    """Run the diffs, draw both confusion matrices into `images_dir`, return the Report."""
    repo = Path(repo).resolve()
    output = Path(output).resolve()
    images = Path(images_dir).resolve() if images_dir else output.parent
    base_short = resolve_revision(repo, base)
    head_short = resolve_revision(repo, head)
    warnings: list[str] = []
    metrics = metrics_diff(repo, base, head, warnings)
    params = params_diff(repo, base, head, warnings)
    # one class order for both sides (so the two matrices line up)
    texts = [read_at_revision(repo, predictions, r) for r in (base, head)]
    classes = sorted({name for t in texts if t for name in confusion_from_predictions(t)[1]})
    images.mkdir(parents=True, exist_ok=True)
    base_side = _side(
        repo,
        base,
        base_short,
        predictions,
        classes,
        images / "confusion_base.png",
        output.parent,
        "Base",
    )
    head_side = _side(
        repo,
        head,
        head_short,
        predictions,
        classes,
        images / "confusion_head.png",
        output.parent,
        "Head",
    )
    return Report(
        base=base_side,
        head=head_side,
        metrics=metrics,
        params=params,
        metric=metric,
        predictions=predictions,
        warnings=warnings,
        mcnemar=_mcnemar(texts),
    )


def _mcnemar(texts: Sequence[str | None]) -> dict | None:
    """McNemar's exact test of the two sides' predictions.csv texts, paired by image path
    (None when a side has none or they do not parse)."""
    from pipeline.lib.reporting.metrics import mcnemar_exact, paired_correct

    if not all(texts):
        return None
    try:
        return mcnemar_exact(*paired_correct(texts[0], texts[1]))
    except ValueError:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m pipeline.ci_report`."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.ci_report",
        description="Markdown report of what changed between two revisions of the pipeline: "
        "dvc metrics/params diff and the test confusion matrices.",
    )
    parser.add_argument(
        "--base", required=True, help="git revision to compare against (e.g. origin/main)"
    )
    parser.add_argument(
        "--head",
        default=WORKSPACE,
        help="git revision, or 'workspace' (the "
        "default: the files on disk, e.g. after `dvc repro`)",
    )
    parser.add_argument("--output", required=True, type=Path, help="Markdown file to write")
    parser.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        help="where the confusion-matrix "
        "PNGs go (default: next to --output); linked relative to the report",
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC project (default: .)")
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help=f"headline metric for the verdict (default: {DEFAULT_METRIC})",
    )
    parser.add_argument(
        "--predictions",
        default=DEFAULT_PREDICTIONS,
        help="git-tracked predictions "
        f"CSV with actual,predicted columns (default: {DEFAULT_PREDICTIONS})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; exit status 0, or 2 with one message when git or DVC fails."""
    args = parse_args(argv)
    try:
        report = build_report(
            args.repo,
            args.base,
            args.head,
            args.output,
            args.images_dir,
            metric=args.metric,
            predictions=args.predictions,
        )
        text = render_report(report)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    except CIReportError as exc:
        print(f"ci_report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    print(verdict(find_metric(report.metrics, report.metric), report.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
