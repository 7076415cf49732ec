"""The node's book of attempts and claims (populi_peer/core/claims.py): a claim and a start
each check and record in one step, so no GPU of a node ever runs two attempts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from populi_peer.core.claims import NO_LEASE_TOKEN, Decision, LeaseTerms, NodeAttempt, NodeBook
from populi_peer.core.fencing import FencingToken
from populi_peer.core.reports import Claim
from populi_peer.errors import BadRequest, Conflict

W = 1_700_000_000_000


def remote(
    task_id: str = "t1", gpus: tuple[str, ...] = ("G0",), lease_id: str = "L1"
) -> NodeAttempt:
    return NodeAttempt(
        role="worker",
        task_id=task_id,
        attempt=1,
        token=FencingToken(1, 5),
        gpus=gpus,
        phase="accepted",
        lease=LeaseTerms(lease_id, "remote", "sub", 10.0, "training"),
    )


def local(
    task_id: str = "t9", gpus: tuple[str, ...] = ("G0",), *, claim_id: str | None = "C1"
) -> tuple[Claim, NodeAttempt]:
    token = FencingToken(0, 0)
    claim = Claim(claim_id or "C1", "w1", task_id, 1, token, gpus, W)
    attempt = NodeAttempt("local", task_id, 1, token, gpus, "started", claim_id=claim_id)
    return claim, attempt


def test_a_remote_attempt_accepted_on_claimed_gpus_is_refused_at_its_start() -> None:
    """Issue 12: a claim made while no control plane was reachable wins over a lease
    granted meanwhile by a control plane that could not hear the node."""
    book, decision = NodeBook("w1").accept(remote())
    assert decision.ok
    claim, attempt = local()
    book, decision = book.claim(claim, attempt)  # accepted-not-started does not block it
    assert decision.ok and decision.claim == claim
    book, decision = book.start(remote().key)
    assert not decision.ok and "gpu_claimed" in decision.reasons
    # Refused at its start: recorded stopped (it never ran); its end rides the reports.
    (reported,) = [x for x in book.holdings().leases if x.lease_id == "L1"]
    assert reported.phase == "stopped"
    assert book.holdings().claims == (claim,)
    # A later handoff on the claimed GPU is refused at once.
    _, decision = book.accept(remote("t2", lease_id="L2"))
    assert decision.reasons == ("gpu_claimed",)


def test_a_claim_never_takes_the_gpus_of_a_started_attempt() -> None:
    book, _ = NodeBook("w1").accept(remote(gpus=("G0", "G1")))
    book, decision = book.start(remote().key)
    assert decision.ok
    claim, attempt = local(gpus=("G1",))
    after, decision = book.claim(claim, attempt)
    assert decision.reasons == ("gpu_busy",) and after is book
    # It ends: the GPUs are free for a claim again (its release is still owed).
    book = book.end(remote().key, "completed")
    book, decision = book.claim(claim, attempt)
    assert decision.ok
    assert [x.phase for x in book.holdings().leases] == ["completed"]
    book = book.release_acknowledged("L1")
    assert book.holdings().leases == ()


def test_a_left_over_attempt_keeps_its_gpus_until_it_ends() -> None:
    book, _ = NodeBook("w1").accept(remote())
    book, _ = book.start(remote().key)
    # The control plane refused its renewal: it must be stopped, and keeps its GPUs
    # until the supervisor confirms it is gone.
    book, stop = book.refused_by_control_plane("L1")
    assert stop and book.gpus_in_use() == {"G0"}
    _, decision = book.claim(*local())
    assert decision.reasons == ("gpu_busy",)


def test_a_refused_attempt_that_never_started_is_never_started() -> None:
    book, _ = NodeBook("w1").accept(remote())
    book, stop = book.refused_by_control_plane("L1")
    assert not stop and book.get(remote().key).phase == "stopped"  # type: ignore[union-attr]
    _, decision = book.start(remote().key)
    assert decision.reasons == ("not_startable",)


def test_a_local_attempt_whose_renewals_go_unanswered_becomes_a_claim() -> None:
    attempt = NodeAttempt(
        "local",
        "t3",
        1,
        FencingToken(1, 7),
        ("G0", "G1"),
        "accepted",
        lease=LeaseTerms("L3", "local", "w1", 10.0, "training"),
    )
    book, _ = NodeBook("w1").accept(attempt)
    book, _ = book.start(attempt.key)
    book, decision = book.convert_to_claim(attempt.key, claim_id="C3", made_wall_ms=W)
    assert decision.ok and decision.claim is not None
    assert decision.claim.lease_id == "L3" and decision.claim.gpus == ("G0", "G1")
    assert book.invariant_violation() is None
    # Its lease is still reported, and its claim; a remote attempt cannot start there.
    assert [x.lease_id for x in book.holdings().leases] == ["L3"]
    book, _ = book.accept(remote("t4", gpus=("G1",), lease_id="L4"))
    assert book.get(remote("t4").key) is None  # refused at accept: G1 is claimed
    # Converting twice is harmless; a refusal of its old lease no longer stops it.
    same, decision = book.convert_to_claim(attempt.key, claim_id="C9", made_wall_ms=W)
    assert decision.ok and same is book
    book, stop = book.refused_by_control_plane("L3")
    assert not stop
    book = book.end(attempt.key, "completed")
    assert book.claims == {} and book.gpus_in_use() == frozenset()


def test_a_proof_that_goes_unanswered_starts_the_accepted_attempt_under_a_claim() -> None:
    terms = LeaseTerms("L5", "local", "w1", 10.0, "training")
    accepted = NodeAttempt("local", "t5", 1, FencingToken(1, 8), ("G0",), "accepted", lease=terms)
    book, _ = NodeBook("w1").accept(accepted)
    book, decision = book.claim_before_start(accepted.key, claim_id="C5", made_wall_ms=W)
    # The claim is made from the attempt: its token, GPUs and lease.
    claim = Claim("C5", "w1", "t5", 1, FencingToken(1, 8), ("G0",), W, lease_id="L5")
    assert decision.ok and decision.claim == claim and book.claims == {"C5": claim}
    assert book.get(accepted.key) == replace(accepted, phase="started", claim_id="C5")
    # Once started under its claim, a second claim of it is a duplicate.
    same, decision = book.claim_before_start(accepted.key, claim_id="C6", made_wall_ms=W)
    assert decision.reasons == ("duplicate",) and same is book
    with pytest.raises(BadRequest):  # the lease it had stays its lease
        NodeBook("w1").accept(accepted)[0].claim(
            claim, replace(accepted, phase="started", claim_id="C5", lease=None)
        )


def test_only_a_held_local_attempt_with_a_lease_is_claimed_before_its_start() -> None:
    accepted = NodeAttempt("local", "t5", 1, FencingToken(1, 8), ("G0",), "accepted")
    no_gpus = NodeAttempt(
        "local",
        "t6",
        1,
        FencingToken(1, 9),
        (),
        "accepted",
        lease=LeaseTerms("L6", "fence", "w1", 0.0, "agent"),
    )
    fenced = replace(
        accepted, task_id="t8", gpus=("G3",), lease=LeaseTerms("L8", "fence", "w1", 0.0, "agent")
    )
    book, _ = NodeBook("w1").accept(accepted)  # no lease
    book, _ = book.accept(no_gpus)  # nothing to claim
    book, _ = book.accept(fenced)  # not a local lease: nothing a claim could stand for
    for key in (accepted.key, no_gpus.key, fenced.key, ("local", "t7", 1)):
        same, decision = book.claim_before_start(key, claim_id="C5", made_wall_ms=W)
        assert decision.reasons == ("not_claimable",) and same is book
    # A remote attempt on the GPUs of a started one is refused as any claim would be.
    book, _ = NodeBook("w1").accept(remote())
    book, _ = book.start(remote().key)
    book, _ = book.accept(replace(accepted, lease=LeaseTerms("L5", "local", "w1", 9.0, "agent")))
    _, decision = book.claim_before_start(accepted.key, claim_id="C5", made_wall_ms=W)
    assert decision.reasons == ("gpu_busy",)


def claim_free(book: NodeBook, wanted: int) -> tuple[NodeBook, Decision]:
    """A local run ``t9`` claims ``wanted`` of the node's four GPUs."""
    return book.claim_free_gpus(
        task_id="t9",
        attempt=2,
        gpus_wanted=wanted,
        verified={"G0", "G1", "G2", "G3"},
        claim_id="C9",
        made_wall_ms=W,
    )


