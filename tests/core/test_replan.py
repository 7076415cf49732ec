"""Queued work follows capacity: synthetic hint changes arrive by gossip, and a queued
task decides whether to re-place, with a reason code each time (never for running work)."""

from __future__ import annotations

from populi_peer.core.gossip import GossipState
from populi_peer.core.hints import HintBody
from populi_peer.core.hlc import Hlc
from populi_peer.core.placement import (
    REPLAN_REASONS,
    Replan,
    TaskView,
    candidates_from_hints,
    propose,
    replan_queued,
)
from populi_peer.core.policy import Scope
from support.hints import GB, GIB, FakeSigner, body, device

NOW = 1_700_000_000_000
ME = "me"
LEASED_0 = frozenset({"GPU-00000000-0000-0000-0000-000000000000"})
SCOPES: dict[str, Scope] = {"w-lan": "lan", "w-lan2": "lan", "w-ovl": "overlay", "w-new": "lan"}
GATES = frozenset({("training", "overlay")})
TASK = TaskView("training", gpus_wanted=1, gpu_mem_bytes=40 * GB)


class Submitter:
    """The submitter's gossip view and one queued task, as the agent would hold them."""

    def __init__(self) -> None:
        self.signer = FakeSigner()
        self.state = GossipState(ME)
        self.clock_ms = NOW
        self.versions: dict[str, int] = {}
        self.waiting_for: str | None = None

    def hint(self, node: str, b: HintBody) -> None:
        """``node`` publishes a new hint, and it reaches this submitter by gossip."""
        self.clock_ms += 300
        self.versions[node] = self.versions.get(node, 0) + 1
        record = self.signer.record(
            node, self.clock_ms, self.versions[node], issued_ms=self.clock_ms, hint=b
        )
        result = self.state.merge(
            [record.text], now_wall_ms=self.clock_ms, verify=self.signer.verify
        )
        assert result.changed == (node,)

    def candidates(self) -> list:  # type: ignore[type-arg]
        return candidates_from_hints(
            self.state.records.values(),
            scope_of=lambda r: SCOPES[r.node_id],
            now_wall_ms=self.clock_ms,
        )

    def queue(self) -> None:
        placement = propose(
            TASK, self.candidates(), remote_enabled=True, local_node=ME, gates_enabled=GATES
        )
        assert placement.where == "local", "the task must be queued, not placed"
        self.waiting_for = placement.waiting_for

    def replan(self) -> Replan:
        decision = replan_queued(
            TASK, self.waiting_for, self.candidates(), local_node=ME, gates_enabled=GATES
        )
        assert decision.replan == (decision.reason is not None)
        assert decision.reason is None or decision.reason in REPLAN_REASONS
        if decision.replan:
            self.waiting_for = decision.placement.waiting_for
        return decision


def busy_lan_submitter() -> Submitter:
    """The LAN worker's only 80 GB GPU is leased to another task: the task waits for it."""
    s = Submitter()
    s.hint("w-lan", body(device(0), leased=LEASED_0))
    s.hint("w-ovl", body(device(0, total=16 * GIB)))  # too small: never a candidate
    s.queue()
    assert s.waiting_for == "w-lan"
    return s


def test_nothing_changed_keeps_waiting() -> None:
    s = busy_lan_submitter()
    s.hint("w-ovl", body(device(0, total=16 * GIB), running_tasks=1))
    decision = s.replan()
    assert (decision.replan, decision.reason) == (False, None)
    assert decision.placement.waiting_for == "w-lan"


def test_capacity_dropped_when_the_awaited_gpu_turns_unhealthy() -> None:
    s = busy_lan_submitter()
    s.hint("w-lan", body(device(0, ecc_errors=3), leased=LEASED_0))
    decision = s.replan()
    assert decision.reason == "replan_capacity_dropped"
    assert decision.placement.waiting_for is None
    assert dict(decision.placement.rejected)["w-lan"] == ("no_free_gpu",)


