"""Placement v2: what a task needs (GPUs, free memory, model, labels), scope, health and
load preferences, and a reason for every rejected node — on candidates built from hints."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.hints import HintBody, HintRecord
from populi_peer.core.hlc import Hlc
from populi_peer.core.placement import (
    REJECTION_ORDER,
    CandidateView,
    Placement,
    TaskView,
    candidate_from_hint,
    check_gpu_model,
    gpu_model_matches,
    parse_size,
    propose,
)
from populi_peer.core.policy import Scope
from populi_peer.errors import BadRequest
from populi_peer.gpu import GpuDevice
from support.hints import GB, GIB, H100, RTX4090, T4, body, device

NOW = 1_700_000_000_000
LOCAL = "me"
OPEN_GATES = frozenset({("training", "overlay"), ("inference", "overlay")})


def hint(node: str, b: HintBody, *, issued_ms: int = NOW) -> HintRecord:
    return HintRecord(node, Hlc(issued_ms, 0), issued_ms, b, f"text-{node}")


def cand(node: str, b: HintBody, scope: Scope = "lan", **kw: int) -> CandidateView:
    return candidate_from_hint(hint(node, b, **kw), scope=scope, now_wall_ms=NOW)


def place(task: TaskView, *candidates: CandidateView) -> Placement:
    return propose(
        task, candidates, remote_enabled=True, local_node=LOCAL, gates_enabled=OPEN_GATES
    )


def task(gpus: int = 1, **kw: object) -> TaskView:
    return TaskView("training", gpus_wanted=gpus, **kw)  # type: ignore[arg-type]


# -- the acceptance cases of issue 15 ---------------------------------------------------


def test_a_40_gb_task_skips_a_16_gb_card() -> None:
    small = cand("small", body(device(0, name=T4, total=16 * GIB, free=15 * GIB)), "local")
    big = cand("big", body(device(0, total=80 * GIB, free=79 * GIB)), "overlay")
    p = place(task(gpu_mem_bytes=parse_size("40G")), small, big)
    assert (p.where, p.node) == ("remote", "big")
    assert p.gpus == ("GPU-00000000-0000-0000-0000-000000000000",)
    assert dict(p.rejected) == {"small": ("gpu_mem_insufficient",)}
    # Without the memory need the nearer 16 GB card wins.
    assert place(task(), small, big).node == "small"


def test_free_memory_counts_not_total_memory() -> None:
    busy = cand("busy", body(device(0, total=80 * GIB, free=30 * GIB)))
    p = place(task(gpu_mem_bytes=40 * GB), busy)
    assert p.where == "local"
    assert p.reasons == ("no_remote_candidate", "gpu_mem_insufficient")


def test_a_model_pattern_is_honoured() -> None:
    h100 = cand("h100", body(device(0, name=H100)))
    rtx = cand("rtx", body(device(0, name=RTX4090, total=24 * GIB)))
    p = place(task(gpu_model="*4090"), h100, rtx)
    assert p.node == "rtx"
    assert dict(p.rejected) == {"h100": ("gpu_model_mismatch",)}
    p = place(task(gpu_model="h100"), h100, rtx)
    assert p.node == "h100"
    assert dict(p.rejected) == {"rtx": ("gpu_model_mismatch",)}
    p = place(task(gpu_model="A100"), h100, rtx)
    assert p.reasons == ("no_remote_candidate", "gpu_model_mismatch")


def test_a_lan_node_wins_over_an_overlay_node() -> None:
    lan = cand("z-lan", body(device(0), running_tasks=3))
    overlay = cand("a-overlay", body(device(0), device(1), device(2)), "overlay")
    p = place(task(), overlay, lan)
    assert (p.node, p.reasons) == ("z-lan", ("nearest_scope", "scope_lan"))
    assert p.rejected == ()


def test_every_rejection_carries_its_reason() -> None:
    candidates = [
        cand("a-draining", body(device(0), lifecycle="draining")),
        cand("b-stale", body(device(0)), issued_ms=NOW - 60_000),
        cand("c-not-worker", body(device(0), roles=("submit",))),
        cand("d-remote-off", body(device(0), accepts_remote_work=False)),
        cand("e-no-gpu", body()),
        cand(
            "f-busy",
            body(device(0), leased=frozenset({"GPU-00000000-0000-0000-0000-000000000000"})),
        ),
        cand("g-foreign", body(device(0, foreign=True))),
        cand("h-small", body(device(0, name=H100, total=16 * GIB))),
        cand("i-model", body(device(0, name=RTX4090))),
        cand("j-label", body(device(0), advertised={"zone": "lab"})),
        cand("k-unhealthy", body(device(0, ecc_errors=2))),
    ]
    need = task(gpu_mem_bytes=40 * GB, gpu_model="H100", labels={"zone": "desk"})
    p = place(need, *candidates)
    assert p.where == "local"
    rejected = dict(p.rejected)
    assert set(rejected) == {c.node_id for c in candidates}
    assert all(codes for codes in rejected.values())
    assert rejected["a-draining"] == ("node_ineligible", "draining", "label_mismatch")
    assert rejected["b-stale"] == ("node_ineligible", "hint_stale", "label_mismatch")
    assert rejected["c-not-worker"][:2] == ("node_ineligible", "not_a_worker")
    assert rejected["d-remote-off"][:2] == ("node_ineligible", "remote_off_on_node")
    assert rejected["e-no-gpu"] == ("label_mismatch", "no_free_gpu")
    assert rejected["f-busy"] == ("label_mismatch", "no_free_gpu")
    assert rejected["g-foreign"] == ("label_mismatch", "no_free_gpu")
    assert rejected["h-small"] == ("label_mismatch", "gpu_mem_insufficient")
    assert rejected["i-model"] == ("label_mismatch", "gpu_model_mismatch")
    assert rejected["j-label"] == ("label_mismatch",)
    assert rejected["k-unhealthy"] == ("label_mismatch", "no_free_gpu")
    # The aggregate lists each distinct code once, in the documented order.
    assert p.reasons[0] == "no_remote_candidate"
    assert list(p.reasons[1:]) == sorted(p.reasons[1:], key=REJECTION_ORDER.index)
    # What `populi task show` lists.
    assert p.to_json()["rejected"]["h-small"] == ["label_mismatch", "gpu_mem_insufficient"]


# -- labels: constraints, never capacity ------------------------------------------------


def test_labels_constrain_and_never_add_capacity() -> None:
    desk = cand("desk", body(device(0), advertised={"zone": "desk", "count": "4"}))
    p = place(task(labels={"zone": "desk"}), desk)
    assert p.node == "desk"
    # The label says four GPUs; the probe verified one: one it is.
    p = place(task(2, labels={"zone": "desk"}), desk)
    assert dict(p.rejected) == {"desk": ("no_free_gpu",)}


def test_advertised_pseudo_gpus_never_satisfy_memory_or_model() -> None:
    pseudo = cand(
        "cpu-box",
        body(advertised={"count": "1", "model": "RTX 4090"}, trust_advertised=True),
    )
    assert place(task(), pseudo).node == "cpu-box"  # trusted: a plain GPU count may use it
    p = place(task(gpu_model="4090", gpu_mem_bytes=GB), pseudo)
    assert dict(p.rejected) == {"cpu-box": ("gpu_model_unverified", "gpu_mem_unknown")}


def test_needs_without_per_gpu_facts_cannot_be_judged() -> None:
    counted = CandidateView("w1", eligible=True, free_gpus=4, scope="lan")
    assert place(task(), counted).node == "w1"
    p = place(task(gpu_mem_bytes=GB), counted)
    assert dict(p.rejected) == {"w1": ("gpu_facts_unknown",)}


# -- preferences ------------------------------------------------------------------------


def test_health_then_load_then_utilisation_decide_between_equals() -> None:
    healthy = cand("z-healthy", body(device(0)))
    degraded = cand("a-degraded", body(device(0, throttle_mask=0x20)))
    assert place(task(), degraded, healthy).reasons == ("healthiest_gpus", "scope_lan")
    loaded = cand("a-loaded", body(device(0), running_tasks=2))
    idle = cand("z-idle", body(device(0), running_tasks=0))
    p = place(task(), loaded, idle)
    assert (p.node, p.reasons) == ("z-idle", ("least_loaded", "scope_lan"))
    hot = cand("a-hot", body(device(0, util=40)))
    cold = cand("z-cold", body(device(0, util=0)))
    assert place(task(), hot, cold).reasons == ("least_utilized", "scope_lan")


def test_the_gpus_chosen_are_those_that_fit_best() -> None:
    node = cand(
        "mixed",
        body(
            device(0, name=T4, total=16 * GIB),
            device(1, throttle_mask=0x20),
            device(2),
            device(3, util=50),
        ),
    )
    p = place(task(2, gpu_mem_bytes=40 * GB), node)
    assert p.gpus == (
        "GPU-00000002-0000-0000-0000-000000000000",
        "GPU-00000003-0000-0000-0000-000000000000",
    )


# -- patterns and sizes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("H100", H100, True),
        ("h100 80gb", H100, True),
        ("h100  80GB", H100, True),
        ("A100", H100, False),
        ("*4090", RTX4090, True),
        ("*4090", "NVIDIA GeForce RTX 4090 D", False),
        ("*RTX 40?0", RTX4090, True),
        ("NVIDIA*", T4, False),
        ("A100, H100", H100, True),
        ("tesla t[0-9]", T4, True),
    ],
)
def test_gpu_model_patterns(pattern: str, name: str, matches: bool) -> None:
    assert gpu_model_matches(check_gpu_model(pattern), name) is matches


@pytest.mark.parametrize("pattern", ["", "   ", "a,,b", "x" * 129, "H100\n", "Ĥ100"])
def test_bad_gpu_model_patterns(pattern: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_gpu_model(pattern)
    assert info.value.code == "bad_gpu_model"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("40G", 40 * 10**9),
        ("40GB", 40 * 10**9),
        ("40 gb", 40 * 10**9),
        ("40GiB", 40 * 2**30),
        ("16000MiB", 16000 * 2**20),
        ("1.5T", 15 * 10**11),
        ("1024", 1024),
        ("512k", 512_000),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "40 GB x", "4e9", "40Gi B"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_size(text)
    assert info.value.code == "bad_size"


def test_task_needs_are_checked() -> None:
    with pytest.raises(BadRequest):
        TaskView("training", gpus_wanted=0, gpu_mem_bytes=GB)
    with pytest.raises(BadRequest) as refused:
        TaskView("training", gpus_wanted=1, gpu_mem_bytes=0)
    assert (refused.value.code, refused.value.details) == (
        "bad_request",
        {"field": "gpu_mem_bytes"},
    )
    with pytest.raises(BadRequest):
        TaskView("training", gpus_wanted=1, labels={"zone": 1})  # type: ignore[dict-item]
    with pytest.raises(BadRequest):
        CandidateView("w", eligible=True, free_gpus=2, scope="lan", gpus=body(device(0)).gpus)


# -- properties -------------------------------------------------------------------------

gpu_devices = st.builds(
    lambda i, name, total_gib, free_pct, util, throttle, foreign: device(
        i,
        name=name,
        total=total_gib * GIB,
        free=total_gib * GIB * free_pct // 100,
        util=util,
        throttle_mask=throttle,
        foreign=foreign,
    ),
    st.just(0),
    st.sampled_from([H100, RTX4090, T4]),
    st.sampled_from([16, 24, 80]),
    st.integers(0, 100),
    st.integers(0, 100),
    st.sampled_from([0, 0x20]),
    st.booleans(),
)
nodes = st.lists(
    st.tuples(
        st.lists(gpu_devices, max_size=3),
        st.sampled_from(["local", "lan", "overlay"]),
        st.sampled_from(["active", "active", "draining"]),
        st.integers(0, 3),
    ),
    max_size=5,
)


@given(
    nodes,
    st.integers(1, 2),
    st.sampled_from([None, 20 * GB, 60 * GB]),
    st.sampled_from([None, "H100", "*4090", "T4,H100"]),
)
def test_a_fit_satisfies_every_need_and_every_other_node_has_a_reason(
    spec: list[tuple[list[GpuDevice], str, str, int]],
    gpus: int,
    mem: int | None,
    model: str | None,
) -> None:
    candidates = []
    for i, (devices, scope, lifecycle, load) in enumerate(spec):
        devs = [replace(d, index=k, uuid=f"GPU-{i}-{k}") for k, d in enumerate(devices)]
        b = body(*devs, lifecycle=lifecycle, running_tasks=load)
        candidates.append(cand(f"n{i}", b, scope))  # type: ignore[arg-type]
    need = task(gpus, gpu_mem_bytes=mem, gpu_model=model)
    p = place(need, *candidates)
    rejected = dict(p.rejected)
    assert all(rejected.values())
    if p.where == "remote":
        chosen = next(c for c in candidates if c.node_id == p.node)
        assert p.node not in rejected
        assert chosen.eligible and len(p.gpus) == gpus
        for uuid in p.gpus:
            g = next(g for g in chosen.gpus or () if g.uuid == uuid)
            assert g.allocatable
            assert mem is None or (g.memory_free_bytes or 0) >= mem
            assert model is None or gpu_model_matches(model, g.name or "")
        others = [c for c in candidates if c.node_id not in rejected]
        assert all(
            ("local", "lan", "overlay").index(chosen.scope)
            <= ("local", "lan", "overlay").index(c.scope)
            for c in others
        )
    else:
        assert set(rejected) == {c.node_id for c in candidates}
