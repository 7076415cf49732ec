"""Hints signed from a real probe: the replayed H100 capture, eight GPUs on one node."""

from __future__ import annotations

from pathlib import Path

import trio
from gpu import gpu_variants as v

from enrollment.hints import MAX_HINT_CHARS
from enrollment.keys import generate_key
from populi_peer.core.gossip import GossipSettings, GossipState
from populi_peer.core.hints import HintBody, next_hint_version
from populi_peer.core.hlc import Hlc
from populi_peer.gpu import gpu_summary, open_probe
from populi_peer.signed_hints import hint_verifier, sign_hint_record
from populi_peer.testing import VirtualClock
from support.hints import allocations

NOW = 1_700_000_000_000


async def test_an_eight_gpu_hint_fits_the_bounds_and_reads_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = v.write(tmp_path, v.eight_gpus(v.capture(v.LOAD)))
    async with open_probe(fixture=path, node_id="n-x", clock=VirtualClock()) as probe:
        inventory = await probe.probe()
    allocs = allocations(inventory)
    body = HintBody(
        lifecycle="active",
        roles=("worker",),
        accepts_remote_work=True,
        addresses=("10.0.0.7:7443",),
        gpu=gpu_summary(inventory, allocs, advertised={"zone": "rack"}),
    )
    key = generate_key()
    record = sign_hint_record(
        key, version=next_hint_version(Hlc(0, 0), NOW), issued_ms=NOW, body=body
    )
    # About 5 KiB: a 64 KiB message carries a dozen such nodes, and one always fits.
    assert 2_000 < record.size < 8_000 < MAX_HINT_CHARS <= GossipSettings().max_message_bytes
    state = GossipState("me")
    result = state.merge(
        [record.text], now_wall_ms=NOW, verify=hint_verifier(lambda n: key.public_key())
    )
    assert result.changed == (record.node_id,)
    gpus = state.records[record.node_id].body.gpus
    assert len(gpus) == 8
    assert {g.name for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(g.memory_free_bytes and g.verified for g in gpus)
