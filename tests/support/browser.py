"""Headless Chromium for the UI tests (tests/test_browser.py, tests/test_notebook_from_zero.py): Debian's binary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
UI_TIMEOUT_MS = 60_000  # the MLflow UI's bundle, parsed and rendered by Chromium on a loaded 2-core machine


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium; CI must have it (its absence fails there), elsewhere the test is skipped."""
    if CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK):
        return str(CHROMIUM)
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's `chromium` package (.ci/run does)")
    pytest.skip(f"{CHROMIUM} is not installed")
