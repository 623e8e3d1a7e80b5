"""A real headless browser for the tests of HTML pages: Debian's chromium + chromium-driver,
driven by selenium. `.ci/run` installs them; elsewhere a test that needs them is skipped with
the command to install them, and in CI (CI=true) it fails instead."""

from __future__ import annotations

import os
import shutil

import pytest

INSTALL = "apt-get install chromium chromium-driver"


def chromium():
    """A headless Chrome WebDriver on the system's chromium (quit it when done)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        message = f"Chromium and chromedriver are not installed ({INSTALL})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)