def test_a_claim_for_a_local_run_takes_free_gpus_those_no_attempt_waits_for_first() -> None:
    book, _ = NodeBook("w1").accept(remote("t1", gpus=("G0",)))  # waits for G0
    book, _ = book.accept(remote("t2", gpus=("G1",), lease_id="L2"))
    book, _ = book.start(remote("t2").key)  # uses G1
    assert book.free_gpus(["G3", "G0", "G1", "G2"]) == ("G2", "G3", "G0")
    after, decision = claim_free(book, 2)
    claim = Claim("C9", "w1", "t9", 2, NO_LEASE_TOKEN, ("G2", "G3"), W)
    assert decision.ok and decision.claim == claim
    assert after.get(("local", "t9", 2)) == NodeAttempt(
        "local", "t9", 2, NO_LEASE_TOKEN, ("G2", "G3"), "started", claim_id="C9"
    )
    # The GPU an accepted attempt waits for is taken last; one a started attempt uses never.
    _, decision = claim_free(book, 3)
    assert decision.claim is not None and decision.claim.gpus == ("G2", "G3", "G0")
    for wanted in (4, 0):
        same, decision = claim_free(book, wanted)
        assert decision.reasons == ("no_free_gpu",) and same is book


def test_an_attempt_without_a_lease_is_forgotten_when_it_ends() -> None:
    claim, attempt = local()
    book, _ = NodeBook("w1").claim(claim, attempt)
    assert book.holdings().leases == () and book.holdings().claims == (claim,)
    book = book.end(attempt.key, "completed")
    assert book.attempts == {} and book.claims == {}


