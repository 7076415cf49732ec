"""The attack on a live cluster, kept as a suite (issue 10): black-box, against real
``populi`` processes on loopback (real TLS, real SQLite), one row per attack.

Each row of ``TABLE`` names the attack, the refusal it must meet (HTTP status and reason
code; for attacks below HTTP, what the connection does) and checks that nothing was
written: the state a refusal must leave alone is read through the operator API before and
after (``attack_support.snapshot``: join tokens and their uses, members, nodes, events,
leases, revocations, settings; the worker's inbox; the submitter's tasks), and every agent
must still be running. The rows share one cluster, built once for the module: ``cp`` (the
control plane), ``w1`` (a worker, roles ``worker`` only, replaying a recorded H100), ``s1``
(a submitter, role ``submit`` only), and ``r1``, a node that joined and was retired (its
agent never ran; the attacker holds its data directory).

The attacks that kill or stop processes run on a cluster of their own (``cp``, ``w1`` and
``w2``, two replayed H100s, remote execution on, leases of 6 s), healed after each; the
full disk on a control plane of its own whose data directory is a small tmpfs (root).

The attacker's join requests come from 127.0.0.2 and its join flood from 127.0.0.3, so
that the per-address join rate limit (30 a minute) never refuses a row for the wrong
reason; the cluster's own joins come from 127.0.0.1.

Rows that show a hole are marked ``xfail(strict=True)`` with the hole in one line: they
turn red (XPASS) once it is fixed, and must then be unmarked. ``docs/security-posture.md``
("The attack suite") lists every row, what stops the attack, and its test id;
``test_the_posture_doc_lists_every_attack`` keeps the two in step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from e2e.exec_support import (
    Mesh,
    check_tick_order,
    log_events,
    read_ticks,
    tick_command,
    token_key,
    wait_for,
)
from security.attack_support import (
    CODE_RE,
    Answer,
    answer_of,
    mint,
    raw_exchange,
    read_answer,
    request_bytes,
    sign,
    snapshot,
    tls_connect,
)

from enrollment._sealed import _seal
from enrollment.ca import (
    ca_pin,
    cert_from_pem,
    certificate_der,
    certificate_public_key,
    make_ca_certificate,
    make_issuer_certificate,
)
from enrollment.canonical import b64url_decode, b64url_encode, canonical_json
from enrollment.keys import generate_key, load_private_key, node_id_for, public_to_text, raw_public
from enrollment.signing import content_digest
from enrollment.tokens import (
    ISSUED_TOKEN_DOMAIN,
    ISSUED_TOKEN_PREFIX,
    REDEEM_GRACE_MS,
    JoinClaim,
    JoinToken,
    mint_token,
    open_token,
    prove_join,
)
from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context, client_context_from_pem, insecure_probe_context
from populi_peer.clock import SystemClock
from populi_peer.config import Config
from populi_peer.errors import MAX_MESSAGE_CHARS, PopuliError
from populi_peer.identity import Credential
from populi_peer.joining import join_cluster
from support.disk import fill, small_tmpfs
from support.mesh import credential_of, meta_of
from support.procs import one_line, populi
from support.state import differences

pytestmark = pytest.mark.e2e

#: Where the attacker's join requests and its join flood come from (see the docstring).
ATTACKER = "127.0.0.2"
FLOODER = "127.0.0.3"
LIMIT = Config().api.max_body_bytes
SKEW_S = Config().security.max_skew_s
POSTURE = Path(__file__).resolve().parents[2] / "docs" / "security-posture.md"


# -- what an attack comes to --------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How an attack was refused: the HTTP status and reason code, or, for attacks below
    HTTP, ``status`` ``None`` and a word for what the connection did."""

    status: int | None
    code: str
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def outcome_of(answer: Answer | httpx.Response) -> Outcome:
    if isinstance(answer, httpx.Response):
        answer = answer_of(answer)
    if answer.status < 400:
        return Outcome(answer.status, "accepted", answer.body[:300].decode(errors="replace"))
    error = answer.error
    return Outcome(answer.status, error["code"], error["message"], error.get("details") or {})


# -- what the rows run against -------------------------------------------------------------


@dataclass
class World:
    mesh: Mesh
    root: Path
    clients: dict[str, httpx.Client]
    #: A join token of 1 s, minted when the cluster was built, and when it expired.
    short_token: str
    short_expires_s: float
    #: A lease ``s1`` took for itself and released (terminal: its state never moves).
    released_lease: str
    names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def ca(self) -> Path:
        return self.mesh["cp"].data_dir / "tls" / "ca.crt"

    @property
    def cp_id(self) -> str:
        return self.mesh["cp"].node_id

    def port(self, name: str) -> int:
        return self.mesh[name].port

    def key(self, name: str) -> Credential:
        if name == "r1":
            return credential_of(self.root / "r1")
        return self.mesh.credential(name)

    def unsigned_from(self, address: str) -> httpx.Client:
        """A client of the control plane with no credential, from loopback ``address``
        (the rate limits count per address)."""
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.port('cp')}",
            transport=httpx.HTTPTransport(
                verify=client_context(self.ca), local_address=address, retries=0
            ),
            timeout=30,
        )

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.names)}"

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.clients["cp"], worker=self.clients["w1"], submitter=self.clients["s1"])

    def token(self, **body: Any) -> str:
        return mint(self.clients["cp"], **body)

    def send(
        self,
        to: str,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        signer: str | None = "operator",
        headers: dict[str, str] | None = None,
        **signing: Any,
    ) -> Outcome:
        """One request as raw bytes over TLS, signed by ``signer`` for node ``to``
        (``signing`` overrides: ``recipient``, ``created_s``, ``sign_path``)."""
        recipient = signing.pop("recipient", self.mesh[to].node_id)
        # The agent checks the signature against the path as it decodes it.
        sign_path = signing.pop("sign_path", unquote(path))
        signed = {}
        if signer is not None:
            signed = sign(self.key(signer), recipient, method, sign_path, body, **signing)
        data = request_bytes(
            method, path, {"content-type": "application/json", **signed, **(headers or {})}, body
        )
        return outcome_of(raw_exchange(self.port(to), self.ca, data))


def attacker_transports(ca_pem: str | None) -> httpx.AsyncBaseTransport:
    """The real joiner's transports (``populi_peer.joining.tls_transports``), from the
    attacker's address."""
    context = insecure_probe_context() if ca_pem is None else client_context_from_pem(ca_pem)
    return httpx.AsyncHTTPTransport(verify=context, retries=0, local_address=ATTACKER)


