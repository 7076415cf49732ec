"""What the attack table (``test_attack_table.py``) drives: real clusters on loopback, an
attacker's raw requests, and the state a refusal must leave alone.

- The clusters are ``support.mesh.Mesh`` (joins and agent starts all at once, the roles
  of each node's token, settings set once and awaited); these helpers talk to them.
- An attacker holds what it holds: a node's key read from its data directory
  (``support.mesh.credential_of``), a key of its own, a captured request. :func:`sign` signs
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from enrollment.signing import sign_request
from populi_peer.api.tls import client_context
from populi_peer.identity import Credential

#: The reason codes of the API are stable snake_case words.
CODE_RE = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"


# -- tokens -----------------------------------------------------------------------------


def mint(client: httpx.Client, **body: Any) -> str:
    """A join token, minted by the operator through the API; returns its text."""
    answer = client.post("/v1/populi/admin/tokens", json={"ttl_s": 600, **body})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["token"])


# -- talking to agents ------------------------------------------------------------------


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


__all__ = [
    "CODE_RE",
    "Answer",
    "answer_of",
    "mint",
    "raw_exchange",
    "read_answer",
    "request_bytes",
    "sign",
    "snapshot",
    "tls_connect",
]
