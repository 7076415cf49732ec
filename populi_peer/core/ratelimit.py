"""A token bucket per key (e.g. per client address), pure: ``now_mono`` is an argument."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allow ``per_minute`` events per key, with bursts up to ``burst`` (default: the same).

    ``per_minute == 0`` disables the limit. At most ``max_keys`` buckets are kept; the
    stalest are forgotten first (a forgotten key starts with a full bucket again, which
    only ever allows more, never less, than the steady rate over a minute).
    """

    def __init__(
        self, per_minute: int, *, burst: int | None = None, max_keys: int = 10_000
    ) -> None:
        self.per_minute = per_minute
        self.burst = float(burst if burst is not None else max(per_minute, 1))
        self.max_keys = max_keys
        # Insertion-ordered, and each use moves a key to the end: the first key is the
        # least recently used, so eviction is O(1) even under a flood of new addresses.
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str, *, now_mono: float) -> bool:
        if self.per_minute <= 0:
            return True
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
            bucket = _Bucket(self.burst, now_mono)
        self._buckets[key] = bucket
        rate = self.per_minute / 60.0
        bucket.tokens = min(self.burst, bucket.tokens + (now_mono - bucket.updated) * rate)
        bucket.updated = now_mono
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def retry_after_s(self, key: str) -> float:
        bucket = self._buckets.get(key)
        if bucket is None or self.per_minute <= 0:
            return 0.0
        return max(0.0, (1.0 - bucket.tokens) * 60.0 / self.per_minute)


__all__ = ["RateLimiter"]