def test_the_book_refuses_what_breaks_its_rule() -> None:
    claim, attempt = local()
    with pytest.raises(BadRequest):
        NodeBook("w2").claim(claim, attempt)  # another node's claim
    with pytest.raises(BadRequest):
        NodeBook("w1").claim(claim, replace(attempt, gpus=("G1",)))
    with pytest.raises(Conflict):
        NodeBook.restore(
            "w1",
            [
                replace(remote(), phase="started"),
                replace(remote("t2", lease_id="L2"), phase="started"),
            ],
            [],
        )
    with pytest.raises(BadRequest):
        NodeAttempt("worker", "t1", 1, FencingToken(1, 1), (), "accepted")  # no lease


# -- any order of accepts, starts, claims and ends --------------------------------------------

GPUS = ("G0", "G1", "G2")


class NodeBookMachine(RuleBasedStateMachine):
    """Whatever order handoffs, starts, claims, conversions (before or after a start) and
    ends come in, no GPU is in two started attempts or in a claim and another attempt's
    start."""

    def __init__(self) -> None:
        super().__init__()
        self.book = NodeBook("w1")
        self.n = 0

    def _next(self) -> int:
        self.n += 1
        return self.n

    @rule(gpus=st.sets(st.sampled_from(GPUS), max_size=2), local_lease=st.booleans())
    def accept(self, gpus: set[str], local_lease: bool) -> None:
        n = self._next()
        kind = "local" if local_lease else "remote"
        attempt = NodeAttempt(
            "local" if local_lease else "worker",
            f"t{n}",
            1,
            FencingToken(1, n),
            tuple(sorted(gpus)),
            "accepted",
            lease=LeaseTerms(f"L{n}", kind, "w1" if local_lease else "sub", 10.0, "agent"),
        )
        before = self.book
        self.book, decision = self.book.accept(attempt)
        if not decision.ok:
            assert set(gpus) & set(before.claimed_gpus()) and self.book is before

    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        waiting = sorted(k for k, x in self.book.attempts.items() if x.phase == "accepted")
        if not waiting:
            return
        key = data.draw(st.sampled_from(waiting))
        attempt = self.book.attempts[key]
        in_use = self.book.gpus_in_use()
        self.book, decision = self.book.start(key)
        assert decision.ok == (not set(attempt.gpus) & in_use)

    @rule(gpus=st.sets(st.sampled_from(GPUS), min_size=1, max_size=2))
    def claim(self, gpus: set[str]) -> None:
        n = self._next()
        claim = Claim(f"C{n}", "w1", f"t{n}", 1, FencingToken(0, 0), tuple(sorted(gpus)), W)
        attempt = NodeAttempt(
            "local", f"t{n}", 1, claim.token, claim.gpus, "started", claim_id=claim.claim_id
        )
        in_use = self.book.gpus_in_use()
        self.book, decision = self.book.claim(claim, attempt)
        assert decision.ok == (not set(gpus) & in_use)

    @rule(data=st.data(), before_start=st.booleans())
    def convert(self, data: st.DataObject, before_start: bool) -> None:
        keys = sorted(self.book.attempts)
        if keys:
            key = data.draw(st.sampled_from(keys))
            book = self.book
            to_claim = book.claim_before_start if before_start else book.convert_to_claim
            self.book, _ = to_claim(key, claim_id=f"C{self._next()}", made_wall_ms=W)

    @rule(data=st.data(), outcome=st.sampled_from(["completed", "stopped"]))
    def end(self, data: st.DataObject, outcome: str) -> None:
        keys = sorted(k for k, x in self.book.attempts.items() if x.started)
        if keys:
            self.book = self.book.end(data.draw(st.sampled_from(keys)), outcome)  # type: ignore[arg-type]

    @rule(data=st.data())
    def release_acknowledged(self, data: st.DataObject) -> None:
        ended = sorted(x.lease.lease_id for x in self.book.attempts.values() if x.ended and x.lease)
        if ended:
            self.book = self.book.release_acknowledged(data.draw(st.sampled_from(ended)))

    @invariant()
    def no_gpu_runs_two_attempts(self) -> None:
        assert self.book.invariant_violation() is None


TestNodeBookMachine = NodeBookMachine.TestCase
TestNodeBookMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
