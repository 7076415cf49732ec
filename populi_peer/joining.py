"""The joining side of enrollment (``populi join TOKEN``; ADR 0008).

1. Open the token: its signature is checked with the key it embeds, that key must match
   the token's CA pin, and its secret must be the seed of the token key it names. Nothing
   is trusted yet, and the secret never leaves this process.
2. Fetch the CA certificate from a contact address over a connection that verifies
   nothing, and check the CA key against the pin. A mismatch ends the join: only a GET
   was sent.
3. From then on, talk to the contact only over TLS that trusts exactly that CA, and learn
   from each handshake which node answers (the node id of its certificate's key). A node
   the token does not name among its recipients ends the join before anything is asked
   or sent: it may be a man in the middle (a retired node's certificate still chains to
   the CA).
4. Ask that node for a challenge and send the token's envelope, this node's new public
   key, its name and addresses, and two proofs over a claim bound to that node's id and
   challenge (node key and token key). Every answer must come from that same node. An
   answer lost on the way is retried with a new challenge and the same key: the control
   plane answers a retry with the outcome it recorded.
5. Write the data directory: keys (0600), certificates, identity facts, the membership
   snapshot, the revocation list and the settings record.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.ca import (
    BACKDATE_S,
    ca_pin,
    cert_from_pem,
    certificate_public_key,
    chain_from_pem,
    issuer_node_id,
    node_certificate_info,
    verify_chain,
    verify_issued_by,
)
from enrollment.errors import CertificateError
from enrollment.keys import generate_key, node_id_for, public_to_text
from enrollment.revocation import verify_revocations
from enrollment.tokens import HeldToken, JoinClaim, JoinToken, open_token, prove_join
from populi_peer.api.client import (
    RequestBody,
    decode_response,
    encode_body,
    parse_answer,
    transport_error,
)
from populi_peer.api.tls import client_context_from_pem, insecure_probe_context
from populi_peer.clock import Clock
from populi_peer.cluster import (
    has_cluster,
    wipe_node_files,
    write_identity_files,
    write_node_config,
)
from populi_peer.core.messages import (
    JoinCaAnswer,
    JoinChallengeAnswer,
    JoinEnrollAnswer,
    JoinEnrollRequest,
    Message,
)
from populi_peer.errors import Conflict, PeerError, PopuliError, enrollment_boundary
from populi_peer.identity import DataPaths
from populi_peer.store import Store
from populi_peer.store.members import Members
from populi_peer.store.records import SignedRecords
from populi_peer.store.revocations import RevocationLists

#: ``transport_for(ca_pem)``: ``None`` asks for the unverified first-contact transport.
TransportFactory = Callable[[str | None], httpx.AsyncBaseTransport]

#: Where a transport without TLS (an in-memory network, a test) says which node answered;
#: over TLS the answer's own handshake says it, and this is not looked at.
PEER_NODE_ID_EXTENSION = "populi_peer_node_id"

#: Errors after which an enroll request may or may not have been handled: retried with a
#: fresh challenge and the same key, the control plane answering from what it recorded.
_LOST_ANSWER_CODES = frozenset({"peer_timeout", "peer_unreachable"})

M = TypeVar("M", bound=Message)

CA_PATH = "/v1/populi/join/ca"
CHALLENGE_PATH = "/v1/populi/join/challenge"
ENROLL_PATH = "/v1/populi/join/enroll"


def tls_transports(ca_pem: str | None) -> httpx.AsyncBaseTransport:
    context = insecure_probe_context() if ca_pem is None else client_context_from_pem(ca_pem)
    return httpx.AsyncHTTPTransport(verify=context, retries=0)


@dataclass(frozen=True)
class JoinResult:
    node_id: str
    name: str
    roles: tuple[str, ...]
    cluster_id: str
    cluster_name: str
    control_plane_url: str
    contact: str


async def _send(
    client: httpx.AsyncClient, url: str, payload: RequestBody, *, peer: str
) -> httpx.Response:
    try:
        if payload is None:
            response = await client.get(url)
        else:
            response = await client.post(
                url, content=encode_body(payload), headers={"content-type": "application/json"}
            )
    except httpx.HTTPError as exc:
        foreign = _certificate_refusal(exc)
        if foreign is not None:
            raise CertificateError(
                f"the node at {peer} presents a certificate the token's CA did not issue "
                f"({foreign}): this may be a man in the middle; nothing was sent",
                code="peer_certificate_foreign",
            ) from exc
        raise transport_error(exc, peer=peer, url=url) from exc
    return response


def _certificate_refusal(exc: BaseException) -> str | None:
    """The verification error behind a failed TLS handshake, if that is what failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current)
        current = current.__cause__ or current.__context__
    return None


