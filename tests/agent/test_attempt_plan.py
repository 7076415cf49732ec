"""The stored form of an attempt's plan (the ``body`` of its attempt row)."""

from __future__ import annotations

from populi_peer.agent.attempts import AttemptPlan
from populi_peer.core.fencing import FencingToken


def _plan(**changes: object) -> AttemptPlan:
    fields: dict[str, object] = {
        "task_id": "t-1",
        "attempt": 2,
        "role": "worker",
        "submitter": "n-submitter",
        "token": FencingToken(3, 7),
        "lease_id": "L1",
        "ttl_s": 10.0,
        "renewable": True,
        "argv": ("python", "train.py"),
        "env": {"A": "1"},
        "gpus": ("GPU-a", "GPU-b"),
        "work_class": "training",
        "cwd": "/srv/work",
        "claim_id": "C1",
        "may_claim": True,
        "lease_attempt": 5,
    }
    fields.update(changes)
    return AttemptPlan(**fields)  # type: ignore[arg-type]


def test_a_plan_is_stored_with_its_keys_in_order() -> None:
    plan = _plan()
    assert list(plan.to_json().items()) == [
        ("task_id", "t-1"),
        ("attempt", 2),
        ("role", "worker"),
        ("submitter", "n-submitter"),
        ("token", "3.7"),
        ("lease_id", "L1"),
        ("ttl_s", 10.0),
        ("renewable", True),
        ("argv", ["python", "train.py"]),
        ("env", {"A": "1"}),
        ("gpus", ["GPU-a", "GPU-b"]),
        ("work_class", "training"),
        ("cwd", "/srv/work"),
        ("claim_id", "C1"),
        ("may_claim", True),
        ("lease_attempt", 5),
    ]
    assert AttemptPlan.from_json(plan.to_json()) == plan


def test_a_plan_writes_null_for_its_head_and_leaves_out_an_unset_tail() -> None:
    """``lease_id``, ``ttl_s`` and ``cwd`` are written as ``null``; ``claim_id``,
    ``may_claim`` and ``lease_attempt`` only when set (plans stored before them read the
    same)."""
    plan = _plan(
        lease_id=None,
        ttl_s=None,
        cwd=None,
        claim_id=None,
        may_claim=False,
        lease_attempt=None,
        role="local",
        renewable=False,
        gpus=(),
    )
    assert list(plan.to_json().items()) == [
        ("task_id", "t-1"),
        ("attempt", 2),
        ("role", "local"),
        ("submitter", "n-submitter"),
        ("token", "3.7"),
        ("lease_id", None),
        ("ttl_s", None),
        ("renewable", False),
        ("argv", ["python", "train.py"]),
        ("env", {"A": "1"}),
        ("gpus", []),
        ("work_class", "training"),
        ("cwd", None),
    ]
    assert AttemptPlan.from_json(plan.to_json()) == plan
