"""The node's ledger over its store (populi_peer/agent/holdings.py): the claim transactions
run the core's book (populi_peer/core/claims.py) inside one store transaction each and
record what it decided, on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from populi_peer.agent.attempts import AttemptPlan
from populi_peer.agent.holdings import NodeLedger
from populi_peer.core.fencing import FencingToken
from populi_peer.core.reports import Claim
from populi_peer.store.attempts import Attempts
from populi_peer.store.db import Store

NODE = "w1"
WALL_S = 1_700_000_000.0


class FixedClock:
    def wall(self) -> float:
        return WALL_S

    def mono(self) -> float:
        return 0.0

    def boot(self) -> float:
        return 0.0


@pytest.fixture
def ledger(tmp_path: Path) -> NodeLedger:
    store = Store.open(tmp_path, create=True)
    return NodeLedger(node_id=NODE, attempts=Attempts(store), clock=FixedClock())


def plan(task_id: str, gpus: tuple[str, ...], *, lease_id: str | None = None) -> AttemptPlan:
    """A local attempt of this node (under a ``local`` lease where ``lease_id`` names one)."""
    return AttemptPlan(
        task_id=task_id,
        attempt=1,
        role="local",
        submitter=NODE,
        token=FencingToken(2, 7) if lease_id else FencingToken(0, 0),
        lease_id=lease_id,
        ttl_s=10.0 if lease_id else None,
        renewable=lease_id is not None,
        argv=("sim", "1"),
        env={},
        gpus=gpus,
        work_class="training",
        may_claim=True,
    )


def save(ledger: NodeLedger, attempt: AttemptPlan, state: str, claim: Claim | None = None) -> None:
    ledger.attempts.save(
        attempt,
        state=state,
        body=attempt.to_json(),
        result=None,
        now_ms=0,
        claim=claim,
    )


def test_an_accepted_attempt_whose_proof_goes_unanswered_starts_under_a_claim(
    ledger: NodeLedger,
) -> None:
    accepted = plan("t1", ("G0", "G1"), lease_id="L1")
    save(ledger, accepted, "accepted")
    claim = ledger.convert(accepted, True, lambda p, c: save(ledger, p, "running", c))
    assert claim == Claim(
        "c-t1-1", NODE, "t1", 1, FencingToken(2, 7), ("G0", "G1"), 1_700_000_000_000, "L1"
    )
    assert ledger.claimed_gpus() == {"G0", "G1"}
    (reported,) = ledger.holdings().leases
    assert (reported.lease_id, reported.phase) == ("L1", "started")
    # Claimed once: a second conversion is no new claim.
    assert ledger.convert(accepted, True, lambda p, c: save(ledger, p, "running", c)) is None


def test_a_conversion_before_start_takes_no_gpu_a_started_attempt_uses(
    ledger: NodeLedger,
) -> None:
    save(ledger, plan("t0", ("G1",)), "running")
    save(ledger, plan("t1", ("G0", "G1"), lease_id="L1"), "accepted")
    recorded: list[Claim] = []
    claim = ledger.convert(
        plan("t1", ("G0", "G1"), lease_id="L1"), True, lambda p, c: recorded.append(c)
    )
    assert claim is None and recorded == []
    # An attempt the book does not hold with a lease is no claim either.
    save(ledger, plan("t2", ("G2",)), "accepted")
    assert ledger.convert(plan("t2", ("G2",)), True, lambda p, c: recorded.append(c)) is None
    # Nor is one without GPUs: refused, not an error that ends its run.
    save(ledger, plan("t3", (), lease_id="L3"), "accepted")
    assert (
        ledger.convert(plan("t3", (), lease_id="L3"), True, lambda p, c: recorded.append(c)) is None
    )
    assert recorded == []


def test_a_local_run_claims_the_free_gpus_no_accepted_attempt_waits_for_first(
    ledger: NodeLedger,
) -> None:
    save(ledger, plan("t0", ("G1",)), "running")  # uses G1
    save(ledger, plan("t1", ("G0",), lease_id="L1"), "accepted")  # waits for G0
    recorded: list[Claim] = []

    def claim(wanted: int) -> Claim | None:
        return ledger.claim(
            task_id="t9",
            attempt=1,
            gpus_wanted=wanted,
            verified=frozenset({"G0", "G1", "G2"}),
            now_ms=5,
            record=recorded.append,
        )

    assert claim(3) is None and claim(0) is None and recorded == []
    made = claim(2)
    assert made == Claim("c-t9-1", NODE, "t9", 1, FencingToken(0, 0), ("G2", "G0"), 5)
    assert recorded == [made]
