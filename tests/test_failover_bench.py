"""The failover benchmark's pure helpers (``bench/failover.py``: a benchmark, not a test;
these check only how it reads answers and summarizes its figures)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "failover.py"
_SPEC = importlib.util.spec_from_file_location("failover_bench", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
failover = importlib.util.module_from_spec(_SPEC)
sys.modules["failover_bench"] = failover
_SPEC.loader.exec_module(failover)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert failover.percentile(values, 0.5) == 10.0
    assert failover.percentile(values, 0.99) == 20.0  # of 20 kills, p99 is the largest
    assert failover.percentile([3.0], 0.99) == 3.0
    with pytest.raises(ValueError):
        failover.percentile([], 0.5)
    with pytest.raises(ValueError):
        failover.percentile(values, 0.0)


def test_summary_rounds_to_ms_and_says_n() -> None:
    assert failover.summary([]) == {"n": 0}
    assert failover.summary([1.23456, 2.0]) == {
        "n": 2,
        "min": 1.235,
        "p50": 1.235,
        "p99": 2.0,
        "max": 2.0,
    }


def test_etcd_status_names_the_leader_and_term() -> None:
    # The v3 gateway writes uint64 values as strings.
    leader = {"header": {"member_id": "42", "raft_term": "7"}, "leader": "42", "raftTerm": "7"}
    follower = {"header": {"member_id": "43", "raft_term": "7"}, "leader": "42"}
    assert failover.etcd_status(leader) == (True, 7)
    assert failover.etcd_status(follower) == (False, 7)
    assert failover.etcd_status({}) == (False, 0)


def test_token_term_reads_a_fencing_token() -> None:
    assert failover.token_term("3.17") == 3
    for bad in ("3", "a.1", "3.x", ""):
        with pytest.raises(ValueError):
            failover.token_term(bad)


def test_the_table_shows_the_ratio_to_etcd_and_what_was_not_measured() -> None:
    etcd = failover.Row("etcd", "defaults", [1.0, 1.2], [1.0, 1.4])
    populi = failover.Row("populi defaults", "lan", [2.0, 2.2], [2.5, 2.9], unplanned=1)
    raft = failover.Row("hashicorp/raft", "defaults", note="not measured: no go")
    table = failover.format_table([populi, etcd, raft])
    lines = table.splitlines()
    assert lines[2].rstrip().endswith("2.5")  # 2.5 s over etcd's 1.0 s at p50
    assert "1 round(s) began at a higher term than the last first grant" in table
    assert "not measured: no go" in table


def test_a_round_counts_when_its_term_moved_on_since_the_last_first_grant() -> None:
    moved = failover.term_moved_between_rounds
    assert not moved(0, 5)  # the first round: nothing to compare with
    assert not moved(3, 3)  # the term the last grant came at: no election since
    assert moved(3, 4)  # an election nobody caused between the kills
    assert moved(3, 6)  # several count as one round
    assert not moved(4, 3)


def test_the_warmup_is_the_profiles_longest_election_timeout_and_a_margin() -> None:
    margin = failover.WARMUP_MARGIN_S
    # The defaults (3 s, as populi init writes them) outlast etcd-like's 2.2 s.
    assert failover.warmup_s(failover.PROFILES["etcd-like"]) == 3.0 + margin
    assert failover.warmup_s(failover.PROFILES["adr0016"]) == 16.0 + margin
    assert failover.warmup_s([{}]) == 3.0 + margin
    assert failover.warmup_s(
        [{"election_timeout_max_s": 9.0}, {"election_timeout_max_s": 4.0}]
    ) == (9.0 + margin)
