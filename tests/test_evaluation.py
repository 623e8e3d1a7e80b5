"""`pipeline.lib.reporting.evaluation`: the figures evaluate writes."""

from __future__ import annotations

import numpy as np

from pipeline.lib.reporting import evaluation, figures
from pipeline.lib.reporting.metrics import Predictions


def test_the_gallery_png_says_its_mistakes_are_chosen_first(tmp_path, monkeypatch):
    """The case gallery-title-misleading: 12 of 153 test images shown, 6 of them mistakes, for a
    95.4 % model; the title was "Test predictions: 6 of 12 right"."""
    y_true = np.repeat([0, 1], [80, 73])
    y_pred = y_true.copy()
    y_pred[5:145:20] = 1 - y_pred[5:145:20]  # 7 mistakes
    probs = np.eye(2, dtype=np.float32)[y_pred] * 0.8 + 0.1
    images = np.zeros((153, 8, 8, 3), np.uint8)
    predictions = Predictions(probs, y_true, ["bus", "car"])
    titles, save = {}, figures.save_figure

    def recording(fig, path):
        titles[path.stem] = fig.get_suptitle()
        return save(fig, path)

    monkeypatch.setattr(figures, "save_figure", recording)
    written = evaluation.write_figures(
        predictions, images, tmp_path / "figures", gallery_size=12, columns=4
    )
    assert all(p.is_file() for p in written) and written[-1].name == "gallery.png"
    assert titles["gallery"] == (
        "12 of 153 test images, 6 of them mistakes (mistakes chosen first: 7 in all); "
        "test accuracy 95.4 %"
    )