def join(world: World, token: str, name: str) -> Outcome:
    """``populi join`` as a library call (the real joiner: its checks, TLS and proofs);
    the refusal it met, or ``accepted``. A refused joiner leaves no data directory."""
    data_dir = world.root / "joiners" / world.fresh(name + "-")

    async def go() -> None:
        await join_cluster(
            token,
            data_dir=data_dir,
            name=name,
            listen="127.0.0.1:0",
            advertise=[],
            clock=SystemClock(),
            transports=attacker_transports,
        )

    try:
        trio.run(go)
    except PopuliError as exc:
        assert not (data_dir / "populi.db").exists(), "a refused join wrote a data directory"
        return Outcome(exc.details.get("http_status"), exc.code, str(exc), dict(exc.details))
    return Outcome(200, "accepted")


def enroll_raw(
    world: World,
    envelope: str,
    *,
    token_key: Any = None,
    token_id: str = "0" * 32,
    cluster_id: str = "c-none",
    name: str = "intruder",
) -> Outcome:
    """A join request the real joiner would never send (it checks its token first): a
    fresh challenge, then ``envelope`` with proofs made by ``token_key`` (a key of the
    attacker's own where it has none) over a claim naming the control plane."""
    with world.unsigned_from(ATTACKER) as client:
        challenge = client.post("/v1/populi/join/challenge", json={})
        assert challenge.status_code == 200, challenge.text
        node_key = generate_key()
        claim = JoinClaim(
            recipient=world.cp_id,
            challenge=challenge.json()["challenge"],
            public_key=public_to_text(node_key.public_key()),
            cluster_id=cluster_id,
            name=name,
            token_id=token_id,
            addresses=(),
        )
        proofs = prove_join(claim, node_key=node_key, token_key=token_key or generate_key())
        answer = client.post(
            "/v1/populi/join/enroll",
            json={
                "token": envelope,
                "public_key": claim.public_key,
                "name": name,
                "addresses": [],
                "challenge": claim.challenge,
                "proof": proofs.proof,
                "token_proof": proofs.token_proof,
            },
        )
    return outcome_of(answer)


def enroll_tampered(world: World, text: str, tamper: Callable[[bytes], bytes]) -> Outcome:
    """A genuine token whose signed envelope (signer key, signature, payload) the attacker
    changed, sent with proofs made with the genuine token key."""
    held = open_token(text, now_ms=int(time.time() * 1000), skew_ms=0)
    prefix, body = held.envelope.split(".", 1)
    raw = b64url_decode(body)
    changed = tamper(raw)
    assert changed != raw
    return enroll_raw(
        world,
        prefix + "." + b64url_encode(changed),
        token_key=held.token_key,
        token_id=held.token.token_id,
        cluster_id=held.token.cluster_id,
    )


def more_uses(raw: bytes) -> bytes:
    """The payload (after the 32-byte signer key and 64-byte signature) says 9 uses."""
    head, payload = raw[:96], raw[96:]
    assert b'"uses":1' in payload
    return head + payload.replace(b'"uses":1', b'"uses":9')


def flipped_signature(raw: bytes) -> bytes:
    return raw[:32] + bytes([raw[32] ^ 0x01]) + raw[33:]


def foreign_token(world: World) -> Outcome:
    """A token that names this cluster, its control plane and its address, signed by
    another root (another cluster's, or one the attacker made)."""
    cluster_id = meta_of(world.mesh["cp"].data_dir, "cluster_id")
    seed = secrets.token_bytes(32)
    text, token = mint_token(
        signing_key=generate_key(),
        cluster_id=cluster_id,
        contacts=[f"127.0.0.1:{world.port('cp')}"],
        recipients=[world.cp_id],
        roles=["operator", "submit", "worker"],
        now_ms=int(time.time() * 1000),
        ttl_ms=600_000,
        token_id=secrets.token_bytes(16),
        token_seed=seed,
    )
    held = open_token(text, now_ms=int(time.time() * 1000), skew_ms=0)
    return enroll_raw(
        world,
        held.envelope,
        token_key=held.token_key,
        token_id=token.token_id,
        cluster_id=cluster_id,
    )


def forged_issued_token(world: World, signing_key: Any, issuer_der: bytes) -> Outcome:
    """A version-3 token (ADR 0018) naming this cluster's root, signed by ``signing_key``
    and carrying ``issuer_der`` as its issuer: sealed by hand, since ``mint_token`` itself
    refuses an issuer that does not hold."""
    ca = cert_from_pem(world.ca.read_bytes())
    root = certificate_public_key(ca)
    now_ms = int(time.time() * 1000)
    seed = secrets.token_bytes(32)
    token = JoinToken(
        token_id=secrets.token_bytes(16).hex(),
        cluster_id=meta_of(world.mesh["cp"].data_dir, "cluster_id"),
        ca_pin=ca_pin(root),
        contacts=(f"127.0.0.1:{world.port('cp')}",),
        recipients=(world.cp_id,),
        not_before_ms=now_ms,
        expires_ms=now_ms + 600_000,
        uses=1,
        roles=("operator", "submit", "worker"),
        name=None,
        token_key=raw_public(Ed25519PrivateKey.from_private_bytes(seed).public_key()),
        signer_public_key=raw_public(signing_key.public_key()),
        issuer=issuer_der,
        root_public_key=raw_public(root),
    )
    envelope = _seal(
        ISSUED_TOKEN_PREFIX, ISSUED_TOKEN_DOMAIN, signing_key, canonical_json(token.to_json())
    )
    return enroll_raw(
        world,
        envelope,
        token_key=Ed25519PrivateKey.from_private_bytes(seed),
        token_id=token.token_id,
        cluster_id=token.cluster_id,
    )


def issuer_of_another_root(world: World) -> Outcome:
    """An issuer certificate for this cluster made by a root the attacker holds."""
    other_root, issuer_key = generate_key(), generate_key()
    cluster_id = meta_of(world.mesh["cp"].data_dir, "cluster_id")
    other_ca = make_ca_certificate(
        root_key=other_root,
        cluster_id=cluster_id,
        cluster_name="lab",
        now_wall_s=time.time(),
        serial=1,
    )
    issuer = make_issuer_certificate(
        root_key=other_root,
        root_cert=other_ca,
        subject_key=issuer_key.public_key(),
        node_id=world.cp_id,
        cluster_id=cluster_id,
        now_wall_s=time.time(),
        serial=2,
    )
    return forged_issued_token(world, issuer_key, certificate_der(issuer))


def member_as_issuer(world: World) -> Outcome:
    """A member (the retired r1, whose data directory the attacker holds) signs a token
    with its node key and presents its genuine node certificate as the issuer."""
    r1 = world.root / "r1"
    leaf = cert_from_pem((r1 / "tls" / "node.crt").read_bytes())
    return forged_issued_token(
        world, load_private_key(r1 / "keys" / "node.key"), certificate_der(leaf)
    )


