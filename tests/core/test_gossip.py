from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrollment.keys import generate_key, node_id_for
from populi_peer.core.gossip import (
    MAX_DIGEST_ENTRIES,
    DigestReply,
    DigestRequest,
    GossipSettings,
    GossipState,
    HintPush,
    first_round_delay_s,
    plan_round,
)
from populi_peer.core.hints import HintBody, HintRecord, next_hint_version
from populi_peer.core.hlc import Hlc
from populi_peer.errors import BadRequest, ConfigError
from populi_peer.signed_hints import hint_verifier, sign_hint_record
from support.hints import FakeSigner, body, device

NOW = 1_700_000_000_000
BIG = 1 << 20


def texts(*records: HintRecord) -> tuple[str, ...]:
    return tuple(r.text for r in records)


def held(state: GossipState) -> dict[str, str]:
    return {node: record.text for node, record in state.records.items()}


def exchange(a: GossipState, b: GossipState, verify, *, max_bytes: int = BIG) -> None:  # type: ignore[no-untyped-def]
    """One push-pull exchange, initiated by ``a``, through the wire forms."""
    request = DigestRequest.from_json(a.digest_request().to_json())
    reply = DigestReply.from_json(b.answer(request, max_bytes=max_bytes).to_json())
    a.merge(reply.records, now_wall_ms=NOW, verify=verify)
    push = a.push_for(reply, max_bytes=max_bytes)
    if push is not None:
        b.merge(HintPush.from_json(push.to_json()).records, now_wall_ms=NOW, verify=verify)


# -- merging ----------------------------------------------------------------------------


def test_merge_keeps_the_highest_version_and_says_what_changed() -> None:
    f = FakeSigner()
    state = GossipState("me")
    a1, a2, b1 = f.record("a", NOW - 10), f.record("a", NOW - 5), f.record("b", NOW - 7)
    result = state.merge(texts(a1, b1), now_wall_ms=NOW, verify=f.verify)
    assert (result.changed, result.stale, result.refused) == (("a", "b"), 0, ())
    result = state.merge(texts(a1, a2), now_wall_ms=NOW, verify=f.verify)
    assert (result.changed, result.stale) == (("a",), 1)
    result = state.merge(texts(a1), now_wall_ms=NOW, verify=f.verify)
    assert (result.changed, result.stale) == ((), 1)
    assert held(state) == {"a": a2.text, "b": b1.text}
    assert state.digest() == {"a": a2.version, "b": b1.version}


def test_garbage_is_refused_one_record_at_a_time() -> None:
    f = FakeSigner()
    state = GossipState("me")
    good = f.record("a", NOW)
    result = state.merge(["junk", good.text], now_wall_ms=NOW, verify=f.verify)
    assert result.changed == ("a",)
    assert [(r.node_id, r.code) for r in result.refused] == [(None, "hint_bad_signature")]


pool_signer = FakeSigner()
POOL = [
    pool_signer.record(node, NOW + wall, counter, tag=tag)
    for node in ("a", "b", "c")
    for wall in (0, 1)
    for counter in (0, 1)
    for tag in ("", "x")
]
batches = st.lists(st.sampled_from(POOL), max_size=8)


def merged(*groups: list[HintRecord]) -> dict[str, str]:
    state = GossipState("me")
    for group in groups:
        state.merge(texts(*group), now_wall_ms=NOW, verify=pool_signer.verify)
    return held(state)


@given(batches, batches)
def test_merge_is_commutative(x: list[HintRecord], y: list[HintRecord]) -> None:
    assert merged(x, y) == merged(y, x)
    assert merged(x + y) == merged(list(reversed(y + x)))


@given(batches, batches, batches)
def test_merge_is_associative(
    x: list[HintRecord], y: list[HintRecord], z: list[HintRecord]
) -> None:
    """Joining states (a state's records merged into another) groups any way."""
    yz = GossipState("me")
    yz.merge(texts(*y, *z), now_wall_ms=NOW, verify=pool_signer.verify)
    left = GossipState("me")
    left.merge(texts(*x), now_wall_ms=NOW, verify=pool_signer.verify)
    left.merge(list(held(yz).values()), now_wall_ms=NOW, verify=pool_signer.verify)
    assert held(left) == merged(x, y, z) == merged(x + y, z)


