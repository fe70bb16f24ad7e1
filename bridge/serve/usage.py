"""What the workstation sent out through the tunnel this calendar month: requests and response bytes.

ngrok's free plan leaves inbound traffic (uploads from Colab) unlimited but caps what the workstation sends out
(1 GB and 20,000 requests a month), so the entrance counts every response it sends to a tunnel client here, the
supervisor saves the count every few seconds, and `bridge status` shows it against the budget. The count is per
calendar month in local time; it starts again at zero when the month changes.

A Cloudflare quick tunnel has no monthly cap: its limits are per moment (200 requests in flight) and per request
(100 MB bodies), so for it the count is shown without a budget and no budget warning is given (`tunnel_limits`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge import config

log = logging.getLogger(__name__)


def month_of(when: float) -> str:
    """`YYYY-MM` of a timestamp, in local time."""
    return time.strftime("%Y-%m", time.localtime(when))


class TunnelUsage:
    """This month's tunnel requests and bytes out; `add()` from the entrance's loop, `save()` from anywhere."""

    def __init__(
        self,
        path: Path | None,
        *,
        month: str | None = None,
        requests: int = 0,
        bytes_out: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._clock = clock
        self.month = month or month_of(clock())
        self.requests = int(requests)
        self.bytes_out = int(bytes_out)
        self._lock = threading.Lock()
        self._dirty = False

    @classmethod
    def load(cls, path: Path, clock: Callable[[], float] = time.time) -> TunnelUsage:
        """This month's count from `path`; a missing, unreadable or last month's file starts at zero."""
        data = read_usage(path) or {}
        usage = cls(path, clock=clock)
        if data.get("month") == usage.month:
            usage.requests = int(data.get("requests", 0))
            usage.bytes_out = int(data.get("bytes_out", 0))
        return usage

    def add(self, bytes_out: int, requests: int = 1) -> None:
        with self._lock:
            month = month_of(self._clock())
            if month != self.month:
                self.month, self.requests, self.bytes_out = month, 0, 0
            self.requests += requests
            self.bytes_out += bytes_out
            self._dirty = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            month = month_of(self._clock())
            if month != self.month:
                return {"month": month, "requests": 0, "bytes_out": 0}
            return {"month": self.month, "requests": self.requests, "bytes_out": self.bytes_out}

    def save(self, *, force: bool = False) -> None:
        """Write the count (atomically) when it changed since the last save."""
        if self.path is None:
            return
        with self._lock:
            if not (self._dirty or force):
                return
            self._dirty = False
        data = self.snapshot()
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("Could not write %s: %s", self.path, exc)


def read_usage(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: What each tunnel kind limits, in a sentence for the terminal and `bridge status`. The quick tunnel's numbers are
#: Cloudflare's (developers.cloudflare.com/cloudflare-one/.../trycloudflare/: 200 in-flight requests, then 429;
#: the 100 MB upload limit of the Free plan, then 413); tests/support/fake_cloudflared.py enforces both.
TUNNEL_LIMITS = {
    "ngrok": "ngrok's free plan: 1 GB and 20,000 requests sent out a month; it stops serving at either",
    "cloudflared": "a Cloudflare quick tunnel: no monthly cap, but at most 200 requests in flight (429 beyond) "
    "and 100 MB per request body (413 beyond)",
}


def tunnel_limits(mode: str) -> str | None:
    """The limits of the tunnel kind `mode` (ngrok, cloudflared), or None for no tunnel."""
    return TUNNEL_LIMITS.get(mode)


def has_monthly_cap(mode: str) -> bool:
    """Whether the tunnel kind counts against a monthly budget (a quick tunnel has none)."""
    return mode != "cloudflared"


def budget_warning(
    usage: dict[str, Any],
    bytes_budget: float,
    requests_budget: float,
    warn_fraction: float = config.TUNNEL_BUDGET_WARN_FRACTION,
    *,
    tunnel: str = "ngrok",
) -> str | None:
    """A sentence when this month's use passed `warn_fraction` of either budget, else None (always None for a
    tunnel without a monthly cap)."""
    if not has_monthly_cap(tunnel):
        return None
    parts = []
    if bytes_budget > 0 and usage.get("bytes_out", 0) >= warn_fraction * bytes_budget:
        parts.append(f"{usage['bytes_out'] / bytes_budget:.0%} of the {format_bytes(bytes_budget)} sent-out budget")
    if requests_budget > 0 and usage.get("requests", 0) >= warn_fraction * requests_budget:
        parts.append(f"{usage['requests'] / requests_budget:.0%} of the {int(requests_budget):,} request budget")
    if not parts:
        return None
    return (
        "this month the tunnel has used " + " and ".join(parts) + "; ngrok's free plan stops serving at the "
        "limit (a Cloudflare quick tunnel, `--tunnel cloudflared`, has no monthly cap)"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