def tls_peer_node_id(response: httpx.Response, ca: x509.Certificate, *, peer: str) -> str:
    """The node that sent ``response``, as its TLS handshake proved it: the node id of the
    key in its certificate, which must chain to ``ca``.

    Over a transport without TLS, the transport's own word (:data:`PEER_NODE_ID_EXTENSION`).
    """
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is not None:
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            raise PeerError(f"{peer} sent no certificate", code="peer_unverified")
        cert = x509.load_der_x509_certificate(der)
        # The handshake verified the chain to exactly ``ca`` (the pinned root); a certificate
        # the root signed itself is checked here once more (an issuer's is not in ``der``).
        if issuer_node_id(cert) is None:
            verify_issued_by(cert, ca)
        node_id = node_id_for(certificate_public_key(cert))
        if node_certificate_info(cert).principal_id != node_id:
            raise CertificateError(
                f"the certificate of the node at {peer} names another node than its key",
                code="certificate_malformed",
            )
        return node_id
    claimed = response.extensions.get(PEER_NODE_ID_EXTENSION)
    if isinstance(claimed, str):
        return claimed
    raise PeerError(f"cannot tell which node answered at {peer}", code="peer_unverified")


async def fetch_pinned_ca(
    contact: str, pin: str, *, transports: TransportFactory, timeout_s: float
) -> str:
    """The CA certificate at ``contact``, if its key matches ``pin``; else an error, and
    nothing was sent but a GET."""
    base = f"https://{contact}"
    async with httpx.AsyncClient(transport=transports(None), timeout=timeout_s) as probe:
        response = await _send(probe, base + CA_PATH, None, peer=contact)
    answer = parse_answer(
        decode_response(response, peer=contact), JoinCaAnswer, peer=contact, what=f"GET {CA_PATH}"
    )
    pem = answer.ca_certificate
    ca = cert_from_pem(pem)
    if ca_pin(certificate_public_key(ca)) != pin:
        raise CertificateError(
            f"the node at {contact} presents a CA that does not match the token's pin; "
            "the token was not sent (wrong address, or someone in the middle)",
            code="ca_pin_mismatch",
        )
    verify_issued_by(ca, ca)
    return pem


@dataclass(frozen=True)
class _Contact:
    """One contact address, over TLS trusting exactly the pinned CA."""

    client: httpx.AsyncClient
    address: str
    ca: x509.Certificate

    @property
    def base(self) -> str:
        return f"https://{self.address}"

    async def call(
        self, path: str, payload: RequestBody, *, node_id: str | None, answer: type[M]
    ) -> tuple[M, str]:
        """One request; returns the answer (parsed as ``answer``: a malformed one is
        ``bad_peer_answer``) and the node that gave it, which must be ``node_id`` when
        given (checked before the answer, refusals included, is read)."""
        response = await _send(self.client, self.base + path, payload, peer=self.address)
        answered_by = tls_peer_node_id(response, self.ca, peer=self.address)
        if node_id is not None and answered_by != node_id:
            raise CertificateError(
                f"{self.address} was {node_id} and now answers as {answered_by}: this may be "
                "a man in the middle; the join stopped",
                code="join_peer_changed",
            )
        body = decode_response(response, peer=self.address)
        method = "GET" if payload is None else "POST"
        return parse_answer(body, answer, peer=self.address, what=f"{method} {path}"), answered_by


async def _identify_recipient(contact: _Contact, held: HeldToken) -> str:
    """The node at ``contact`` if the token names it; else a refusal that says it may be
    a man in the middle. Nothing but a GET of the public CA certificate was sent."""
    _, node_id = await contact.call(CA_PATH, None, node_id=None, answer=JoinCaAnswer)
    if not held.token.names_recipient(node_id):
        raise CertificateError(
            f"the node at {contact.address} is {node_id}, which this token does not name "
            f"(it names {', '.join(held.token.recipients)}): this may be a man in the "
            "middle; nothing was sent",
            code="join_peer_not_recipient",
        )
    return node_id


