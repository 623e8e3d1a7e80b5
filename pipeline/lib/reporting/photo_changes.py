"""Which photos two runs disagree on, from their predictions.csv texts (columns by name: `path`,
`actual`, `predicted`, `confidence` where present), paired by `path` (and `sha256` where both have
it); photos only one run has are listed apart. McNemar's exact test on the paired photos, with b
right only in A and c only in B: p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)
(McNemar 1947, Psychometrika 12:153; Fagerland et al. 2013, BMC Med Res Methodol 13:91, eq. 2)."""

from __future__ import annotations

import csv
import html
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.lib.files import atomic_file
from pipeline.lib.reporting.html_report import thumbnail
from pipeline.lib.reporting.metrics import McNemar, mcnemar_exact, significance_text
from pipeline.lib.reporting.tables import write_csv

KINDS = ("right -> wrong", "wrong -> right", "changed, both wrong", "only in A", "only in B")
COLUMNS = ("change", "path", "actual", "predicted_a", "confidence_a", "predicted_b", "confidence_b")
WORKSPACE = "workspace"
DEFAULT_PREDICTIONS = "reports/predictions.csv"


@dataclass(frozen=True)
class PhotoDiff:
    """`rows`: COLUMNS per photo whose prediction changed or that one run lacks, in KINDS order,
    by path within a kind; `mcnemar` on the photos both runs have (only_a: right -> wrong)."""

    rows: list[tuple[str, ...]]
    mcnemar: McNemar

    def paths(self, kind: str) -> list[str]:
        return [row[1] for row in self.rows if row[0] == kind]

    def counts(self) -> str:
        return ", ".join(f"{len(self.paths(kind))} {kind}" for kind in KINDS)


def read_at_revision(repo: Path | str, path: str, rev: str) -> str | None:
    """Git-tracked `path`'s text at `rev` (or in the workspace); None where it does not exist."""
    if rev == WORKSPACE:
        file = Path(repo) / path
        return file.read_text(encoding="utf-8") if file.is_file() else None
    show = ["git", "show", "--end-of-options", f"{rev}:./{path}"]
    proc = subprocess.run(show, cwd=repo, capture_output=True)
    return proc.stdout.decode("utf-8") if proc.returncode == 0 else None


def _by_photo(text: str, hashed: bool) -> dict[tuple[str, str], dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if missing := {"path", "actual", "predicted"} - set(reader.fieldnames or []):
        raise ValueError(f"predictions CSV lacks column(s) {sorted(missing)}")
    return {(row["path"], row["sha256"] if hashed else ""): row for row in reader}


def _row(kind: str, a: dict[str, str], b: dict[str, str]) -> tuple[str, ...]:
    picked = (side.get(c, "") for side in (a, b) for c in ("predicted", "confidence"))
    return (kind, (a or b)["path"], (b or a)["actual"], *picked)


def diff_predictions(text_a: str, text_b: str) -> PhotoDiff:
    """The photos whose prediction differs; ValueError when a text lacks a needed column."""
    hashed = all("sha256" in next(csv.reader(io.StringIO(t)), []) for t in (text_a, text_b))
    a, b = _by_photo(text_a, hashed), _by_photo(text_b, hashed)
    common = sorted(a.keys() & b.keys())
    right_a, right_b = ([s[k]["actual"] == s[k]["predicted"] for k in common] for s in (a, b))
    rows = [
        _row(KINDS[{(True, False): 0, (False, True): 1}.get((ra, rb), 2)], a[k], b[k])
        for k, ra, rb in zip(common, right_a, right_b, strict=True)
        if a[k]["predicted"] != b[k]["predicted"]
    ]
    rows += [_row(KINDS[3], a[k], {}) for k in sorted(a.keys() - b.keys())]
    rows += [_row(KINDS[4], {}, b[k]) for k in sorted(b.keys() - a.keys())]
    rows.sort(key=lambda row: KINDS.index(row[0]))  # stable: by path within a kind
    return PhotoDiff(rows, mcnemar_exact(right_a, right_b))


def markdown(diff: PhotoDiff, top: int = 10) -> str:
    """For the CI report: counts and the first `top` paths right -> wrong and wrong -> right."""
    parts = [f"{diff.counts()} (A = base, B = head)."]
    for kind in KINDS[:2]:
        if paths := diff.paths(kind):
            shown = [f"<code>{html.escape(p)}</code>" for p in paths[:top]]
            more = f" and {len(paths) - top} more" if len(paths) > top else ""
            parts.append(f"**{kind}**: {', '.join(shown)}{more}")
    return "\n\n".join(parts)


def _thumbnail(file: Path) -> str | None:
    try:
        with Image.open(file) as image:
            return thumbnail(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def write_outputs(
    diff: PhotoDiff, csv_path: Path, photos_root: Path, names: tuple[str, str]
) -> Path:
    """Write `csv_path` (COLUMNS) and beside it an offline .html page with thumbnails (from
    `photos_root` / path, where readable); return the page's path."""
    write_csv(csv_path, {c: [row[i] for row in diff.rows] for i, c in enumerate(COLUMNS)})
    rows = "".join(
        f"<tr><td>{f'<img src={t!r}>' if (t := _thumbnail(photos_root / row[1])) else ''}</td>"
        + "".join(f"<td>{html.escape(value)}</td>" for value in row)
        for row in diff.rows
    )
    header = "".join(f"<th>{c}</th>" for c in ("", *COLUMNS))
    a, b = map(html.escape, names)
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Photos that changed</title>'
        "<style>td,th{border-bottom:1px solid #ddd;padding:4px}</style></head><body>"
        f"<h1>Photos that changed: A = {a}, B = {b}</h1><p>{html.escape(diff.counts())}.</p>"
        f"<p>{html.escape(significance_text(diff.mcnemar, 'A', 'B'))}</p>"
        f"<table><tr>{header}</tr>{rows}</table></body></html>\n"
    )
    with atomic_file(csv_path.with_suffix(".html")) as fh:
        fh.write(page)
    return csv_path.with_suffix(".html")
