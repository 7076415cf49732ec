"""Whether this node is still a member of its cluster, as far as it can tell.

A retired node keeps its agent, its data directory and its old key; it must not look
healthy. It learns that it was retired in two ways:

- a peer refuses its signed request with 401 ``node_retired`` (its signature still
  verifies with its old key, so the peer tells it what it knows: the lifecycle record —
  who retired it, when, why — and the signed revocation list). The heartbeat loop hands
  that refusal here; the list is installed only if it verifies against the cluster key
  and is newer, like any other;
- its own node id is on the signed revocation list it holds (pushed or installed above).

A 401 ``unknown_signer`` from the control plane (the node was deleted, or its certificate
expired while it was off) is the other way out of the cluster: ``unknown_to_control_plane``.

Either way the node takes no more work: the worker refuses handoffs (``node_retired``),
the submitter places nothing remotely, and ``populi status`` says what happened and how to
re-join. Nothing here is persisted apart from the revocation list: after a restart the
held list (or the next refused heartbeat) tells again.

Serving side: :meth:`Standing.notice_for` is what this node tells a retired signer.
"""

from __future__ import annotations

import logging
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enrollment.revocation import RevokedNode
from populi_peer.agent.membership import Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.api.auth import Principal
from populi_peer.clock import Clock, wall_ms
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages import Standing as StandingView
from populi_peer.core.settings import remote_refusal
from populi_peer.errors import PopuliError
from populi_peer.log import get_logger, log

#: Refusals of a signed request that mean this node is out of the cluster.
OUT_CODES = ("node_retired", "unknown_signer")


def rejoin_steps(name: str, *, name_blocked: bool) -> list[str]:
    """What an operator runs to bring this machine back (it re-joins as a new node id)."""
    steps = []
    if name_blocked:
        steps.append(f"on the control plane: populi node unretire {name}  (the name is blocked)")
    steps.append(f"on the control plane: populi token create --name {name}")
    steps.append(
        f"here: stop this agent, then populi join TOKEN --force --name {name} --data-dir DIR "
        "--listen HOST:PORT, and start the agent again (runbooks/revoke-a-node.md)"
    )
    return steps


