"""Backoff, as one pure function used by everything in bridge that waits before trying again."""

from __future__ import annotations

import random

DEFAULT_MIN_BACKOFF_MS = 200
DEFAULT_MAX_BACKOFF_MS = 30_000


def compute_backoff_ms(
    attempts: int,
    *,
    min_backoff_ms: float = DEFAULT_MIN_BACKOFF_MS,
    max_backoff_ms: float = DEFAULT_MAX_BACKOFF_MS,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """Milliseconds to wait after `attempts` consecutive failures: exponential, capped, with full jitter.

    With jitter the wait is uniform in [cap/2, cap] so retries spread out but never collapse to zero.
    """
    if attempts < 0:
        raise ValueError(f"attempts must be >= 0, got {attempts}")
    cap = min(max_backoff_ms, min_backoff_ms * (2 ** min(attempts, 32)))
    if not jitter:
        return cap
    return (rng or random).uniform(cap / 2, cap)
