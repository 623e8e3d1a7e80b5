"""pipeline.lib.reporting.html_report: the self-contained evaluation report, checked as HTML and
in a real headless Chromium (clicking a confusion-matrix cell shows that cell's images)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np

from pipeline.lib.reporting.evaluation import write_text
from pipeline.lib.reporting.html_report import MAX_THUMBNAILS, render_report, worst_first
from pipeline.lib.reporting.metrics import Predictions, classification_metrics, headline_metrics
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


def all_metrics(p: Predictions) -> dict:
    return {**classification_metrics(p), **headline_metrics(p)}


def report(images_per_cell: int = 48, provenance: dict[str, str] | None = None) -> str:
    p, images, paths = predictions()
    return render_report(p, images, paths, all_metrics(p), images_per_cell, "test", provenance)


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
    # one clickable cell per non-empty matrix entry, each with a panel; class names escaped
    cells = [a for t, a in tags if t == "label" and "cell" in a.get("class", "")]
    used = {"0-0", "0-1", "1-0", "1-1", "2-1", "2-2"}
    assert {a["for"] for a in cells} == {f"v-{v}" for v in used} and len(cells) == 6
    panels = {a["id"] for t, a in tags if t == "div" and a.get("class") == "panel"}
    assert panels == {f"p-{v}" for v in used | {"mistakes"}}
    assert html.count("<td></td>") == 3  # the empty cells: no label, no panel
    assert "fox &lt;&amp;&gt;" in html and "fox <&>" not in html
    # every image appears once in its cell, mistakes again in the mistakes panel: 9 + 3
    assert len(sources) == 12
    # accuracy 6 of 9 with its Wilson interval, and the ECE
    assert "Accuracy 0.6667 (95 % interval 0.3542–0.8794)" in html and "ECE 0." in html


def test_provenance_lines_are_escaped_text():
    origin = {"MLflow run": "0123abcd", "data": "folder /photos/</div><script>x()</script>"}
    html = report(provenance=origin)
    assert "<div>MLflow run: 0123abcd</div>" in html
    assert "data: folder /photos/&lt;/div&gt;&lt;script&gt;x()&lt;/script&gt;" in html
    assert "<script" not in html


def test_panels_cap_their_thumbnails():
    html = report(images_per_cell=1)
    assert html.count("<img") == 1 + 6  # one per non-empty panel (3 mistakes, 6 cells in use)
    assert "and 2 more" in html


def test_write_text(tmp_path):
    """evaluate's writer of the report: into a new folder, atomically."""
    target = tmp_path / "reports" / "eval_report.html"
    path = write_text(target, report(48, {"run": "r1"}))
    assert path == target and path.read_text(encoding="utf-8") == report(48, {"run": "r1"})
    assert [f.name for f in path.parent.iterdir()] == ["eval_report.html"]  # no temporary left


def write_report(path, html: str):
    path.write_text(html, encoding="utf-8")
    return path


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
        # an empty cell shows its 0 and opens nothing
        empty = driver.find_elements(By.CSS_SELECTOR, "table.confusion td")[2]
        after = "return getComputedStyle(arguments[0], '::after').content"
        assert driver.execute_script(after, empty) == '"0"'
        assert not empty.find_elements(By.TAG_NAME, "label")
        # and back to the mistakes
        driver.find_element(By.CSS_SELECTOR, 'label[for="v-mistakes"]').click()
        assert _visible_paths(driver)[0] == "photos/img_4.jpg"
    finally:
        driver.quit()


def test_200_classes_stay_small_and_open_in_a_real_browser(tmp_path):
    """200 classes x 3 test images (the case eval-report-200-classes-too-big: 20 MB, a browser
    gave up): panels for non-empty cells only, thumbnails capped per report."""
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(0)
    n_classes, n = 200, 600
    y_true = np.repeat(np.arange(n_classes), 3)
    probs = rng.dirichlet(np.ones(n_classes), n).astype(np.float32)
    probs[np.arange(0, n, 2), y_true[::2]] += 1.0  # half right
    p = Predictions(probs, y_true, [f"class{c:03d}" for c in range(n_classes)])
    images = rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)
    paths = [f"photos/{k}.png" for k in range(n)]
    html = render_report(p, images, paths, all_metrics(p), 48)
    assert len(html.encode()) < 3_000_000  # was 20 MB for 200 images
    assert html.count("<img") <= MAX_THUMBNAILS
    assert html.count("<label") <= n + 1  # at most one per image, and the mistakes button
    path = write_report(tmp_path / "eval_report.html", html)
    driver = chromium()
    try:
        driver.set_page_load_timeout(20)
        driver.get(path.as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.confusion tr")) == n_classes + 1
        assert _visible_paths(driver)  # the worst mistakes are there
    finally:
        driver.quit()
