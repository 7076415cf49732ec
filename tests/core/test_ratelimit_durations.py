from __future__ import annotations

import pytest

from populi_peer.core.durations import format_duration, parse_duration
from populi_peer.core.ratelimit import RateLimiter
from populi_peer.errors import UsageError


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    limiter = RateLimiter(60)  # one a second, bursts of 60
    assert all(limiter.allow("a", now_mono=0.0) for _ in range(60))
    assert not limiter.allow("a", now_mono=0.0)
    assert limiter.retry_after_s("a") == pytest.approx(1.0, abs=0.01)
    assert limiter.allow("a", now_mono=1.0)
    assert not limiter.allow("a", now_mono=1.0)
    assert limiter.allow("b", now_mono=1.0)  # per key


def test_zero_disables_the_limit() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.allow("a", now_mono=0.0) for _ in range(10_000))


def test_least_recently_used_key_is_forgotten_first() -> None:
    limiter = RateLimiter(1, max_keys=2)
    assert limiter.allow("a", now_mono=0.0)
    assert limiter.allow("b", now_mono=0.0)
    assert not limiter.allow("a", now_mono=0.1)  # a is now the most recently used
    assert limiter.allow("c", now_mono=0.2)  # evicts b, not a
    assert not limiter.allow("a", now_mono=0.3)
    assert limiter.allow("b", now_mono=0.3)  # b starts again with a full bucket


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("2d", 172800),
        ("45", 45),
        ("1.5h", 5400),
        ("250ms", 0.25),
    ],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1x", "h", "-5s", "0", "1h 2m", "5m3"])
def test_bad_durations_are_usage_errors_naming_the_flag(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_duration(text, flag="--ttl")
    assert "--ttl" in str(info.value)


def test_format_duration() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(5400) == "1h30m"