@given(batches)
def test_merge_is_idempotent(x: list[HintRecord]) -> None:
    state = GossipState("me")
    state.merge(texts(*x), now_wall_ms=NOW, verify=pool_signer.verify)
    before = held(state)
    again = state.merge(texts(*x), now_wall_ms=NOW, verify=pool_signer.verify)
    assert held(state) == before
    assert again.changed == ()
    assert again.stale == len(x)


# -- signatures: the real verifier ------------------------------------------------------


def test_a_forged_hint_is_refused_and_the_real_one_kept() -> None:
    key_a, key_b = generate_key(), generate_key()
    a, b = node_id_for(key_a.public_key()), node_id_for(key_b.public_key())
    keys = {a: key_a.public_key(), b: key_b.public_key()}
    verify = hint_verifier(keys.get)
    real = sign_hint_record(key_a, version=Hlc(NOW, 0), issued_ms=NOW, body=body(device(0)))
    state = GossipState("me")
    assert state.merge([real.text], now_wall_ms=NOW, verify=verify).changed == (a,)

    # Node B signs a "newer" hint about node A saying A has left and has no GPUs.
    from enrollment._sealed import _seal
    from enrollment.canonical import canonical_json
    from enrollment.hints import HINT_DOMAIN, HINT_PREFIX

    payload = {
        "v": 1,
        "node": a,
        "version": [NOW + 1000, 0],
        "issued_ms": NOW,
        "body": HintBody(lifecycle="left").to_json(),
    }
    forged = _seal(HINT_PREFIX, HINT_DOMAIN, key_b, canonical_json(payload))
    result = state.merge([forged], now_wall_ms=NOW, verify=verify)
    assert result.changed == ()
    assert [r.code for r in result.refused] == ["hint_forged"]
    assert state.get(a) == real

    # A node that is not a member (or was retired) cannot place a hint at all.
    outsider = sign_hint_record(
        generate_key(), version=Hlc(NOW, 0), issued_ms=NOW, body=HintBody(lifecycle="active")
    )
    result = state.merge([outsider.text], now_wall_ms=NOW, verify=verify)
    assert [r.code for r in result.refused] == ["hint_unknown_node"]


def test_a_hint_from_the_future_is_refused() -> None:
    f = FakeSigner()
    state = GossipState("me", max_skew_ms=1000)
    at_limit = f.record("a", NOW, issued_ms=NOW + 1000)
    beyond = f.record("b", NOW, issued_ms=NOW + 1001)
    result = state.merge(texts(at_limit, beyond), now_wall_ms=NOW, verify=f.verify)
    assert result.changed == ("a",)
    assert [(r.node_id, r.code) for r in result.refused] == [("b", "hint_clock_skew")]


# -- departed nodes and restarts --------------------------------------------------------


def test_departed_nodes_are_refused_by_identity_and_not_spread_again() -> None:
    f = FakeSigner()
    x = f.record("x", NOW)
    me, lagging = GossipState("me"), GossipState("lag")
    for state in (me, lagging):
        state.merge(texts(x), now_wall_ms=NOW, verify=f.verify)
    # This node's signed records say x left: its hint goes, and stays gone.
    assert me.depart(["x"]) == ("x",)
    assert me.get("x") is None
    # The lagging peer still holds it and would push it back in an exchange, both ways.
    exchange(me, lagging, f.verify)
    exchange(lagging, me, f.verify)
    assert me.get("x") is None
    assert "x" not in me.wanted(lagging.digest())
    result = me.merge(texts(f.record("x", NOW + 50)), now_wall_ms=NOW, verify=f.verify)
    assert [(r.node_id, r.code) for r in result.refused] == [("x", "hint_node_departed")]
    assert me.departed == {"x"}


def test_a_restarted_node_replaces_its_record_and_leaves_no_ghost() -> None:
    f = FakeSigner()
    x = GossipState("x")
    old = f.record("x", NOW, tag="before")
    x.publish(old)
    peer, lagging = GossipState("p"), GossipState("l")
    exchange(peer, x, f.verify)
    exchange(lagging, x, f.verify)
    persisted = old.version

    # x restarts with its wall clock stepped back a minute; it stamps from its floor.
    x = GossipState("x")
    version = next_hint_version(persisted, NOW - 60_000)
    new = f.record("x", version.wall_ms, version.counter, issued_ms=NOW - 60_000, tag="after")
    x.publish(new)
    exchange(peer, x, f.verify)
    assert peer.get("x") == new
    # The lagging peer offers the old record back: it is older, nothing changes.
    exchange(lagging, peer, f.verify)
    assert peer.get("x") == new and lagging.get("x") == new
    assert list(peer.records) == ["x"]


