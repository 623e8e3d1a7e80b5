"""Learning curves, confusion matrix, prediction gallery and reliability diagram on standalone
Agg `Figure`s (never pyplot): each `*_figure` returns the figure unsaved, `save_figure` and
`save_learning_curves` write PNGs atomically (folders created) and return the paths."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from pipeline.lib.files import atomic_file

PathLike = str | os.PathLike[str]
Series = Mapping[str, Sequence[float]]

DPI = 110
CORRECT_COLOR = "#1a7f37"
WRONG_COLOR = "#cf222e"
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
CELL_TEXT_MAX_CLASSES = 20  # above this many classes the confusion matrix cells carry no text
#: Above this many classes the confusion matrix is drawn at a fixed size (18 in) with class indices.
LABELLED_MAX_CLASSES = 60
#: above this many classes a gallery bar chart shows only the top scores (and the true class)
GALLERY_ALL_CLASSES_MAX = 12
GALLERY_TOP_K = 10
_GALLERY_IMAGE_IN, _GALLERY_BARS_IN = 2.4, 1.9  # a gallery panel's image and bars widths
_METRICS = {"loss": ("Loss", "min"), "accuracy": ("Accuracy", "max")}
_CENTERED = {"ha": "center", "va": "center"}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Write `fig` as a PNG to `path` atomically (folders created), then clear it; return `path`."""
    path = Path(path)
    try:
        with atomic_file(path, "wb") as fh:
            style = {"bbox_inches": "tight", "pad_inches": 0.15, "facecolor": "white"}
            fig.savefig(fh, format="png", dpi=DPI, **style)
    finally:
        fig.clear()
    return path


def _shown_names(classes: Sequence[object], most: int = 40) -> list[str]:  # shown without mathtext
    return [c if len(c) <= most else f"{c[: most - 1]}…" for c in map(str, classes)]


def _text_width_in(chars: int, fontsize: float) -> float:  # roughly, in DejaVu Sans
    return chars * fontsize * 0.62 / 72.0


def _float_series(values: Sequence[float] | None) -> np.ndarray:
    return np.asarray(list(values if values is not None else []), dtype=float).reshape(-1)


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, fontsize=12, color="#555555", transform=ax.transAxes, **_CENTERED)
    ax.set_axis_off()


def learning_curve_figure(history: Series, metric: str, batches: Series | None = None) -> Figure:
    """One metric ('loss' or 'accuracy'): train vs validation per epoch (or 'step'), batches
    faintly under; the best validation point (else train) starred."""
    label, best_mode = _METRICS.get(metric, (metric.replace("_", " ").capitalize(), "min"))
    train, val = (_float_series(history.get(key)) for key in (metric, f"val_{metric}"))
    n = max(len(train), len(val))
    unit = "step" if "step" in history else "epoch"
    given = _float_series(history.get(unit))
    x = given[:n] if len(given) >= n else np.arange(1, n + 1, dtype=float)
    batch_y = _float_series((batches or {}).get(metric))  # batch k of m ends at epoch k * n / m
    batch_x = np.arange(1, len(batch_y) + 1, dtype=float)
    if n and len(batch_y):
        batch_x = x[0] - 1.0 + batch_x * n / len(batch_y)

    fig = _new_figure(7.0, 4.3)
    ax = fig.add_subplot()
    ax.set_title(f"{label} per {unit}", fontsize=12)
    if n == 0 and not len(batch_y):
        _message(ax, f"no {metric} recorded")
        return fig
    if len(batch_y):
        faint = {"color": TRAIN_COLOR, "alpha": 0.3, "linewidth": 0.8}
        ax.plot(batch_x, batch_y, label="train (per batch)", zorder=1, **faint)
    style = {"linewidth": 2, "zorder": 3, "markersize": 7 if n == 1 else 4}
    for y, color, line, marker, name in (
        (train, TRAIN_COLOR, "-", "o", "train"),
        (val, VAL_COLOR, "--", "s", "validation"),
    ):
        if len(y):
            marker = marker if n <= 30 else None
            ax.plot(x[: len(y)], y, color=color, ls=line, marker=marker, label=name, **style)
    ref, ref_name = (val, "validation") if len(val) else (train, "train")
    if len(ref) > 1 and np.isfinite(ref).any():
        i = int(np.nanargmin(ref) if best_mode == "min" else np.nanargmax(ref))
        star = {"marker": "*", "markersize": 15, "color": "#d4a017", "markeredgecolor": "black"}
        best = f"best {ref_name}: {ref[i]:.4g} ({unit} {x[i]:g})"
        ax.plot([x[i]], [ref[i]], ls="none", label=best, zorder=4, markeredgewidth=0.6, **star)
    ax.set(xlabel=unit if n else "step", ylabel=label.lower())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if n == 1 and not len(batch_y):
        ax.set_xlim(x[0] - 1, x[0] + 1)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    return fig


