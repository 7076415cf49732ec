"""The execution plane's services built alone, without an agent: a real store in a
temporary directory, the virtual clock, the simulated executor (``populi_peer.testing.sim``)
and, for every other host, :class:`FakePeers` — an ``httpx.MockTransport`` that answers as
the control plane, a worker or a submitter would, or spoils its answers on purpose.

What this node's other services would tell the execution plane (its standing, settings,
GPUs) is given through the small Protocols the services declare (``WorkerGates``,
``SubmitterNode``, ``NodeFacts``): :class:`Gates` here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.keys import public_to_text
from populi_peer.agent.attempts import AttemptRunner
from populi_peer.agent.health import Health
from populi_peer.agent.holdings import NodeLedger
from populi_peer.agent.links import ControlPlaneLink, PeerLink
from populi_peer.agent.membership import Membership
from populi_peer.api.auth import Principal
from populi_peer.api.client import PeerClient
from populi_peer.config import ExecConfig
from populi_peer.core.membership import Member
from populi_peer.core.scope import Scope
from populi_peer.core.settings import defaults
from populi_peer.identity import Credential
from populi_peer.store import Store
from populi_peer.store.attempts import Attempts
from populi_peer.testing import VirtualClock
from populi_peer.testing.sim import SimHost

CP = "n-cp"
WORKER = "n-worker"
SUBMITTER = "n-submitter"
HOSTS = {CP: "cp.test", WORKER: "worker.test", SUBMITTER: "submitter.test"}
T0_MS = 1_700_000_000_000

#: What a fake peer answers: an ``httpx.Response``, ``bytes`` (200, sent as they are) or
#: anything JSON can write (200).
Answer = httpx.Response | bytes | Mapping[str, Any] | list[Any] | str | int | None
Responder = Callable[[httpx.Request, dict[str, Any]], Answer]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    responder: Responder


@dataclass
class Seen:
    host: str
    method: str
    path: str
    body: dict[str, Any]


class FakePeers:
    """Every other host, one handler: ``on(method, path regex, responder)``; the newest
    matching route answers. A request no route takes is a 404 ``no_route``."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.seen: list[Seen] = []

    def on(self, method: str, pattern: str, responder: Responder) -> None:
        self.routes.insert(0, Route(method, re.compile(pattern), responder))

    def requests(self, method: str, pattern: str) -> list[Seen]:
        found = re.compile(pattern)
        return [s for s in self.seen if s.method == method and found.fullmatch(s.path)]

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        self.seen.append(Seen(request.url.host, request.method, path, body))
        for route in self.routes:
            if route.method == request.method and route.pattern.fullmatch(path):
                return response(route.responder(request, body))
        return error(404, "no_route", f"no route {path}")

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def response(answer: Answer) -> httpx.Response:
    if isinstance(answer, httpx.Response):
        return answer
    content = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    return httpx.Response(200, content=content, headers={"content-type": "application/json"})


def error(status: int, code: str, message: str = "refused", **details: Any) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return httpx.Response(status, json=body)


def lease_json(**changes: Any) -> dict[str, Any]:
    """A ``LeaseView`` as a control plane writes it."""
    lease: dict[str, Any] = {
        "lease_id": "l-1",
        "task_key": "task:t-1",
        "task_id": "t-1",
        "attempt": 1,
        "work_class": "agent",
        "holder": WORKER,
        "submitter": SUBMITTER,
        "gpus": [],
        "token": "1.5",
        "ttl_s": 30.0,
        "state": "live",
        "kind": "remote",
        "granted_wall_ms": T0_MS,
        "state_changed_wall_ms": T0_MS,
        "reason": "",
        "expires_in_s": 30.0,
        "flag": None,
    }
    lease.update(changes)
    lease["task_key"] = f"task:{lease['task_id']}"
    return lease


def principal(node_id: str, *roles: str) -> Principal:
    return Principal(
        id=node_id,
        kind="node",
        name=node_id.removeprefix("n-"),
        roles=frozenset(roles or ("worker", "submit")),
        public_key=Ed25519PrivateKey.generate().public_key(),
    )


