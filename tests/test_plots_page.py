"""`dvc plots show`: each plot once, and an offline page (`pipeline.lib.reporting.plots_page`)
that a real browser draws without the internet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
            "reports/eval_figures/confusion_matrix.png",
            "reports/eval_figures/gallery.png",
            "reports/train_figures/loss.png",
            "reports/train_figures/accuracy.png",
        ]
    )


def test_the_plots_page_renders_offline(repo: Path, first_repro: str, tmp_path: Path):
    """`dvc plots show` with the project's template (pipeline.plots_template): the page loads
    nothing from the internet, and a real browser draws the four interactive plots."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.lib.reporting.plots_page import write_template
    from tests.browser import chromium

    template = write_template(tmp_path / "template.html")
    dvc(repo, "plots", "show", "--html-template", str(template), "-o", str(tmp_path / "page"))
    page = tmp_path / "page" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and 'src="http' not in html
    driver = chromium()
    try:
        driver.get(page.as_uri())
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "div svg, div canvas")) >= 4
        )
        drawn = driver.find_elements(By.CSS_SELECTOR, ".vega-embed")
        assert len(drawn) == 4
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
