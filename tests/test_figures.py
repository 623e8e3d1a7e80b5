"""The pipeline's figures: each writes a readable PNG, and says what it should (titles, colours)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  only to check that no figure is left open
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.lib.reporting import figures  # noqa: E402

CLASSES = [
    "Container_Big_Tractor_B",
    "Container_Big_Tractor_Y",
    "Container_Small_B",
    "Container_Small_Gy",
    "Loader_Tractor_R",
    "Loader_Tractor_Y",
]


@pytest.fixture(autouse=True)
def no_figures_left_open():
    assert plt.get_fignums() == []
    yield
    assert plt.get_fignums() == []  # the module draws on standalone figures, never pyplot's


def read_png(path: Path, min_side: int = 150) -> np.ndarray:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_side, im.size
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 5, "the figure is blank"
    return pixels


def no_temp_files_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def is_green(color) -> bool:
    r, g, b = to_rgb(color)
    return g > r + 0.2 and g > b + 0.2


def is_red(color) -> bool:
    r, g, b = to_rgb(color)
    return r > g + 0.3 and r > b + 0.3


def gallery_pairs(fig) -> list[tuple]:
    """(image axes, bar axes) per shown image, in order."""
    return [tuple(sub.axes) for sub in fig.subfigs if sub.axes]


# --------------------------------------------------------------------------- learning curves


def test_learning_curves_write_both_pngs_in_new_folders(tmp_path):
    epochs = {
        "loss": [1.5, 1.1, 0.8, 0.6],
        "val_loss": [1.4, 1.2, 0.9, 0.95],
        "accuracy": [0.4, 0.6, 0.75, 0.85],
        "val_accuracy": [0.45, 0.55, 0.7, 0.68],
    }
    steps = np.arange(40)
    batches = {
        "step": steps.tolist(),
        "loss": (1.6 - steps / 30).tolist(),
        "accuracy": (0.3 + steps / 70).tolist(),
    }
    out = tmp_path / "reports" / "plots" / "train"

    paths = figures.save_learning_curves(epochs, out, batches)

    assert paths == [out / "loss.png", out / "accuracy.png"]
    for path in paths:
        read_png(path)
    no_temp_files_left(out)


def test_learning_curve_marks_best_validation_epoch():
    fig = figures.learning_curve_figure(
        {"loss": [1.0, 0.8, 0.5], "val_loss": [1.2, 0.7, 0.9]}, "loss"
    )
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "train" in labels and "validation" in labels
    assert any(label.startswith("best validation: 0.7 (epoch 2)") for label in labels)

    fig = figures.learning_curve_figure(
        {"accuracy": [0.5, 0.9, 0.7], "val_accuracy": [0.4, 0.6, 0.8]}, "accuracy"
    )
    assert any("(epoch 3)" in label for label in fig.axes[0].get_legend_handles_labels()[1])


def test_batches_are_placed_on_the_epoch_axis():
    epochs = {"loss": [1.0, 0.5]}
    batches = {"step": list(range(20)), "loss": list(np.linspace(1.2, 0.4, 20))}
    ax = figures.learning_curve_figure(epochs, "loss", batches).axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "train (per batch)")
    x = line.get_xdata()
    # 10 steps per epoch: the last batch of epoch 1 lands on epoch 1, the last of all on epoch 2
    assert x[9] == pytest.approx(1.0)
    assert x[-1] == pytest.approx(2.0)
    assert x[0] > 0

    # a batch index that restarts every epoch is numbered in order instead
    batches = {"step": list(range(10)) * 2, "loss": list(np.linspace(1.2, 0.4, 20))}
    ax = figures.learning_curve_figure(epochs, "loss", batches).axes[0]
    x = next(ln for ln in ax.get_lines() if ln.get_label() == "train (per batch)").get_xdata()
    assert np.all(np.diff(x) > 0) and x[-1] == pytest.approx(2.0)


def test_single_epoch_draws_markers(tmp_path):
    epochs = {"loss": [0.9], "val_loss": [1.1], "accuracy": [0.6], "val_accuracy": [0.5]}
    for metric in ("loss", "accuracy"):
        ax = figures.learning_curve_figure(epochs, metric).axes[0]
        curves = [ln for ln in ax.get_lines() if ln.get_label() in ("train", "validation")]
        assert len(curves) == 2
        assert all(ln.get_marker() not in (None, "None", "", " ") for ln in curves)
        assert all(len(ln.get_xdata()) == 1 and ln.get_xdata()[0] == 1 for ln in curves)
    for path in figures.save_learning_curves(epochs, tmp_path / "one"):
        read_png(path)


def test_missing_validation_and_missing_metric(tmp_path):
    epochs = {"epoch": [0, 1, 2], "loss": [1.0, 0.7, 0.6]}
    ax = figures.learning_curve_figure(epochs, "loss").axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "train" in labels and "validation" not in labels
    train = next(ln for ln in ax.get_lines() if ln.get_label() == "train")
    assert list(train.get_xdata()) == [0, 1, 2]  # the given epoch numbers are kept

    loss, accuracy = figures.save_learning_curves(epochs, tmp_path / "curves")
    read_png(loss)
    read_png(accuracy)  # no accuracy at all: still a file, saying so
    assert "no accuracy recorded" in texts(figures.learning_curve_figure(epochs, "accuracy"))


def test_x_axis_is_named_by_the_history_key():
    """L-BFGS histories are per iteration, keyed 'step'; Keras' per epoch, keyed 'epoch'."""
    ax = figures.learning_curve_figure({"step": [0, 1, 2], "loss": [1.0, 0.6, 0.5]}, "loss").axes[0]
    assert ax.get_xlabel() == "step" and ax.get_title() == "Loss per step"
    assert "best train: 0.5 (step 2)" in ax.get_legend_handles_labels()[1]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 1, 2]
    ax = figures.learning_curve_figure({"epoch": [1, 2], "loss": [1.0, 0.5]}, "loss").axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_title() == "Loss per epoch"


