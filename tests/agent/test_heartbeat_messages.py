"""The heartbeat exchange speaks typed messages at both ends (core/messages/heartbeat.py).

Sender: a control plane that answers a heartbeat with a malformed body (a field missing
or of the wrong type, a record that does not parse, not JSON at all) is an error for that
beat, ``bad_peer_answer`` naming the field, and the sender keeps beating; once the answers
are good again it is back. Here the control plane is played by a fake peer (it stands for
another host): it passes every request to the real control plane and spoils only the
heartbeat answers, as a buggy or hostile node of another version might.

Receiver: a malformed report is a 400 that names the field, before anything is applied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.core.messages import HeartbeatAnswer, HeartbeatReport
from populi_peer.errors import PeerError, PopuliError
from populi_peer.testing.cluster import VirtualCluster
from support.vcluster import heard_from, peer_client_as, vcluster

Spoil = Callable[[dict[str, Any]], Any]


class FakeControlPlane:
    """An ASGI app in front of the real control plane: heartbeat answers go through
    ``spoil`` (a function of the real answer's JSON: what to send instead; ``bytes`` are
    sent as they are), everything else passes untouched."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.spoil: Spoil | None = None
        self.spoiled = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        spoil = self.spoil
        if scope["type"] != "http" or scope["path"] != "/v1/populi/heartbeat" or spoil is None:
            await self.real(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.real(scope, receive, capture)
        changed = spoil(json.loads(b"".join(chunks)))
        body = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
        headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        self.spoiled += 1
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_fake(cluster: VirtualCluster, node: str) -> FakeControlPlane:
    """``node``'s requests to the control plane reach the fake from now on (the fake
    proves to be the control plane: it stands in for it on another host)."""
    cp = cluster.cp
    fake = FakeControlPlane(cp.app)
    cluster.network.register(node_id=cp.node_id, host="fake-cp.populi.test", app=fake)
    cluster.network.redirect(cluster[node].node_id, "cp.populi.test", "fake-cp.populi.test")
    return fake


def _without(key: str) -> Spoil:
    return lambda answer: {k: v for k, v in answer.items() if k != key}


def _with(key: str, value: Any) -> Spoil:
    return lambda answer: {**answer, key: value}


MALFORMED: list[tuple[str, Spoil, str]] = [
    ("no-term", _without("term"), "term"),
    ("term-bool", _with("term", True), "term"),
    ("control-plane-string", _with("control_plane", "cp"), "control_plane"),
    (
        "control-plane-url-number",
        _with("control_plane", {"node_id": "x", "url": 5}),
        "control_plane.url",
    ),
    (
        "lifecycle-unknown-state",
        _with("lifecycle", {"state": "flying", "since_wall_ms": 1, "actor": "op", "reason": ""}),
        "lifecycle.state",
    ),
    ("interval-text", _with("heartbeat_interval_s", "fast"), "heartbeat_interval_s"),
    ("interval-zero", _with("heartbeat_interval_s", 0), "heartbeat_interval_s"),
    ("scope-unknown", _with("scope", "moon"), "scope"),
    ("registers-not-list", _with("gpu_registers", {"a": 1}), "gpu_registers"),
    (
        "register-malformed",
        _with("gpu_registers", [{"node_id": "x"}]),
        "gpu_registers[0].attribute",
    ),
    ("revocations-number", _with("revocations", 7), "revocations"),
    ("list", lambda answer: [answer], ""),
    ("not-json", lambda answer: b"<html>bad gateway</html>", ""),
]


@pytest.mark.parametrize(("label", "spoil", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_a_malformed_heartbeat_answer_is_an_error_for_that_beat(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, label: str, spoil: Spoil, field: str
) -> None:
    async with vcluster(tmp_path, workers=1, on_response=None) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        sender = w1.heartbeat_sender
        await heard_from(cluster, "w1")
        fake = install_fake(cluster, "w1")
        fake.spoil = spoil
        with pytest.raises(PeerError) as raised:
            await sender.beat_once()
        error = raised.value
        assert error.code == "bad_peer_answer", str(error)
        assert cp.node_id in str(error) and "\n" not in str(error)
        if field:
            assert error.details.get("field") == field
            assert f"field {field.split('.', maxsplit=1)[0]}" in str(error).replace("'", "")
        # The loop meets the same answers: it reports the control plane unreachable and
        # keeps beating (backing off); the agent stays up.
        spoiled = fake.spoiled
        await cluster.wait_until(lambda: sender.cp_down and fake.spoiled > spoiled + 2)
        assert cluster.nodes["w1"].running and not sender.expelled
        # Good answers again: the same loop is back.
        fake.spoil = None
        beats = sender.beats
        await cluster.wait_until(lambda: not sender.cp_down and sender.beats > beats)
        assert isinstance(sender.last_answer, HeartbeatAnswer)
        assert sender.lifecycle is not None and sender.lifecycle.state == "active"


async def test_the_sender_sends_a_report_the_route_takes_and_reads_the_typed_answer(
    one_worker: tuple[VirtualCluster, Agent, Agent], autojump_clock: trio.testing.MockClock
) -> None:
    _, cp, w1 = one_worker
    answer = await w1.heartbeat_sender.beat_once()
    assert answer.term == cp.control_plane.term and answer.control_plane.node_id == cp.node_id
    assert answer.lifecycle is not None and answer.lifecycle.state == "active"
    seen = cp.heartbeats.seen[w1.node_id].report
    assert isinstance(seen, HeartbeatReport)
    assert seen.status == "running" and seen.addresses == ("w1.populi.test:443",)
    # What the sender builds is exactly what the route parsed.
    assert HeartbeatReport.from_json(w1.heartbeat_sender.payload().to_json()).status == "running"


BAD_REPORTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("status-unknown", {"status": "sleeping"}, "bad_request", "status"),
    ("addresses-not-list", {"addresses": "w1:443"}, "bad_request", "addresses"),
    ("addresses-nine", {"addresses": [f"w{i}:443" for i in range(9)]}, "bad_request", "addresses"),
    ("address-not-host-port", {"addresses": ["w1:port"]}, "bad_request", "addresses"),
    ("serial-text", {"revocation_serial": "3"}, "bad_request", "revocation_serial"),
    (
        "lease-token",
        {
            "leases": [
                {
                    "task_id": "t",
                    "attempt": 1,
                    "token": "01.2",
                    "lease_id": None,
                    "state": "running",
                }
            ]
        },
        "bad_fencing_token",
        "leases[0].token",
    ),
    (
        "lease-state",
        {
            "leases": [
                {"task_id": "t", "attempt": 1, "token": "1.2", "lease_id": None, "state": "done"}
            ]
        },
        "bad_request",
        "leases[0].state",
    ),
    (
        "gpu-device-index",
        {"gpu": {"facts_version": "f", "metrics": {"devices": [{"index": "0"}]}}},
        "bad_gpu_summary",
        "gpu.metrics",
    ),
    ("gpu-not-object", {"gpu": []}, "bad_request", "gpu"),
    (
        "register-malformed",
        {"registers": [{"node_id": "x"}]},
        "bad_request",
        "registers[0].attribute",
    ),
    ("exec-remote-text", {"exec_remote": "no"}, "bad_request", "exec_remote"),
]


@pytest.mark.parametrize(
    ("label", "changes", "code", "field"), BAD_REPORTS, ids=[b[0] for b in BAD_REPORTS]
)
async def test_a_malformed_report_is_refused_naming_the_field(
    one_worker: tuple[VirtualCluster, Agent, Agent],
    autojump_clock: trio.testing.MockClock,
    label: str,
    changes: dict[str, Any],
    code: str,
    field: str,
) -> None:
    cluster, cp, w1 = one_worker
    await cluster.crash("w1")  # from now on only this test speaks for w1
    before = cp.heartbeats.seen[w1.node_id]
    client = peer_client_as(cluster, w1)
    try:
        with pytest.raises(PopuliError) as raised:
            await client.call(
                url=cp.address.url,
                node_id=cp.node_id,
                method="POST",
                path="/v1/populi/heartbeat",
                payload={"status": "running", **changes},
                answer=HeartbeatAnswer,
            )
    finally:
        await client.aclose()
    error = raised.value
    assert (error.details.get("http_status"), error.code) == (400, code), str(error)
    assert error.details.get("field") == field, error.details
    assert cp.heartbeats.seen[w1.node_id] is before  # nothing applied
