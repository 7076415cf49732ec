from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.placement import SCOPE_RANK, CandidateView, Placement, TaskView, propose
from populi_peer.core.policy import SCOPES, WORK_CLASSES, Scope, decide
from populi_peer.errors import BadRequest

LOCAL = "me"
TASK = TaskView("training", gpus_wanted=1)


def cand(
    node: str,
    free: int = 2,
    scope: Scope = "lan",
    eligible: bool = True,
    reasons: tuple[str, ...] = (),
) -> CandidateView:
    return CandidateView(node, eligible=eligible, free_gpus=free, scope=scope, reasons=reasons)


def place(task: TaskView, *candidates: CandidateView, **kw: object) -> Placement:
    kw.setdefault("remote_enabled", True)
    return propose(task, candidates, local_node=LOCAL, **kw)  # type: ignore[arg-type]


def test_remote_disabled_is_local() -> None:
    p = place(TASK, cand("w1"), remote_enabled=False)
    assert (p.where, p.node, p.reasons) == ("local", LOCAL, ("remote_disabled",))


def test_no_candidates() -> None:
    assert place(TASK).reasons == ("no_remote_candidate",)
    # This node is never its own remote candidate.
    assert place(TASK, cand(LOCAL)).reasons == ("no_remote_candidate",)


def test_most_free_gpus_then_node_id_wins() -> None:
    p = place(TASK, cand("w2", free=2), cand("w1", free=2), cand("w0", free=1))
    assert (p.where, p.node, p.reasons) == ("remote", "w1", ("node_id_order", "scope_lan"))
    p = place(TASK, cand("w1", free=1), cand("w9", free=4))
    assert (p.node, p.reasons) == ("w9", ("most_free_gpus", "scope_lan"))
    p = place(TASK, cand("w1", free=1))
    assert (p.node, p.reasons) == ("w1", ("only_fit", "scope_lan"))


def test_every_rejection_is_named() -> None:
    p = place(
        TaskView("collective", gpus_wanted=2),
        cand("a", eligible=False, free=4, scope="local", reasons=("node_cordoned",)),
        cand("b", free=1, scope="local"),
        cand("c", free=4, scope="overlay"),
        cand("d", free=4, scope="lan"),
    )
    assert p.where == "local"
    assert p.reasons == (
        "no_remote_candidate",
        "node_ineligible",
        "no_free_gpu",
        "policy_blocked",
        "policy_gated_off",
    )
    assert dict(p.rejected) == {
        "a": ("node_ineligible", "node_cordoned"),
        "b": ("no_free_gpu",),
        "c": ("policy_blocked",),
        "d": ("policy_gated_off",),
    }


def test_a_gate_lets_gated_work_through() -> None:
    task = TaskView("inference", gpus_wanted=1)
    assert place(task, cand("w1", scope="overlay")).where == "local"
    p = place(
        task, cand("w1", scope="overlay"), gates_enabled=frozenset({("inference", "overlay")})
    )
    assert (p.where, p.node) == ("remote", "w1")


def test_pinned_node() -> None:
    pinned = TaskView("training", gpus_wanted=1, node="w2")
    p = place(pinned, cand("w1", free=8), cand("w2", free=1))
    assert (p.where, p.node, p.reasons) == ("remote", "w2", ("node_pinned", "scope_lan"))
    p = place(pinned, cand("w1", free=8), cand("w2", free=0))
    assert p.where == "local" and p.reasons == ("node_pinned_unavailable", "no_free_gpu")
    p = place(pinned, cand("w1", free=8))
    assert p.reasons == ("node_pinned_unavailable", "no_remote_candidate")
    p = place(TaskView("training", gpus_wanted=1, node=LOCAL), cand("w1"))
    assert (p.where, p.reasons) == ("local", ("node_pinned_local",))


def test_avoided_nodes_are_skipped() -> None:
    p = place(TASK, cand("w1", free=8), cand("w2", free=1), avoid=frozenset({"w1"}))
    assert p.node == "w2"


def test_duplicate_candidates_are_refused() -> None:
    with pytest.raises(BadRequest):
        place(TASK, cand("w1"), cand("w1"))


def test_placement_json() -> None:
    p = place(TASK, cand("w1", free=0))
    assert p.to_json() == {
        "where": "local",
        "node": LOCAL,
        "reasons": ["no_remote_candidate", "no_free_gpu"],
        "rejected": {"w1": ["no_free_gpu"]},
        "gpus": [],
        "waiting_for": None,
    }


candidates = st.lists(
    st.builds(
        CandidateView,
        node_id=st.sampled_from(["a", "b", "c", "d", "e"]),
        eligible=st.booleans(),
        free_gpus=st.integers(0, 4),
        scope=st.sampled_from(SCOPES),
    ),
    unique_by=lambda c: c.node_id,
    max_size=5,
)


@given(
    st.sampled_from(WORK_CLASSES),
    st.integers(0, 3),
    candidates,
    st.randoms(use_true_random=False),
)
def test_remote_placement_always_fits_and_order_does_not_matter(
    work_class: str, gpus: int, cands: list[CandidateView], rnd: object
) -> None:
    task = TaskView(work_class, gpus_wanted=gpus)  # type: ignore[arg-type]
    p = propose(task, cands, remote_enabled=True, local_node=LOCAL)
    shuffled = list(cands)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert propose(task, shuffled, remote_enabled=True, local_node=LOCAL) == p

    def fits(c: CandidateView) -> bool:
        return (
            c.eligible
            and c.free_gpus >= gpus
            and decide(work_class, c.scope, gates_enabled=frozenset()).allowed
        )

    fitting = [c for c in cands if fits(c)]
    if fitting:
        assert p.where == "remote"
        chosen = next(c for c in cands if c.node_id == p.node)
        assert fits(chosen)

        # Nearest scope first, then the most free GPUs, then the smallest node id.
        def rank(c: CandidateView) -> tuple[int, int, str]:
            return (SCOPE_RANK[c.scope], -c.free_gpus, c.node_id)

        assert all(rank(chosen) <= rank(c) for c in fitting)
    else:
        assert p.where == "local" and p.node == LOCAL
        assert p.reasons[0] == "no_remote_candidate"
        assert len(p.rejected) == len(cands)