def test_a_node_restored_from_an_old_backup_learns_its_floor() -> None:
    f = FakeSigner()
    newest = f.record("x", NOW + 500, 2)
    peer = GossipState("p")
    peer.merge(texts(newest), now_wall_ms=NOW, verify=f.verify)
    x = GossipState("x")
    x.publish(f.record("x", NOW, 0, tag="restored"))
    result = x.merge(texts(newest), now_wall_ms=NOW, verify=f.verify)
    assert result.own_newer == newest.version
    assert x.get("x").text.endswith("restored")  # type: ignore[union-attr]
    version = next_hint_version(result.own_newer, NOW)
    x.publish(f.record("x", version.wall_ms, version.counter, tag="republished"))
    exchange(peer, x, f.verify)
    assert peer.get("x").text.endswith("republished")  # type: ignore[union-attr]


def test_publish_takes_only_this_nodes_records_with_growing_versions() -> None:
    f = FakeSigner()
    state = GossipState("x")
    state.publish(f.record("x", NOW))
    with pytest.raises(BadRequest) as info:
        state.publish(f.record("x", NOW))
    assert info.value.code == "hint_version_not_newer"
    with pytest.raises(BadRequest):
        state.publish(f.record("y", NOW + 1))


# -- exchanges and the size bound -------------------------------------------------------


def test_one_exchange_converges_two_nodes() -> None:
    f = FakeSigner()
    a, b = GossipState("a"), GossipState("b")
    a.publish(f.record("a", NOW))
    b.publish(f.record("b", NOW))
    a.merge(texts(f.record("c", NOW + 2)), now_wall_ms=NOW, verify=f.verify)
    b.merge(texts(f.record("c", NOW + 1), f.record("d", NOW)), now_wall_ms=NOW, verify=f.verify)
    exchange(a, b, f.verify)
    assert held(a) == held(b)
    assert a.get("c").version == Hlc(NOW + 2, 0)  # type: ignore[union-attr]


def test_the_bound_sends_oldest_missing_first_and_leaves_the_rest() -> None:
    f = FakeSigner()
    source, sink = GossipState("s"), GossipState("k")
    records = [f.record(f"n{i}", NOW + 100) for i in range(6)]
    source.merge(texts(*records), now_wall_ms=NOW, verify=f.verify)
    # The sink holds n0..n3 at different (older) versions, and lacks n4, n5.
    sink.merge(
        texts(*(f.record(f"n{i}", NOW + 10 * (4 - i)) for i in range(4))),
        now_wall_ms=NOW,
        verify=f.verify,
    )
    size = records[0].size + 3
    batch = source.missing(sink.digest(), max_bytes=3 * size)
    assert batch.more
    # Absent first (n4, n5), then the oldest copy (n3 holds NOW + 10).
    assert batch.records == texts(records[4], records[5], records[3])
    assert batch.size_bytes == 3 * size
    # A single record larger than the bound still moves, alone.
    assert len(source.missing(sink.digest(), max_bytes=1).records) == 1


def test_no_record_starves_under_churn_and_a_small_bound() -> None:
    """The sink's copies age while they wait, so every record gets its turn."""
    f = FakeSigner()
    source, sink = GossipState("s"), GossipState("k")
    nodes = [f"n{i}" for i in range(12)]
    version = dict.fromkeys(nodes, NOW)
    source.merge(texts(*(f.record(n, version[n]) for n in nodes)), now_wall_ms=NOW, verify=f.verify)
    sink.merge(texts(*(f.record(n, NOW - 1) for n in nodes)), now_wall_ms=NOW, verify=f.verify)
    size = f.record("n0", NOW).size + 3
    for step in range(1, 30):
        # Three nodes republish every round: they are always missing at the sink.
        for n in nodes[:3]:
            version[n] = NOW + step
            source.merge(texts(f.record(n, version[n])), now_wall_ms=NOW, verify=f.verify)
        reply = source.answer(sink.digest_request(), max_bytes=2 * size)
        sink.merge(reply.records, now_wall_ms=NOW, verify=f.verify)
    for n in nodes[3:]:
        assert sink.get(n).version == Hlc(NOW, 0), n  # type: ignore[union-attr]


