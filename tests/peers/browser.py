"""Headless Debian Chromium driven by Selenium through the Debian chromedriver.

Both paths are explicit, so Selenium never looks for (or downloads) a browser or a driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_installed() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


def chromium(window: tuple[int, int] = (1400, 1000)) -> Any:
    """A headless Chromium WebDriver; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@contextmanager
def headless(window: tuple[int, int] = (1400, 1000), page_load_s: float = 30) -> Iterator[Any]:
    """A headless Chromium WebDriver for a ``with`` block (a test fixture's), quit at its end."""
    driver = chromium(window)
    driver.set_page_load_timeout(page_load_s)
    try:
        yield driver
    finally:
        driver.quit()
