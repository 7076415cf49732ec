from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrollment.keys import generate_key, node_id_for
from populi_peer.core.hints import (
    GPU_HEALTH,
    HintBody,
    HintRecord,
    gpu_facts,
    hint_age_s,
    next_hint_version,
)
from populi_peer.core.hlc import Hlc
from populi_peer.errors import BadRequest
from populi_peer.gpu import Health
from populi_peer.signed_hints import hint_verifier, sign_hint_record
from support.hints import GIB, H100, T4, body, device, summary


def test_health_values_are_the_gpu_packages() -> None:
    assert set(GPU_HEALTH) == {h.value for h in Health}


def test_gpu_facts_read_the_heartbeat_summary() -> None:
    hint = body(
        device(0, util=7),
        device(1, name=T4, total=16 * GIB, free=15 * GIB, throttle_mask=0x20),
        device(2, foreign=True),
        leased=frozenset({"GPU-00000000-0000-0000-0000-000000000000"}),
        advertised={"zone": "desk"},
    )
    g0, g1, g2 = hint.gpus
    assert (g0.name, g0.memory_total_bytes, g0.utilization_gpu_pct) == (H100, 80 * GIB, 7)
    assert (g0.allocatable, g0.allocation_reasons) == (False, ("gpu_leased",))
    assert (g1.memory_free_bytes, g1.health, g1.allocatable) == (15 * GIB, "degraded", True)
    assert g1.health_reasons == ("throttle_sw_thermal",)
    assert (g2.allocatable, g2.allocation_reasons) == (False, ("gpu_in_use_foreign",))
    assert all(g.verified for g in hint.gpus)
    # Labels stay a separate layer: they are not facts of any GPU.
    assert dict(hint.labels) == {"zone": "desk"}


def test_trusted_labels_make_unverified_pseudo_devices_without_a_model() -> None:
    hint = body(advertised={"count": "1", "model": "RTX 4090"}, trust_advertised=True)
    (pseudo,) = hint.gpus
    assert (pseudo.verified, pseudo.allocatable, pseudo.name) == (False, True, None)
    assert hint.labels["model"] == "RTX 4090"
    assert hint.facts.cpu_only_reason == "no_gpus"


def test_metrics_of_a_device_missing_make_it_unknown() -> None:
    s = summary(device(0))
    s["metrics"]["devices"] = []
    (gpu,) = gpu_facts(s).devices
    assert (gpu.health, gpu.allocatable, gpu.memory_free_bytes) == ("unknown", False, None)


def test_body_round_trips_through_json_and_ignores_unknown_keys() -> None:
    hint = body(device(0), running_tasks=2)
    data = json.loads(json.dumps(hint.to_json()))
    data["future_field"] = {"x": 1}
    assert HintBody.from_json(data) == hint
    # An older node's body without the optional keys still reads.
    assert HintBody.from_json({"lifecycle": "draining"}).gpus == ()


@pytest.mark.parametrize(
    "patch",
    [
        {"lifecycle": "sleeping"},
        {"roles": "worker"},
        {"load": {"running_tasks": -1}},
        {"addresses": ["10.0.0.1 :1"]},
        {"addresses": ["a"] * 17},
        {"gpu": []},
        {"gpu": {"static": {"devices": [{"index": "0"}]}}},
        {
            "gpu": {
                "static": {"devices": []},
                "metrics": {"devices": [{"index": 0, "health": "ok"}]},
            }
        },
        {"accepts_remote_work": "yes"},
    ],
)
def test_malformed_bodies_are_refused_with_one_code(patch: dict[str, object]) -> None:
    data = {**body(device(0)).to_json(), **patch}
    with pytest.raises(BadRequest) as info:
        HintBody.from_json(data)
    assert info.value.code == "hint_malformed"


def test_a_signed_hint_of_a_real_summary_round_trips() -> None:
    key = generate_key()
    record = sign_hint_record(
        key, version=Hlc(1_700_000_000_000, 3), issued_ms=1_700_000_000_000, body=body(device(0))
    )
    assert record.node_id == node_id_for(key.public_key())
    again = hint_verifier(lambda n: key.public_key())(record.text)
    assert again == record
    assert again.body.gpus[0].name == H100


def test_age_counts_from_issue_and_is_never_negative() -> None:
    record = HintRecord("n-a", Hlc(5_000, 0), 5_000, HintBody(lifecycle="active"), "t")
    assert hint_age_s(record, 7_500) == 2.5
    assert hint_age_s(record, 4_000) == 0


hlcs = st.builds(Hlc, st.integers(0, 2**45), st.integers(0, 1000))


@given(st.lists(st.tuples(hlcs, st.integers(0, 2**45)), min_size=1, max_size=20))
def test_versions_only_grow_across_restarts(steps: list[tuple[Hlc, int]]) -> None:
    """A node stamps from its persisted floor (raised by what gossip showed it), whatever
    its wall clock does: every version it publishes is above every earlier one."""
    persisted = Hlc(0, 0)
    published: list[Hlc] = []
    for seen_in_gossip, now_wall_ms in steps:
        # A restart may come between any two steps: only `persisted` survives it.
        floor = max(persisted, seen_in_gossip)
        version = next_hint_version(floor, now_wall_ms)
        persisted = version  # written before the record is signed and served
        assert version > floor
        assert all(version > earlier for earlier in published)
        published.append(version)
