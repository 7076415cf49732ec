"""What the submitter does when a request to the control plane fails: one pure decision
(``core.refusals.decide_refusal``), its table row by row, and the safety property that an
unreached lease request never leads to a local run without the control plane's word."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.claims import CLAIM_BASES, claim_basis
from populi_peer.core.fencing import FencingToken
from populi_peer.core.refusals import (
    ASKS,
    Decision,
    Refusal,
    decide_refusal,
)
from populi_peer.core.tasks import (
    ControlPlaneUnreachable,
    FallbackRefused,
    GrantRefused,
    PlacedLocal,
    PlacedRemote,
    PlacementFailed,
    PlacementStarted,
    PopuliFailure,
    Task,
    TaskOptions,
)
from populi_peer.errors import BadRequest

T0 = 1_700_000_000_000
ME = "n-me"


def task(gpus: int = 1, state: str = "placing", **options: object) -> Task:
    t = Task.new(
        "t-1",
        command=("true",),
        env={},
        gpus_wanted=gpus,
        work_class="inference" if gpus else "agent",
        created_wall_ms=T0,
        options=TaskOptions(**options),  # type: ignore[arg-type]
    )
    t = t.apply(PlacementStarted(), now_wall_ms=T0 + 1)
    if state == "running_remote":
        t = t.apply(
            PlacedRemote(node="n-w", lease_id="l-1", token=FencingToken(1, 1)), now_wall_ms=T0 + 2
        )
    elif state == "fallback_pending":
        t = t.apply(
            PlacedRemote(node="n-w", lease_id="l-1", token=FencingToken(1, 1)), now_wall_ms=T0 + 2
        )
        t = t.apply(ControlPlaneUnreachable(detail="x"), now_wall_ms=T0 + 3)
    assert t.state == state
    return t


def decide(t: Task, ask: str, refusal: Refusal, *, queue_over: bool = True) -> Decision:
    return decide_refusal(
        t,
        ask,  # type: ignore[arg-type]
        refusal,
        local_node=ME,
        queue_deadline_passed=queue_over,
        node="n-w",
        placement_reasons=("no_remote_candidate",),
    )


REFUSED = Refusal.refused
UNREACHED = Refusal.unreached("n-cp did not answer in time")


def test_the_node_list() -> None:
    refused = decide(task(), "nodes", REFUSED(["role_required"], "no"))
    assert refused == Decision(PopuliFailure(code="role_required", detail="no"))
    assert decide(task(), "nodes", UNREACHED, queue_over=False) == Decision(wait_s=2.0)
    # Nothing was granted: a task without GPUs may run here.
    assert decide(task(gpus=0), "nodes", UNREACHED).event == PlacedLocal(
        node=ME, reasons=("control_plane_unreachable",)
    )
    assert isinstance(decide(task(gpus=1), "nodes", UNREACHED).event, PlacementFailed)
    assert isinstance(
        decide(task(gpus=0, no_fallback=True), "nodes", UNREACHED).event, PlacementFailed
    )


def test_a_grant() -> None:
    assert decide(task(), "grant", REFUSED(["node_not_reported"])) == Decision(
        wait_s=1.0, settle=True
    )
    assert decide(task(), "grant", REFUSED(["no_free_gpu"]), queue_over=False) == Decision(
        wait_s=0.5, settle=True
    )
    refused = decide(task(), "grant", REFUSED(["node_ineligible", "stale_heartbeat"]))
    assert refused == Decision(
        GrantRefused(node="n-w", reasons=("node_ineligible", "stale_heartbeat")),
        settle=True,
        avoid="n-w",
    )
    # Unanswered: it may have been granted. Wait for the word; the number stays pending.
    unreached = decide(task(), "grant", UNREACHED)
    assert isinstance(unreached.event, ControlPlaneUnreachable) and not unreached.settle


def test_a_local_token() -> None:
    assert decide(task(), "local", REFUSED(["stale_attempt"])) == Decision(settle=True)
    assert decide(task(), "local", REFUSED(["node_not_reported"])) == Decision(wait_s=1.0)
    assert decide(task(), "local", REFUSED(["no_free_gpu"]), queue_over=False) == Decision(
        wait_s=1.0
    )
    assert decide(task(), "local", REFUSED(["no_free_gpu"])).event == PlacementFailed(
        reasons=("no_free_gpu",), detail=""
    )
    assert decide(task(gpus=0), "local", UNREACHED).event == PlacedLocal(
        node=ME, reasons=("no_remote_candidate", "control_plane_unreachable")
    )
    assert decide(task(gpus=1), "local", UNREACHED) == Decision(wait_s=2.0)


def test_a_fallback() -> None:
    running = task(state="running_remote")
    waiting = task(state="fallback_pending")
    assert decide(running, "fallback", REFUSED(["lease_live"])) == Decision(
        FallbackRefused(reasons=("lease_live",))
    )
    assert decide(waiting, "fallback", REFUSED(["stale_attempt"])) == Decision(
        FallbackRefused(reasons=("stale_attempt",)), settle=True
    )
    assert isinstance(decide(running, "fallback", UNREACHED).event, ControlPlaneUnreachable)
    assert decide(waiting, "fallback", UNREACHED) == Decision()  # already waiting


def test_a_lease_check() -> None:
    running = task(state="running_remote")
    assert decide(running, "lease_check", REFUSED(["lease_not_found"])) == Decision()
    assert isinstance(decide(running, "lease_check", UNREACHED).event, ControlPlaneUnreachable)
    assert decide(task(state="fallback_pending"), "lease_check", UNREACHED) == Decision()


def test_a_refusal_has_reasons_exactly_when_it_was_answered() -> None:
    with pytest.raises(BadRequest):
        Refusal(reached=True)
    with pytest.raises(BadRequest):
        Refusal(reached=False, reasons=("x",))
    with pytest.raises(BadRequest):
        Refusal(reached=True, reasons=("",))
    with pytest.raises(BadRequest):
        decide(task(), "lottery", UNREACHED)
    assert len(Refusal.unreached("x" * 1000).detail) == 200


@given(
    ask=st.sampled_from(["grant", "fallback", "lease_check"]),
    state=st.sampled_from(["placing", "running_remote", "fallback_pending"]),
    gpus=st.integers(0, 2),
    no_fallback=st.booleans(),
    queue_over=st.booleans(),
)
def test_an_unanswered_lease_request_never_runs_the_task_here(
    ask: str, state: str, gpus: int, no_fallback: bool, queue_over: bool
) -> None:
    """Safety rule 4: without the control plane's word nothing runs locally after a
    request that may have been granted; the task waits (``fallback_pending``)."""
    if ask != "grant" and state == "placing":
        state = "running_remote"
    if ask == "grant":
        state = "placing"
    t = task(gpus=gpus, state=state, no_fallback=no_fallback)
    decision = decide(t, ask, UNREACHED, queue_over=queue_over)
    assert not isinstance(decision.event, PlacedLocal)
    if decision.event is not None:
        assert t.apply(decision.event, now_wall_ms=T0 + 10).state == "fallback_pending"


def test_every_request_has_a_row() -> None:
    for ask in ASKS:
        t = task(state="running_remote") if ask in ("fallback", "lease_check") else task()
        assert isinstance(decide(t, ask, UNREACHED), Decision)
        assert isinstance(decide(t, ask, REFUSED(["refused"])), Decision)


def test_an_unanswered_local_gpu_request_with_a_claim_basis_claims() -> None:
    """ADR 0015: local work never waits for an unreachable control plane — a first local
    GPU attempt with a claim basis claims this node's GPUs; without one it waits, and a
    refusal (an answer) is never a reason to claim."""
    for basis in CLAIM_BASES:
        decision = decide_refusal(
            task(gpus=1),
            "local",
            UNREACHED,
            local_node=ME,
            queue_deadline_passed=False,
            claim_basis=basis,
        )
        assert decision == Decision(claim=True, settle=True)
        refused = decide_refusal(
            task(gpus=1),
            "local",
            REFUSED(["no_free_gpu"]),
            local_node=ME,
            queue_deadline_passed=False,
            claim_basis=basis,
        )
        assert not refused.claim
    assert not decide(task(gpus=1), "local", UNREACHED).claim
    # A grant, a fallback or a lease check that went unanswered never claims: a lease of
    # the task may exist elsewhere.
    for ask, state in (("grant", "placing"), ("fallback", "running_remote")):
        unanswered = decide_refusal(
            task(gpus=1, state=state),
            ask,  # type: ignore[arg-type]
            UNREACHED,
            local_node=ME,
            queue_deadline_passed=True,
            node="n-w",
            claim_basis="pinned_here",
        )
        assert not unanswered.claim


def test_the_claim_bases() -> None:
    assert claim_basis(remote_enabled=False, pinned_to=None, local_node=ME) == "remote_off"
    assert claim_basis(remote_enabled=True, pinned_to=ME, local_node=ME) == "pinned_here"
    assert claim_basis(remote_enabled=True, pinned_to="n-w", local_node=ME) is None
    assert claim_basis(remote_enabled=True, pinned_to=None, local_node=ME) is None
    assert (
        claim_basis(remote_enabled=True, pinned_to=None, local_node=ME, fallback_confirmed=True)
        == "fallback_confirmed"
    )
