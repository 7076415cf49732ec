"""What the attack table (``test_attack_table.py``) drives: real clusters on loopback, an
attacker's raw requests, and the state a refusal must leave alone.

- :func:`build_mesh` starts a control plane and nodes as real ``populi`` processes (the
  ``Mesh`` of ``e2e/exec_support.py``, built faster: tokens and settings through the
  operator API, joins and agent starts in parallel).
- An attacker holds what it holds: a node's key read from its data directory
  (:func:`credential_of`), a key of its own, a captured request. :func:`sign` signs
  exactly what it is told (any ``created`` time, any recipient); :func:`raw_exchange`
  writes bytes to a TLS connection and reads one answer, so that a request can be
  replayed byte for byte, or a body be declared larger than what is sent.
- :func:`snapshot` reads, through the operator API, everything a refused request could
  have written: join tokens and their uses, members and nodes, events, leases, the
  revocation list and settings, the worker's inbox and the submitter's tasks.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from e2e.exec_support import Mesh, wait_for

from enrollment.signing import sign_request
from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from populi_peer.identity import Credential, load_identity
from populi_peer.store import Store
from support.contract import sync_hook
from support.procs import POPULI, populi

#: The reason codes of the API are stable snake_case words.
CODE_RE = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"


# -- identities -------------------------------------------------------------------------


def credential_of(data_dir: Path, *, operator: bool = False) -> Credential:
    """The node key (or the operator key) a data directory holds: what anyone who can
    read that directory can sign with."""
    store = Store.open(data_dir, readonly=True)
    try:
        identity = load_identity(data_dir, store)
    finally:
        store.close()
    if operator:
        assert identity.operator is not None, f"{data_dir} holds no operator credential"
        return identity.operator
    return identity.node_credential


def meta(data_dir: Path, key: str) -> str:
    store = Store.open(data_dir, readonly=True)
    try:
        return store.require_meta(key)
    finally:
        store.close()


# -- building a cluster -----------------------------------------------------------------


def build_mesh(
    root: Path,
    *,
    gpu: tuple[str, ...] = (),
    cpu: tuple[str, ...] = (),
    roles: dict[str, str] | None = None,
    settings: dict[str, Any] | None = None,
    cp_env: dict[str, str] | None = None,
) -> Mesh:
    """A control plane ``cp`` (CPU only) and the named nodes, every agent running and seen
    fresh by the control plane. ``roles`` maps a node to the roles its token grants
    (default ``worker,submit``); ``settings`` are set once and awaited on every node.
    Remote execution is on only if ``settings`` turns it on."""
    remote = bool(settings and settings.get("remote_exec_enabled"))
    mesh = Mesh(root, remote=remote)
    try:
        cp = mesh._add("cp", gpu=False)
        cp.env.update(cp_env or {})
        init = populi(
            "init", "--cluster-name", "lab", "--data-dir", str(cp.data_dir),
            "--listen", f"127.0.0.1:{cp.port}", "--name", "cp", "--json", check=True,
        )  # fmt: skip
        cp.node_id = json.loads(init.stdout)["node"]["id"]
        mesh.start("cp")
        names = [*gpu, *cpu]
        for name in names:
            mesh._add(name, gpu=name in gpu)
        with operator_api(mesh) as op:
            tokens = {
                name: mint(op, roles=(roles or {}).get(name, "worker,submit").split(","))
                for name in names
            }
        joins = {}
        for name in names:
            args = ["join", tokens[name], "--data-dir", str(mesh[name].data_dir),
                    "--listen", f"127.0.0.1:{mesh[name].port}", "--name", name]  # fmt: skip
            joins[name] = subprocess.Popen(
                [*POPULI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        for name, join in joins.items():
            _, err = join.communicate(timeout=120)
            assert join.returncode == 0, f"join {name}: {err}"
        for name in names:
            node = mesh[name]
            node.agent = mesh.procs.start_agent(node.data_dir, env=node.env, wait=False)
        for name in names:
            node = mesh[name]
            assert node.agent is not None
            mesh.procs.wait_ready(node.agent, guard_s=60)
            node.node_id = node.agent.node_id
        if settings:
            set_settings(mesh, settings)
        mesh.wait_settled()
    except BaseException:
        mesh.close()
        raise
    return mesh


def mint(client: httpx.Client, **body: Any) -> str:
    """A join token, minted by the operator through the API; returns its text."""
    answer = client.post("/v1/populi/admin/tokens", json={"ttl_s": 600, **body})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["token"])


def set_settings(mesh: Mesh, changes: dict[str, Any]) -> None:
    """Change cluster settings in one record and wait until every running node holds it."""
    with operator_api(mesh) as op:
        answer = op.post("/v1/populi/admin/settings", json={"changes": changes})
    assert answer.status_code == 200, answer.text
    serial = int(answer.json()["settings"]["serial"])
    if "max_lease_ttl_s" in changes:
        mesh.ttl_s = int(changes["max_lease_ttl_s"])
    wait_for(
        f"settings serial {serial} reaches every node",
        lambda: all(
            mesh.settings_serial(name) >= serial
            for name, node in mesh.nodes.items()
            if node.alive()
        ),
        guard_s=60,
    )


# -- talking to agents ------------------------------------------------------------------


@contextmanager
def api(
    mesh: Mesh,
    to: str,
    credential: Credential | None,
    *,
    validate: bool = True,
    local_address: str | None = None,
) -> Iterator[httpx.Client]:
    """A client of node ``to`` over real TLS (the cluster CA), signing as ``credential``
    (unsigned with ``None``); every answer is checked against the OpenAPI contract."""
    node = mesh[to]
    transport = httpx.HTTPTransport(
        verify=client_context(mesh["cp"].data_dir / "tls" / "ca.crt"),
        local_address=local_address,
        retries=0,
    )
    with httpx.Client(
        base_url=f"https://127.0.0.1:{node.port}",
        transport=transport,
        auth=SignedAuth(credential, node.node_id, SystemClock()) if credential else None,
        event_hooks={"response": [sync_hook]} if validate else {},
        timeout=30,
    ) as client:
        yield client


@contextmanager
def operator_api(mesh: Mesh, to: str = "cp") -> Iterator[httpx.Client]:
    with api(mesh, to, credential_of(mesh["cp"].data_dir, operator=True)) as client:
        yield client


def sign(
    credential: Credential,
    recipient: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    query: str = "",
    created_s: int | None = None,
) -> dict[str, str]:
    """The signature headers of a request, with any ``created`` time and recipient."""
    return sign_request(
        key=credential.key,
        keyid=credential.principal_id,
        recipient=recipient,
        method=method,
        path=path,
        query=query,
        body=body,
        created_s=int(time.time()) if created_s is None else created_s,
        nonce=secrets.token_bytes(16),
    )


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as an attacker sees it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def error(self) -> dict[str, Any]:
        error = self.json().get("error")
        assert isinstance(error, dict), f"HTTP {self.status} without an error: {self.body[:300]!r}"
        return error


def answer_of(response: httpx.Response) -> Answer:
    return Answer(response.status_code, dict(response.headers), response.content)


def request_bytes(
    method: str, path: str, headers: dict[str, str], body: bytes = b"", *, length: int | None = None
) -> bytes:
    """An HTTP/1.1 request, byte for byte; ``length`` declares another body size than
    the body sent."""
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def tls_connect(port: int, ca: Path, *, timeout_s: float = 30.0) -> ssl.SSLSocket:
    """A TLS 1.3 connection to an agent, trusting the cluster CA (no node check: an
    attacker does not care who answers)."""
    context = client_context(ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    return context.wrap_socket(raw)


def read_answer(conn: socket.socket) -> Answer:
    """Read one HTTP/1.1 answer (the agent always sends ``content-length``)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before an answer: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, rest[:length])