def save_learning_curves(
    history: Series, out_dir: PathLike, batches: Series | None = None
) -> list[Path]:
    """Write out_dir/loss.png and out_dir/accuracy.png (`learning_curve_figure`); return them.
    history: 'loss', 'accuracy', 'val_*', x under 'epoch' or 'step'; batches: per-batch series."""
    drawn = ((metric, learning_curve_figure(history, metric, batches)) for metric in _METRICS)
    return [save_figure(fig, Path(out_dir, f"{metric}.png")) for metric, fig in drawn]


def _format_count(value: float) -> str:
    return f"{int(round(value))}" if float(value).is_integer() else f"{value:.3g}"


def confusion_figure(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> Figure:
    """Heatmap of a (C, C) count matrix (rows true, columns predicted) for C class names; counts
    (and row %) in the cells up to 20 classes. ValueError: not square, or not C classes (C >= 1)."""
    counts = np.asarray(matrix, dtype=float)
    n = len(classes)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {counts.shape}")
    if n == 0 or counts.shape[0] != n:
        k = counts.shape[0]
        raise ValueError(f"a {k}x{k} confusion matrix needs {k} class names (at least 1), got {n}")
    classes = _shown_names(classes)
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    shown = fractions if normalize else counts
    # sized for n classes: cells, labels and colour bar across, rotated labels and title down
    tick_fs = 10 if n <= 10 else 8 if n <= 20 else 7 if n <= 35 else 6
    cell_in = (
        (0.95 if normalize else 0.8) if n <= 6 else 0.7 if n <= 10 else 0.5 if n <= 20 else 0.3
    )
    if n > LABELLED_MAX_CLASSES:  # a bounded picture: class indices every few rows, names in CSV
        cell_in, step = LABELLED_MAX_CLASSES * 0.3 / n, int(np.ceil(n / 20))
        classes = [str(i) if i % step == 0 else "" for i in range(n)]
    label_in = _text_width_in(max(len(c) for c in classes), tick_fs)
    grid_in = max(3.0, n * cell_in)
    fig = _new_figure(grid_in + label_in + 1.6, grid_in + label_in * 0.75 + 1.3)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(counts.max()), 1.0)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, shrink=0.9)
    if normalize:
        bar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    bar.set_label("share of the true class" if normalize else "images")
    rotated = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
    ax.set_xticks(range(n), labels=classes, fontsize=tick_fs, parse_math=False, **rotated)
    ax.set_yticks(range(n), labels=classes, fontsize=tick_fs, parse_math=False)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0 if n <= 20 else 0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted label", fontsize=11)
    ax.set_ylabel("true label", fontsize=11)
    total = counts.sum()
    subtitle = f"accuracy {np.trace(counts) / total:.1%} on {_format_count(total)} images"
    subtitle = (subtitle if total > 0 else "no images") + (" · rows normalised" * normalize)
    subtitle += f" · classes numbered 0-{n - 1}, in the model's order" * (n > LABELLED_MAX_CLASSES)
    ax.set_title(f"{title}\n{subtitle}", fontsize=12)
    if n <= CELL_TEXT_MAX_CLASSES:  # each cell's count (and row share), white on dark cells
        cell_fs = 10 if n <= 6 else 9 if n <= 10 else 7 if n <= 15 else 6
        for i, j in np.ndindex(n, n):
            text = _format_count(counts[i, j])
            if normalize:
                text += f"\n{100 * fractions[i, j]:.{1 if n <= 10 else 0}f}%"
            color = "white" if image.norm(shown[i, j]) > 0.55 else "#222222"
            alpha = 1.0 if counts[i, j] else 0.45
            ax.text(j, i, text, fontsize=cell_fs, color=color, alpha=alpha, **_CENTERED)
    ax.spines[:].set_color("#888888")
    return fig


