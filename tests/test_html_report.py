"""pipeline.lib.reporting.html_report: the self-contained evaluation report, checked as HTML and
in a real headless Chromium (clicking a confusion-matrix cell shows that cell's images)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np

from pipeline.lib.reporting.html_report import render_report, worst_first, write_report
from pipeline.lib.reporting.metrics import Predictions, classification_metrics
from tests.browser import chromium

CLASSES = ["cat", "dog", "fox <&>"]


def predictions() -> tuple[Predictions, np.ndarray, list[str]]:
    """9 images: 3 per class; image k is a flat colour of value 20*k (so each is distinct)."""
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.6, 0.3, 0.1],
            [0.2, 0.7, 0.1],  # cat as dog, 0.7
            [0.1, 0.8, 0.1],
            [0.95, 0.04, 0.01],  # dog as cat, 0.95: the worst mistake
            [0.3, 0.4, 0.3],
            [0.1, 0.3, 0.6],
            [0.2, 0.6, 0.2],  # fox as dog, 0.6
            [0.0, 0.1, 0.9],
        ],
        dtype=np.float32,
    )
    images = np.stack([np.full((40, 40, 3), 20 * k, dtype=np.uint8) for k in range(9)])
    paths = [f"photos/img_{k}.jpg" for k in range(9)]
    return Predictions(probs, y_true, CLASSES), images, paths


def report(images_per_cell: int = 48) -> str:
    p, images, paths = predictions()
    metrics = classification_metrics(p.y_true, p.y_pred, CLASSES)
    return render_report(p, images, paths, metrics, images_per_cell)


def test_worst_first_orders_mistakes_by_confidence_then_right_ones_by_doubt():
    p, _, _ = predictions()
    assert list(worst_first(p, np.flatnonzero(p.y_true != p.y_pred))) == [4, 2, 7]
    assert list(worst_first(p, np.array([0, 1, 3, 5]))) == [5, 1, 3, 0]
    assert list(worst_first(p, np.arange(9)))[:3] == [4, 2, 7]


class Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_is_self_contained_valid_and_deterministic():
    html = report()
    assert html == report()  # same inputs, same bytes
    parsed = Parsed()
    parsed.feed(html)
    tags = parsed.tags
    assert not [t for t, a in tags if t in ("script", "link", "iframe")]
    sources = [a["src"] for t, a in tags if t == "img"]
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert not re.search(r"(https?:)?//[a-z]", html.replace("data:image", ""))
    # one clickable cell per matrix entry, each with a panel; class names escaped
    cells = [a for t, a in tags if t == "label" and "cell" in a.get("class", "")]
    assert len(cells) == 9 and {a["for"] for a in cells} == {
        f"v-{i}-{j}" for i in range(3) for j in range(3)
    }
    assert "fox &lt;&amp;&gt;" in html and "fox <&>" not in html
    # every image appears once in its cell, mistakes again in the mistakes panel: 9 + 3
    assert len(sources) == 12
    assert "Accuracy 0.6667" in html


def test_panels_cap_their_thumbnails():
    html = report(images_per_cell=1)
    assert html.count("<img") == 1 + 6  # one per non-empty panel (3 mistakes, 6 cells in use)
    assert "and 2 more" in html


def test_write_report(tmp_path):
    path = write_report(tmp_path / "reports" / "eval_report.html", report())
    assert path.read_text(encoding="utf-8") == report()


def _visible_paths(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        item.get_attribute("data-path")
        for item in driver.find_elements(By.CSS_SELECTOR, "li.item")
        if item.is_displayed()
    ]


def test_clicking_a_cell_in_a_real_browser_shows_its_images(tmp_path):
    from selenium.webdriver.common.by import By

    path = write_report(tmp_path / "eval_report.html", report())
    driver = chromium()
    try:
        driver.get(path.as_uri())
        # opens on the worst mistakes, most confident first
        assert _visible_paths(driver) == [
            "photos/img_4.jpg",
            "photos/img_2.jpg",
            "photos/img_7.jpg",
        ]
        # true dog, predicted cat: the one image 4
        driver.find_element(By.CSS_SELECTOR, 'label[for="v-1-0"]').click()
        assert _visible_paths(driver) == ["photos/img_4.jpg"]
        # true cat, predicted cat: images 1 (least sure) then 0
        driver.find_element(By.CSS_SELECTOR, 'label[for="v-0-0"]').click()
        assert _visible_paths(driver) == ["photos/img_1.jpg", "photos/img_0.jpg"]
        shown = [i for i in driver.find_elements(By.CSS_SELECTOR, "li.item") if i.is_displayed()]
        assert all(i.get_attribute("data-true") == "cat" for i in shown)
        assert "predicted: cat 0.600" in shown[0].text
        image = shown[0].find_element(By.TAG_NAME, "img")
        assert driver.execute_script("return arguments[0].naturalWidth", image) == 40  # decoded
        # an empty cell says so
        driver.find_element(By.CSS_SELECTOR, 'label[for="v-0-2"]').click()
        assert _visible_paths(driver) == []
        panel = driver.find_element(By.ID, "p-0-2")
        assert panel.is_displayed() and "No images" in panel.text
        # and back to the mistakes
        driver.find_element(By.CSS_SELECTOR, 'label[for="v-mistakes"]').click()
        assert _visible_paths(driver)[0] == "photos/img_4.jpg"
    finally:
        driver.quit()