def raw_exchange(port: int, ca: Path, data: bytes) -> Answer:
    """Write ``data`` to a fresh TLS connection and read the answer."""
    with tls_connect(port, ca) as conn:
        conn.sendall(data)
        return read_answer(conn)


# -- the state a refusal must leave alone -------------------------------------------------


def _get(client: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    answer = client.get(path, params=params)
    assert answer.status_code == 200, f"{path}: {answer.text}"
    return dict(answer.json())


def snapshot(
    cp: httpx.Client, *, worker: httpx.Client | None = None, submitter: httpx.Client | None = None
) -> dict[str, Any]:
    """Everything a refused request could have written, read through the API as the
    operator: on the control plane (``cp``), join tokens (uses left, who used them,
    revoked), members, nodes and their lifecycle, every event, every lease, the revocation
    list and the settings record; on ``worker`` its inbox, on ``submitter`` its tasks.
    Fields that move by themselves (heartbeat ages, times left) are left out."""
    state: dict[str, Any] = {}
    tokens = _get(cp, "/v1/populi/admin/tokens")["tokens"]
    state["tokens"] = sorted(
        (t["token_id"], t["uses_left"], tuple(t["used_by"]), t["revoked_ms"]) for t in tokens
    )
    state["members"] = sorted(
        (m["id"], m["kind"], m["name"], tuple(m["roles"]), m.get("cert_serial"))
        for m in _get(cp, "/v1/populi/members")["members"]
    )
    state["nodes"] = sorted(
        (n["id"], n["name"], n["state"]) for n in _get(cp, "/v1/populi/nodes")["nodes"]
    )
    state["events"] = [
        (e["seq"], e["kind"], e["node_id"], e["actor"])
        for e in _get(cp, "/v1/populi/events", limit=1000)["events"]
    ]
    state["leases"] = sorted(
        (x["lease_id"], x["state"], x["token"], x["holder"], tuple(x["gpus"]))
        for x in _get(cp, "/v1/populi/exec/leases")["leases"]
    )
    state["revocations"] = _get(cp, "/v1/populi/revocations")["serial"]
    state["settings"] = _get(cp, "/v1/populi/settings")["settings"]["serial"]
    if worker is not None:
        messages = _get(worker, "/v1/populi/inbox", limit=1000)["messages"]
        state["inbox"] = [(m["seq"], m["message_id"], m["sender"]) for m in messages]
    if submitter is not None:
        tasks = _get(submitter, "/v1/populi/tasks", limit=1000)["tasks"]
        state["tasks"] = sorted((t["task_id"], t["state"]) for t in tasks)
    return state


def differences(before: dict[str, Any], after: dict[str, Any]) -> str:
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new:
            if isinstance(old, list) and isinstance(new, list):
                out.append(
                    f"{key}: -{[x for x in old if x not in new]} +{[x for x in new if x not in old]}"
                )
            else:
                out.append(f"{key}: {old!r} -> {new!r}")
    return "; ".join(out)[:3000]


__all__ = [
    "CODE_RE",
    "Answer",
    "answer_of",
    "api",
    "build_mesh",
    "credential_of",
    "differences",
    "meta",
    "mint",
    "operator_api",
    "raw_exchange",
    "read_answer",
    "request_bytes",
    "set_settings",
    "sign",
    "snapshot",
    "tls_connect",
]
