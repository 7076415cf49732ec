"""Creating a cluster (``populi init``) and writing a node's identity to its data directory."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.ca import ca_pin, cert_to_pem, make_ca_certificate, make_node_certificate
from enrollment.keys import (
    generate_key,
    node_id_for,
    operator_id_for,
    principal_id,
    public_to_text,
    write_private_key,
    write_public_file,
)
from enrollment.records import sign_record
from enrollment.revocation import RevocationList, sign_revocations
from populi_peer.config import CONFIG_FILE_NAME, format_host_port, parse_host_port, reach_host
from populi_peer.core import settings as cluster_settings
from populi_peer.core.membership import Member
from populi_peer.core.replication import Entry, bootstrap_voters, voters_body
from populi_peer.datadir_lock import refuse_while_locked
from populi_peer.errors import Conflict, UsageError
from populi_peer.identity import NODE_ROLES_INIT, OPERATOR_ROLES, DataPaths
from populi_peer.store import DB_FILE_NAME, Store
from populi_peer.store.election import ElectionState
from populi_peer.store.events import EventLog
from populi_peer.store.members import Members
from populi_peer.store.records import SignedRecords
from populi_peer.store.revocations import RevocationLists

_OWNED = (
    DB_FILE_NAME,
    DB_FILE_NAME + "-wal",
    DB_FILE_NAME + "-shm",
    CONFIG_FILE_NAME,
    "keys",
    "tls",
    "run",
)


@dataclass(frozen=True)
class InitResult:
    cluster_id: str
    cluster_name: str
    node_id: str
    node_name: str
    operator_id: str
    url: str
    ca_pin: str


def has_cluster(data_dir: Path) -> bool:
    return (data_dir / DB_FILE_NAME).exists() or (data_dir / "keys" / "node.key").exists()


def wipe_node_files(data_dir: Path) -> None:
    """Remove the files Populi owns in a data directory (``--force``), nothing else;
    refused (:class:`AlreadyRunning`) while an agent runs on it."""
    with refuse_while_locked(data_dir):
        for name in _OWNED:
            path = data_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def address_hosts(addresses: list[str]) -> list[str]:
    return [parse_host_port(address)[0] for address in addresses]


def write_node_config(data_dir: Path, *, name: str, listen: str, advertise: list[str]) -> None:
    node: dict[str, object] = {"name": name, "listen": listen}
    if advertise:
        node["advertise"] = advertise
    text = (
        "# Written by populi init/join. Every key: configs/populi.example.toml\n"
        + tomli_w.dumps({"node": node})
    )
    path = data_dir / CONFIG_FILE_NAME
    path.write_text(text)


def url_for(addresses: list[str], listen: str) -> str:
    if addresses:
        return f"https://{addresses[0]}"
    host, port = parse_host_port(listen)
    return f"https://{format_host_port(reach_host(host), port)}"


def write_identity_files(
    paths: DataPaths,
    *,
    node_key: Ed25519PrivateKey,
    node_cert: x509.Certificate,
    ca_cert: x509.Certificate,
) -> None:
    (paths.root / "keys").mkdir(parents=True, exist_ok=True)
    (paths.root / "keys").chmod(0o700)
    write_private_key(paths.node_key, node_key)
    write_public_file(paths.ca_cert, cert_to_pem(ca_cert))
    write_public_file(paths.node_cert, cert_to_pem(node_cert))


def init_cluster(
    data_dir: Path,
    *,
    cluster_name: str,
    node_name: str,
    listen: str,
    advertise: list[str],
    force: bool,
    now_wall_s: float,
) -> InitResult:
    if (
        not cluster_name
        or len(cluster_name) > 63
        or not all(c.isalnum() or c in "-_." for c in cluster_name)
    ):
        raise UsageError(
            f"cluster name {cluster_name!r} must be 1-63 letters, digits, '-', '_' or '.'"
        )
    if has_cluster(data_dir):
        if not force:
            raise Conflict(
                f"{data_dir} already holds a Populi node; use another --data-dir, or --force to "
                "replace it (its cluster keys are lost)",
                code="cluster_exists",
            )
        wipe_node_files(data_dir)
    paths = DataPaths(data_dir)
    now_ms = int(now_wall_s * 1000)
    root_key = generate_key()
    cluster_id = principal_id("c", root_key.public_key())
    ca_cert = make_ca_certificate(
        root_key=root_key,
        cluster_id=cluster_id,
        cluster_name=cluster_name,
        now_wall_s=now_wall_s,
        serial=secrets.randbits(63) | 1,
    )
    node_key = generate_key()
    node_id = node_id_for(node_key.public_key())
    advertise = advertise or _default_advertise(listen)
    node_cert = make_node_certificate(
        ca_key=root_key,
        ca_cert=ca_cert,
        subject_key=node_key.public_key(),
        principal_id=node_id,
        cluster_id=cluster_id,
        addresses=address_hosts(advertise),
        now_wall_s=now_wall_s,
        serial=secrets.randbits(63) | 1,
    )
    operator_key = generate_key()
    operator_id = operator_id_for(operator_key.public_key())

    store = Store.open(data_dir, create=True)
    try:
        write_identity_files(paths, node_key=node_key, node_cert=node_cert, ca_cert=ca_cert)
        write_private_key(paths.cluster_key, root_key)
        write_private_key(paths.operator_key, operator_key)
        url = url_for(advertise, listen)
        settings_text = sign_record(
            kind="settings",
            serial=1,
            body=cluster_settings.signed_body(cluster_settings.defaults()),
            signer_id=node_id,
            signer_key=node_key,
            now_ms=now_ms,
            actor=operator_id,
        )
        with store.transaction():
            meta = {
                "cluster_id": cluster_id,
                "cluster_name": cluster_name,
                "node_id": node_id,
                "node_name": node_name,
                "roles": json.dumps(list(NODE_ROLES_INIT)),
                "operator_id": operator_id,
                "ca_pin": ca_pin(root_key.public_key()),
                "term": "1",
                "control_plane_id": node_id,
                "control_plane_url": url,
                "created_ms": str(now_ms),
            }
            store.insert_meta(meta)
            members = Members(store)
            members.insert(
                Member(
                    id=node_id,
                    kind="node",
                    name=node_name,
                    public_key=public_to_text(node_key.public_key()),
                    roles=tuple(NODE_ROLES_INIT),
                    addresses=tuple(advertise),
                    cert_serial=format(node_cert.serial_number, "x"),
                    cert_not_after_ms=int(node_cert.not_valid_after_utc.timestamp() * 1000),
                    joined_ms=now_ms,
                    token_id="",
                    updated_ms=now_ms,
                )
            )
            members.insert(
                Member(
                    id=operator_id,
                    kind="operator",
                    name=f"operator@{node_name}",
                    public_key=public_to_text(operator_key.public_key()),
                    roles=tuple(OPERATOR_ROLES),
                    addresses=(),
                    cert_serial="",
                    cert_not_after_ms=0,
                    joined_ms=now_ms,
                    token_id="",
                    updated_ms=now_ms,
                )
            )
            SignedRecords(store).put("settings", serial=1, text=settings_text, stored_ms=now_ms)
            ElectionState(store).bootstrap(
                first_voters_entry(
                    node_id=node_id, node_key=node_key, actor=operator_id, now_ms=now_ms
                )
            )
            RevocationLists(store).install(
                0,
                sign_revocations(RevocationList.empty(cluster_id, now_ms=now_ms), root_key),
                stored_ms=now_ms,
            )
            EventLog(store).append(
                at_ms=now_ms,
                node_id=node_id,
                kind="cluster_created",
                actor=operator_id,
                detail={"cluster_name": cluster_name},
            )
        write_node_config(
            data_dir,
            name=node_name,
            listen=listen,
            advertise=advertise if advertise != _default_advertise(listen) else [],
        )
    finally:
        store.close()
    return InitResult(
        cluster_id=cluster_id,
        cluster_name=cluster_name,
        node_id=node_id,
        node_name=node_name,
        operator_id=operator_id,
        url=url,
        ca_pin=ca_pin(root_key.public_key()),
    )


def first_voters_entry(
    *, node_id: str, node_key: Ed25519PrivateKey, actor: str, now_ms: int
) -> Entry:
    """The cluster's first voter-set record: the ``populi init`` node as its sole voter,
    signed with its node key (ADR 0011 Decision 6, ADR 0016)."""
    text = sign_record(
        kind="voters",
        serial=1,
        body=voters_body([node_id], ()),
        signer_id=node_id,
        signer_key=node_key,
        now_ms=now_ms,
        actor=actor,
    )
    return bootstrap_voters([node_id], text)


def _default_advertise(listen: str) -> list[str]:
    host, port = parse_host_port(listen)
    if host in ("0.0.0.0", "::") or port == 0:
        return []
    return [format_host_port(host, port)]


__all__ = [
    "InitResult",
    "first_voters_entry",
    "has_cluster",
    "init_cluster",
    "url_for",
    "wipe_node_files",
    "write_identity_files",
    "write_node_config",
]