def test_empty_history_still_writes(tmp_path):
    for path in figures.save_learning_curves({}, tmp_path / "empty", batches=None):
        read_png(path, min_side=100)


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_six_classes(tmp_path):
    matrix = np.array(
        [
            [9, 1, 0, 0, 0, 0],
            [2, 7, 0, 0, 1, 0],
            [0, 0, 10, 0, 0, 0],
            [0, 0, 3, 6, 0, 1],
            [0, 0, 0, 0, 8, 2],
            [0, 0, 0, 0, 0, 10],
        ]
    )
    path = figures.save_figure(
        figures.confusion_figure(matrix, CLASSES), tmp_path / "eval" / "cm.png"
    )
    assert path == tmp_path / "eval" / "cm.png"
    read_png(path, min_side=400)

    fig = figures.confusion_figure(matrix, CLASSES, normalize=True, title="Test set")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert all(t.get_rotation() == 45 for t in ax.get_xticklabels())
    assert ax.get_xlabel() == "predicted label" and ax.get_ylabel() == "true label"
    assert ax.get_title().startswith("Test set")
    assert "accuracy 83.3% on 60 images" in ax.get_title()
    assert len(fig.axes) == 2  # the colour bar
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 36
    assert "6\n60.0%" in cells  # row 4: 6 of 10
    assert "9\n90.0%" in cells

    # tick labels lie inside the saved image: nothing of a long class name is cut off
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    whole = fig.bbox
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        box = label.get_window_extent(renderer)
        assert box.x0 >= whole.x0 - 1 and box.y0 >= whole.y0 - 1
        assert box.x1 <= whole.x1 + 1 and box.y1 <= whole.y1 + 1


def test_confusion_matrix_two_classes_counts(tmp_path):
    fig = figures.confusion_figure([[5, 1], [2, 7]], ["cat", "dog"])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["1", "2", "5", "7"]
    read_png(
        figures.save_figure(
            figures.confusion_figure([[5, 1], [2, 7]], ["cat", "dog"]), tmp_path / "cm2.png"
        )
    )


def test_confusion_matrix_thirty_classes_has_no_cell_text(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"Vehicle_Class_{i:02d}" for i in range(30)]
    matrix = rng.integers(0, 3, (30, 30)) + np.diag(rng.integers(5, 20, 30))
    fig = figures.confusion_figure(matrix, classes, normalize=True)
    assert len(fig.axes[0].texts) == 0
    assert len(fig.axes[0].get_xticklabels()) == 30
    read_png(
        figures.save_figure(
            figures.confusion_figure(matrix, classes, normalize=True), tmp_path / "cm30.png"
        ),
        min_side=600,
    )


