"""Replays after a restart, with a real agent process: a captured operator request is
refused (401 signature_replayed) once the control plane has restarted, and nothing is
written. Each request is captured exactly as it went on the wire (headers and body) and
sent again byte for byte."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from support.mesh import identity_of
from support.procs import Processes

pytestmark = pytest.mark.e2e


def durable(data_dir: Path) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{data_dir / 'populi.db'}?mode=ro", uri=True, timeout=30)
    try:
        return {
            "tokens": conn.execute("SELECT COUNT(*) FROM join_tokens").fetchone()[0],
            "events": conn.execute("SELECT COUNT(*) FROM events").fetchone()[0],
            "registers": sorted(conn.execute("SELECT node_id, body FROM registers").fetchall()),
            "settings": conn.execute(
                "SELECT serial, text FROM cluster_records WHERE kind = 'settings'"
            ).fetchone(),
        }
    finally:
        conn.close()


def test_captured_operator_requests_replayed_after_a_restart_are_refused(
    tmp_path: Path, procs: Processes
) -> None:
    cp = tmp_path / "cp"
    agent = procs.init_and_start(cp)
    identity = identity_of(cp)
    assert identity.operator is not None
    captured: list[httpx.Request] = []

    def capture(request: httpx.Request) -> None:
        captured.append(request)

    verify = client_context(identity.paths.ca_cert)
    auth = SignedAuth(identity.operator, agent.node_id, SystemClock())
    with httpx.Client(
        base_url=agent.url, verify=verify, timeout=15, event_hooks={"request": [capture]}
    ) as client:
        answers = [
            client.post("/v1/populi/admin/tokens", json={"ttl_s": 3600}, auth=auth),
            client.post("/v1/populi/admin/nodes/cp/cordon", json={"reason": "x"}, auth=auth),
            client.post(
                "/v1/populi/admin/settings",
                json={"changes": {"remote_exec_enabled": True}},
                auth=auth,
            ),
        ]
        # The path, headers and body as sent (the signature covers the path, not the
        # authority: the restarted agent listens on a new port).
        wire = [
            (r.method, r.url.raw_path.decode(), list(r.headers.multi_items()), r.content)
            for r in captured
        ]
        # Undo the effects, so that a replay that got through would show.
        answers += [
            client.post("/v1/populi/admin/nodes/cp/resume", auth=auth),
            client.post(
                "/v1/populi/admin/settings",
                json={"changes": {"remote_exec_enabled": False}},
                auth=auth,
            ),
        ]
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]

    assert procs.stop(agent) == 0
    agent = procs.start_agent(cp)
    before = durable(cp)
    with httpx.Client(verify=verify, timeout=15) as client:
        for method, path, sent, content in wire:
            headers = [(k, v) for k, v in sent if k.lower() != "host"]
            url = agent.url + path
            again = client.send(httpx.Request(method, url, headers=headers, content=content))
            assert again.status_code == 401, f"{url}: {again.status_code} {again.text}"
            assert again.json()["error"]["code"] == "signature_replayed", again.text
    assert durable(cp) == before
    status = json.loads(
        httpx.get(
            agent.url + "/v1/populi/status",
            verify=verify,
            auth=SignedAuth(identity.operator, agent.node_id, SystemClock()),
        ).text
    )
    assert status["lifecycle"]["state"] == "active"
