"""Running a seeded simulation over many seeds and replaying its failure, as the election
and lease simulation tests do."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

F = TypeVar("F", bound=AssertionError)


def seed_totals(run: Callable[[int], Mapping[str, int]], seeds: Iterable[int]) -> Counter[str]:
    """The figures ``run`` (a simulation's ``run_seed``) counts over ``seeds``, summed;
    the first seed that breaks a rule raises its failure."""
    totals: Counter[str] = Counter()
    for seed in seeds:
        totals.update(run(seed))
    return totals


def first_failure_twice(
    run_seed: Callable[[int], object], seeds: Iterable[int], failure: type[F]
) -> tuple[F, F]:
    """The first seed of ``seeds`` that fails with ``failure``, found twice over from the
    start: the failure of the first search and that of the second. Fails the test where
    a search finds none."""
    seeds = tuple(seeds)
    found: list[F] = []
    for _ in range(2):
        for seed in seeds:
            try:
                run_seed(seed)
            except failure as exc:
                found.append(exc)
                break
    assert len(found) == 2
    first, again = found
    return first, again
