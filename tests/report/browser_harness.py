"""Open a local HTML file in headless Chromium (selenium + chromedriver) and read what a
person would see: the DOM, the browser console, the resources it fetched, a screenshot.

Used by the report's browser tests (``test_report_browser.py``) and by any other page
torchvitals writes (the compare page). Nothing is fetched from the network: the browser
starts with background networking, component updates and sync off, in a fresh profile.

    from browser_harness import browser_or_skip

    def test_page(tmp_path):
        with browser_or_skip() as browser:
            browser.open(tmp_path / "page.html")
            assert browser.console_errors() == []
            assert browser.count("svg") == 2

:func:`browser_or_skip` skips the test, saying what is missing, when Chromium, its driver
or selenium is not installed (``scripts/test.sh`` installs Debian's ``chromium`` and
``chromium-driver``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("TORCHVITALS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TORCHVITALS_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI and containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
)


def missing() -> str | None:
    """What is missing to run a headless browser, in one line, or ``None``."""
    gone = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        gone.append("the Python package selenium")
    if not gone:
        return None
    return (
        f"headless browser tests need {', '.join(gone)} (Debian: apt-get install chromium "
        "chromium-driver; pip install selenium)"
    )


class Browser:
    """One headless Chromium page. ``driver`` is the selenium WebDriver for anything else."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def open(self, path: str | os.PathLike[str]) -> None:
        """Loads a local file and waits until the page and its scripts have run."""
        self.driver.get(Path(path).resolve().as_uri())
        self.driver.execute_script("return document.readyState")  # get() waits for 'complete'

    def js(self, script: str, *args: Any) -> Any:
        """Runs ``script`` in the page (``return ...`` gives a value back)."""
        return self.driver.execute_script(script, *args)

    def count(self, selector: str) -> int:
        """Elements matching a CSS selector."""
        return int(self.js("return document.querySelectorAll(arguments[0]).length", selector))

    def console(self) -> list[dict[str, Any]]:
        """Console entries since the last call (``level``, ``message``): console.* calls,
        uncaught exceptions, failed loads and Content-Security-Policy violations."""
        return list(self.driver.get_log("browser"))

    def console_errors(self) -> list[str]:
        """The messages of the console's errors (level SEVERE) since the last call."""
        return [e["message"] for e in self.console() if e.get("level") == "SEVERE"]

    def fetched(self) -> list[str]:
        """URLs of every resource the page loaded besides itself (images, scripts, styles)
        that was not inline: ``data:`` URLs are left out."""
        names = self.js(
            "return performance.getEntriesByType('resource').map(function (e) { return e.name; })"
        )
        return [n for n in names if not n.startswith("data:")]

    def select(self, selector: str, value: str) -> None:
        """Picks ``value`` in the ``<select>`` matching ``selector``, as a user would
        (the ``change`` event fires)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(self.driver.find_element(By.CSS_SELECTOR, selector)).select_by_value(value)

    def screenshot(self, out: str | os.PathLike[str], full_page: bool = True) -> Path:
        """A PNG of the page (the whole page, not only the window, when ``full_page``)."""
        out = Path(out)
        if full_page:
            height = int(self.js("return document.documentElement.scrollHeight"))
            width = int(self.js("return document.documentElement.scrollWidth"))
            self.driver.set_window_size(max(width, 800), height + 100)
        self.driver.save_screenshot(str(out))
        return out


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 1000) -> Iterator[Browser]:
    """A headless Chromium with a fresh profile, closed (and its profile removed) on exit.
    Raises ``RuntimeError`` naming what is missing when it cannot start."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="torchvitals-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def browser_or_skip(width: int = 1280, height: int = 1000) -> Iterator[Browser]:
    """:func:`headless_chromium`, or the calling test skipped saying what is missing."""
    import pytest

    reason = missing()
    if reason:
        pytest.skip(reason)
    with headless_chromium(width, height) as browser:
        yield browser
