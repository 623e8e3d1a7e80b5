"""The audit's sections of the HTML report, with thumbnails, from the audit's report files."""

from __future__ import annotations

import base64
import csv
from html import escape
from itertools import islice
from pathlib import Path

from pipeline.lib import audit
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import read_json
from pipeline.lib.reporting.html_report import thumbnail


def _rows(path: Path, count: int) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(islice(csv.DictReader(fh), count))


def audit_sections(reports: Path, dataset: PreparedDataset, count: int) -> str:
    """HTML: "Label issues" (the first `count` rows), "Near-duplicates" (as many pairs) and "Data
    sufficiency" (the curve, if drawn, and its sentences), from the reports `run_audit` wrote."""
    where = {row.path: (row.split, row.index) for row in dataset.manifest()}

    def photo(path: str, caption: str) -> str:
        split, index = where[path]
        image = thumbnail(dataset.images(split)[index])
        return (
            f'<li class="item"><img src="{image}" alt="{escape(path)}">{caption}'
            f'<div class="path">{escape(path)}</div></li>'
        )

    items = "".join(
        photo(
            r["path"],
            f"<div>given: <b>{escape(r['given_label'])}</b></div><div>suggested: "
            f"<b>{escape(r['suggested_label'])}</b></div><div>score {float(r['score']):.3f}"
            f"{' (flagged)' if r['flagged'] == 'True' else ''}</div>",
        )
        for r in _rows(reports / audit.LABEL_ISSUES_CSV, count)
    )
    html = (
        "<h2>Label issues</h2><p>The train and val photos most likely mislabelled (lowest "
        f"score first; all in {audit.LABEL_ISSUES_CSV}). Check them; nothing was changed.</p>"
        f'<ol class="thumbs">{items}</ol>'
    )
    items = "".join(
        photo(r["path_a"], "")
        + photo(r["path_b"], f"<div>similarity {float(r['similarity']):.4f}</div>")
        for r in _rows(reports / audit.NEAR_DUPLICATES_CSV, count)
    )
    html += (
        f"<h2>Near-duplicates</h2><p>Pairs of almost identical photos, most similar first "
        f"(all in {audit.NEAR_DUPLICATES_CSV}).</p>"
        + (f'<ol class="thumbs">{items}</ol>' if items else "<p>None.</p>")
    )
    if (png := reports / audit.SUFFICIENCY_PNG).is_file():  # not drawn without test photos
        sentences = "".join(
            f"<li>{escape(s)}</li>" for s in read_json(reports / audit.AUDIT_JSON)["sentences"]
        )
        image = base64.b64encode(png.read_bytes()).decode("ascii")
        html += (
            "<h2>Data sufficiency</h2><p>Test accuracy of the head trained on 1, 2, 5, ... photos "
            f"per class (all in {audit.SUFFICIENCY_CSV}), and what twice as many would bring:</p>"
            f'<ul>{sentences}</ul><img src="data:image/png;base64,{image}" alt="sufficiency">'
        )
    return html
