"""A real browser for the UI tests: Debian's Chromium driven by Playwright.

Each page collects what a person would see go wrong (uncaught page errors, HTTP 5xx
answers); a test that fails leaves a screenshot of every page it had open under
.test-artifacts/browser/ (CI keeps the folder), named after the test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.project import REPO

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it
SCREENSHOTS = REPO / ".test-artifacts" / "browser"
VIEWPORT = {"width": 1920, "height": 1200}
TIMEOUT_MS = 30_000  # a cold UI bundle on a loaded 2-core machine


def require_chromium() -> None:
    """Skip where no Chromium is installed, with the fix; CI installs it, so there a
    missing browser fails instead of skipping."""
    if CHROMIUM.is_file():
        return
    message = f"{CHROMIUM} not found: apt-get install -y chromium fonts-liberation"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Problems:
    """What went wrong in the pages of one test, as a person would notice it."""

    found: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.on("pageerror", lambda error: self.found.append(f"page error at {page.url}: {error}"))
        page.on(
            "response",
            lambda response: (
                response.status >= 500
                and self.found.append(f"HTTP {response.status} {response.url}")
            ),
        )


@contextmanager
def browser(name: str, **context: Any) -> Iterator[tuple[Any, Problems]]:
    """A fresh Chromium context (no stored UI choices: a first-time visitor) and its
    Problems; on failure, a screenshot per open page in SCREENSHOTS/<name>-<n>.png."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    problems = Problems()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            session = chromium.new_context(viewport=VIEWPORT, **context)
            session.set_default_timeout(TIMEOUT_MS)
            session.on("page", problems.watch)
            try:
                yield session, problems
            except BaseException:
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
                for index, page in enumerate(session.pages):
                    page.screenshot(path=SCREENSHOTS / f"{safe}-{index}.png", full_page=True)
                raise
        finally:
            chromium.close()


def plot_traces(card: Any) -> list[dict[str, Any]]:
    """The traces Plotly draws in a chart card (its x and y), read from the chart itself."""
    plot = card.locator(".js-plotly-plot").first
    plot.wait_for()
    return plot.evaluate("el => (el.data || []).map(t => ({x: t.x, y: t.y, type: t.type}))")
