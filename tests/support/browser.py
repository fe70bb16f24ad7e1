"""Headless Chromium for the UI tests (tests/test_browser.py, tests/test_notebook_from_zero.py): Debian's binary."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

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


def launch_at(playwright, chromium: str, public_url: str, port: int):
    """Headless Chromium that finds `public_url`'s host at 127.0.0.1:`port` (the test's TLS edge), as a user's
    browser finds the tunnel's edge: the page's origin, cookies and Origin headers are the public URL's. Only that
    name is mapped."""
    host = urlsplit(public_url).hostname
    resolver = f"--host-resolver-rules=MAP {host} 127.0.0.1:{port}, EXCLUDE 127.0.0.1"
    return playwright.chromium.launch(executable_path=chromium, args=[*CHROMIUM_ARGS, resolver])