def test_capacity_dropped_when_foreign_work_takes_the_gpu() -> None:
    s = busy_lan_submitter()
    s.hint("w-lan", body(device(0, foreign=True)))
    assert s.replan().reason == "replan_capacity_dropped"


def test_node_ineligible_when_it_starts_draining() -> None:
    s = busy_lan_submitter()
    s.hint("w-lan", body(device(0), leased=LEASED_0, lifecycle="draining"))
    decision = s.replan()
    assert decision.reason == "replan_node_ineligible"
    assert dict(decision.placement.rejected)["w-lan"][:2] == ("node_ineligible", "draining")


def test_node_ineligible_when_it_leaves_or_its_hint_goes_stale() -> None:
    s = busy_lan_submitter()
    s.state.depart(["w-lan"])  # the signed records say it left: its hint is gone
    assert s.replan().reason == "replan_node_ineligible"

    s = busy_lan_submitter()
    s.clock_ms += 31_000  # no word from w-lan for longer than the stale bound
    s.hint("w-ovl", body(device(0, total=16 * GIB)))
    assert s.replan().reason == "replan_node_ineligible"


def test_a_better_node_appears() -> None:
    s = busy_lan_submitter()
    s.hint("w-new", body(device(0, total=48 * GIB)))
    decision = s.replan()
    assert decision.reason == "replan_better_node"
    assert (decision.placement.where, decision.placement.node) == ("remote", "w-new")


def test_capacity_freed_on_the_awaited_node() -> None:
    s = busy_lan_submitter()
    s.hint("w-lan", body(device(0)))  # the other task's lease ended
    decision = s.replan()
    assert decision.reason == "replan_capacity_freed"
    assert (decision.placement.where, decision.placement.node) == ("remote", "w-lan")


def test_a_waiting_target_changes_only_for_a_strictly_better_one() -> None:
    s = busy_lan_submitter()
    # A busy overlay node could serve once free: not better than the LAN one awaited.
    s.hint("w-ovl", body(device(0), leased=LEASED_0))
    decision = s.replan()
    assert (decision.replan, decision.placement.waiting_for) == (False, "w-lan")
    # A busy LAN node with less load is: wait for it instead.
    s.hint("w-lan", body(device(0), leased=LEASED_0, running_tasks=2))
    s.hint("w-lan2", body(device(0), leased=LEASED_0, running_tasks=0))
    decision = s.replan()
    assert decision.reason == "replan_better_node"
    assert decision.placement.waiting_for == "w-lan2"


def test_a_task_waiting_for_nothing_gets_a_target_when_capacity_appears() -> None:
    s = Submitter()
    s.hint("w-ovl", body(device(0, total=16 * GIB)))
    s.queue()
    assert s.waiting_for is None
    assert s.replan().replan is False
    s.hint("w-lan", body(device(0), leased=LEASED_0))
    decision = s.replan()
    assert (decision.reason, decision.placement.waiting_for) == ("replan_better_node", "w-lan")


def test_every_step_of_a_sequence_is_explained() -> None:
    """Hints drop and return; each decision carries its code, and the task ends placed."""
    s = busy_lan_submitter()
    steps = [
        ("w-lan", body(device(0, ecc_errors=1), leased=LEASED_0), "replan_capacity_dropped"),
        ("w-lan2", body(device(0), leased=LEASED_0), "replan_better_node"),
        (
            "w-lan2",
            body(device(0), leased=LEASED_0, lifecycle="cordoned"),
            "replan_node_ineligible",
        ),
        ("w-lan", body(device(0)), "replan_better_node"),
    ]
    for node, b, reason in steps:
        s.hint(node, b)
        assert s.replan().reason == reason, node
    assert s.replan().placement.node == "w-lan"
    assert Hlc(NOW, 0) < s.state.get("w-lan").version  # type: ignore[union-attr]
