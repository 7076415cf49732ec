"""Every peer call checks WHO answers (docs/adr/0009-peer-identity-of-answers.md).

Real TLS on loopback: hypercorn serves with real certificates from ``enrollment.ca`` (one
cluster CA, several nodes), and the real peer clients — the agent's async ``PeerClient``
over ``PeerTransport`` and the CLI's ``SyncPeerClient`` — call it expecting one node or
another. The CA alone proves only membership: node B's valid certificate must not answer
a call meant for node A, nor a revoked node's, and the server must see no request at all
when the handshake refuses it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.ca import (
    cert_to_pem,
    make_ca_certificate,
    make_issuer_certificate,
    make_node_certificate,
)
from enrollment.keys import generate_key, node_id_for, write_private_key
from populi_peer.api.client import PeerClient, PeerTransport, SyncPeerClient
from populi_peer.api.server import answer_lifespan, hypercorn_config, serve_api
from populi_peer.api.tls import RevokedCheck, client_context, peer_context
from populi_peer.clock import SystemClock
from populi_peer.errors import PeerIdentityError
from populi_peer.identity import Credential

CLUSTER = "c-peerid"


@dataclass
class Pki:
    root: Path
    ca_key: Ed25519PrivateKey = field(default_factory=generate_key)
    ca_cert: x509.Certificate | None = None
    serial: int = 100

    def __post_init__(self) -> None:
        self.ca_cert = make_ca_certificate(
            root_key=self.ca_key,
            cluster_id=CLUSTER,
            cluster_name="peerid",
            now_wall_s=time.time(),
            serial=1,
        )
        (self.root / "ca.crt").write_bytes(cert_to_pem(self.ca_cert))

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.crt"

    def issuer(self, *, ca: bool = True) -> tuple[str, Ed25519PrivateKey, x509.Certificate]:
        """A voter's issuer (ADR 0018): its node id, key and certificate under the root;
        with ``ca=False`` a certificate that must not sign (OpenSSL refuses its chains)."""
        assert self.ca_cert is not None
        key = generate_key()
        voter = node_id_for(generate_key().public_key())
        self.serial += 1
        if ca:
            cert = make_issuer_certificate(
                root_key=self.ca_key,
                root_cert=self.ca_cert,
                subject_key=key.public_key(),
                node_id=voter,
                cluster_id=CLUSTER,
                now_wall_s=time.time(),
                serial=self.serial,
            )
        else:
            cert = make_node_certificate(
                ca_key=self.ca_key,
                ca_cert=self.ca_cert,
                subject_key=key.public_key(),
                principal_id=voter,
                cluster_id=CLUSTER,
                addresses=[],
                now_wall_s=time.time(),
                serial=self.serial,
            )
        return voter, key, cert

    def node(
        self,
        name: str,
        *,
        addresses: tuple[str, ...] = ("127.0.0.1",),
        issuer: tuple[str, Ed25519PrivateKey, x509.Certificate] | None = None,
        present_chain: bool = True,
    ) -> Node:
        """A node key and certificate issued by the cluster CA (or by ``issuer``, the
        certificate file then holding the issuer's too unless not ``present_chain``),
        written as files."""
        assert self.ca_cert is not None
        key = generate_key()
        node_id = node_id_for(key.public_key())
        self.serial += 1
        signer_key, signer_cert = (
            (self.ca_key, self.ca_cert) if issuer is None else (issuer[1], issuer[2])
        )
        cert = make_node_certificate(
            ca_key=signer_key,
            ca_cert=signer_cert,
            subject_key=key.public_key(),
            principal_id=node_id,
            cluster_id=CLUSTER,
            addresses=list(addresses),
            now_wall_s=time.time(),
            serial=self.serial,
        )
        write_private_key(self.root / f"{name}.key", key)
        chain = (cert, issuer[2]) if issuer is not None and present_chain else (cert,)
        (self.root / f"{name}.crt").write_bytes(b"".join(cert_to_pem(c) for c in chain))
        return Node(name, node_id, key, format(self.serial, "x"), self.root)


@dataclass
class Node:
    name: str
    node_id: str
    key: Ed25519PrivateKey
    serial: str
    root: Path

    @property
    def credential(self) -> Credential:
        return Credential(principal_id=self.node_id, key=self.key)


@dataclass
class Server:
    url: str
    node: Node
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def _serve(nursery: trio.Nursery, node: Node) -> Server:
    """An HTTPS server presenting ``node``'s certificate; it answers every request with
    that node's id and records what it received."""
    server = Server(url="", node=node)

    async def app(
        scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        if scope["type"] != "http":
            return
        server.requests.append(f"{scope['method']} {scope['path']}")
        body = json.dumps({"v": 1, "node_id": node.node_id}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    config = hypercorn_config(
        host="127.0.0.1",
        port=0,
        certfile=node.root / f"{node.name}.crt",
        keyfile=node.root / f"{node.name}.key",
        keep_alive_max_requests=1000,
    )
    stop = trio.Event()
    bound = await nursery.start(serve_api, app, config, stop.wait)
    server.url = bound[0]
    return server


@contextlib.asynccontextmanager
async def _async_client(
    pki: Pki, caller: Node, *, revoked: RevokedCheck | None = None, is_revoked: Any = None
) -> AsyncIterator[PeerClient]:
    client = PeerClient(
        credential=caller.credential,
        clock=SystemClock(),
        transport=PeerTransport(peer_context(pki.ca_path, revoked=revoked)),
        timeout_s=10.0,
        is_revoked=is_revoked,
    )
    try:
        yield client
    finally:
        await client.aclose()


async def _refused_call(client: PeerClient, server: Server, node_id: str) -> PeerIdentityError:
    """Why ``client``'s call to ``server``, expecting ``node_id`` there, is refused; the
    refusal comes in the handshake or before it: not one request byte reaches ``server``."""
    with pytest.raises(PeerIdentityError) as refused:
        await client.call(url=server.url, node_id=node_id, method="GET", path="/v1/x")
    assert server.requests == []
    return refused.value


async def test_async_client_refuses_another_nodes_valid_certificate(
    pki: Pki, nursery: trio.Nursery
) -> None:
    caller, a, b = pki.node("caller"), pki.node("a"), pki.node("b")
    server = await _serve(nursery, b)
    async with _async_client(pki, caller) as client:
        # The handshake refuses it: not one request byte reaches the impostor.
        refused = await _refused_call(client, server, a.node_id)
        assert refused.code == "peer_identity_mismatch"
        assert refused.details["peer"] == a.node_id
        assert a.node_id in str(refused) and "\n" not in str(refused)
        # The node it is, it may answer for.
        answer = await client.call(url=server.url, node_id=b.node_id, method="GET", path="/v1/x")
        assert answer["node_id"] == b.node_id
        assert server.requests == ["GET /v1/x"]


async def test_a_connection_proven_for_one_node_never_carries_a_call_for_another(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """httpcore pools by address: after a good call to B, a call expecting A at the same
    address must not ride B's kept-alive connection."""
    caller, a, b = pki.node("caller"), pki.node("a"), pki.node("b")
    server = await _serve(nursery, b)
    async with _async_client(pki, caller) as client:
        await client.call(url=server.url, node_id=b.node_id, method="GET", path="/first")
        with pytest.raises(PeerIdentityError):
            await client.call(url=server.url, node_id=a.node_id, method="GET", path="/second")
        assert server.requests == ["GET /first"]


async def test_a_certificate_naming_the_expected_id_only_as_an_address_is_refused(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """A joiner names its own addresses, and a host name among them lands in its
    certificate's SAN: a node that gave A's id as its address passes OpenSSL's host-name
    check for A, but its certificate is still not A's."""
    caller, a = pki.node("caller"), pki.node("a")
    sly = pki.node("sly", addresses=("127.0.0.1", a.node_id))
    server = await _serve(nursery, sly)
    async with _async_client(pki, caller) as client:
        refused = await _refused_call(client, server, a.node_id)
    assert refused.code == "peer_identity_mismatch"
    assert refused.details["presented"] == sly.node_id


@pytest.mark.parametrize("by", ["node_id", "serial"])
async def test_a_revoked_nodes_certificate_is_refused_in_the_handshake(
    pki: Pki, nursery: trio.Nursery, by: str
) -> None:
    caller, retired = pki.node("caller"), pki.node("retired")
    server = await _serve(nursery, retired)

    def revoked(node_id: str, serial: str) -> bool:
        return node_id == retired.node_id if by == "node_id" else serial == retired.serial

    async with _async_client(pki, caller, revoked=revoked) as client:
        refused = await _refused_call(client, server, retired.node_id)
    assert refused.code == "peer_revoked"


async def test_a_node_certificate_signed_by_an_issuer_verifies_to_the_root_in_tls(
    pki: Pki, nursery: trio.Nursery
) -> None:
    caller, worker = pki.node("caller"), pki.node("worker", issuer=pki.issuer())
    server = await _serve(nursery, worker)
    async with _async_client(pki, caller, revoked=lambda node_id, serial: False) as client:
        await client.call(url=server.url, node_id=worker.node_id, method="GET", path="/v1/x")
        assert server.requests == ["GET /v1/x"]


async def test_a_certificate_whose_issuer_is_revoked_is_refused_in_the_handshake(
    pki: Pki, nursery: trio.Nursery
) -> None:
    voter, *_ = issuer = pki.issuer()
    caller, worker = pki.node("caller"), pki.node("worker", issuer=issuer)
    server = await _serve(nursery, worker)
    async with _async_client(
        pki, caller, revoked=lambda node_id, serial: node_id == voter
    ) as client:
        refused = await _refused_call(client, server, worker.node_id)
    assert refused.code == "peer_revoked"
    assert voter in str(refused)


@pytest.mark.parametrize("case", ["not_a_ca", "chain_missing"])
async def test_a_chain_through_a_non_ca_or_without_its_issuer_is_refused(
    pki: Pki, nursery: trio.Nursery, case: str
) -> None:
    caller = pki.node("caller")
    if case == "not_a_ca":
        worker = pki.node("worker", issuer=pki.issuer(ca=False))
    else:
        worker = pki.node("worker", issuer=pki.issuer(), present_chain=False)
    server = await _serve(nursery, worker)
    async with _async_client(pki, caller) as client:
        await _refused_call(client, server, worker.node_id)


async def test_a_node_revoked_on_the_callers_list_is_not_called_at_all(
    pki: Pki, nursery: trio.Nursery
) -> None:
    caller, retired = pki.node("caller"), pki.node("retired")
    server = await _serve(nursery, retired)
    async with _async_client(
        pki, caller, is_revoked=lambda node_id: node_id == retired.node_id
    ) as client:
        refused = await _refused_call(client, server, retired.node_id)
    assert refused.code == "peer_revoked"


async def test_sync_client_checks_who_answers(pki: Pki, nursery: trio.Nursery) -> None:
    """The CLI's blocking client, over the same kind of server (run in a thread, so the
    server keeps serving)."""
    caller, a, b = pki.node("caller"), pki.node("a"), pki.node("b")
    server = await _serve(nursery, b)

    def calls() -> list[Any]:
        client = SyncPeerClient(
            credential=caller.credential, clock=SystemClock(), verify=peer_context(pki.ca_path)
        )
        outcomes: list[Any] = []
        try:
            for expected in (a.node_id, b.node_id, a.node_id):
                try:
                    outcomes.append(
                        client.call(url=server.url, node_id=expected, method="GET", path="/s")
                    )
                except PeerIdentityError as exc:
                    outcomes.append(exc.code)
        finally:
            client.close()
        return outcomes

    outcomes = await trio.to_thread.run_sync(calls)
    assert outcomes == [
        "peer_identity_mismatch",
        {"v": 1, "node_id": b.node_id},
        # B's kept-alive connection does not carry a call meant for A.
        "peer_identity_mismatch",
    ]
    assert server.requests == ["GET /s"]


async def test_sync_client_refuses_a_revoked_certificate(pki: Pki, nursery: trio.Nursery) -> None:
    caller, retired = pki.node("caller"), pki.node("retired")
    server = await _serve(nursery, retired)

    def call() -> str:
        client = SyncPeerClient(
            credential=caller.credential,
            clock=SystemClock(),
            verify=peer_context(
                pki.ca_path, revoked=lambda node_id, serial: serial == retired.serial
            ),
        )
        try:
            client.call(url=server.url, node_id=retired.node_id, method="GET", path="/s")
        except PeerIdentityError as exc:
            return exc.code
        finally:
            client.close()
        return "answered"

    assert await trio.to_thread.run_sync(call) == "peer_revoked"
    assert server.requests == []


async def test_the_chain_only_context_is_what_let_the_impostor_answer(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """The control case: with the chain-only context (what every peer call used before),
    B's certificate answers a call meant for A. Peer calls must not use it."""
    caller, a, b = pki.node("caller"), pki.node("a"), pki.node("b")
    server = await _serve(nursery, b)
    client = PeerClient(
        credential=caller.credential,
        clock=SystemClock(),
        transport=httpx.AsyncHTTPTransport(verify=client_context(pki.ca_path), retries=0),
        timeout_s=10.0,
    )
    try:
        answer = await client.call(url=server.url, node_id=a.node_id, method="GET", path="/v1/x")
    finally:
        await client.aclose()
    assert answer["node_id"] == b.node_id
    assert server.requests == ["GET /v1/x"]


# -- what a refused handshake tells the client -------------------------------------------


def _handshake_outcome(url: str, *, maximum: ssl.TLSVersion) -> str:
    """A plain client (chain unchecked) offering TLS up to ``maximum``: the TLS version it
    got, or the OpenSSL reason its handshake failed with."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    try:
        with (
            socket.create_connection((host, int(port)), timeout=30) as raw,
            context.wrap_socket(raw) as conn,
        ):
            return str(conn.version())
    except ssl.SSLError as exc:
        return str(exc.reason)


async def test_a_tls_1_2_client_hears_the_protocol_version_alert(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """The server speaks TLS 1.3 only; a TLS 1.2 client is told so with the
    ``protocol_version`` alert (RFC 8446 §6.2) instead of a bare EOF, which is what trio's
    SSLStream left it with (populi_peer/api/server.py)."""
    server = await _serve(nursery, pki.node("a"))
    refused = await trio.to_thread.run_sync(
        lambda: _handshake_outcome(server.url, maximum=ssl.TLSVersion.TLSv1_2)
    )
    assert refused == "TLSV1_ALERT_PROTOCOL_VERSION"
    accepted = await trio.to_thread.run_sync(
        lambda: _handshake_outcome(server.url, maximum=ssl.TLSVersion.TLSv1_3)
    )
    assert accepted == "TLSv1.3"
