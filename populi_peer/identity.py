"""Who this node is: keys, certificates and cluster facts in the data directory.

Layout (``populi init`` / ``populi join`` create it)::

    <data dir>/
      populi.db            SQLite: identity facts, membership, records, tasks...
      populi.toml          node config written at init/join (listen, advertise, name)
      keys/node.key        this node's Ed25519 key (0600)
      keys/cluster.key     the cluster root key: made by init, moved off-line by the
                           operator (runbooks/offline-root.md) (0600)
      keys/issuer.key      a voter's issuing key, made on this node, never copied (0600)
      keys/issuer.next.key the key of a pending issuer request (populi ca request) (0600)
      keys/operator.key    the local operator credential (0600), where one was made
      tls/ca.crt           the cluster CA certificate (the only trust anchor)
      tls/issuer.crt       a voter's issuer certificate, signed by the root
      tls/issuer.csr       the request for it, while the root has not signed it yet
      tls/node.crt         this node's certificate, then the issuer certificate that
                           signed it (none when the root signed it: older clusters)
      run/agent.json       written by a running agent: pid, bound address
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.ca import Issuer, cert_from_pem, certificate_public_key, node_certificate_info
from enrollment.keys import load_private_key
from populi_peer.errors import AgentUnavailable, StoreError, enrollment_boundary
from populi_peer.store import Store

NODE_ROLES_INIT = ("submit", "voter", "worker")
OPERATOR_ROLES = ("operator", "submit")


@dataclass(frozen=True)
class DataPaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "populi.db"

    @property
    def config(self) -> Path:
        return self.root / "populi.toml"

    @property
    def node_key(self) -> Path:
        return self.root / "keys" / "node.key"

    @property
    def cluster_key(self) -> Path:
        return self.root / "keys" / "cluster.key"

    @property
    def operator_key(self) -> Path:
        return self.root / "keys" / "operator.key"

    @property
    def issuer_key(self) -> Path:
        return self.root / "keys" / "issuer.key"

    @property
    def issuer_key_next(self) -> Path:
        """The key of a pending issuer request (``populi ca request``), until installed."""
        return self.root / "keys" / "issuer.next.key"

    @property
    def issuer_cert(self) -> Path:
        return self.root / "tls" / "issuer.crt"

    @property
    def issuer_request(self) -> Path:
        return self.root / "tls" / "issuer.csr"

    @property
    def ca_cert(self) -> Path:
        return self.root / "tls" / "ca.crt"

    @property
    def node_cert(self) -> Path:
        return self.root / "tls" / "node.crt"

    @property
    def runtime(self) -> Path:
        return self.root / "run" / "agent.json"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"


@dataclass(frozen=True)
class Credential:
    """A principal that can sign requests: a node, or an operator."""

    principal_id: str
    key: Ed25519PrivateKey


@dataclass(frozen=True)
class Identity:
    paths: DataPaths
    cluster_id: str
    cluster_name: str
    node_id: str
    node_name: str
    roles: tuple[str, ...]
    node_key: Ed25519PrivateKey
    ca_cert: x509.Certificate
    node_cert: x509.Certificate
    cluster_key: Ed25519PrivateKey | None
    operator: Credential | None
    issuer_key: Ed25519PrivateKey | None = None
    issuer_cert: x509.Certificate | None = None

    @property
    def issuer(self) -> Issuer | None:
        """What this node signs certificates, tokens and revocation lists with: its issuer
        (a voter's intermediate), else the root key where it is still here (a cluster made
        before issuers), else nothing."""
        if self.issuer_key is not None and self.issuer_cert is not None:
            return Issuer(self.issuer_key, self.issuer_cert, self.ca_cert)
        if self.cluster_key is not None:
            return Issuer(self.cluster_key, None, self.ca_cert)
        return None

    @property
    def node_credential(self) -> Credential:
        return Credential(self.node_id, self.node_key)

    @property
    def cli_credential(self) -> Credential:
        """What the CLI signs with: the operator credential where there is one."""
        return self.operator or self.node_credential

    @property
    def cert_not_after_s(self) -> float:
        return node_certificate_info(self.node_cert).not_after_s


def load_identity(data_dir: Path, store: Store) -> Identity:
    """The node's identity from its data directory; a certificate or key that does not
    load is a refusal (``certificate_*``, ``key_unreadable``)."""
    with enrollment_boundary():
        return _load_identity(data_dir, store)


def _load_identity(data_dir: Path, store: Store) -> Identity:
    paths = DataPaths(data_dir)
    try:
        ca_cert = cert_from_pem(paths.ca_cert.read_bytes())
        node_cert = cert_from_pem(paths.node_cert.read_bytes())
    except OSError as exc:
        raise StoreError(
            f"data directory {data_dir} lacks its certificates ({exc.filename}); re-run init or join",
            code="no_identity",
        ) from exc
    node_key = load_private_key(paths.node_key)
    if certificate_public_key(node_cert) != node_key.public_key():
        raise StoreError(
            f"{paths.node_cert} does not belong to {paths.node_key}", code="identity_mismatch"
        )
    cluster_key = load_private_key(paths.cluster_key) if paths.cluster_key.exists() else None
    issuer_key = issuer_cert = None
    if paths.issuer_key.exists() and paths.issuer_cert.exists():
        issuer_key = load_private_key(paths.issuer_key)
        issuer_cert = cert_from_pem(paths.issuer_cert.read_bytes())
        if certificate_public_key(issuer_cert) != issuer_key.public_key():
            raise StoreError(
                f"{paths.issuer_cert} does not belong to {paths.issuer_key}",
                code="identity_mismatch",
            )
    operator = None
    operator_id = store.get_meta("operator_id")
    if operator_id and paths.operator_key.exists():
        operator = Credential(operator_id, load_private_key(paths.operator_key))
    return Identity(
        paths=paths,
        cluster_id=store.require_meta("cluster_id"),
        cluster_name=store.require_meta("cluster_name"),
        node_id=store.require_meta("node_id"),
        node_name=store.require_meta("node_name"),
        roles=tuple(json.loads(store.require_meta("roles"))),
        node_key=node_key,
        ca_cert=ca_cert,
        node_cert=node_cert,
        cluster_key=cluster_key,
        operator=operator,
        issuer_key=issuer_key,
        issuer_cert=issuer_cert,
    )


@dataclass(frozen=True)
class RuntimeInfo:
    """What a running agent publishes in ``run/agent.json`` for the CLI."""

    pid: int
    url: str
    node_id: str
    started_wall_s: float


def write_runtime(paths: DataPaths, info: RuntimeInfo) -> None:
    paths.runtime.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.runtime.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "pid": info.pid,
                "url": info.url,
                "node_id": info.node_id,
                "started_wall_s": info.started_wall_s,
            }
        )
    )
    os.replace(tmp, paths.runtime)


def clear_runtime(paths: DataPaths, pid: int) -> None:
    try:
        current = json.loads(paths.runtime.read_text())
    except (OSError, ValueError):
        return
    if current.get("pid") == pid:
        paths.runtime.unlink(missing_ok=True)


def read_runtime(paths: DataPaths) -> RuntimeInfo:
    """The running agent's address, or :class:`AgentUnavailable` (exit 3)."""
    try:
        data = json.loads(paths.runtime.read_text())
        info = RuntimeInfo(
            pid=int(data["pid"]),
            url=str(data["url"]),
            node_id=str(data["node_id"]),
            started_wall_s=float(data["started_wall_s"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentUnavailable(
            f"no agent running for {paths.root} (start one with: populi agent --data-dir {paths.root})"
        ) from exc
    if not _pid_alive(info.pid):
        raise AgentUnavailable(
            f"no agent running for {paths.root} (pid {info.pid} is gone; start one with: "
            f"populi agent --data-dir {paths.root})"
        )
    return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "NODE_ROLES_INIT",
    "OPERATOR_ROLES",
    "Credential",
    "DataPaths",
    "Identity",
    "RuntimeInfo",
    "clear_runtime",
    "load_identity",
    "read_runtime",
    "write_runtime",
]
