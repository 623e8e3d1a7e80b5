"""`dvc plots show`: each plot once, and an offline page (`pipeline.plots_template`)
that a real browser draws without the internet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.lib.reporting.evaluation import evaluation_metrics, write_tables
from pipeline.lib.reporting.metrics import Predictions
from pipeline.plots_template import write_template
from tests.browser import chromium
from tests.project_repo import dvc

pytestmark = pytest.mark.slow


def test_plots_show_draws_each_plot_once(repo: Path, first_repro: str):
    """Exactly the named plots and the figures: no default plot of a CSV's last column."""
    shown = json.loads(dvc(repo, "plots", "show", "--json"))
    assert sorted(shown["data"]) == sorted(
        [
            "Loss",
            "Accuracy",
            "Per-batch loss",
            "Confusion matrix",
            "Accuracy vs coverage (reject option)",
            "reports/audit_figures/sufficiency.png",
            "reports/eval_figures/confusion_matrix.png",
            "reports/eval_figures/coverage.png",
            "reports/eval_figures/gallery.png",
            "reports/train_figures/loss.png",
            "reports/train_figures/accuracy.png",
        ]
    )


def test_the_plots_page_renders_offline(repo: Path, first_repro: str, tmp_path: Path):
    """`dvc plots show` with the project's template (pipeline.plots_template): the page loads
    nothing from the internet, and a real browser draws the five interactive plots."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    template = write_template(tmp_path / "template.html")
    dvc(repo, "plots", "show", "--html-template", str(template), "-o", str(tmp_path / "page"))
    page = tmp_path / "page" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and 'src="http' not in html
    driver = chromium()
    try:
        driver.get(page.as_uri())
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "div svg, div canvas")) >= 5
        )
        drawn = driver.find_elements(By.CSS_SELECTOR, ".vega-embed")
        assert len(drawn) == 5  # loss, accuracy, per-batch loss, confusion matrix, coverage
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


#: The case dvc-plots-xss-via-file-name: a class folder "a<" holding "script><img ...>0.png"
#: (its path ends DVC's <script> block), and a class name that opens a comment in one.
HOSTILE_PATHS = [
    "a</script><img src=x onerror=window.__pwnK0=1>0.png",
    "bus/<script>window.__pwnf2=1<!--.png",
    "x<!--<script>/</script><svg onload=window.__pwnS=1>.png",
]
HOSTILE_CLASSES = ["a<", "bus", "x<!--<script>"]


def _opened(page: Path, plots: int) -> dict:
    """Open `page` in Chromium: what ran (window.__pwn*, alerts) and what was drawn."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        driver.get(page.as_uri())
        drawn = (  # plots whose marks Vega drew
            "return [...document.querySelectorAll('.vega-embed')]"
            ".filter(e => e.querySelector('canvas, svg.marks')).length"
        )
        if plots:
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(drawn) >= plots)
        try:
            alert = driver.switch_to.alert.text
        except NoAlertPresentException:
            alert = None
        return {
            "ran": driver.execute_script(
                "return Object.keys(window).filter(k => k.startsWith('__pwn'))"
            ),
            "alert": alert,
            "injected": driver.execute_script(
                "return document.querySelectorAll('[onerror], [onload]').length"
            ),
            "drawn": driver.execute_script(drawn),
            "text": driver.execute_script("return document.body.innerText"),
        }
    finally:
        driver.quit()


def test_hostile_names_run_no_script_in_the_plots_page(repo: Path, first_repro: str, tmp_path):
    """Test predictions of photos with hostile paths and class names, written by evaluate's own
    `write_tables`, then the real `dvc plots show`: with the project's template no injected
    script runs and all five plots draw; DVC's own page (which needs its CDN) runs none either."""
    probs = np.eye(3, dtype=np.float32)[[1, 1, 2]]
    p = Predictions(probs, np.array([0, 1, 2]), HOSTILE_CLASSES)
    write_tables(p, HOSTILE_PATHS, repo / "reports", evaluation_metrics(p))
    confusion = (repo / "reports" / "confusion.csv").read_text(encoding="utf-8")
    assert "<" not in confusion and "/" not in confusion and "x\ufe64!--\ufe64script>" in confusion

    template = write_template(tmp_path / "template.html")
    dvc(repo, "plots", "show", "--html-template", str(template), "-o", str(tmp_path / "ours"))
    seen = _opened(tmp_path / "ours" / "index.html", plots=5)
    assert seen["ran"] == [] and seen["alert"] is None and seen["injected"] == 0
    assert seen["drawn"] == 5 and "reports/eval_figures/gallery.png" in seen["text"]

    dvc(repo, "plots", "show", "-o", str(tmp_path / "dvc"))  # DVC's default page
    seen = _opened(tmp_path / "dvc" / "index.html", plots=0)
    assert seen["ran"] == [] and seen["alert"] is None and seen["injected"] == 0