async def _enroll_at(
    contact: _Contact,
    held: HeldToken,
    *,
    recipient: str,
    key: Ed25519PrivateKey,
    name: str,
    advertise: list[str],
    attempts: int = 3,
) -> JoinEnrollAnswer:
    """Challenge, proofs, enroll at ``recipient``; an answer lost on the way is asked for
    again with a fresh challenge and the same key (the control plane answers a retry with
    the outcome it recorded)."""
    public_text = public_to_text(key.public_key())
    for attempt in range(1, attempts + 1):
        challenge, _ = await contact.call(
            CHALLENGE_PATH, {}, node_id=recipient, answer=JoinChallengeAnswer
        )
        if challenge.cluster_id != held.token.cluster_id:
            raise CertificateError(
                f"{contact.address} belongs to another cluster", code="wrong_cluster"
            )
        claim = JoinClaim(
            recipient=recipient,
            challenge=challenge.challenge,
            public_key=public_text,
            cluster_id=held.token.cluster_id,
            name=name,
            token_id=held.token.token_id,
            addresses=tuple(advertise),
        )
        proofs = prove_join(claim, node_key=key, token_key=held.token_key)
        request = JoinEnrollRequest(
            token=held.envelope,
            public_key=public_text,
            name=name,
            addresses=tuple(advertise),
            challenge=claim.challenge,
            proof=proofs.proof,
            token_proof=proofs.token_proof,
        )
        try:
            answer, _ = await contact.call(
                ENROLL_PATH, request, node_id=recipient, answer=JoinEnrollAnswer
            )
        except PopuliError as exc:
            if exc.code in _LOST_ANSWER_CODES and attempt < attempts:
                continue
            raise
        return answer
    raise AssertionError("unreachable: the last attempt returns or raises")


#: ``find_contacts(token)``: more addresses to try when the token's own fail (the
#: recipients as discovery saw them); each is proven like a contact before use.
ContactFinder = Callable[[JoinToken], Awaitable[list[str]]]
#: ``advertise(contacts)``: the addresses to advertise, given the address that answered
#: first and then the token's contacts (an overlay cluster advertises its overlay first).
AdvertiseFor = Callable[[list[str]], list[str]]


async def join_cluster(
    token_text: str,
    *,
    data_dir: Path,
    name: str,
    listen: str,
    advertise: list[str] | AdvertiseFor,
    clock: Clock,
    transports: TransportFactory = tls_transports,
    force: bool = False,
    timeout_s: float = 15.0,
    skew_s: float = 300.0,
    node_key: Ed25519PrivateKey | None = None,
    rank: Callable[[list[str]], list[str]] | None = None,
    find_contacts: ContactFinder | None = None,
) -> JoinResult:
    """Join the cluster of ``token_text``; ``node_key`` (a fresh key by default) is the
    key this node will be known by.

    The token's contacts are tried in the order ``rank`` gives (nearest first, as seen
    from this machine; the token's order without it). When none answers,
    ``find_contacts`` may offer more (LAN sightings of the token's recipients); those are
    hints: a CA that does not match the pin, or a node the token does not name, only
    rules that address out. ``advertise`` may be a function of the address that answered
    (an overlay cluster advertises its overlay address first: docs/wan.md); the data
    directory then keeps no fixed ``advertise`` list (the agent plans it at each start).
    The control plane is kept at the address this node reached it by, when it is the node
    that answered.
    """
    # Enrollment errors leave as Populi errors (still instances of their enrollment class).
    with enrollment_boundary():
        if has_cluster(data_dir):
            if not force:
                raise Conflict(
                    f"{data_dir} already holds a Populi node; use another --data-dir, or --force to replace it",
                    code="node_exists",
                )
            wipe_node_files(data_dir)
        now_ms = int(clock.wall() * 1000)
        # The joiner's clock is not the one that counts (the control plane checks expiry on
        # the clock that minted the token): this pre-check allows the whole skew budget.
        held = open_token(token_text, now_ms=now_ms, skew_ms=int(skew_s * 1000))
        key = node_key or generate_key()
        errors: list[str] = []
        contacts = list(held.token.contacts)
        if rank is not None:
            contacts = rank(contacts)

        async def attempt(address: str, *, hint: bool) -> JoinResult | None:
            """Join through ``address``; ``None`` when it is not the way in (it does not
            answer; or, for a ``hint``, it proves to be someone else)."""

            def passed_over(exc: CertificateError | PopuliError) -> bool:
                """Whether ``exc`` only says ``address`` is not the way in (noted in
                ``errors``); a certificate refused at a token's own contact ends the join."""
                if isinstance(exc, CertificateError):
                    if not hint:
                        return False
                    errors.append(f"{address} (seen on the LAN): {exc}")
                else:
                    errors.append(f"{address}: {exc}")
                return True

            try:
                ca_pem = await fetch_pinned_ca(
                    address, held.token.ca_pin, transports=transports, timeout_s=timeout_s
                )
            except (CertificateError, PopuliError) as exc:
                if not passed_over(exc):
                    raise
                return None
            async with httpx.AsyncClient(transport=transports(ca_pem), timeout=timeout_s) as client:
                contact = _Contact(client=client, address=address, ca=cert_from_pem(ca_pem))
                try:
                    recipient = await _identify_recipient(contact, held)
                except (CertificateError, PopuliError) as exc:
                    if not passed_over(exc):
                        raise
                    return None
                advertised = (
                    advertise([address, *held.token.contacts]) if callable(advertise) else advertise
                )
                answer = await _enroll_at(
                    contact, held, recipient=recipient, key=key, name=name, advertise=advertised
                )
            # The control plane is reached where this node just reached it (the nearest of
            # its addresses from here), not necessarily at the URL it calls its own.
            if answer.control_plane.node_id == recipient:
                answer = replace(
                    answer,
                    control_plane=replace(answer.control_plane, url=f"https://{address}"),
                )
            _write_data_dir(
                data_dir,
                key=key,
                answer=answer,
                ca_pem=ca_pem,
                name=name,
                listen=listen,
                advertise=[] if callable(advertise) else advertise,
                now_ms=now_ms,
            )
            return JoinResult(
                node_id=answer.node_id,
                name=answer.name,
                roles=answer.roles,
                cluster_id=answer.cluster.id,
                cluster_name=answer.cluster.name,
                control_plane_url=answer.control_plane.url,
                contact=address,
            )

        for address in contacts:
            result = await attempt(address, hint=False)
            if result is not None:
                return result
        if find_contacts is not None:
            seen = [a for a in await find_contacts(held.token) if a not in contacts]
            if not seen:
                errors.append("no node the token names was seen on the LAN or at a static peer")
            for address in seen:
                result = await attempt(address, hint=True)
                if result is not None:
                    return result
        raise PeerError(
            "no contact address of the token answered: " + "; ".join(errors),
            code="peer_unreachable",
        )