def open_store(data_dir: Path, *, node_id: str) -> Store:
    """A fresh store of ``node_id``, whose control plane is :data:`CP` (this node when it
    is ``CP``), with every node of the harness a member."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.open(data_dir, create=True)
    store.set_meta("term", "1")
    store.set_meta("control_plane_id", CP)
    store.set_meta("control_plane_url", f"https://{HOSTS[CP]}")
    membership = Membership(store)
    for member_id, host in HOSTS.items():
        membership.upsert(
            Member(
                id=member_id,
                kind="node",
                name=member_id.removeprefix("n-"),
                public_key=public_to_text(Ed25519PrivateKey.generate().public_key()),
                roles=("worker", "submit"),
                addresses=(f"{host}:443",),
                cert_serial="1",
                cert_not_after_ms=T0_MS * 2,
                joined_ms=T0_MS,
                token_id="",
                updated_ms=T0_MS,
            )
        )
    return store


@dataclass
class Links:
    client: PeerClient
    control_plane: ControlPlaneLink
    peers: PeerLink


def links(store: Store, node_id: str, fake: FakePeers, clock: VirtualClock) -> Links:
    client = PeerClient(
        credential=Credential(principal_id=node_id, key=Ed25519PrivateKey.generate()),
        clock=clock,
        transport=fake.transport,
        timeout_s=5.0,
    )
    control_plane = ControlPlaneLink(node_id=node_id, store=store, client=client)
    peers = PeerLink(
        node_id=node_id, membership=Membership(store), control_plane=control_plane, client=client
    )
    return Links(client, control_plane, peers)


def runner(
    store: Store,
    data_dir: Path,
    *,
    node_id: str,
    link: Links,
    host: SimHost,
    clock: VirtualClock,
    health: Health,
) -> AttemptRunner:
    # The node's start transaction, as the composition root wires it (ADR 0015).
    ledger = NodeLedger(node_id=node_id, attempts=Attempts(store), clock=clock)
    return AttemptRunner(
        node_id=node_id,
        tasks_dir=data_dir / "tasks",
        attempts=Attempts(store),
        clock=clock,
        control_plane=link.control_plane,
        executor=host.executor(node_id, clock),
        config=ExecConfig(),
        health=health,
        start_check=ledger.start,
        claim_convert=ledger.convert,
    )


@dataclass
class Gates:
    """This node's other services, as the worker and the submitter ask them."""

    remote: bool = True
    gpus: tuple[str, ...] = ()
    is_retired: bool = False
    is_leaving: bool = False
    caught_up: list[int | None] = field(default_factory=list)

    def retired(self) -> bool:
        return self.is_retired

    def leaving(self) -> bool:
        return self.is_leaving

    def remote_enabled(self) -> bool:
        return self.remote and not self.is_retired

    def verified_gpu_uuids(self) -> Collection[str]:
        return self.gpus

    async def catch_up_settings(self, serial: int | None) -> None:
        self.caught_up.append(serial)

    def resolve_node(self, ref: str) -> str:
        return ref if ref.startswith("n-") else f"n-{ref}"

    def scope_of(self, host: str | None) -> Scope:
        return "lan"


@dataclass
class Settings:
    """The cluster settings this node holds."""

    settings: dict[str, Any] = field(
        default_factory=lambda: {**defaults(), "remote_exec_enabled": True}
    )
    settings_serial: int = 1


#: A lease's own path (``/v1/populi/exec/leases/<lease>``), as a FakePeers route pattern.
LEASE = r"/v1/populi/exec/leases/(?P<lease>[^/]+)"
#: What a test sends instead of a good answer: a function of the good answer's JSON.
Spoil = Callable[[Any], Any]
#: A proxy's error page instead of the answer.
NOT_JSON: Spoil = lambda good: b"<html>proxy error</html>"  # noqa: E731


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def drop(*path: str | int) -> Spoil:
    """The good answer without the field at ``path`` (keys and list indexes)."""

    def spoil(good: Any) -> Any:
        out = _copy(good)
        inner = out
        for key in path[:-1]:
            inner = inner[key]
        del inner[path[-1]]
        return out

    return spoil


def set_at(value: Any, *path: str | int) -> Spoil:
    """The good answer with ``value`` at ``path`` (keys and list indexes)."""

    def spoil(good: Any) -> Any:
        out = _copy(good)
        inner = out
        for key in path[:-1]:
            inner = inner[key]
        inner[path[-1]] = value
        return out

    return spoil


__all__ = [
    "CP",
    "HOSTS",
    "LEASE",
    "NOT_JSON",
    "SUBMITTER",
    "T0_MS",
    "WORKER",
    "FakePeers",
    "Gates",
    "Links",
    "Settings",
    "Spoil",
    "drop",
    "error",
    "lease_json",
    "links",
    "open_store",
    "principal",
    "response",
    "runner",
    "set_at",
]
