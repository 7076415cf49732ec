"""What every command shares: data directory, config, talking to agents, output."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack

from populi_peer.config import (
    Config,
    default_data_dir,
    default_node_name,
    load_config,
    parse_host_port,
)
from populi_peer.errors import PopuliError, UsageError

if TYPE_CHECKING:  # heavy imports stay out of ``populi --help`` and usage errors
    from populi_peer.api.client import RequestBody, SyncPeerClient
    from populi_peer.core.messages import Message
    from populi_peer.identity import Identity, RuntimeInfo
    from populi_peer.store import Store

    M = TypeVar("M", bound=Message)


class ArgParser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit 2)."""

    def error(self, message: str) -> Any:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: $POPULI_DATA_DIR or $XDG_DATA_HOME/populi)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_new_node_flags(parser: argparse.ArgumentParser, *, listen_help: str) -> None:
    """``--listen``, ``--advertise``, ``--name`` and ``--force`` of a command that makes a
    node in the data directory (``init``, ``join``); :func:`new_node_name` checks them."""
    parser.add_argument("--listen", default="127.0.0.1:7431", help=listen_help)
    parser.add_argument(
        "--advertise",
        action="append",
        default=[],
        metavar="ADDR",
        help="HOST:PORT other nodes use to reach this one (repeatable)",
    )
    parser.add_argument("--name", default=None, help="this node's name (default: host name)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing node in the data directory"
    )


def new_node_name(args: argparse.Namespace) -> str:
    """The new node's name (``--name`` or the host's), once ``--listen``, ``--advertise``
    and the name are checked; a UsageError names the flag at fault."""
    for flag, value in [("--listen", args.listen), *(("--advertise", a) for a in args.advertise)]:
        try:
            parse_host_port(value)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from exc
    name: str = args.name or default_node_name()
    from enrollment.errors import NodeNameError
    from enrollment.tokens import validate_node_name

    try:
        return validate_node_name(name)
    except NodeNameError as exc:
        raise UsageError(f"--name: {exc}") from None


def data_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if getattr(args, "data_dir", None) else default_data_dir()


def warn(message: str) -> None:
    sys.stderr.write(message + "\n")