def _write_data_dir(
    data_dir: Path,
    *,
    key: Any,
    answer: JoinEnrollAnswer,
    ca_pem: str,
    name: str,
    listen: str,
    advertise: list[str],
    now_ms: int,
) -> None:
    node_id = node_id_for(key.public_key())
    if answer.node_id != node_id:
        raise PeerError("the control plane enrolled another key than ours", code="bad_peer_answer")
    ca = cert_from_pem(ca_pem)
    cert, *chain = chain_from_pem(answer.certificate)
    if certificate_public_key(cert) != key.public_key():
        raise PeerError("the certificate we received is not for our key", code="bad_peer_answer")
    cluster_id = answer.cluster.id
    revocations = answer.revocations
    revoked = None
    if revocations:
        revoked = verify_revocations(
            revocations, cluster_key=certificate_public_key(ca), cluster_id=cluster_id
        )
    serial = None if revoked is None else revoked.serial
    # The whole chain, each hop: the issuer under the root, not revoked (ADR 0018).
    verify_chain(
        cert,
        chain,
        ca,
        now_wall_s=now_ms / 1000,
        skew_s=BACKDATE_S,
        revoked=None if revoked is None else revoked.revokes_certificate,
    )
    settings = None
    if answer.settings_record:
        from enrollment.records import verify_record

        settings = verify_record(answer.settings_record, expected_kind="settings")
    paths = DataPaths(data_dir)
    store = Store.open(data_dir, create=True)
    try:
        write_identity_files(paths, node_key=key, node_cert=cert, ca_cert=ca, chain=tuple(chain))
        with store.transaction():
            meta = {
                "cluster_id": cluster_id,
                "cluster_name": answer.cluster.name,
                "node_id": node_id,
                "node_name": name,
                "roles": json.dumps(list(answer.roles)),
                "ca_pin": ca_pin(certificate_public_key(ca)),
                "term": str(answer.term),
                "control_plane_id": answer.control_plane.node_id,
                "control_plane_url": answer.control_plane.url,
                "created_ms": str(now_ms),
                "membership_version": str(answer.membership_version),
            }
            store.insert_meta(meta)
            members = Members(store)
            for view in answer.members:
                members.insert(view.member())
            if revocations and serial is not None:
                RevocationLists(store).install(serial, revocations, stored_ms=now_ms)
            if settings is not None:
                SignedRecords(store).put(
                    "settings", serial=settings.serial, text=settings.text, stored_ms=now_ms
                )
        write_node_config(data_dir, name=name, listen=listen, advertise=advertise)
    except BaseException:
        store.close()
        wipe_node_files(data_dir)
        raise
    store.close()


__all__ = [
    "PEER_NODE_ID_EXTENSION",
    "AdvertiseFor",
    "ContactFinder",
    "JoinResult",
    "TransportFactory",
    "fetch_pinned_ca",
    "join_cluster",
    "tls_peer_node_id",
    "tls_transports",
]