@dataclass(kw_only=True, eq=False, repr=False)
class Standing:
    """``max_skew_s``: how long past its expiry a signer's certificate still counts
    (the request-time skew budget)."""

    node_id: str
    node_name: str
    clock: Clock
    revocations: RevocationState
    membership: Membership
    registry: Registry
    max_skew_s: InitVar[float]
    logger: ClassVar[logging.Logger] = get_logger("standing")

    def __post_init__(self, max_skew_s: float) -> None:
        self.max_skew_ms = int(max_skew_s * 1000)
        #: The lifecycle record a peer sent with its ``node_retired`` refusal.
        self.refused_lifecycle: NodeLifecycle | None = None
        self.refused_at_ms: int | None = None
        self.refused_code: str | None = None

    # -- this node ------------------------------------------------------------------------

    def revoked_entry(self) -> RevokedNode | None:
        """This node's entry on the revocation list it holds, if it is there."""
        current = self.revocations.current
        if current is None or self.node_id not in current.node_ids:
            return None
        return next(node for node in current.revoked if node.node_id == self.node_id)

    @property
    def retired(self) -> bool:
        return self.refused_code == "node_retired" or self.revoked_entry() is not None

    @property
    def out(self) -> bool:
        """Retired, or unknown to the control plane: this node takes no work."""
        return self.retired or self.refused_code is not None

    def learn(self, exc: PopuliError) -> bool:
        """A peer refused this node's signed request; returns whether the refusal says
        this node is out of the cluster (and takes note of what it says)."""
        if exc.code not in OUT_CODES or exc.details.get("http_status") != 401:
            return False
        now_ms = wall_ms(self.clock)
        if exc.code == "node_retired":
            text = exc.details.get("revocations")
            if isinstance(text, str):
                self.revocations.offer(text, now_ms=now_ms)
            lifecycle = _lifecycle(exc.details.get("lifecycle"))
            if lifecycle is not None and lifecycle.state == "retired":
                self.refused_lifecycle = lifecycle
        if self.refused_code != "node_retired":
            self.refused_code = exc.code
            self.refused_at_ms = now_ms
        log(
            self.logger,
            logging.ERROR,
            "this node was retired from the cluster; it takes no more work"
            if self.retired
            else "the control plane no longer knows this node (deleted, or its certificate "
            "expired); it takes no more work",
            error=str(exc),
            rejoin=self.view().rejoin,
        )
        return True

    def view(self) -> StandingView:
        """``status.standing``: member, retired (since when, by whom, why, and from what
        this node knows it), or unknown to the control plane; and how to re-join."""
        entry = self.revoked_entry()
        lifecycle = self.refused_lifecycle
        if self.retired:
            return StandingView(
                state="retired",
                since_ms=lifecycle.since_wall_ms
                if lifecycle is not None
                else (entry.revoked_ms if entry else None),
                by=lifecycle.actor if lifecycle is not None else None,
                reason=(lifecycle.reason if lifecycle is not None else None)
                or (entry.reason if entry else None),
                source="revocation_list" if entry is not None else "control_plane",
                rejoin=self._rejoin(),
            )
        if self.refused_code is not None:
            return StandingView(
                state="unknown_to_control_plane",
                since_ms=self.refused_at_ms,
                by=None,
                reason=None,
                source="control_plane",
                rejoin=self._rejoin(),
            )
        return StandingView(
            state="member", since_ms=None, by=None, reason=None, source=None, rejoin=None
        )

    def json(self) -> dict[str, Any]:
        return self.view().to_json()

    def _rejoin(self) -> tuple[str, ...]:
        name = self.node_name
        return tuple(rejoin_steps(name, name_blocked=self.revocations.is_name_blocked(name)))

    # -- who may sign requests here -------------------------------------------------------

    def signer(self, principal_id: str) -> Principal | None:
        """The signer of a request, unless unknown, retired or its certificate expired."""
        principal = self.membership.principal(principal_id)
        if principal is None:
            return None
        member = self.membership.get(principal_id)
        if member is not None and member.kind == "node":
            lifecycle = self.registry.lifecycle(principal_id)
            if lifecycle is not None and lifecycle.state == "retired":
                return None
            expired_ms = wall_ms(self.clock) - self.max_skew_ms
            if member.cert_not_after_ms and member.cert_not_after_ms < expired_ms:
                return None
        return principal

    def refuses_signer(self, principal_id: str) -> bool:
        """A revoked signer is refused; this node's own key is always good at its own
        agent (the CLI here signs with it, and a retired node's operator must still read
        its status)."""
        return principal_id != self.node_id and self.revocations.is_revoked(principal_id)

    # -- what this node tells others --------------------------------------------------------

    def notice_for(self, signer: str) -> tuple[Ed25519PublicKey, dict[str, Any]] | None:
        """A retired node's old key and what it is told when it signs a request here;
        ``None`` for anyone else (they stay ``unknown_signer``)."""
        if signer == self.node_id:
            return None
        principal = self.membership.principal(signer)
        if principal is None or principal.kind != "node":
            return None
        lifecycle = self.registry.lifecycle(signer)
        retired = lifecycle is not None and lifecycle.state == "retired"
        revoked = self.revocations.is_revoked(signer)
        if not (retired or revoked):
            return None
        return principal.public_key, {
            "node_id": signer,
            "lifecycle": lifecycle.to_json() if retired and lifecycle is not None else None,
            "revocations": self.revocations.text if revoked else None,
            "rejoin": rejoin_steps(
                principal.name, name_blocked=self.revocations.is_name_blocked(principal.name)
            ),
        }


def _lifecycle(raw: object) -> NodeLifecycle | None:
    """The lifecycle record in a peer's refusal, if it is one."""
    if not isinstance(raw, dict):
        return None
    try:
        return NodeLifecycle.from_json(raw)
    except PopuliError:
        return None


@dataclass(kw_only=True, eq=False, repr=False)
class RemoteWork:
    """Whether this node takes part in remote execution: on in its own config
    (``exec.remote``) and in the cluster settings (no kill switch), and still a member."""

    exec_remote: bool
    records: ClusterRecords
    standing: Standing

    def enabled(self) -> bool:
        return bool(
            self.exec_remote
            and remote_refusal(self.records.settings) is None
            and not self.standing.out
        )


__all__ = ["OUT_CODES", "RemoteWork", "Standing", "rejoin_steps"]