def secret_sent(world: World, text: str) -> Outcome:
    """What a version-1 joiner did: send the whole token, secret included."""
    held = open_token(text, now_ms=int(time.time() * 1000), skew_ms=0)
    return enroll_raw(
        world,
        text,
        token_key=held.token_key,
        token_id=held.token.token_id,
        cluster_id=held.token.cluster_id,
    )


def reused_token(world: World) -> str:
    token = world.token()
    first = join(world, token, world.fresh("first"))
    assert first.code == "accepted", first
    return token


def revoked_token(world: World) -> str:
    token = world.token()
    token_id = open_token(token, now_ms=int(time.time() * 1000), skew_ms=0).token.token_id
    revoked = world.clients["cp"].post(f"/v1/populi/admin/tokens/{token_id}/revoke")
    assert revoked.status_code == 200, revoked.text
    return token


def wait_until_expired(world: World) -> None:
    """Past the 1 s token's expiry and the control plane's 2 s of grace — and far
    inside the ±300 s request skew budget, which must not apply to a token's expiry."""
    end = world.short_expires_s + REDEEM_GRACE_MS / 1000 + 0.5
    while time.time() < end:
        time.sleep(end - time.time())


# -- requests -----------------------------------------------------------------------------


def replay_setup(world: World) -> bytes:
    """A genuine operator request that mints a token, captured on the wire: it is
    answered (and writes) before the snapshot; the replay must not."""
    body = b'{"ttl_s": 600}'
    path = "/v1/populi/admin/tokens"
    signed = sign(world.key("operator"), world.cp_id, "POST", path, body)
    data = request_bytes("POST", path, {"content-type": "application/json", **signed}, body)
    first = raw_exchange(world.port("cp"), world.ca, data)
    assert first.status == 200, first.body
    return data


def tampered_signature(world: World) -> Outcome:
    body = b'{"ttl_s": 600}'
    path = "/v1/populi/admin/tokens"
    signed = sign(world.key("operator"), world.cp_id, "POST", path, body)
    raw = b64url_decode(signed["populi-signature"])
    signed["populi-signature"] = b64url_encode(bytes([raw[0] ^ 0x01]) + raw[1:])
    data = request_bytes("POST", path, {"content-type": "application/json", **signed}, body)
    return outcome_of(raw_exchange(world.port("cp"), world.ca, data))


def swapped_body(world: World) -> Outcome:
    """A signed request whose body the attacker replaced, with a matching digest."""
    path = "/v1/populi/admin/tokens"
    signed = sign(world.key("operator"), world.cp_id, "POST", path, b'{"ttl_s": 60}')
    body = b'{"ttl_s": 600, "uses": 1000, "roles": ["operator"]}'
    signed["content-digest"] = content_digest(body)
    data = request_bytes("POST", path, {"content-type": "application/json", **signed}, body)
    return outcome_of(raw_exchange(world.port("cp"), world.ca, data))


def unknown_signer(world: World) -> Outcome:
    key = generate_key()
    stranger = Credential(node_id_for(key.public_key()), key)
    body = b"{}"
    signed = sign(stranger, world.cp_id, "POST", "/v1/populi/heartbeat", body)
    data = request_bytes(
        "POST", "/v1/populi/heartbeat", {"content-type": "application/json", **signed}, body
    )
    return outcome_of(raw_exchange(world.port("cp"), world.ca, data))


def flood(world: World) -> Outcome:
    """More join challenges from one address than the rate allows; the last refusal,
    after which another address is still served."""
    burst = Config().security.join_rate_per_min
    last: Outcome | None = None
    with world.unsigned_from(FLOODER) as client:
        for _ in range(burst + 5):
            last = outcome_of(client.post("/v1/populi/join/challenge", json={}))
    assert last is not None
    with world.unsigned_from("127.0.0.4") as client:
        other = client.post("/v1/populi/join/challenge", json={})
    assert other.status_code == 200, f"another address was refused too: {other.text}"
    return last


def second_agent(world: World) -> Outcome:
    """A second ``populi agent`` on the control plane's live data directory."""
    cp = world.mesh["cp"]
    result = populi("agent", "--data-dir", str(cp.data_dir), timeout=60)
    assert one_line(result.stderr), result.stderr
    assert f"already running (pid {cp.pid})" in result.stderr, result.stderr
    runtime = json.loads((cp.data_dir / "run" / "agent.json").read_text())
    assert runtime["pid"] == cp.pid, "the second agent rewrote the first one's runtime file"
    return Outcome(None, f"exit_{result.returncode}", result.stderr.strip())


# -- input --------------------------------------------------------------------------------


def declared_10mb(world: World) -> Outcome:
    """10 MB declared, 1 KiB sent: the answer must come without the rest."""
    body = b"{" + b" " * 1023
    path = "/v1/populi/admin/tokens"
    signed = sign(world.key("operator"), world.cp_id, "POST", path, body)
    head = request_bytes(
        "POST", path, {"content-type": "application/json", **signed}, body, length=10 << 20
    )
    with tls_connect(world.port("cp"), world.ca) as conn:
        conn.sendall(head)
        return outcome_of(read_answer(conn))


