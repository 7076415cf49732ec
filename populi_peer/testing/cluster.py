"""A virtual cluster: several real :class:`~populi_peer.agent.agent.Agent` objects in one
trio run, each with its own data directory, clock and ASGI app, joined by a
:class:`~populi_peer.testing.network.MemoryNetwork` through the real join flow (token,
pinned CA, challenge, proof). Run it on trio's ``MockClock`` (pytest-trio's
``autojump_clock``) and time is virtual: a test can wait an hour in milliseconds.

    async with open_virtual_cluster(tmp_path, workers=2) as cluster:
        await cluster.wait_until(lambda: cluster.cp.heartbeats.age_ms(cluster["w1"].node_id) is not None)
        cluster.network.partition(cluster["w1"].node_id, cluster.cp.node_id)

A node whose config names no GPU capture replays a real one whose ``nvmlInit`` fails as
on a machine without a loaded driver (:func:`write_no_driver_capture`): the real NVML runs
in worker threads, and threads do not mix with an autojump clock (it jumps while a thread
answers, past the call's timeout), whatever GPU the test machine has.

``crash(name)`` cancels an agent without any graceful step (like SIGKILL: its tasks stop,
its store is closed, nothing is said to anyone); ``start(name)`` brings it back from its
data directory, as a restart would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict, Unpack

import httpx
import trio

from populi_peer.agent.agent import Agent
from populi_peer.api.client import SignedAuth
from populi_peer.cluster import init_cluster
from populi_peer.config import Config
from populi_peer.joining import join_cluster
from populi_peer.testing.clock import VirtualClock, require_mock_clock
from populi_peer.testing.network import Faults, MemoryNetwork
from populi_peer.testing.waiting import Changes, wait_for


@dataclass
class VirtualNode:
    name: str
    data_dir: Path
    clock: VirtualClock
    config: Config
    host: str
    address: str
    agent: Agent | None = None
    scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def node_id(self) -> str:
        assert self.agent is not None, f"{self.name} is not running"
        return self.agent.node_id

    @property
    def running(self) -> bool:
        return self.agent is not None and self.scope is not None and not self.done.is_set()


AgentFactory = Callable[..., Agent]

#: The capture :func:`write_no_driver_capture` starts from.
NO_DRIVER_BASE_CAPTURE = "h100-80gb-hbm3-idle.json"


def write_no_driver_capture(folder: Path, name: str = "no-gpu-driver.json") -> Path:
    """Write a real capture whose ``nvmlInit`` fails as on a machine without a loaded
    driver (a CPU-only node, replayed: no NVML thread); returns its path."""
    text = resources.files("populi_peer.gpu").joinpath("captures", NO_DRIVER_BASE_CAPTURE)
    data = copy.deepcopy(json.loads(text.read_text("utf-8")))
    data["init"] = {"error": "NVMLError_DriverNotLoaded", "code": 9, "msg": "Driver Not Loaded"}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data), "utf-8")
    return path


def replayed_gpu(config: Config, folder: Path) -> Config:
    """``config``, with the no-driver capture (written in ``folder``) when it names no
    GPU capture: a virtual node never runs the real NVML."""
    if config.gpu.fixture:
        return config
    capture = folder / "no-gpu-driver.json"
    if not capture.exists():
        write_no_driver_capture(folder)
    return dataclasses.replace(config, gpu=dataclasses.replace(config.gpu, fixture=str(capture)))


OnResponse = Callable[[httpx.Request, httpx.Response], None]


class VirtualCluster:
    """Agents on one memory network. ``make_network(cluster)`` builds another network
    (a :class:`MemoryNetwork` subclass) from the cluster's ``seed``, ``faults`` and
    ``on_response``; ``changes`` fires at every delivery (:meth:`wait_until` wakes on it).
    """

    def __init__(
        self,
        root: Path,
        nursery: trio.Nursery,
        *,
        seed: int = 0,
        faults: Faults | None = None,
        config: Config | None = None,
        agent_factory: AgentFactory = Agent,
        on_response: OnResponse | None = None,
        make_network: Callable[[VirtualCluster], MemoryNetwork] | None = None,
        changes: Changes | None = None,
        gossip: bool = False,
    ) -> None:
        require_mock_clock("a VirtualCluster")
        #: Hint gossip runs only where a test asks for it: every round costs a signed
        #: exchange with a few peers every ``gossip.round_interval_s`` of virtual time, and
        #: most tests wait through long virtual times that gossip plays no part in.
        self.gossip = gossip
        self.root = root
        self.nursery = nursery
        self.seed = seed
        self.faults = faults or Faults()
        self.changes = changes or Changes()
        self._on_response = on_response
        self.node_ids: dict[str, str] = {}
        self.network = (
            make_network(self)
            if make_network is not None
            else MemoryNetwork(seed=seed, faults=self.faults, on_response=self.on_response)
        )
        self.config = config or Config()
        self.agent_factory = agent_factory
        self.nodes: dict[str, VirtualNode] = {}

    def on_response(self, request: httpx.Request, response: httpx.Response) -> None:
        """Every delivered answer: the caller's own hook, then a change for the waiters."""
        try:
            if self._on_response is not None:
                self._on_response(request, response)
        finally:
            self.changes.notify()

    def __getitem__(self, name: str) -> Agent:
        agent = self.nodes[name].agent
        assert agent is not None, f"{name} is not running"
        return agent

    @property
    def cp(self) -> Agent:
        return self["cp"]

    def _new_node(
        self, name: str, *, address: str | None, skew_s: float, config: Config | None
    ) -> VirtualNode:
        number = len(self.nodes) + 1
        node = VirtualNode(
            name=name,
            data_dir=self.root / name,
            clock=VirtualClock(skew_s=skew_s),
            config=config or self.config,
            host=f"{name}.populi.test",
            address=address or f"10.77.0.{number}",
        )
        self.nodes[name] = node
        return node

    async def init(
        self, name: str = "cp", *, address: str | None = None, config: Config | None = None
    ) -> Agent:
        node = self._new_node(name, address=address, skew_s=0.0, config=config)
        init_cluster(
            node.data_dir,
            cluster_name="virtual",
            node_name=name,
            listen="127.0.0.1:0",
            advertise=[f"{node.host}:443"],
            force=False,
            now_wall_s=node.clock.wall(),
        )
        return await self.start(name)

    async def start(self, name: str) -> Agent:
        node = self.nodes[name]
        node.done = trio.Event()
        url = f"https://{node.host}:443"
        config = replayed_gpu(node.config, self.root)
        if not self.gossip:
            config = dataclasses.replace(
                config, gossip=dataclasses.replace(config.gossip, enabled=False)
            )
        agent = self.agent_factory(
            data_dir=node.data_dir,
            config=dataclasses.replace(
                config, node=dataclasses.replace(config.node, advertise=[f"{node.host}:443"])
            ),
            clock=node.clock,
            network=self.network,
            serve=False,
            url=url,
        )
        node.agent = agent
        self.network.register(
            node_id=agent.node_id, host=node.host, app=agent.app, address=node.address
        )
        self.node_ids[name] = agent.node_id

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                node.scope = scope
                try:
                    await agent.run(task_status=task_status)
                finally:
                    node.done.set()
            node.done.set()

        await self.nursery.start(run)
        return agent

    async def start_copy(self, name: str, template: Path) -> Agent:
        """Start ``name`` from a copy of ``template / name``, a data directory of an
        earlier virtual cluster (named and addressed as there when the nodes are added
        in the same order)."""
        shutil.copytree(template / name, self.root / name)
        self._new_node(name, address=None, skew_s=0.0, config=None)
        return await self.start(name)

    async def crash(self, name: str) -> None:
        """Stop an agent abruptly: no leave, no graceful steps."""
        node = self.nodes[name]
        if node.scope is not None:
            node.scope.cancel()
        await node.done.wait()
        self.network.unregister(node.host)

    async def stop(self, name: str) -> None:
        """Graceful stop, as SIGTERM would."""
        node = self.nodes[name]
        assert node.agent is not None
        node.agent.request_stop()
        await node.done.wait()
        self.network.unregister(node.host)

    def operator_client(self, via: str = "cp") -> httpx.AsyncClient:
        """An httpx client signing as the init node's operator, talking to ``via``."""
        cp = self["cp"]
        target = self[via]
        assert cp.certificates.identity.operator is not None
        return httpx.AsyncClient(
            transport=self.network.transport_for("operator"),
            base_url=f"https://{self.nodes[via].host}",
            auth=SignedAuth(cp.certificates.identity.operator, target.node_id, cp.clock),
        )

    async def mint_token(self, **payload: Any) -> str:
        async with self.operator_client() as client:
            response = await client.post("/v1/populi/admin/tokens", json={"ttl_s": 3600, **payload})
        if response.status_code != 200:
            raise AssertionError(f"token create failed: {response.status_code} {response.text}")
        return str(response.json()["token"])

    async def join(
        self,
        name: str,
        *,
        token: str | None = None,
        roles: list[str] | None = None,
        address: str | None = None,
        skew_s: float = 0.0,
        config: Config | None = None,
        start: bool = True,
        force: bool = False,
    ) -> Agent | None:
        token = token or await self.mint_token(roles=roles or ["worker", "submit"])
        node = self._new_node(name, address=address, skew_s=skew_s, config=config)

        def transports(ca_pem: str | None) -> httpx.AsyncBaseTransport:
            return self.network.transport_for(f"joiner-{name}")

        await join_cluster(
            token,
            data_dir=node.data_dir,
            name=name,
            listen="127.0.0.1:0",
            advertise=[f"{node.host}:443"],
            clock=node.clock,
            transports=transports,
            force=force,
        )
        return await self.start(name) if start else None

    async def wait_until(
        self,
        predicate: Callable[[], object],
        *,
        timeout_s: float = 60.0,
        poll_s: float = 0.05,
        what: str = "the condition",
    ) -> float:
        """Wait (virtual time) until ``predicate()``, looking again at every delivery
        (:func:`~populi_peer.testing.waiting.wait_for`); returns how long it took."""
        _, took = await wait_for(
            what, predicate, timeout_s=timeout_s, poll_s=poll_s, changes=self.changes
        )
        return took

    async def aclose(self) -> None:
        for name, node in self.nodes.items():
            if node.running:
                await self.stop(name)