def _draw_gallery_scores(
    ax: Axes, probs_k: np.ndarray, true_k: int, color: str, classes: list[str], label_fs: float
) -> None:
    """Predicted bar in `color`, the true one outlined; with many classes the top ones only."""
    pred_k = int(probs_k.argmax())
    order = np.arange(len(probs_k))
    if len(probs_k) > GALLERY_ALL_CLASSES_MAX:
        order = np.argsort(-probs_k, kind="stable")[:GALLERY_TOP_K]
        if true_k not in order:
            order[-1] = true_k
    scores = np.clip(probs_k[order], 0.0, 1.0)
    bar_colors = [color if i == pred_k else "#b8c0cc" for i in order]
    edges = ["black" if i == true_k else "none" for i in order]
    ypos = np.arange(len(order))
    ax.barh(ypos, scores, color=bar_colors, edgecolor=edges, linewidth=1.4, height=0.7)
    ax.set_yticks(ypos, labels=[classes[i] for i in order], fontsize=label_fs, parse_math=False)
    for tick, y, i, p in zip(ax.get_yticklabels(), ypos, order, scores, strict=True):
        inside = p > 0.62
        tag, weight = (f"{p:.2f}  true", "bold") if i == true_k else (f"{p:.2f}", "normal")
        tick.set_fontweight(weight)
        color = "white" if inside and i == pred_k else "#222222"
        x, ha = (p - 0.02, "right") if inside else (p + 0.02, "left")
        ax.text(x, y, tag, va="center", ha=ha, fontsize=7, color=color, fontweight=weight)
    ax.set(xlim=(0, 1), ylim=(len(order) - 0.5, -0.5), axisbelow=True)  # first class on top
    ax.set_xticks([0, 0.5, 1], labels=["0", "0.5", "1"], fontsize=7)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlabel("score", fontsize=7, labelpad=1)


