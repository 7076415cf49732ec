"""The joining side of enrollment (``populi join TOKEN``).

1. Decode the token: its signature is checked with the key it embeds, and that key must
   match the token's CA pin. Nothing is trusted yet.
2. Fetch the CA certificate from a contact address over a connection that verifies
   nothing, and check the CA key against the pin. A mismatch ends the join: the token is
   never sent.
3. From then on, talk to the contact only over TLS that trusts exactly that CA: ask for a
   challenge, then send the token, this node's new public key and a proof of possession.
4. Write the data directory: keys (0600), certificates, identity facts, the membership
   snapshot, the revocation list and the settings record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from enrollment.ca import ca_pin, cert_from_pem, certificate_public_key, verify_issued_by
from enrollment.canonical import b64url_encode
from enrollment.errors import CertificateError
from enrollment.keys import generate_key, node_id_for, public_to_text
from enrollment.revocation import verify_revocations
from enrollment.tokens import decode_token
from populi_peer.agent.enrollment import proof_payload
from populi_peer.api.client import decode_response, encode_body, transport_error
from populi_peer.api.tls import client_context_from_pem, insecure_probe_context
from populi_peer.clock import Clock
from populi_peer.cluster import (
    has_cluster,
    wipe_node_files,
    write_identity_files,
    write_node_config,
)
from populi_peer.errors import Conflict, PeerError, PopuliError
from populi_peer.identity import DataPaths
from populi_peer.store import Store

#: ``transport_for(ca_pem)``: ``None`` asks for the unverified first-contact transport.
TransportFactory = Callable[[str | None], httpx.AsyncBaseTransport]


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


async def _post(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any] | None, *, peer: str
) -> dict[str, Any]:
    try:
        if payload is None:
            response = await client.get(url)
        else:
            response = await client.post(
                url, content=encode_body(payload), headers={"content-type": "application/json"}
            )
    except httpx.HTTPError as exc:
        raise transport_error(exc, peer=peer, url=url) from exc
    return decode_response(response, peer=peer)


async def fetch_pinned_ca(
    contact: str, pin: str, *, transports: TransportFactory, timeout_s: float
) -> str:
    """The CA certificate at ``contact``, if its key matches ``pin``; else an error, and
    nothing was sent but a GET."""
    base = f"https://{contact}"
    async with httpx.AsyncClient(transport=transports(None), timeout=timeout_s) as probe:
        answer = await _post(probe, base + "/v1/populi/join/ca", None, peer=contact)
    pem = answer.get("ca_certificate")
    if not isinstance(pem, str):
        raise PeerError(f"{contact} did not send a CA certificate", code="bad_peer_answer")
    ca = cert_from_pem(pem)
    if ca_pin(certificate_public_key(ca)) != pin:
        raise CertificateError(
            f"the node at {contact} presents a CA that does not match the token's pin; "
            "the token was not sent (wrong address, or someone in the middle)",
            code="ca_pin_mismatch",
        )
    verify_issued_by(ca, ca)
    return pem


async def join_cluster(
    token_text: str,
    *,
    data_dir: Path,
    name: str,
    listen: str,
    advertise: list[str],
    clock: Clock,
    transports: TransportFactory = tls_transports,
    force: bool = False,
    timeout_s: float = 15.0,
    skew_s: float = 300.0,
) -> JoinResult:
    if has_cluster(data_dir):
        if not force:
            raise Conflict(
                f"{data_dir} already holds a Populi node; use another --data-dir, or --force to replace it",
                code="node_exists",
            )
        wipe_node_files(data_dir)
    now_ms = int(clock.wall() * 1000)
    token = decode_token(token_text, now_ms=now_ms, skew_ms=int(skew_s * 1000))
    key = generate_key()
    public_text = public_to_text(key.public_key())
    errors: list[str] = []
    for contact in token.contacts:
        try:
            ca_pem = await fetch_pinned_ca(
                contact, token.ca_pin, transports=transports, timeout_s=timeout_s
            )
        except CertificateError:
            raise
        except PopuliError as exc:
            errors.append(f"{contact}: {exc}")
            continue
        base = f"https://{contact}"
        async with httpx.AsyncClient(transport=transports(ca_pem), timeout=timeout_s) as client:
            try:
                challenge = await _post(
                    client, base + "/v1/populi/join/challenge", {}, peer=contact
                )
            except (PeerError, CertificateError) as exc:
                errors.append(f"{contact}: {exc}")
                continue
            except PopuliError as exc:
                if exc.code in ("peer_unreachable", "agent_unavailable"):
                    errors.append(f"{contact}: {exc}")
                    continue
                raise
            if challenge.get("cluster_id") != token.cluster_id:
                raise CertificateError(
                    f"{contact} belongs to another cluster", code="wrong_cluster"
                )
            proof = key.sign(
                proof_payload(
                    challenge=str(challenge["challenge"]),
                    token_id=token.token_id,
                    public_key=public_text,
                    cluster_id=token.cluster_id,
                    name=name,
                )
            )
            answer = await _post(
                client,
                base + "/v1/populi/join/enroll",
                {
                    "token": token_text.strip(),
                    "public_key": public_text,
                    "name": name,
                    "addresses": advertise,
                    "challenge": challenge["challenge"],
                    "proof": b64url_encode(proof),
                },
                peer=contact,
            )
        _write_data_dir(
            data_dir,
            key=key,
            answer=answer,
            ca_pem=ca_pem,
            name=name,
            listen=listen,
            advertise=advertise,
            now_ms=now_ms,
        )
        return JoinResult(
            node_id=str(answer["node_id"]),
            name=str(answer["name"]),
            roles=tuple(answer["roles"]),
            cluster_id=str(answer["cluster"]["id"]),
            cluster_name=str(answer["cluster"]["name"]),
            control_plane_url=str(answer["control_plane"]["url"]),
            contact=contact,
        )
    raise PeerError(
        "no contact address of the token answered: " + "; ".join(errors), code="peer_unreachable"
    )


def _write_data_dir(
    data_dir: Path,
    *,
    key: Any,
    answer: dict[str, Any],
    ca_pem: str,
    name: str,
    listen: str,
    advertise: list[str],
    now_ms: int,
) -> None:
    node_id = node_id_for(key.public_key())
    if answer.get("node_id") != node_id:
        raise PeerError("the control plane enrolled another key than ours", code="bad_peer_answer")
    ca = cert_from_pem(ca_pem)
    cert = cert_from_pem(answer["certificate"])
    verify_issued_by(cert, ca)
    if certificate_public_key(cert) != key.public_key():
        raise PeerError("the certificate we received is not for our key", code="bad_peer_answer")
    revocations = answer.get("revocations")
    if revocations:
        verify_revocations(
            revocations, cluster_key=certificate_public_key(ca), cluster_id=answer["cluster"]["id"]
        )
    paths = DataPaths(data_dir)
    store = Store.open(data_dir, create=True)
    try:
        write_identity_files(paths, node_key=key, node_cert=cert, ca_cert=ca)
        with store.transaction():
            meta = {
                "cluster_id": answer["cluster"]["id"],
                "cluster_name": answer["cluster"]["name"],
                "node_id": node_id,
                "node_name": name,
                "roles": json.dumps(list(answer["roles"])),
                "ca_pin": ca_pin(certificate_public_key(ca)),
                "term": str(int(answer["term"])),
                "control_plane_id": answer["control_plane"]["node_id"],
                "control_plane_url": answer["control_plane"]["url"],
                "created_ms": str(now_ms),
                "membership_version": str(int(answer.get("membership_version", 1))),
            }
            for k, v in meta.items():
                store.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (k, v))
            for member in answer.get("members", []):
                store.execute(
                    "INSERT INTO principals (id, kind, name, public_key, roles, addresses, cert_serial, "
                    "cert_not_after_ms, joined_ms, token_id, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        member["id"],
                        member["kind"],
                        member["name"],
                        member["public_key"],
                        json.dumps(member["roles"]),
                        json.dumps(member.get("addresses", [])),
                        member.get("cert_serial", ""),
                        int(member.get("cert_not_after_ms", 0)),
                        int(member.get("joined_ms", 0)),
                        "",
                        int(member.get("updated_ms", 0)),
                    ),
                )
            if revocations:
                serial = verify_revocations(
                    revocations,
                    cluster_key=certificate_public_key(ca),
                    cluster_id=answer["cluster"]["id"],
                ).serial
                store.execute(
                    "INSERT INTO revocation_lists (serial, text, stored_ms) VALUES (?, ?, ?)",
                    (serial, revocations, now_ms),
                )
            if answer.get("settings_record"):
                from enrollment.records import verify_record

                record = verify_record(answer["settings_record"], expected_kind="settings")
                store.execute(
                    "INSERT INTO cluster_records (kind, serial, text, stored_ms) VALUES ('settings', ?, ?, ?)",
                    (record.serial, record.text, now_ms),
                )
        write_node_config(data_dir, name=name, listen=listen, advertise=advertise)
    except BaseException:
        store.close()
        wipe_node_files(data_dir)
        raise
    store.close()


__all__ = ["JoinResult", "TransportFactory", "fetch_pinned_ca", "join_cluster", "tls_transports"]
