"""Joins on loopback with real processes, real TLS and real SQLite (issue 10).

- A man in the middle (item 1): a retired node's certificate still chains to the cluster
  CA, so an impostor that holds one and answers on the control plane's address passes the
  CA pin. ``populi join`` must notice that the node it reached is not one its token names,
  say so in one line and exit 4, having sent nothing but a GET of the public CA
  certificate; the token then still works at the real control plane.
- A full disk (item 2): the control plane's data directory on a small tmpfs, filled. The
  join is refused in one line (503 ``storage_unavailable`` on the wire), the control plane
  keeps running and knows nothing of the joiner; once space is back the same token joins
  exactly one node.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from populi_peer.api.app import ApiApp, Request, Response, Route
from populi_peer.api.server import hypercorn_config, serve_api
from populi_peer.clock import SystemClock
from support.apps import open_routes_app
from support.disk import fill, small_tmpfs
from support.mesh import meta_of
from support.procs import POPULI, Processes, init, one_line, populi

pytestmark = pytest.mark.e2e


def _token(cp: Path, *args: str) -> str:
    out = populi("token", "create", "--data-dir", str(cp), "--json", *args, check=True).stdout
    return str(json.loads(out)["token"])


def _join_args(token: str, data_dir: Path, name: str) -> list[str]:
    return ["join", token, "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--name", name]


class _Recorder:
    """An ASGI wrapper that keeps every request it is sent: method, path, headers, body."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        headers = b"\n".join(k + b": " + v for k, v in scope.get("headers", []))

        async def recording_receive() -> dict[str, Any]:
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        try:
            await self.app(scope, recording_receive, send)
        finally:
            self.requests.append(
                (scope["method"], scope["path"], headers + b"\n\n" + b"".join(chunks))
            )


def _impostor_app(ca_pem: str, cluster_id: str, claims_to_be: str) -> ApiApp:
    """What an impostor would answer: the real CA, and a challenge that names the control
    plane (a lie the joiner must not need to believe)."""

    async def ca(request: Request) -> Response:
        return Response(200, {"cluster_id": cluster_id, "ca_certificate": ca_pem})

    async def challenge(request: Request) -> Response:
        return Response(
            200,
            {
                "challenge": "c" * 43,
                "node_id": claims_to_be,
                "cluster_id": cluster_id,
                "expires_in_s": 120,
            },
        )

    async def enroll(request: Request) -> Response:
        return Response(500, {"error": {"code": "captured", "message": "thanks"}})

    clock = SystemClock()
    return open_routes_app(
        [
            Route("GET", "/v1/populi/join/ca", ca, roles=None),
            Route("POST", "/v1/populi/join/challenge", challenge, roles=None),
            Route("POST", "/v1/populi/join/enroll", enroll, roles=None),
        ],
        clock=clock,
        node_id=claims_to_be,
    )


def test_an_impostor_with_a_retired_nodes_certificate_receives_nothing(
    tmp_path: Path, procs: Processes, free_tcp_port: int
) -> None:
    port = free_tcp_port
    cp = tmp_path / "cp"
    init(cp, "--listen", f"127.0.0.1:{port}")
    agent = procs.start_agent(cp)
    cp_id = agent.node_id
    w1 = tmp_path / "w1"
    populi(*_join_args(_token(cp), w1, "w1"), check=True)
    populi("node", "retire", "w1", "--data-dir", str(cp), check=True)
    w1_id = meta_of(w1, "node_id")
    token = _token(cp)
    procs.stop(agent)

    # The retired node's key and certificate, on the control plane's address.
    recorder = _Recorder(
        _impostor_app(
            (cp / "tls" / "ca.crt").read_text(), meta_of(cp, "cluster_id"), claims_to_be=cp_id
        )
    )

    async def main() -> tuple[int, str]:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_api,
                recorder,
                hypercorn_config(
                    host="127.0.0.1",
                    port=port,
                    certfile=w1 / "tls" / "node.crt",
                    keyfile=w1 / "keys" / "node.key",
                    keep_alive_max_requests=100,
                ),
                stop.wait,
            )
            with trio.fail_after(60):
                done = await trio.run_process(
                    [*POPULI, *_join_args(token, tmp_path / "victim", "victim")],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            stop.set()
        return done.returncode, done.stderr.decode()

    returncode, stderr = trio.run(main)
    assert returncode == 4, stderr
    assert one_line(stderr), stderr
    assert "man in the middle" in stderr
    assert w1_id in stderr and cp_id in stderr
    # Nothing but the public CA certificate was asked for: no challenge, no enroll.
    assert [(method, path) for method, path, _ in recorder.requests] == [
        ("GET", "/v1/populi/join/ca"),
        ("GET", "/v1/populi/join/ca"),
    ]
    envelope, secret = token.split(".")[1:]
    for _, _, raw in recorder.requests:
        assert secret.encode() not in raw and envelope.encode() not in raw
    assert not (tmp_path / "victim" / "populi.db").exists()

    # The real control plane is back on its address: the token was never spent.
    procs.start_agent(cp)
    joined = populi(*_join_args(token, tmp_path / "victim", "victim"))
    assert joined.returncode == 0, joined.stderr
    again = populi(*_join_args(token, tmp_path / "late", "late"))
    assert again.returncode == 4 and "token already used" in again.stderr


def test_a_join_refused_for_a_full_disk_leaves_nothing_and_the_token_works_once(
    tmp_path: Path, procs: Processes
) -> None:
    with small_tmpfs(tmp_path / "cp") as cp:
        agent = procs.init_and_start(cp)
        token = _token(cp)
        # Start the WAL afresh so that the next commit must grow it, then fill the disk.
        with sqlite3.connect(cp / "populi.db") as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = fill(cp)
        refused = populi(*_join_args(token, tmp_path / "w1", "w1"))
        assert refused.returncode == 125, refused.stderr
        assert one_line(refused.stderr)
        assert "could not record the join" in refused.stderr
        assert "token is unused" in refused.stderr
        assert not (tmp_path / "w1" / "populi.db").exists()
        assert agent.proc.poll() is None, agent.log()[-2000:]
        filler.unlink()
        nodes = json.loads(populi("nodes", "--data-dir", str(cp), "--json", check=True).stdout)
        assert [n["name"] for n in nodes["nodes"]] == ["cp"]
        listed = json.loads(
            populi("token", "list", "--data-dir", str(cp), "--json", check=True).stdout
        )
        assert [(t["uses_left"], t["used_by"]) for t in listed["tokens"]] == [(1, [])]
        populi(*_join_args(token, tmp_path / "w1", "w1"), check=True)
        again = populi(*_join_args(token, tmp_path / "w2", "w2"))
        assert again.returncode == 4 and "token already used" in again.stderr
        nodes = json.loads(populi("nodes", "--data-dir", str(cp), "--json", check=True).stdout)
        assert sorted(n["name"] for n in nodes["nodes"]) == ["cp", "w1"]
        procs.stop(agent)