def gallery_figure(
    images: np.ndarray,
    probabilities: np.ndarray,
    true_labels: np.ndarray,
    classes: Sequence[str],
    columns: int = 3,
    max_images: int | None = None,
    heading: str | None = None,
) -> Figure:
    """Image + class-score bars per test image, `columns` per row: right green, wrong red, the
    true class outlined, bold, tagged 'true'; `heading` replaces "Test predictions: k of n right".
    images uint8 (N, H, W, 3) (a memmap: only the shown ones are read); probabilities (N, C) in
    0..1; true_labels (N,) indices. ValueError: they do not match."""
    classes = _shown_names(classes)
    n_total = len(images)
    n = n_total if max_images is None else max(0, min(n_total, int(max_images)))
    if n == 0:
        fig = _new_figure(4.0, 1.5)
        _message(fig.add_subplot(), "no test images")
        return fig
    n_classes = len(classes)
    probs = np.asarray(probabilities[:n], dtype=float)
    labels = np.asarray(true_labels[:n]).astype(int).reshape(-1)
    if probs.shape != (n, n_classes):
        raise ValueError(f"probabilities must be ({n}, {n_classes}), got {probs.shape}")
    if len(labels) != n:
        raise ValueError(f"need {n} true labels, got {len(labels)}")
    if n_classes and ((labels < 0) | (labels >= n_classes)).any():
        raise ValueError("true label index out of range of the classes")
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    columns = max(1, min(int(columns), n))
    # 'pred: <class> / true: <class>', broken after the slash when too long for a panel
    pairs = zip(predicted, labels, strict=True)
    titles = [f"pred: {classes[p]} / true: {classes[t]}" for p, t in pairs]
    titles = [t if len(t) <= 32 else t.replace(" / true: ", " /\ntrue: ") for t in titles]

    rows = math.ceil(n / columns)
    shown_classes = n_classes if n_classes <= GALLERY_ALL_CLASSES_MAX else GALLERY_TOP_K
    label_fs = 8 if shown_classes <= 8 else 7
    label_in = _text_width_in(max(len(c) for c in classes), label_fs)
    longest_line = max(len(line) for t in titles for line in t.split("\n"))
    # bold title lines must fit over the image panel
    title_fs = float(np.clip(_GALLERY_IMAGE_IN * 72.0 / (longest_line * 0.68), 6.5, 10.0))
    pair_in = _GALLERY_IMAGE_IN + label_in + _GALLERY_BARS_IN + 0.6
    row_in = max(_GALLERY_IMAGE_IN + 1.1, 0.24 * shown_classes + 1.0)
    fig = _new_figure(columns * pair_in, rows * row_in + 0.5)
    # one subfigure per image+scores pair: each lays out on its own, nothing spills into the next
    cells = fig.subfigures(rows, columns, squeeze=False, wspace=0.02, hspace=0.02)
    first = f" (first {n} of {n_total} images)" if n < n_total else ""
    heading = heading or f"Test predictions: {int(correct.sum())} of {n} right{first}"
    fig.suptitle(heading, fontsize=13, fontweight="bold")
    widths = [_GALLERY_IMAGE_IN, _GALLERY_BARS_IN]
    plain_bold = {"fontweight": "bold", "parse_math": False}
    for k in range(n):
        color = CORRECT_COLOR if correct[k] else WRONG_COLOR
        ax_img, ax_bar = cells[divmod(k, columns)].subplots(1, 2, width_ratios=widths)
        ax_img.imshow(np.asarray(images[k]), interpolation="antialiased")
        ax_img.set(xticks=[], yticks=[])
        ax_img.spines[:].set(color=color, linewidth=3)
        ax_img.set_title(titles[k], color=color, fontsize=title_fs, **plain_bold)
        _draw_gallery_scores(ax_bar, probs[k], int(labels[k]), color, classes, label_fs)
    return fig


class ReliabilityData(Protocol):
    """`metrics.ReliabilityBins` (not imported: train draws figures without that module)."""

    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def reliability_figure(bins: ReliabilityData) -> Figure:
    """A reliability diagram (Guo et al. 2017): per confidence bin the accuracy as a bar against
    the diagonal, the gap to the mean confidence shaded, the count above; the ECE in the title."""
    count = np.asarray(bins.count)
    edges = np.linspace(0, 1, len(count) + 1)  # equal width
    acc, conf = np.nan_to_num(bins.accuracy), np.nan_to_num(bins.confidence)
    ece = float(np.sum(count / max(int(count.sum()), 1) * np.abs(acc - conf)))
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    used = count > 0
    x, w, a = edges[:-1][used], np.diff(edges)[used], acc[used]
    ax.bar(x, a, w, align="edge", color="#4c72b0", label="accuracy")
    gap = {"bottom": a, "align": "edge", "color": "#dd8452", "alpha": 0.45}
    ax.bar(x, conf[used] - a, w, label="gap to mean confidence", **gap)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for xi, wi, c, ai in zip(x, w, count[used], a, strict=True):
        ax.text(xi + wi / 2, min(ai, 1.0) + 0.01, str(int(c)), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top-1 probability)", ylabel="accuracy")
    bins_text = f"{len(count)} bins, {int(count.sum())} images"
    ax.set_title(f"Reliability diagram: ECE {ece:.4f} ({bins_text})")
    ax.legend(loc="upper left", fontsize=8)
    return fig