@pytest.mark.parametrize("n", [61, 200, 1000])
def test_confusion_matrix_of_many_classes_stays_a_bounded_picture(tmp_path, n):
    """Issue 25: 200 classes drew a ~6800 px PNG. Above LABELLED_MAX_CLASSES the matrix keeps a
    fixed size (as at 60 classes, about 2200 px) with every few class numbers on the axes."""
    classes = [f"a_rather_long_class_name_{i:04d}" for i in range(n)]
    matrix = np.diag(np.arange(1, n + 1))
    fig = figures.confusion_figure(matrix, classes)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "0" and 10 <= sum(bool(t) for t in labels) <= 21
    assert f"classes numbered 0-{n - 1}" in fig.axes[0].get_title()
    height, width = read_png(
        figures.save_figure(figures.confusion_figure(matrix, classes), tmp_path / "cm.png")
    ).shape[:2]
    assert max(width, height) <= 2600, (width, height)


def test_class_names_are_shortened_and_drawn_as_plain_text(tmp_path):
    """20 names of 2,000 characters drew a 16972x12644 px matrix, and `$x$` was drawn as math:
    names are cut to 40 characters (with an ellipsis) and never parsed as math text."""
    classes = ["$x$", *(f"{i:02d}" + "n" * 1998 for i in range(1, 20))]
    matrix = np.diag(np.arange(1, 21))
    fig = figures.confusion_figure(matrix, classes)
    ticks = fig.axes[0].get_xticklabels()
    assert ticks[0].get_text() == "$x$" and not ticks[0].get_parse_math()
    assert ticks[1].get_text() == "01" + "n" * 37 + "…"
    height, width = read_png(
        figures.save_figure(figures.confusion_figure(matrix, classes), tmp_path / "cm.png")
    ).shape[:2]
    assert max(width, height) <= 2600, (width, height)
    probabilities = np.full((2, 20), 0.01)
    probabilities[:, 0] = 0.81
    images = np.zeros((2, 8, 8, 3), np.uint8)
    fig = figures.gallery_figure(images, probabilities, np.array([0, 1]), classes, columns=2)
    image_ax, bar_ax = gallery_pairs(fig)[1]
    title = image_ax.title.get_text()
    assert title.startswith("pred: $x$ /") and title.endswith("n" * 37 + "…") and len(title) < 99
    assert not image_ax.title.get_parse_math()
    assert [t.get_text() for t in bar_ax.get_yticklabels()][0] == "$x$"
    assert not any(t.get_parse_math() for t in bar_ax.get_yticklabels())
    height, width = read_png(figures.save_figure(fig, tmp_path / "gallery.png")).shape[:2]
    assert max(width, height) <= 2600, (width, height)


def test_confusion_matrix_rejects_mismatched_classes(tmp_path):
    with pytest.raises(ValueError):
        figures.save_figure(figures.confusion_figure(np.eye(3), ["a", "b"]), tmp_path / "x.png")
    with pytest.raises(ValueError):
        figures.save_figure(
            figures.confusion_figure(np.ones((2, 3)), ["a", "b"]), tmp_path / "x.png"
        )
    assert not (tmp_path / "x.png").exists()


def test_confusion_matrix_empty_row_is_not_nan():
    fig = figures.confusion_figure([[0, 0], [1, 3]], ["a", "b"], normalize=True)
    assert "nan" not in " ".join(t.get_text() for t in fig.axes[0].texts)


# --------------------------------------------------------------------------- gallery


def gallery_inputs(n: int = 4, size: int = 32):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    probabilities = np.full((n, len(CLASSES)), 0.02)
    # items 0 and 2 right, 1 and 3 wrong (predicted: the next class)
    for i in range(n):
        guess = labels[i] if i % 2 == 0 else (labels[i] + 1) % len(CLASSES)
        probabilities[i, guess] = 0.9
    return images, probabilities, labels


