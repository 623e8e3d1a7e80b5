"""The evaluation report: one self-contained HTML page (no network, no JavaScript): the confusion
matrix, each non-empty cell the `<label>` of a hidden radio button whose CSS rule shows the cell's
images (works in MLflow's sandboxed artifact viewer), the worst mistakes, per-class metrics.
Thumbnails: JPEG data URIs, worst first, `MAX_THUMBNAILS` per report (200 classes stay a few MB).
Every name is escaped. Same inputs, same bytes."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from pipeline.lib.reporting.metrics import Predictions, confusion

THUMB_PX = 96  # a thumbnail's longest side
MAX_THUMBNAILS = 400  # thumbnails per report (each 2 to 5 kB), over all panels
MISTAKES_VIEW = "mistakes"

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:1200px;margin:0 auto;padding:16px 24px}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:20px 0 8px}
.view{display:none}
.summary{color:#57606a}
table{border-collapse:collapse}
th,td{padding:3px 6px;text-align:right}
th{font-weight:600}
.confusion td{padding:1px}
.confusion th.col{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left}
.cell{display:block;min-width:44px;padding:8px 4px;text-align:center;cursor:pointer;
border:2px solid transparent;border-radius:3px}
.cell:hover{border-color:#0969da}
.cell.diag{font-weight:700}
.confusion td:empty::after{content:"0";display:block;padding:8px 4px;color:#8c959f;text-align:center}
.button{display:inline-block;margin:8px 0;padding:4px 10px;border:1px solid #d0d7de;
border-radius:6px;cursor:pointer;background:#f6f8fa}
.panel{display:none}
.thumbs{list-style:none;padding:0;margin:0;display:flex;flex-wrap:wrap;gap:10px}
.item{width:150px;border:3px solid #1a7f37;border-radius:4px;padding:4px;font-size:12px}
.item.wrong{border-color:#cf222e}
.item img{display:block;margin:0 auto 4px}
.path{color:#57606a;word-break:break-all}
.provenance{color:#57606a;font-size:12px}
.metrics td:first-child,.metrics th:first-child{text-align:left}
"""