class ClusterOptions(TypedDict, total=False):
    """The keywords of :class:`VirtualCluster` (its defaults apply), which
    :func:`open_virtual_cluster` passes on."""

    seed: int
    faults: Faults | None
    config: Config | None
    agent_factory: AgentFactory
    on_response: OnResponse | None
    make_network: Callable[[VirtualCluster], MemoryNetwork] | None
    changes: Changes | None
    gossip: bool


@contextlib.asynccontextmanager
async def open_virtual_cluster(
    root: Path,
    *,
    workers: int = 0,
    worker_config: Config | None = None,
    template: Path | None = None,
    **options: Unpack[ClusterOptions],
) -> AsyncIterator[VirtualCluster]:
    """A cluster with a control plane ``cp`` and ``workers`` joined nodes ``w1..wN``;
    every node runs ``config``, the workers ``worker_config`` when it is given. With
    ``template`` (the ``root`` of an earlier cluster of as many workers), the nodes are
    copies of its data directories, restarted, instead of a new cluster. The other
    arguments are :class:`VirtualCluster`'s (``gossip``: run hint gossip, off unless asked)."""
    require_mock_clock("a VirtualCluster")
    async with trio.open_nursery() as nursery:
        cluster = VirtualCluster(root, nursery, **options)
        workers_named = [f"w{index}" for index in range(1, workers + 1)]
        if template is not None:
            for name in ("cp", *workers_named):
                await cluster.start_copy(name, template)
        else:
            await cluster.init("cp")
            for name in workers_named:
                await cluster.join(name, config=worker_config)
        try:
            yield cluster
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await cluster.aclose()
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_virtual_agent(
    data_dir: Path, *, url: str, config: Config | None = None, gossip: bool = False
) -> AsyncIterator[Agent]:
    """One agent on virtual time over the initialised ``data_dir``, with no network: tests
    call its ASGI app (``agent.app``) directly. Stopped gracefully when the block ends.
    Hint gossip runs only with ``gossip`` (it has no peer here, and its periodic publish
    writes the store)."""
    require_mock_clock("a virtual agent")
    config = replayed_gpu(config or Config(), data_dir.parent)
    if not gossip:
        config = dataclasses.replace(
            config, gossip=dataclasses.replace(config.gossip, enabled=False)
        )
    agent = Agent(
        data_dir=data_dir,
        config=config,
        clock=VirtualClock(),
        serve=False,
        url=url,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        try:
            yield agent
        finally:
            agent.request_stop()
            await agent.stopped.wait()


__all__ = [
    "VirtualCluster",
    "VirtualNode",
    "open_virtual_agent",
    "open_virtual_cluster",
    "replayed_gpu",
    "write_no_driver_capture",
]