def test_gallery_titles_are_green_when_right_and_red_when_wrong():
    images, probabilities, labels = gallery_inputs()
    fig = figures.gallery_figure(images, probabilities, labels, CLASSES, columns=2)
    pairs = gallery_pairs(fig)
    assert len(pairs) == 4
    for i, (ax_img, ax_bar) in enumerate(pairs):
        title = ax_img.title
        right = i % 2 == 0
        pred = CLASSES[labels[i]] if right else CLASSES[(labels[i] + 1) % len(CLASSES)]
        assert " ".join(title.get_text().split()) == f"pred: {pred} / true: {CLASSES[labels[i]]}"
        assert is_green(title.get_color()) if right else is_red(title.get_color())
        assert len(ax_img.images) == 1
        # the bar chart: every class named, the predicted bar in the verdict colour
        assert [t.get_text() for t in ax_bar.get_yticklabels()] == CLASSES
        bars = ax_bar.patches
        assert len(bars) == len(CLASSES)
        pred_index = CLASSES.index(pred)
        assert to_rgb(bars[pred_index].get_facecolor()) == to_rgb(title.get_color())
        assert bars[pred_index].get_width() == pytest.approx(0.9)
        # the true class is marked: black outline, bold name
        true_index = int(labels[i])
        assert to_rgb(bars[true_index].get_edgecolor()) == (0, 0, 0)
        assert ax_bar.get_yticklabels()[true_index].get_fontweight() == "bold"
    assert "2 of 4 right" in fig._suptitle.get_text()
    heading = "4 of 9 test images, 2 of them mistakes (mistakes chosen first: 3 in all)"
    titled = figures.gallery_figure(images, probabilities, labels, CLASSES, heading=heading)
    assert titled._suptitle.get_text() == heading


def test_gallery_png_with_memmap_and_max_images(tmp_path):
    images, probabilities, labels = gallery_inputs(n=7, size=64)
    np.save(tmp_path / "test.npy", images)
    memmap = np.load(tmp_path / "test.npy", mmap_mode="r")

    fig = figures.gallery_figure(memmap, probabilities, labels, CLASSES, columns=3, max_images=5)
    path = figures.save_figure(fig, tmp_path / "reports" / "gallery.png")
    pixels = read_png(path, min_side=400)
    assert pixels.shape[1] > pixels.shape[0]  # 3 pairs side by side
    no_temp_files_left(path.parent)

    fig = figures.gallery_figure(memmap, probabilities, labels, CLASSES, columns=3, max_images=5)
    assert len(gallery_pairs(fig)) == 5
    assert "first 5 of 7" in fig._suptitle.get_text()


def test_gallery_many_classes_shows_top_scores_and_the_true_class():
    rng = np.random.default_rng(2)
    classes = [f"class_{i}" for i in range(30)]
    probabilities = rng.dirichlet(np.ones(30), 2)
    labels = np.argsort(probabilities, axis=1)[:, 0]  # the least likely class is the true one
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    pairs = gallery_pairs(figures.gallery_figure(images, probabilities, labels, classes))
    assert len(pairs) == 2
    for i, (_, ax_bar) in enumerate(pairs):
        names = [t.get_text() for t in ax_bar.get_yticklabels()]
        assert len(names) == figures.GALLERY_TOP_K
        assert classes[labels[i]] in names
        assert names[0] == classes[int(probabilities[i].argmax())]


def test_empty_gallery_says_so(tmp_path):
    empty = np.zeros((0, 224, 224, 3), dtype=np.uint8)
    fig = figures.gallery_figure(empty, np.zeros((0, 6)), np.zeros(0, dtype=int), CLASSES)
    assert "no test images" in texts(fig)
    path = figures.save_figure(fig, tmp_path / "new" / "gallery.png")
    read_png(path, min_side=100)


def test_gallery_rejects_mismatched_scores():
    images, probabilities, labels = gallery_inputs()
    with pytest.raises(ValueError, match=r"probabilities must be \(4, 6\)"):
        figures.gallery_figure(images, probabilities[:, :5], labels, CLASSES)
    with pytest.raises(ValueError, match="need 4 true labels, got 3"):
        figures.gallery_figure(images, probabilities, labels[:3], CLASSES)


def test_module_does_not_use_pyplot():
    source = Path(figures.__file__).read_text(encoding="utf-8")
    assert "import matplotlib.pyplot" not in source
    assert "from matplotlib import pyplot" not in source


def test_reliability_diagram_has_every_colour_in_its_legend():
    from matplotlib.colors import to_rgb

    from pipeline.lib.reporting.metrics import reliability_bins

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    ax = figures.reliability_figure(reliability_bins(probs, np.array([0, 1, 1, 1]))).axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["perfect calibration", "accuracy", "gap to mean confidence"]
    legend = {to_rgb(h.patches[0].get_facecolor()) for h in handles[1:]}
    drawn = {to_rgb(bar.get_facecolor()) for bar in ax.patches}
    assert drawn == legend and len(drawn) == 2