def thumbnail(image: np.ndarray | Image.Image) -> str:
    """A uint8 (H, W, 3) image (or a PIL image) as a JPEG data URI, longest side `THUMB_PX`."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS, reducing_gap=None)
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def worst_first(p: Predictions, members: np.ndarray) -> np.ndarray:
    """`members` (indices into the split) worst first: mistakes by the predicted class's score
    descending, then right predictions by their score ascending; ties by index."""
    members = np.asarray(members, dtype=np.int64)
    score = p.probs[members, p.y_pred[members]] if len(members) else np.zeros(0)
    wrong = p.y_pred[members] != p.y_true[members]
    return members[np.lexsort((members, np.where(wrong, -score, score), ~wrong))]


def _item(p: Predictions, i: int, image: np.ndarray, path: str) -> str:
    t, q = int(p.y_true[i]), int(p.y_pred[i])
    name = escape(path)
    return (
        f'<li class="item{"" if t == q else " wrong"}" data-index="{i}" data-path="{name}" '
        f'data-true="{escape(p.classes[t])}" data-pred="{escape(p.classes[q])}">'
        f'<img src="{thumbnail(image)}" alt="{name}">'
        f"<div>true: <b>{escape(p.classes[t])}</b></div>"
        f"<div>predicted: <b>{escape(p.classes[q])}</b> {p.probs[i, q]:.3f}</div>"
        + (f"<div>score of true: {p.probs[i, t]:.3f}</div>" if t != q else "")
        + f'<div class="path">{name}</div></li>'
    )


def _panels(
    p: Predictions, images: np.ndarray, paths: list[str], cap: int
) -> tuple[list[str], str]:
    """(views, panels): the worst mistakes, then one per non-empty cell, at most `cap` images."""
    wrong = p.y_pred != p.y_true
    groups = [(MISTAKES_VIEW, f"Worst mistakes ({int(wrong.sum())})", np.flatnonzero(wrong))]
    for i, j in zip(*np.nonzero(confusion(p)), strict=True):
        members = np.flatnonzero((p.y_true == i) & (p.y_pred == j))
        title = f"True {p.classes[i]}, predicted {p.classes[j]}: {len(members)} image(s)"
        groups.append((f"{i}-{j}", title, members))
    cap = max(1, min(cap, MAX_THUMBNAILS // len(groups)))
    panels, budget = [], MAX_THUMBNAILS
    for view, title, members in groups:
        ordered, take = worst_first(p, members), min(cap, budget)
        shown = "".join(_item(p, int(k), images[int(k)], paths[int(k)]) for k in ordered[:take])
        note = "" if len(ordered) else "<p>No images.</p>"
        if more := len(ordered) - min(len(ordered), take):
            note = f"<p>… and {more} more (shown: evaluate.report_images_per_cell, at most "
            note += f"{MAX_THUMBNAILS} per report).</p>"
        body = f'<h2>{escape(title)}</h2><ol class="thumbs">{shown}</ol>{note}'
        panels.append(f'<div class="panel" id="p-{view}">{body}</div>')
        budget -= min(take, len(ordered))
    return [view for view, _, _ in groups], "".join(panels)


def _matrix_table(p: Predictions, matrix: np.ndarray) -> str:
    """Rows true, columns predicted; an empty cell is an empty `<td>` (CSS draws its 0)."""
    top, names = max(int(matrix.max(initial=0)), 1), [escape(c) for c in p.classes]

    def cell(i: int, j: int, count: int) -> str:
        color, kind = ("9,105,218", "diag") if i == j else ("207,34,46", "off")
        return (
            f'<td><label for="v-{i}-{j}" class="cell {kind}" '
            f'style="background:rgba({color},{0.08 + 0.72 * count / top:.3f})" '
            f'title="true {names[i]}, predicted {names[j]}">{count}</label></td>'
        )

    rows = "".join(
        f'<tr><th scope="row">{names[i]}</th>'
        + "".join(cell(i, j, int(n)) if n else "<td></td>" for j, n in enumerate(row))
        + "</tr>"
        for i, row in enumerate(matrix)
    )
    head = "".join(f'<th class="col" scope="col">{name}</th>' for name in names)
    return (
        '<table class="confusion"><thead><tr><th>true \\ predicted</th>'
        f"{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


def render_report(
    p: Predictions,
    images: np.ndarray,
    paths: list[str],
    metrics: dict[str, Any],
    images_per_cell: int = 48,
    split: str = "test",
    provenance: dict[str, str] | None = None,
    extra: str = "",
) -> str:
    """The report as HTML. `images`: uint8 (N, H, W, 3), a memmap too (only the shown are read);
    `paths`: the N source paths; `metrics`: `classification_metrics` | `headline_metrics` of `p`;
    `provenance`: {what: value} lines under the title; `extra`: HTML sections at the end."""
    views, panels = _panels(p, images, paths, images_per_cell)
    radios = "".join(
        f'<input type="radio" name="view" class="view" id="v-{v}"'
        f"{' checked' if v == MISTAKES_VIEW else ''}>"
        for v in views
    )
    # per view: its panel shows, and its cell is outlined, while its radio is checked
    view_css = "".join(
        f"#v-{v}:checked~main #p-{v}{{display:block}}"
        f"#v-{v}:checked~main label[for=v-{v}]{{border-color:#1f2328}}"
        for v in views
    )
    summary = (
        f"Accuracy {metrics['accuracy']:.4f} (95 % interval {metrics['ci_low']:.4f}–"
        f"{metrics['ci_high']:.4f}), macro F1 {metrics['macro_f1']:.4f}, ECE {metrics['ece']:.4f} "
        f"on {len(p.y_true)} {escape(split)} images; {(p.y_pred != p.y_true).sum()} mistake(s)."
    )
    origin = "".join(f"<div>{escape(k)}: {escape(v)}</div>" for k, v in (provenance or {}).items())
    rows = "".join(
        f"<tr><td>{escape(c)}</td>"
        + "".join(f"<td>{metrics[k][c]:.4f}</td>" for k in ("precision", "recall", "f1"))
        + f"<td>{metrics['support'][c]}</td></tr>"
        for c in p.classes
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation report ({escape(split)} split)</title>"
        f"<style>{CSS}{view_css}</style></head><body>{radios}<main>"
        f'<h1>Evaluation report: {escape(split)} split</h1><p class="summary">{summary}</p>'
        f'<div class="provenance">{origin}</div>'
        "<h2>Confusion matrix</h2><p>Rows: true class; columns: predicted class. "
        "Click a cell to see its images, the worst first.</p>"
        f"{_matrix_table(p, confusion(p))}"
        f'<label for="v-{MISTAKES_VIEW}" class="button">Show the worst mistakes</label>'
        f'<section class="images">{panels}</section>'
        '<h2>Per-class metrics</h2><table class="metrics"><thead><tr><th>class</th>'
        "<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{extra}"
        "</main></body></html>\n"
    )
