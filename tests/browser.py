"""A real browser for the tests: Debian's headless Chromium driven by chromium-driver through Selenium.

``scripts/install.sh test`` installs both (apt: chromium, chromium-driver). The browser tests fail
when they are missing (CI must prove the pages work in a browser); set LASTLAYER_SKIP_BROWSER=1 to
skip them instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LASTLAYER_CHROMIUM", "/usr/bin/chromium")
DRIVER = os.environ.get("LASTLAYER_CHROMEDRIVER", "/usr/bin/chromedriver")
#: Seconds any page load or wait in the browser may take.
WAIT_S = 30


@contextlib.contextmanager
def chrome(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A headless Chromium session (a Selenium ``WebDriver``), quit at the end."""
    if os.environ.get("LASTLAYER_SKIP_BROWSER") == "1":
        pytest.skip("LASTLAYER_SKIP_BROWSER=1: browser tests skipped")
    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver "
            "(scripts/install.sh test does), or set LASTLAYER_SKIP_BROWSER=1 to skip",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def broken_images(driver) -> list[str]:
    """The sources (first 80 characters) of the page's images that did not load."""
    return driver.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => (i.currentSrc || i.src).slice(0, 80))"
    )


def console_errors(driver) -> list[str]:
    """The browser console's errors so far (a CSP violation or a failed load shows up here)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def full_page_screenshot(driver, path: Path) -> Path:
    """Save the whole page (the window grown to the page's height, at most 12000 px) as a PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], min(int(height) + 40, 12000))
    driver.save_screenshot(str(path))
    return path
