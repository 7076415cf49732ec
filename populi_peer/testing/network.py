"""An in-memory network between agents in one trio run, with seeded faults.

Each node registers its ASGI app under a host name; :meth:`MemoryNetwork.transport_for`
gives a node an ``httpx`` transport that delivers its requests straight to the target app.
Faults come from one ``random.Random(seed)``, so a failing run replays exactly:

- ``drop``: the request is lost before delivery (the caller sees a connect error);
- ``drop_response``: the request is delivered and handled, the answer is lost (the caller
  sees a timeout: did it happen or not?);
- ``duplicate``: the request is delivered twice (the caller sees one answer);
- ``delay_s``: each delivery waits a uniform random time in this range;
- partitions: ``partition(a, b)`` cuts both directions, ``block(src, dst)`` one;
  ``isolate(node)`` cuts a node from everyone; ``heal()`` restores all.
- ``pause(node)``: the node's app does not answer until ``resume(node)`` (its own tasks
  keep running: a paused process would stop those too; see ``VirtualCluster.pause``).
- ``redirect(src, host, to_host)``: ``src``'s requests for ``host`` reach ``to_host``
  instead (a DNAT rule on ``src``'s machine); ``unredirect`` undoes it.

Peer identity, as TLS checks it (``populi_peer.api.tls``): a request that names the node
it expects (the ``sni_hostname`` extension, which ``PeerClient`` always sets) and reaches
an endpoint registered under another node id fails before delivery — the app never sees
it — with the connect error a refused TLS handshake gives (``outcome``
``identity_refused``). A request that names no node (the joiner's first contact, the
tests' operator client) is delivered to whoever is at the host.

Every delivery is counted in ``stats`` and, when ``record=True``, logged in ``log``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from populi_peer.api.tls import EXPECTED_PEER, PeerRefused
from populi_peer.joining import PEER_NODE_ID_EXTENSION


@dataclass
class Faults:
    drop: float = 0.0
    drop_response: float = 0.0
    duplicate: float = 0.0
    delay_s: tuple[float, float] = (0.0, 0.0)


@dataclass
class Delivery:
    src: str
    dst: str
    method: str
    path: str
    outcome: str


@dataclass
class _Endpoint:
    node_id: str
    app: Any
    paused: trio.Event | None = None


@dataclass
class MemoryNetwork:
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    record: bool = False
    #: Called with every (request, response) an app produced, e.g. a contract validator.
    on_response: Callable[[httpx.Request, httpx.Response], None] | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._hosts: dict[str, _Endpoint] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._addresses: dict[str, str] = {}
        self._redirects: dict[tuple[str, str], str] = {}
        self.stats: Counter[str] = Counter()
        self.log: list[Delivery] = []

    # -- topology -------------------------------------------------------------------------

    def register(self, *, node_id: str, host: str, app: Any, address: str | None = None) -> str:
        """Attach ``app`` at ``host``; ``address`` is the IP its requests appear to come
        from (default: a LAN address of its own). Returns the node's base URL."""
        self._hosts[host] = _Endpoint(node_id=node_id, app=app)
        self._addresses[node_id] = address or f"10.77.0.{len(self._addresses) % 250 + 1}"
        return f"https://{host}"

    def address_of(self, node_id: str) -> str:
        return self._addresses.get(node_id, "10.77.0.254")

    def unregister(self, host: str) -> None:
        self._hosts.pop(host, None)

    def node_of(self, host: str) -> str | None:
        endpoint = self._hosts.get(host)
        return endpoint.node_id if endpoint else None

    def block(self, src: str, dst: str) -> None:
        self._blocked.add((src, dst))

    def partition(self, a: str, b: str) -> None:
        self._blocked.update({(a, b), (b, a)})

    def isolate(self, node_id: str) -> None:
        for endpoint in self._hosts.values():
            if endpoint.node_id != node_id:
                self.partition(node_id, endpoint.node_id)

    def heal(self, node_id: str | None = None) -> None:
        if node_id is None:
            self._blocked.clear()
        else:
            self._blocked = {pair for pair in self._blocked if node_id not in pair}

    def redirect(self, src: str, host: str, to_host: str) -> None:
        """``src``'s requests for ``host`` go to ``to_host`` (DNAT on ``src``'s side)."""
        self._redirects[(src, host)] = to_host

    def unredirect(self, src: str, host: str) -> None:
        self._redirects.pop((src, host), None)

    def blocked(self, src: str, dst: str) -> bool:
        return (src, dst) in self._blocked

    def pause(self, node_id: str) -> None:
        for endpoint in self._hosts.values():
            if endpoint.node_id == node_id and endpoint.paused is None:
                endpoint.paused = trio.Event()

    def resume(self, node_id: str) -> None:
        for endpoint in self._hosts.values():
            if endpoint.node_id == node_id and endpoint.paused is not None:
                endpoint.paused.set()
                endpoint.paused = None

    def transport_for(self, node_id: str) -> httpx.AsyncBaseTransport:
        return _MemoryTransport(self, node_id)

    # -- delivery -------------------------------------------------------------------------

    def _note(self, src: str, dst: str, request: httpx.Request, outcome: str) -> None:
        self.stats[outcome] += 1
        if self.record:
            self.log.append(Delivery(src, dst, request.method, request.url.path, outcome))

    async def deliver(self, src: str, request: httpx.Request) -> httpx.Response:
        host = self._redirects.get((src, request.url.host), request.url.host)
        endpoint = self._hosts.get(host)
        if endpoint is None:
            self._note(src, host, request, "no_route")
            raise httpx.ConnectError(f"no route to {host}", request=request)
        dst = endpoint.node_id
        low, high = self.faults.delay_s
        if high > 0:
            await trio.sleep(self.rng.uniform(low, high))
        else:
            await trio.lowlevel.checkpoint()
        if self.blocked(src, dst):
            self._note(src, dst, request, "partitioned")
            # Across a partition a kept-alive request hangs until its timeout.
            await trio.sleep(_timeout_of(request))
            raise httpx.ReadTimeout("partitioned", request=request)
        if self.rng.random() < self.faults.drop:
            self._note(src, dst, request, "dropped")
            raise httpx.ConnectError("dropped", request=request)
        if endpoint.paused is not None:
            with trio.move_on_after(_timeout_of(request)):
                await endpoint.paused.wait()
            if endpoint.paused is not None:
                self._note(src, dst, request, "paused")
                raise httpx.ReadTimeout("peer paused", request=request)
        expected = request.extensions.get(EXPECTED_PEER)
        if expected and expected != dst:
            self._note(src, dst, request, "identity_refused")
            raise httpx.ConnectError(
                f"{host} is {dst}, not {expected}", request=request
            ) from PeerRefused(
                f"the peer's certificate names {dst}, not {expected}",
                code="peer_identity_mismatch",
                expected=expected,
                presented=dst,
            )
        body = request.read()
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        response: httpx.Response | None = None
        for _ in range(copies):
            clone = httpx.Request(
                request.method, request.url, headers=request.headers, content=body
            )
            transport = httpx.ASGITransport(app=endpoint.app, client=(self.address_of(src), 443))
            answer = await transport.handle_async_request(clone)
            await answer.aread()
            if self.on_response is not None:
                self.on_response(clone, answer)
            response = response or answer
        assert response is not None
        if copies == 2:
            self._note(src, dst, request, "duplicated")
        if self.rng.random() < self.faults.drop_response:
            self._note(src, dst, request, "response_dropped")
            raise httpx.ReadTimeout("response lost", request=request)
        self._note(src, dst, request, "delivered")
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=response.content,
            request=request,
            # What a TLS handshake would prove: which node answered (see joining).
            extensions={PEER_NODE_ID_EXTENSION: dst},
        )


def _timeout_of(request: httpx.Request) -> float:
    timeout = request.extensions.get("timeout", {})
    value = timeout.get("read") if isinstance(timeout, dict) else None
    return float(value) if value else 5.0


class _MemoryTransport(httpx.AsyncBaseTransport):
    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        self.network = network
        self.node_id = node_id

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.network.deliver(self.node_id, request)


__all__ = ["Delivery", "Faults", "MemoryNetwork"]