def config_of(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(
        data_dir=data_dir_of(args),
        config_file=getattr(args, "config", None),
        overrides=overrides,
        warn=warn,
    )


@dataclass
class Local:
    """The local node: identity from the data directory, and its running agent."""

    data_dir: Path
    identity: Identity
    store: Store
    _client: SyncPeerClient | None = None
    _runtime: RuntimeInfo | None = None
    _control_plane: tuple[str, str] | None = None

    def runtime(self) -> RuntimeInfo:
        from populi_peer.identity import read_runtime

        return read_runtime(self.identity.paths)

    def client(self) -> SyncPeerClient:
        """One keep-alive client for the whole command (a TLS handshake per request adds up
        when ``populi run`` follows a task). Every call checks which node answers: the
        certificate must name the node the call expects, and neither that node nor the
        certificate may be revoked on this node's own list (docs/adr/0009) — except this
        node itself, so that a retired node's CLI can still ask its own agent."""
        if self._client is None:
            from enrollment.ca import certificate_public_key
            from populi_peer.agent.revocations import RevocationState
            from populi_peer.api.client import SyncPeerClient
            from populi_peer.api.tls import peer_context
            from populi_peer.clock import SystemClock
            from populi_peer.errors import enrollment_boundary

            with enrollment_boundary():
                revocations = RevocationState(
                    self.store,
                    cluster_id=self.identity.cluster_id,
                    cluster_key=certificate_public_key(self.identity.ca_cert),
                )
            own_id = self.identity.node_id

            # A retired node's own CLI still reaches its own agent (which says that it
            # was retired, and how to re-join); every other node is checked.
            def peer_revoked(node_id: str) -> bool:
                return node_id != own_id and revocations.is_revoked(node_id)

            def certificate_revoked(node_id: str, serial: str) -> bool:
                return node_id != own_id and revocations.is_certificate_revoked(node_id, serial)

            self._client = SyncPeerClient(
                credential=self.identity.cli_credential,
                clock=SystemClock(),
                verify=peer_context(self.identity.paths.ca_cert, revoked=certificate_revoked),
                is_revoked=peer_revoked,
            )
        return self._client

    @property
    def call_agent(self) -> NodeCall:
        """Call this node's agent; the answer is parsed as the ``answer`` type."""
        return NodeCall(self.client, self._agent_address)

    @property
    def call_control_plane(self) -> NodeCall:
        """Call the control plane; the answer is parsed as the ``answer`` type."""
        return NodeCall(self.client, self.control_plane)

    def _agent_address(self) -> tuple[str, str]:
        """(url, node id) of this node's agent: the URL from the runtime file, and this
        node's own id whatever that file says (the data directory names the node, and the
        agent at that URL must prove to be it)."""
        if self._runtime is None:
            self._runtime = self.runtime()
        return self._runtime.url, self.identity.node_id

    def control_plane(self) -> tuple[str, str]:
        """(url, node id) of the control plane, as the local agent knows it."""
        if self._control_plane is None:
            from populi_peer.core.messages import StatusAnswer

            cp = self.call_agent("GET", "/v1/populi/status", answer=StatusAnswer).control_plane
            self._control_plane = (cp.url, cp.node_id)
        return self._control_plane

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.store.close()


def open_local(args: argparse.Namespace) -> Local:
    from populi_peer.identity import load_identity
    from populi_peer.store import Store

    data_dir = data_dir_of(args)
    store = Store.open(data_dir, migrate_ok=False)
    try:
        identity = load_identity(data_dir, store)
    except BaseException:
        store.close()
        raise
    return Local(data_dir=data_dir, identity=identity, store=store)


#: How long a command waits for an answer, unless the call says otherwise.
CALL_TIMEOUT_S = 15.0


class CallOptions(TypedDict, total=False):
    """What a command's call may add to its route and body: query ``params``, and
    ``timeout_s`` (default :data:`CALL_TIMEOUT_S`)."""

    params: dict[str, Any] | None
    timeout_s: float


@dataclass(frozen=True)
class NodeCall:
    """Calls to one node, found when called (``address() -> (url, node id)``): this
    node's agent or its control plane, through the command's one client."""

    client: Callable[[], SyncPeerClient]
    address: Callable[[], tuple[str, str]]

    def __call__(
        self,
        method: str,
        path: str,
        payload: RequestBody = None,
        *,
        answer: type[M],
        **options: Unpack[CallOptions],
    ) -> M:
        def call_at(url: str, node_id: str) -> M:
            return self.client().call(
                url=url,
                node_id=node_id,
                method=method,
                path=path,
                payload=payload,
                params=options.get("params"),
                timeout_s=options.get("timeout_s", CALL_TIMEOUT_S),
                answer=answer,
            )

        url, node_id = self.address()
        try:
            return call_at(url, node_id)
        except PopuliError as exc:
            # A voter that does not lead names the leader: ask it once (ADR 0016).
            leader = exc.details.get("leader_id")
            at = exc.details.get("control_plane_url")
            if exc.code != "not_control_plane" or not isinstance(leader, str) or not at:
                raise
            if (str(at), leader) == (url, node_id):
                raise
            return call_at(str(at), leader)


@dataclass(frozen=True)
class OneCall:
    """One call to the node ``pick`` names, for commands that make only one: the local
    node is opened for it and closed after. The answer is always a typed message."""

    pick: Callable[[Local], NodeCall]

    def __call__(
        self,
        args: argparse.Namespace,
        method: str,
        path: str,
        payload: RequestBody = None,
        *,
        answer: type[M],
        **options: Unpack[CallOptions],
    ) -> M:
        local = open_local(args)
        try:
            return self.pick(local)(method, path, payload, answer=answer, **options)
        finally:
            local.close()


#: One call to this node's agent.
agent_call = OneCall(lambda local: local.call_agent)
#: One call to the control plane (found through this node's agent).
control_plane_call = OneCall(lambda local: local.call_control_plane)


def print_json(value: Any) -> None:
    """``value`` (a typed answer is written as its wire form) as indented JSON."""
    from populi_peer.core.messages import Message

    if isinstance(value, Message):
        value = value.to_json()
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def print_answer(args: argparse.Namespace, answer: Message, text: str) -> None:
    """The answer of a command that changes one thing: as JSON with ``--json``, else
    ``text`` (what changed, in words)."""
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(text + "\n")


def print_listing(
    args: argparse.Namespace,
    answer: Message,
    rows: Sequence[Sequence[Any]],
    headers: Sequence[str],
) -> None:
    """The answer of a command that lists things: as JSON with ``--json``, else ``rows``
    as a table under ``headers``."""
    if args.json:
        print_json(answer)
    else:
        print_table(rows, headers)


def utc_text(ms: int | None) -> str:
    """A wall time in ms as UTC text (``2026-12-01 18:00:00Z``); ``-`` where there is none."""
    if not ms:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # past year 9999, or before year 1
        return f"{ms} ms"


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    text_rows = [[("-" if cell is None else str(cell)) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = ["  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in text_rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    sys.stdout.write(format_table(rows, headers) + "\n")


__all__ = [
    "ArgParser",
    "Local",
    "NodeCall",
    "OneCall",
    "add_data_dir",
    "add_json",
    "add_new_node_flags",
    "agent_call",
    "config_of",
    "control_plane_call",
    "data_dir_of",
    "format_table",
    "new_node_name",
    "open_local",
    "print_json",
    "print_listing",
    "print_table",
    "warn",
]