def test_push_answers_what_was_wanted_within_the_bound() -> None:
    f = FakeSigner()
    a = GossipState("a")
    records = [f.record(f"n{i}", NOW) for i in range(4)]
    a.merge(texts(*records), now_wall_ms=NOW, verify=f.verify)
    push = a.push_for(DigestReply((), ("n2", "zz", "n0", "n2")), max_bytes=BIG)
    assert push == HintPush(texts(records[2], records[0]))
    assert a.push_for(DigestReply((), ("zz",)), max_bytes=BIG) is None
    small = a.push_for(DigestReply((), ("n2", "n0")), max_bytes=1)
    assert small == HintPush(texts(records[2]), more=True)


# -- wire forms -------------------------------------------------------------------------


def test_wire_forms_round_trip() -> None:
    request = DigestRequest({"a": Hlc(5, 1)})
    assert request.to_json() == {"digest": {"a": [5, 1]}}
    assert DigestRequest.from_json(request.to_json()).digest == {"a": Hlc(5, 1)}
    reply = DigestReply(("t",), ("a",), True)
    assert DigestReply.from_json(reply.to_json()) == reply
    assert HintPush.from_json({"records": ["t"], "unknown": 1}) == HintPush(("t",))


@pytest.mark.parametrize(
    ("parse", "data"),
    [
        (DigestRequest.from_json, {"digest": {"a": [1]}}),
        (DigestRequest.from_json, {"digest": {"a": [1, -1]}}),
        (DigestRequest.from_json, {"digest": {"": [1, 0]}}),
        (DigestRequest.from_json, {"digest": [1]}),
        (
            DigestRequest.from_json,
            {"digest": {f"n{i}": [1, 0] for i in range(MAX_DIGEST_ENTRIES + 1)}},
        ),
        (DigestReply.from_json, {"records": [1], "want": []}),
        (DigestReply.from_json, {"records": [], "want": "a"}),
        (DigestReply.from_json, {"records": [], "want": [], "more": "no"}),
        (HintPush.from_json, {"records": "t"}),
        (HintPush.from_json, None),
    ],
)
def test_malformed_messages_are_one_clear_error(parse, data) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest):
        parse(data)


# -- rounds -----------------------------------------------------------------------------


def test_plan_round_picks_distinct_random_peers() -> None:
    peers = [f"n{i}" for i in range(10)]
    rng = random.Random(7)
    seen: set[str] = set()
    for _ in range(50):
        chosen = plan_round(peers + ["me"], self_id="me", fanout=3, rng=rng, exclude=["n9"])
        assert len(chosen) == len(set(chosen)) == 3
        assert "me" not in chosen and "n9" not in chosen
        seen.update(chosen)
    assert seen == set(peers) - {"n9"}
    assert plan_round(["me", "a"], self_id="me", fanout=3, rng=rng) == ("a",)
    # The same seed and the same peers, in any order, give the same plan.
    assert plan_round(peers, self_id="me", fanout=3, rng=random.Random(1)) == plan_round(
        list(reversed(peers)), self_id="me", fanout=3, rng=random.Random(1)
    )


def test_first_round_is_staggered_within_one_interval() -> None:
    rng = random.Random(3)
    delays = [first_round_delay_s(0.3, rng) for _ in range(100)]
    assert all(0 <= d < 0.3 for d in delays)
    assert max(delays) - min(delays) > 0.2


def test_settings_are_checked() -> None:
    assert GossipSettings().fanout == 3
    for bad in ({"round_interval_s": 0}, {"fanout": 0}, {"max_message_bytes": 10}):
        with pytest.raises(ConfigError):
            GossipSettings(**bad)  # type: ignore[arg-type]


def test_view_shows_hints_with_their_age() -> None:
    f = FakeSigner()
    state = GossipState("me")
    state.merge(
        texts(f.record("a", NOW, hint=body(device(0)), issued_ms=NOW - 4_000)),
        now_wall_ms=NOW,
        verify=f.verify,
    )
    (view,) = state.view(now_wall_ms=NOW)
    out = view.to_json()
    assert (out["node"], out["hint"], out["age_s"]) == ("a", True, 4.0)
    assert out["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert state.hint("a", now_wall_ms=NOW + 1000).age_s == 5.0  # type: ignore[union-attr]
    assert state.hint("zz", now_wall_ms=NOW) is None
    assert state.peers() == ("a",)
