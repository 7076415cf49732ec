"""Enrollment end to end on loopback: real agents, real TLS, real SQLite."""

from __future__ import annotations

import json
import secrets
import signal
import time
from pathlib import Path

import httpx
import pytest
import trio

from enrollment.ca import cert_to_pem, make_ca_certificate, make_node_certificate
from enrollment.keys import generate_key, node_id_for, write_private_key
from populi_peer.api.app import Request, Response, Route
from populi_peer.api.client import SignedAuth
from populi_peer.api.server import hypercorn_config, serve_api
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from populi_peer.errors import RefusedError
from populi_peer.joining import join_cluster
from support.apps import open_routes_app
from support.mesh import Mesh, identity_of
from support.procs import Processes, create_token, join_node, one_line, populi
from support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_three_real_agents_show_in_nodes(tmp_path: Path) -> None:
    mesh = Mesh.create(tmp_path, cpu_nodes=["w1", "w2"], remote=False)
    try:
        nodes, _ = wait_for(
            "three fresh nodes",
            lambda: (
                (view := mesh.nodes_view())
                and sum(
                    n["heartbeat_age_ms"] is not None and not n["heartbeat_stale"]
                    for n in view.values()
                )
                == 3
                and view
            ),
            guard_s=30,
            every_s=0.2,
        )
        assert sorted(nodes) == ["cp", "w1", "w2"]
        assert all(n["state"] == "active" for n in nodes.values())
        # The joined nodes' own view: status over their own TLS endpoint, signed by them.
        w1 = json.loads(mesh.cli("w1", "status", "--json").stdout)
        assert w1["control_plane"]["reachable"] is True
    finally:
        mesh.close()


def test_twenty_concurrent_real_joins_one_wins(tmp_path: Path, procs: Processes) -> None:
    cp = tmp_path / "cp"
    procs.init_and_start(cp, env={"POPULI_SECURITY__JOIN_RATE_PER_MIN": "0"})
    token = create_token(cp)
    outcomes: list[str] = []

    async def attempt(index: int) -> None:
        try:
            await join_cluster(
                token,
                data_dir=tmp_path / f"j{index}",
                name=f"j{index}",
                listen="127.0.0.1:0",
                advertise=[],
                clock=SystemClock(),
            )
            outcomes.append("ok")
        except RefusedError as exc:
            outcomes.append(exc.code)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(attempt, index)

    trio.run(main)
    assert outcomes.count("ok") == 1, outcomes
    assert outcomes.count("token_already_used") == 19, outcomes
    second = populi(
        "join",
        token,
        "--data-dir",
        str(tmp_path / "late"),
        "--listen",
        "127.0.0.1:0",
        "--name",
        "late",
    )
    assert second.returncode == 4
    assert one_line(second.stderr) and "token already used" in second.stderr


def test_revoked_signer_is_refused_on_an_open_keep_alive_connection(
    tmp_path: Path, procs: Processes
) -> None:
    cp = tmp_path / "cp"
    cp_agent = procs.init_and_start(cp)
    join_node(create_token(cp), tmp_path / "w1", "w1")
    w1 = identity_of(tmp_path / "w1")
    with httpx.Client(verify=client_context(w1.paths.ca_cert), timeout=10) as client:
        auth = SignedAuth(w1.node_credential, cp_agent.node_id, SystemClock())
        first = client.get(cp_agent.url + "/v1/populi/status", auth=auth)
        assert first.status_code == 200
        populi("node", "retire", "w1", "--data-dir", str(cp), check=True)
        second = client.get(cp_agent.url + "/v1/populi/status", auth=auth)
        assert second.status_code == 401
        # Same TCP connection: httpx reused it (one connection in the pool).
        assert len(client._transport._pool.connections) == 1  # type: ignore[attr-defined]


def test_cli_refusals_are_one_line_exit_4(tmp_path: Path, procs: Processes) -> None:
    cp = tmp_path / "cp"
    procs.init_and_start(cp)
    for args in (
        ["node", "cordon", "nope"],
        ["node", "retire", "nope"],
        ["node", "quarantine", "cp"],
        ["node", "drain", "cp"],  # quarantined -> drain is illegal
        ["token", "revoke", "0" * 32],
        ["node", "unretire", "never-retired"],
        ["lease", "revoke", "0" * 32],
    ):
        result = populi(*args, "--data-dir", str(cp))
        if args[:2] == ["node", "quarantine"]:
            assert result.returncode == 0, result.stderr
            continue
        assert result.returncode == 4, (args, result.stderr)
        assert one_line(result.stderr), result.stderr
    usage = populi("token", "create", "--ttl", "25h", "--data-dir", str(cp))
    assert usage.returncode == 2 and one_line(usage.stderr)
    minted = json.loads(
        populi("token", "create", "--json", "--data-dir", str(cp), check=True).stdout
    )
    listed = json.loads(populi("token", "list", "--json", "--data-dir", str(cp), check=True).stdout)
    assert [t["token_id"] for t in listed["tokens"]] == [minted["summary"]["token_id"]]
    assert minted["token"] not in json.dumps(listed)  # the list holds no secrets