def chunked_10mb(world: World) -> Outcome:
    """A 10 MB chunked body to the public enroll route, of which the sender stops after
    the limit and 64 KiB: an agent that read on would wait for the rest forever."""
    chunk = b"x" * 16384
    sent = 0
    with tls_connect(world.port("cp"), world.ca) as conn:
        conn.sendall(
            b"POST /v1/populi/join/enroll HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        try:
            while sent < LIMIT + 65536:
                conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # the agent answered and closed while the body was still coming
        return outcome_of(read_answer(conn))


def tls12(world: World) -> Outcome:
    """A client that speaks TLS 1.2 at most."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with (
            socket.create_connection(("127.0.0.1", world.port("cp")), timeout=30) as raw,
            context.wrap_socket(raw) as conn,
        ):
            return Outcome(None, f"handshake_completed_{conn.version()}")
    except (ssl.SSLError, OSError) as exc:
        return Outcome(None, "handshake_refused", str(exc))


def plain_http(world: World) -> Outcome:
    """Plain HTTP to the TLS port: no HTTP answer, the connection closed."""
    with socket.create_connection(("127.0.0.1", world.port("cp")), timeout=30) as conn:
        conn.sendall(b"GET /v1/populi/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        data = b""
        try:
            while chunk := conn.recv(4096):
                data += chunk
        except OSError:
            pass
    if data.startswith(b"HTTP/"):
        return Outcome(int(data.split()[1]), "answered_in_plain_http")
    return Outcome(None, "closed_without_answer", data[:60].hex())


def slowloris(world: World) -> Outcome:
    """Connections that send their request headers one byte at a time: the agent keeps
    answering everybody else meanwhile, and drops every slow one by itself."""
    slow_count, byte_every_s, guard_s = 4, 0.2, 120.0
    dropped: list[float] = []
    lock = threading.Lock()

    def crawl() -> None:
        started = time.monotonic()
        with tls_connect(world.port("cp"), world.ca) as conn:
            # Headers long enough that the crawl would outlast the guard.
            head = b"GET /v1/populi/health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 4096
            conn.settimeout(byte_every_s)
            for byte in head:
                if time.monotonic() - started > guard_s:
                    return
                try:
                    conn.sendall(bytes([byte]))
                    if conn.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            else:
                return
        with lock:
            dropped.append(time.monotonic() - started)

    crawlers = [threading.Thread(target=crawl, daemon=True) for _ in range(slow_count)]
    for crawler in crawlers:
        crawler.start()
    served = 0
    with world.mesh.client("cp", world.key("operator")) as client:
        while any(c.is_alive() for c in crawlers) and served < 200:
            answer = client.get("/v1/populi/status")
            assert answer.status_code == 200, answer.text
            served += 1
            time.sleep(0.05)
    for crawler in crawlers:
        crawler.join(timeout=guard_s)
    times = sorted(round(d, 1) for d in dropped)
    print(f"slow connections dropped after {times} s; {served} answers to others meanwhile")
    assert served >= 10, f"only {served} answers to other clients during the slow connections"
    if len(dropped) == slow_count:
        return Outcome(None, "slow_connections_dropped")
    return Outcome(None, f"{slow_count - len(dropped)}_slow_connections_kept")


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    id: str
    #: What the attacker does (the posture doc's "attack" column says it in words).
    attack: str
    status: int | None
    code: str
    run: Callable[[World, Any], Outcome]
    setup: Callable[[World], Any] | None = None
    #: Extra checks of the refusal (details, message).
    check: Callable[[Outcome], None] | None = None


TABLE: list[Any] = []


def row(
    id: str,
    attack: str,
    status: int | None,
    code: str,
    run: Callable[[World, Any], Outcome],
    *,
    setup: Callable[[World], Any] | None = None,
    check: Callable[[Outcome], None] | None = None,
    hole: str | None = None,
) -> None:
    marks = [pytest.mark.xfail(strict=True, reason=f"HOLE: {hole}")] if hole else []
    TABLE.append(
        pytest.param(Attack(id, attack, status, code, run, setup, check), id=id, marks=marks)
    )


def says(*fragments: str) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        for fragment in fragments:
            assert fragment in outcome.message, outcome.message

    return check


def names_skew(seconds: int, direction: str) -> Callable[[Outcome], None]:
    """The refusal names the skew (give or take the second the request took)."""

    def check(outcome: Outcome) -> None:
        found = re.search(r"(\d+) s (behind|ahead of)", outcome.message)
        assert found, outcome.message
        assert abs(int(found.group(1)) - seconds) <= 2 and found.group(2) == direction, (
            outcome.message
        )
        assert "fix the clock" in outcome.message, outcome.message

    return check


def one_bounded_line(outcome: Outcome) -> None:
    """Input quoted in a message is shown on one line, escaped, and cut to a bound."""
    assert outcome.message.isprintable(), repr(outcome.message)
    assert len(outcome.message) <= MAX_MESSAGE_CHARS, len(outcome.message)


def reasons(*expected: str) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        for reason in expected:
            assert reason in outcome.details.get("reasons", []), outcome.details

    return check


_TOKEN = "/v1/populi/admin/tokens"

# -- tokens --
row("token-reused", "join with a single-use token that already enrolled a node",
    409, "token_already_used", lambda w, token: join(w, token, w.fresh("again")),
    setup=reused_token, check=says("already used"))  # fmt: skip
row("token-tampered-payload", "a genuine token whose payload says 9 uses instead of 1",
    400, "token_bad_signature", lambda w, token: enroll_tampered(w, token, more_uses),
    setup=lambda w: w.token())  # fmt: skip
row("token-tampered-signature", "a genuine token with one bit of its signature flipped",
    400, "token_bad_signature", lambda w, token: enroll_tampered(w, token, flipped_signature),
    setup=lambda w: w.token())  # fmt: skip
row("token-foreign-ca", "a token naming this cluster and control plane, signed by another root",
    400, "token_foreign_signer", lambda w, _: foreign_token(w))  # fmt: skip
row("token-issuer-foreign", "a version-3 token naming this root, its issuer certificate signed by another root",
    400, "token_bad_issuer", lambda w, _: issuer_of_another_root(w),
    check=says("not signed by this cluster's root"))  # fmt: skip
row("token-member-as-issuer", "a version-3 token signed by a member's node key, its node certificate as the issuer",
    400, "token_bad_issuer", lambda w, _: member_as_issuer(w))  # fmt: skip
row("token-version-1", "a version-1 token (populi-join-1.)",
    400, "token_unsupported_version",
    lambda w, _: enroll_raw(w, "populi-join-1." + b64url_encode(secrets.token_bytes(32))))  # fmt: skip
row("token-secret-sent", "a join request carrying the token's secret (what version 1 sent)",
    400, "token_secret_sent", secret_sent,
    setup=lambda w: w.token())  # fmt: skip
row("token-name-bound", "a token bound to the name 'bound' used to join as another name",
    403, "token_name_mismatch", lambda w, token: join(w, token, w.fresh("other")),
    setup=lambda w: w.token(name="bound"))  # fmt: skip
row("token-revoked", "join with a token the operator revoked",
    403, "token_revoked", lambda w, token: join(w, token, w.fresh("rev")),
    setup=revoked_token)  # fmt: skip
row("token-retired-name", "join under the name of a retired node (r1)",
    403, "name_retired", lambda w, token: join(w, token, "r1"),
    setup=lambda w: w.token(), check=says("populi node unretire r1"))  # fmt: skip
row("token-for-retired-name", "mint a token bound to a retired node's name (r1)",
    409, "name_retired",
    lambda w, _: outcome_of(w.clients["cp"].post(_TOKEN, json={"name": "r1"})))  # fmt: skip
row("join-flood", f"{Config().security.join_rate_per_min + 5} join challenges a minute from one address",
    429, "rate_limited", lambda w, _: flood(w))  # fmt: skip

# -- requests: unsigned, to each class of route that needs a signature --
for _label, _to, _method, _path in [
    ("operator", "cp", "POST", _TOKEN),
    ("node", "cp", "POST", "/v1/populi/heartbeat"),
    ("member-read", "cp", "GET", "/v1/populi/members"),
    ("submit", "cp", "POST", "/v1/populi/exec/leases"),
    ("holder", "cp", "POST", "/v1/populi/exec/leases/l-1/renew"),
    ("worker-inbox", "w1", "POST", "/v1/populi/inbox"),
    ("worker-output", "w1", "GET", "/v1/populi/exec/attempts/t-1/1/output"),
    ("submitter-tasks", "s1", "POST", "/v1/populi/tasks"),
]:
    row(f"unsigned-{_label}", f"unsigned {_method} {_path} on {_to}", 401, "signature_missing",
        lambda w, _, to=_to, m=_method, p=_path: w.send(to, m, p, b"{}", signer=None))  # fmt: skip

# -- requests: signatures --
row("signature-tampered", "an operator request with one bit of its signature flipped",
    401, "signature_invalid", lambda w, _: tampered_signature(w))  # fmt: skip
row("signature-body-swapped", "a signed request whose body was replaced (digest recomputed)",
    401, "signature_invalid", lambda w, _: swapped_body(w))  # fmt: skip
row("signature-other-path", "a request signed for GET /nodes sent to GET /admin/tokens",
    401, "signature_invalid",
    lambda w, _: w.send("cp", "GET", _TOKEN, sign_path="/v1/populi/nodes"))  # fmt: skip
row("signature-other-recipient", "an operator request signed for w1, sent to the control plane",
    401, "signature_wrong_recipient",
    lambda w, _: w.send("cp", "POST", _TOKEN, b"{}", recipient=w.mesh["w1"].node_id))  # fmt: skip
row("replay-same-process", "the exact bytes of an answered token-create request, sent again",
    401, "signature_replayed",
    lambda w, data: outcome_of(raw_exchange(w.port("cp"), w.ca, data)),
    setup=replay_setup)  # fmt: skip
row("skew-past", f"an operator request created {SKEW_S + 100:.0f} s ago",
    401, "clock_skew",
    lambda w, _: w.send("cp", "POST", _TOKEN, b"{}", created_s=int(time.time() - SKEW_S - 100)),
    check=names_skew(int(SKEW_S) + 100, "behind"))  # fmt: skip
row("skew-future", f"an operator request created {SKEW_S + 100:.0f} s from now",
    401, "clock_skew",
    lambda w, _: w.send("cp", "POST", _TOKEN, b"{}", created_s=int(time.time() + SKEW_S + 100)),
    check=names_skew(int(SKEW_S) + 100, "ahead of"))  # fmt: skip
row("skewed-node-clock", "w1's heartbeat signed by a clock 400 s behind (its key, from its data dir)",
    401, "clock_skew",
    lambda w, _: w.send("cp", "POST", "/v1/populi/heartbeat", b"{}", signer="w1",
                        created_s=int(time.time() - 400)),
    check=names_skew(400, "behind"))  # fmt: skip
row("signer-unknown", "a heartbeat signed by a key that never joined",
    401, "unknown_signer", lambda w, _: unknown_signer(w))  # fmt: skip
row("signer-retired", "a heartbeat signed by the retired node r1's key",
    401, "node_retired",
    lambda w, _: w.send("cp", "POST", "/v1/populi/heartbeat", b"{}", signer="r1"))  # fmt: skip
row("role-operator-route", "the submitter's node key creates a join token (an operator route)",
    403, "role_required", lambda w, _: w.send("cp", "POST", _TOKEN, b"{}", signer="s1"))  # fmt: skip
row("role-worker-submits", "the worker's node key asks for a lease (a submit-only route)",
    403, "role_required",
    lambda w, _: w.send("cp", "POST", "/v1/populi/exec/leases",
                        b'{"task_id": "t-x", "attempt": 1, "work_class": "agent", '
                        b'"target": "cp", "gpus_wanted": 0, "ttl_s": 30}', signer="w1"))  # fmt: skip
row("renew-not-holder", "the worker renews a lease the submitter took (and released)",
    409, "lease_refused",
    lambda w, _: w.send("cp", "POST", f"/v1/populi/exec/leases/{w.released_lease}/renew",
                        signer="w1"),
    check=reasons("not_holder"))  # fmt: skip
row("lease-born-dead", "a lease asked with ttl_s 1e-300",
    409, "lease_refused",
    lambda w, _: w.send("cp", "POST", "/v1/populi/exec/leases",
                        b'{"task_id": "t-x", "attempt": 1, "work_class": "agent", '
                        b'"target": "%s", "gpus_wanted": 0, "ttl_s": 1e-300}'
                        % w.mesh["s1"].node_id.encode(), signer="s1"),
    check=reasons("ttl_too_short"))  # fmt: skip
row("second-agent", "a second `populi agent` on the control plane's live data directory",
    None, "exit_4", lambda w, _: second_agent(w))  # fmt: skip

# -- input --
row("path-dot-segments", "the submitter's key on /v1/populi/exec/leases/../../admin/tokens",
    404, "no_route",
    lambda w, _: w.send("cp", "GET", "/v1/populi/exec/leases/../../admin/tokens", signer="s1"))  # fmt: skip
row("path-encoded-slash", "cordon ..%2Fw1 (an encoded slash in a path parameter)",
    404, "no_route", lambda w, _: w.send("cp", "POST", "/v1/populi/admin/nodes/..%2Fw1/cordon"))  # fmt: skip
row("path-nul", "cordon w1%00 (a NUL in a path parameter)",
    404, "unknown_node", lambda w, _: w.send("cp", "POST", "/v1/populi/admin/nodes/w1%00/cordon"))  # fmt: skip
row("path-overlong-id", "a 5000-character lease id",
    404, "lease_not_found",
    lambda w, _: w.send("cp", "GET", "/v1/populi/exec/leases/" + "l" * 5000),
    check=one_bounded_line)  # fmt: skip
row("path-line-break", "an encoded CR LF in the path of a public route",
    404, "no_route",
    lambda w, _: w.send("cp", "GET", "/v1/populi/join/ca%0D%0AX-Injected:%201", signer=None),
    check=one_bounded_line)  # fmt: skip
row("body-10mb-declared", "a 10 MB body declared in content-length, 1 KiB sent",
    413, "payload_too_large", lambda w, _: declared_10mb(w))  # fmt: skip
row("body-10mb-chunked", "a 10 MB chunked body to the public enroll route",
    413, "payload_too_large", lambda w, _: chunked_10mb(w))  # fmt: skip
row("json-deep", "100 000 nested JSON arrays in a signed request",
    400, "bad_json",
    lambda w, _: w.send("cp", "POST", _TOKEN, b"[" * 100_000 + b"]" * 100_000))  # fmt: skip
row("json-nan", "NaN in a signed request's body",
    400, "bad_json", lambda w, _: w.send("cp", "POST", _TOKEN, b'{"ttl_s": NaN}'))  # fmt: skip
row("json-infinity", "Infinity in a signed request's body",
    400, "bad_json", lambda w, _: w.send("cp", "POST", _TOKEN, b'{"ttl_s": Infinity}'))  # fmt: skip
row("content-type-form", "a signed form-encoded body (application/x-www-form-urlencoded)",
    400, "bad_json",
    lambda w, _: w.send("cp", "POST", _TOKEN, b"ttl_s=600&uses=1000",
                        headers={"content-type": "application/x-www-form-urlencoded"}))  # fmt: skip
row("slowloris", "4 connections sending their headers one byte every 200 ms",
    None, "slow_connections_dropped", lambda w, _: slowloris(w))  # fmt: skip
row("tls-1.2", "a client that offers TLS 1.2 at most",
    None, "handshake_refused", lambda w, _: tls12(w))  # fmt: skip
row("plain-http", "plain HTTP to the TLS port",
    None, "closed_without_answer", lambda w, _: plain_http(w))  # fmt: skip


# Last: the 1 s token minted with the cluster has expired by now, so nobody waits for it.
row("token-expired", "join with a 1 s token 3.5 s after minting (expired, past the 2 s grace)",
    400, "token_expired", lambda w, _: join(w, w.short_token, w.fresh("late")),
    setup=wait_until_expired)  # fmt: skip


# -- the shared cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("attack")
    mesh = Mesh.create(
        root, ["w1"], cpu_nodes=["s1"], roles={"w1": "worker", "s1": "submit"}, remote=False
    )
    stack = contextlib.ExitStack()
    try:
        clients = {n: stack.enter_context(mesh.operator(n)) for n in ("cp", "w1", "s1")}
        short = clients["cp"].post(_TOKEN, json={"ttl_s": 1})
        assert short.status_code == 200, short.text
        world = World(
            mesh=mesh,
            root=root,
            clients=clients,
            short_token=short.json()["token"],
            short_expires_s=short.json()["summary"]["expires_ms"] / 1000,
            released_lease="",
        )
        # r1 joins (from 127.0.0.1) and is retired; its agent never runs.
        r1 = Path(root / "r1")

        async def join_r1() -> None:
            await join_cluster(
                world.token(),
                data_dir=r1,
                name="r1",
                listen="127.0.0.1:0",
                advertise=[],
                clock=SystemClock(),
            )

        trio.run(join_r1)
        retired = clients["cp"].post("/v1/populi/admin/nodes/r1/retire", json={"reason": "stolen"})
        assert retired.status_code == 200, retired.text
        # A lease s1 holds for itself, released: a lease whose state never moves again.
        with mesh.client("cp", mesh.credential("s1")) as s1:
            granted = s1.post(
                "/v1/populi/exec/leases",
                json={"task_id": "t-own", "attempt": 1, "work_class": "agent",
                      "target": mesh["s1"].node_id, "gpus_wanted": 0, "ttl_s": 30},
            )  # fmt: skip
            assert granted.status_code == 200, granted.text
            lease_id = granted.json()["lease"]["lease_id"]
            released = s1.post(
                f"/v1/populi/exec/leases/{lease_id}/release", json={"outcome": "stopped"}
            )
            assert released.status_code == 200, released.text
        world.released_lease = lease_id
        print(f"\nattack cluster up in {time.monotonic() - started:.1f} s")
        yield world
    finally:
        stack.close()
        mesh.close()


@pytest.mark.parametrize("row", TABLE)
def test_the_attack_is_refused_and_writes_nothing(world: World, row: Attack) -> None:
    prepared = row.setup(world) if row.setup else None
    before = world.snapshot()
    outcome = row.run(world, prepared)
    after = world.snapshot()
    assert (outcome.status, outcome.code) == (row.status, row.code), outcome
    if outcome.status is not None:
        assert re.match(CODE_RE, outcome.code), outcome.code
        assert outcome.message and "\n" not in outcome.message and "\r" not in outcome.message, (
            repr(outcome.message[:300])
        )
        assert "Traceback" not in outcome.message
    if row.check:
        row.check(outcome)
    assert before == after, f"a refused attack changed: {differences(before, after)}"
    for name, node in world.mesh.nodes.items():
        assert node.alive(), f"{name} died: {node.log()[-2000:]}"
        assert "Traceback" not in node.log(), f"{name}: {node.log()[-3000:]}"


# -- a full disk --------------------------------------------------------------------------


@dataclass
class FullDisk:
    mesh: Mesh
    client: httpx.Client
    #: A token minted before the disk filled up.
    token: str


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullDisk]:
    """A control plane whose data directory is a 16 MiB tmpfs, filled to the last byte
    (skipped where no tmpfs can be mounted)."""
    root = tmp_path_factory.mktemp("disk")
    with small_tmpfs(root / "cp", size_kib=16 * 1024):
        mesh = Mesh.create(root, remote=False)
        try:
            with mesh.operator() as client:
                token = mint(client)
                # Start the WAL afresh, so that the next commit must grow it.
                with sqlite3.connect(mesh["cp"].data_dir / "populi.db") as conn:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                filler = fill(mesh["cp"].data_dir)
                yield FullDisk(mesh, client, token)
                filler.unlink()
        finally:
            mesh.close()


def disk_join(disk: FullDisk) -> Outcome:
    data_dir = disk.mesh.root / "joiner"

    async def go() -> None:
        await join_cluster(
            disk.token,
            data_dir=data_dir,
            name="joiner",
            listen="127.0.0.1:0",
            advertise=[],
            clock=SystemClock(),
        )

    try:
        trio.run(go)
    except PopuliError as exc:
        assert not (data_dir / "populi.db").exists()
        return Outcome(exc.details.get("http_status"), exc.code, str(exc), dict(exc.details))
    return Outcome(200, "accepted")


DISK_TABLE = [
    pytest.param(
        Attack("disk-full-write", "an operator write (token create) on a full data directory",
               503, "storage_unavailable",
               lambda d, _: outcome_of(d.client.post(_TOKEN, json={"ttl_s": 600}))),
        id="disk-full-write",
    ),
    pytest.param(
        Attack("disk-full-join", "a join on a full data directory",
               503, "storage_unavailable", lambda d, _: disk_join(d)),
        id="disk-full-join",
    ),
]  # fmt: skip


@pytest.mark.parametrize("row", DISK_TABLE)
def test_a_full_disk_refuses_writes_and_the_agent_stays_up(
    full_disk: FullDisk, row: Attack
) -> None:
    before = snapshot(full_disk.client)
    outcome = row.run(full_disk, None)
    after = snapshot(full_disk.client)
    assert (outcome.status, outcome.code) == (row.status, row.code), outcome
    assert one_line(outcome.message), outcome.message
    assert before == after, f"a refused write changed: {differences(before, after)}"
    cp = full_disk.mesh["cp"]
    assert cp.alive(), cp.log()[-3000:]
    health = full_disk.client.get("/v1/populi/health")
    assert health.status_code == 200, health.text
    assert "Traceback" not in cp.log()


# -- processes killed and stopped ---------------------------------------------------------


@pytest.fixture(scope="module")
def process_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """``cp``, and ``w1`` and ``w2`` with a replayed H100 each; remote execution on,
    leases of 6 s declared dead 2 s after they expire, and a leader lease of 0.5 s (a
    restarted control plane grants nothing for TTL + leader lease + margin: 8.5 s)."""
    mesh = Mesh.create(
        tmp_path_factory.mktemp("process"),
        ["w1", "w2"],
        # Three election heartbeats per leader lease at least (ADR 0011).
        settings={"leader_lease_s": 0.5, "election_heartbeat_s": 0.15},
    )
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture
def healed(process_mesh: Mesh) -> Iterator[Mesh]:
    """The process cluster, granting again (a restarted control plane holds new grants
    for a while) and healed after the row: stopped agents continue, dead ones start
    again, no task process is left, and no lease is held."""
    mesh = process_mesh
    wait_for("the control plane grants again", lambda: probe_grant(mesh), guard_s=60, every_s=0.5)
    yield mesh
    mesh.heal(kill_leftovers=True)


def probe_grant(mesh: Mesh) -> bool:
    """Whether the control plane grants now: a lease w1 takes for itself, at once
    released."""
    with mesh.client("cp", mesh.credential("w1"), validate=False) as w1:
        granted = w1.post(
            "/v1/populi/exec/leases",
            json={"task_id": f"t-probe{secrets.token_hex(4)}", "attempt": 1,
                  "work_class": "agent", "target": mesh["w1"].node_id, "gpus_wanted": 0,
                  "ttl_s": 3},
        )  # fmt: skip
        if granted.status_code != 200:
            return False
        lease_id = granted.json()["lease"]["lease_id"]
        w1.post(f"/v1/populi/exec/leases/{lease_id}/release", json={"outcome": "stopped"})
    return True


def lease_log(node: Any, lease_id: str) -> list[dict[str, Any]]:
    """The control plane's log lines of the renewals of ``lease_id``."""
    path = f"/v1/populi/exec/leases/{lease_id}/renew"
    return [e for e in log_events(node.log(), "request") if e.get("path") == path]


def test_sigstop_of_a_worker_holding_a_lease(healed: Mesh, tmp_path: Path) -> None:
    """w2 runs w1's task under a lease and its agent is SIGSTOPped: the control plane
    declares the lease dead on its own clock, the task falls back to w1, no tick of the
    remote attempt comes after the first local one, and once w2 continues, its late
    renewals are refused (its own, and one signed with its key) and change nothing."""
    mesh = healed
    ticks = tmp_path / "ticks"
    w2 = mesh["w2"]
    task_id = mesh.run_detached("w1", "--gpus", "1", *tick_command(ticks, n1=600, n2=10))
    (first, *_), _ = wait_for("the first tick", lambda: read_ticks(ticks), guard_s=90)
    (lease,) = mesh.leases(task=task_id)
    assert (first.node, first.attempt, lease["holder"]) == ("w2", 1, w2.node_id), (first, lease)
    os.kill(w2.pid, signal.SIGSTOP)
    try:
        wait_for(
            "the local fallback ticks",
            lambda: any(t.attempt == 2 for t in read_ticks(ticks)),
            guard_s=90,
        )
        dead = mesh.lease_record(lease["lease_id"])
        assert dead["state"] == "expired", dead
        renewed = [e for e in lease_log(mesh["cp"], lease["lease_id"]) if e["status"] == 200]
    finally:
        os.kill(w2.pid, signal.SIGCONT)
    woke_ms = int(time.time() * 1000)
    with mesh.client("cp", mesh.credential("w2")) as client:
        late = outcome_of(client.post(f"/v1/populi/exec/leases/{lease['lease_id']}/renew"))
    assert (late.status, late.code) == (409, "lease_refused"), late
    assert "lease_not_live" in late.details.get("reasons", []), late
    waited = mesh.wait_cli("w1", task_id)
    assert waited.returncode == 0, waited.stderr
    # The woken worker has acted (it delivered its late result); every renewal it sent
    # after waking was refused, and the lease stayed dead.
    mesh.wait_delivered("w2", task_id, what="the woken worker delivers its late result")
    entries = lease_log(mesh["cp"], lease["lease_id"])
    assert [e for e in entries if e["status"] == 200] == renewed
    woken = [e for e in entries if _ms(e["ts"]) >= woke_ms]
    print(f"renewals after SIGCONT: {[e['status'] for e in woken]}")
    assert all(e["status"] == 409 for e in woken), woken
    assert mesh.lease_record(lease["lease_id"])["state"] == "expired"
    by_attempt = check_tick_order(read_ticks(ticks))
    assert sorted(by_attempt) == [1, 2]
    assert {t.node for t in by_attempt[1]} == {"w2"} and {t.node for t in by_attempt[2]} == {"w1"}


def test_kill_9_of_the_control_plane_under_grant_load(healed: Mesh) -> None:
    """The control plane is SIGKILLed while a submitter asks it for leases every 20 ms
    (half of them for w2's one GPU), and started again. Nothing it acknowledged is lost
    (same lease, same fencing token, same GPU); the restarted control plane makes no new
    grant on w2 at once (``node_not_reported``: until w2 reports to it, or for the longest
    TTL ever allowed + margin, ADR 0015), and the first token it issues — the fallback of a task whose lease
    died across the restart — is above every token issued before; no fencing token twice,
    no two leases ever held one GPU at once, and the consumed join tokens, members and
    events are intact."""
    mesh = healed
    submitter = mesh.credential("w1")
    target = mesh["w2"].node_id
    with mesh.operator() as op:
        before = snapshot(op)
    acks: list[tuple[str, dict[str, Any]]] = []
    refused: Counter[tuple[str, str]] = Counter()
    phase = ["before"]
    stop = threading.Event()

    def stream() -> None:
        client: httpx.Client | None = None
        for n in itertools.count():
            if stop.wait(0.02):
                break
            body = {"task_id": f"t-load{n}", "attempt": 1, "work_class": "agent",
                    "target": target, "gpus_wanted": n % 2, "ttl_s": 3}  # fmt: skip
            try:
                if client is None:
                    client = httpx.Client(
                        base_url=f"https://127.0.0.1:{mesh['cp'].port}",
                        verify=client_context(mesh["cp"].data_dir / "tls" / "ca.crt"),
                        auth=SignedAuth(submitter, mesh["cp"].node_id, SystemClock()),
                        timeout=30,
                    )
                answer = client.post("/v1/populi/exec/leases", json=body)
            except httpx.HTTPError:
                refused[(phase[0], "unreachable")] += 1
                if client is not None:
                    client.close()
                client = None
                continue
            if answer.status_code == 200:
                acks.append((phase[0], answer.json()["lease"]))
            else:
                for reason in answer.json()["error"].get("details", {}).get("reasons", ["?"]):
                    refused[(phase[0], reason)] += 1
        if client is not None:
            client.close()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        wait_for("grants before the kill", lambda: len(acks) >= 8, guard_s=60)
        mesh.stop("cp", signal.SIGKILL)
        phase[0] = "after"
        killed_at = len(acks)
        took = mesh.start("cp")
        # The first token after the restart: a fallback (a fence: no GPU to wait for) for a
        # task granted before the kill, once its lease has died on the control plane's
        # clock (restored leases count as renewed at the restart).
        fallen: list[dict[str, Any]] = []
        task_id = next(g["task_id"] for _, g in acks if not g["gpus"])

        def fall_back() -> bool:
            with mesh.client("cp", submitter, validate=False) as client:
                answer = client.post(
                    "/v1/populi/exec/fallback",
                    json={"task_id": task_id, "attempt": 2, "gpus_wanted": 0, "ttl_s": 3,
                          "work_class": "agent"},
                )  # fmt: skip
            if answer.status_code != 200:
                return False
            fallen.append(answer.json()["lease"])
            return True

        wait_for("the fallback after the restart", fall_back, guard_s=90, every_s=0.3)
    finally:
        stop.set()
        streamer.join(timeout=60)
    print(
        f"{killed_at} grants before the kill, {len(acks) - killed_at} after a restart of "
        f"{took:.1f} s, then fallback token {fallen[0]['token']}; refusals {dict(refused)}"
    )
    assert refused[("after", "node_not_reported")] > 0, (
        "the restarted control plane granted at once"
    )
    acks.append(("after", fallen[0]))
    with mesh.operator() as op:
        after = snapshot(op)
        leases = {x["lease_id"]: x for x in op.get("/v1/populi/exec/leases").json()["leases"]}
    # Nothing acknowledged is lost.
    for _, granted in acks:
        kept = leases.get(granted["lease_id"])
        assert kept is not None, f"acknowledged lease {granted['lease_id']} is gone"
        for key in ("token", "gpus", "holder", "task_id"):
            assert kept[key] == granted[key], (key, granted, kept)
    # No fencing token twice; every token after the restart above every one before.
    tokens = [token_key(g["token"]) for _, g in acks]
    assert len(set(tokens)) == len(tokens), "a fencing token was issued twice"
    first = [token_key(g["token"]) for p, g in acks if p == "before"]
    later = [token_key(g["token"]) for p, g in acks if p == "after"]
    assert max(first) < min(later), (max(first), min(later))
    # No two leases held one GPU at once (on the control plane's own clock).
    by_gpu: dict[str, list[dict[str, Any]]] = {}
    for lease in leases.values():
        for gpu in lease["gpus"]:
            by_gpu.setdefault(gpu, []).append(lease)
    assert by_gpu, "no GPU lease was granted"
    for gpu, held in by_gpu.items():
        held.sort(key=lambda x: x["granted_wall_ms"])
        for earlier, later_lease in itertools.pairwise(held):
            assert earlier["state"] not in ("live", "revoking"), (gpu, earlier, later_lease)
            assert later_lease["granted_wall_ms"] >= earlier["state_changed_wall_ms"], (
                f"{gpu} granted to {later_lease['lease_id']} while {earlier['lease_id']} held it"
            )
    # Join tokens, members and events survive; events only grew.
    assert after["tokens"] == before["tokens"]
    assert after["members"] == before["members"]
    assert after["events"][: len(before["events"])] == before["events"]
    assert "Traceback" not in mesh["cp"].log()
    # The holders give the leases back, so that the next row starts from a quiet cluster.
    for holder in ("w1", "w2"):
        node_id = mesh[holder].node_id
        with mesh.client("cp", mesh.credential(holder), validate=False) as client:
            for lease in leases.values():
                if lease["state"] == "live" and lease["holder"] == node_id:
                    client.post(
                        f"/v1/populi/exec/leases/{lease['lease_id']}/release",
                        json={"outcome": "stopped"},
                    )


def test_a_request_replayed_after_a_restart_is_refused(process_mesh: Mesh) -> None:
    """Last of the process rows: it leaves the control plane restarted, holding grants."""
    mesh = process_mesh
    cp = mesh["cp"]
    ca = cp.data_dir / "tls" / "ca.crt"
    body = b'{"ttl_s": 600}'
    operator = mesh.credential("operator")
    signed = sign(operator, cp.node_id, "POST", _TOKEN, body)
    data = request_bytes("POST", _TOKEN, {"content-type": "application/json", **signed}, body)
    assert raw_exchange(cp.port, ca, data).status == 200
    mesh.stop("cp", signal.SIGKILL)
    mesh.start("cp")
    with mesh.operator() as op:
        before = snapshot(op)
        outcome = outcome_of(raw_exchange(cp.port, ca, data))
        after = snapshot(op)
    assert before == after, f"the replay changed: {differences(before, after)}"
    assert (outcome.status, outcome.code) == (401, "signature_replayed"), outcome


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


# -- the posture doc and the suite match one to one -----------------------------------------

OTHER_ROWS = {
    "kill-9-control-plane": test_kill_9_of_the_control_plane_under_grant_load,
    "replay-after-restart": test_a_request_replayed_after_a_restart_is_refused,
    "sigstop-worker": test_sigstop_of_a_worker_holding_a_lease,
}


def test_the_posture_doc_lists_every_attack() -> None:
    """``docs/security-posture.md``, section "The attack suite": one table row per case of
    this module, naming it by its id in backticks in the last column."""
    text = POSTURE.read_text()
    section = text.split("## The attack suite", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\|.*\|\s*`([a-z0-9.-]+)`\s*\|\s*$", section, flags=re.MULTILINE)
    ids = [p.id for p in TABLE] + [p.id for p in DISK_TABLE] + list(OTHER_ROWS)
    assert len(listed) == len(set(listed)), "a case is listed twice"
    assert sorted(listed) == sorted(ids), (
        f"missing from the doc: {sorted(set(ids) - set(listed))}; "
        f"not in the suite: {sorted(set(listed) - set(ids))}"
    )
