import random

import pytest

from bridge.retry import compute_backoff_ms


def test_backoff_grows_exponentially_without_jitter():
    waits = [compute_backoff_ms(n, min_backoff_ms=100, max_backoff_ms=10_000, jitter=False) for n in range(8)]
    assert waits[:7] == [100, 200, 400, 800, 1600, 3200, 6400]
    assert waits[7] == 10_000


def test_jittered_backoff_stays_within_half_cap_and_cap():
    rng = random.Random(1)
    for n in range(40):
        cap = min(5000, 100 * 2**n)
        assert cap / 2 <= compute_backoff_ms(n, min_backoff_ms=100, max_backoff_ms=5000, rng=rng) <= cap


def test_negative_attempts_is_an_error():
    with pytest.raises(ValueError):
        compute_backoff_ms(-1)