def _fake_ca_server(tmp_path: Path) -> tuple[Path, Path, str]:
    """Key and certificate of a node of a *different* CA."""
    other_root = generate_key()
    now = time.time()
    ca = make_ca_certificate(
        root_key=other_root, cluster_id="c-other", cluster_name="evil", now_wall_s=now, serial=7
    )
    key = generate_key()
    cert = make_node_certificate(
        ca_key=other_root,
        ca_cert=ca,
        subject_key=key.public_key(),
        principal_id=node_id_for(key.public_key()),
        cluster_id="c-other",
        addresses=["127.0.0.1"],
        now_wall_s=now,
        serial=9,
    )
    key_path = tmp_path / "evil.key"
    cert_path = tmp_path / "evil.crt"
    write_private_key(key_path, key)
    cert_path.write_bytes(cert_to_pem(cert))
    return key_path, cert_path, cert_to_pem(ca).decode()


@pytest.mark.parametrize("serves", ["its_own_ca", "the_real_ca"])
def test_join_never_sends_the_token_to_a_node_of_another_ca(
    tmp_path: Path, procs: Processes, serves: str
) -> None:
    cp = tmp_path / "cp"
    procs.init_and_start(cp)
    token = create_token(cp)
    real_ca = (cp / "tls" / "ca.crt").read_text()
    key_path, cert_path, evil_ca = _fake_ca_server(tmp_path)
    received: list[bytes] = []

    async def record(request: Request) -> Response:
        received.append(request.body)
        return Response(
            200,
            {
                "ca_certificate": evil_ca if serves == "its_own_ca" else real_ca,
                "cluster_id": "x",
                "challenge": "c",
            },
        )

    routes = [
        Route(m, p, record, roles=None)
        for m, p in (
            ("GET", "/v1/populi/join/ca"),
            ("POST", "/v1/populi/join/challenge"),
            ("POST", "/v1/populi/join/enroll"),
        )
    ]
    clock = SystemClock()
    app = open_routes_app(
        routes,
        clock=clock,
    )

    async def main() -> Exception | None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                serve_api,
                app,
                hypercorn_config(
                    host="127.0.0.1",
                    port=0,
                    certfile=cert_path,
                    keyfile=key_path,
                    keep_alive_max_requests=100,
                ),
                stop.wait,
            )
            address = binds[0].removeprefix("https://")
            # The token names the real cluster; point its contact at the impostor by
            # minting with the real key but this address.
            from enrollment.keys import load_private_key
            from enrollment.tokens import decode_token, mint_token

            real = decode_token(token, now_ms=int(time.time() * 1000), skew_ms=300_000)
            forged, _ = mint_token(
                signing_key=load_private_key(cp / "keys" / "cluster.key"),
                cluster_id=real.cluster_id,
                contacts=[address],
                recipients=real.recipients,
                roles=["worker"],
                now_ms=int(time.time() * 1000),
                ttl_ms=600_000,
                token_id=secrets.token_bytes(16),
                token_seed=secrets.token_bytes(32),
            )
            error: Exception | None = None
            try:
                await join_cluster(
                    forged,
                    data_dir=tmp_path / "victim",
                    name="victim",
                    listen="127.0.0.1:0",
                    advertise=[],
                    clock=clock,
                )
            except Exception as exc:
                error = exc
            stop.set()
            received.append(forged.encode())  # marker: what must not appear before it
            return error

    error = trio.run(main)
    assert error is not None
    expected = {"its_own_ca": "ca_pin_mismatch", "the_real_ca": "peer_certificate_foreign"}
    assert getattr(error, "code", "") == expected[serves], error
    assert "man in the middle" in str(error) or "someone in the middle" in str(error)
    forged_token = received.pop()
    assert all(forged_token not in body for body in received)
    assert all(forged_token.split(b".")[1] not in body for body in received)  # nor its envelope
    assert not (tmp_path / "victim" / "populi.db").exists()


def test_sigkill_then_restart_of_the_control_plane_keeps_quarantine(
    tmp_path: Path, procs: Processes
) -> None:
    cp = tmp_path / "cp"
    agent = procs.init_and_start(cp)
    join_node(create_token(cp), tmp_path / "w1", "w1")
    procs.start_agent(tmp_path / "w1")
    populi("node", "quarantine", "w1", "--reason", "flaky PSU", "--data-dir", str(cp), check=True)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=10)
    procs.start_agent(cp)
    nodes = json.loads(populi("nodes", "--data-dir", str(cp), "--json", check=True).stdout)["nodes"]
    w1 = next(n for n in nodes if n["name"] == "w1")
    assert w1["state"] == "quarantined"
    assert w1["lifecycle"]["reason"] == "flaky PSU"
    assert "quarantined" in w1["ineligible_reasons"]
