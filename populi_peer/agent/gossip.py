"""Hint gossip: the trio shell around :mod:`populi_peer.core.gossip` (docs/adr/0010).

Every node publishes one hint about itself (its verified GPUs, load, lifecycle as it knows
it, addresses), signed with its node key and versioned by its own hybrid logical clock,
and spreads the hints it holds to ``fanout`` random peers every ``round_interval_s`` by
push-pull over the signed HTTP API:

1. ``POST /v1/populi/gossip/digest`` — this node's digest; the answer carries the records
   it lacks and the ids the peer wants;
2. ``POST /v1/populi/gossip/push`` — the wanted records, if any.

The core decides everything (what to send, what to keep, what to refuse); this module
reads the clock and the random source, persists the version floor, signs, and calls.

- **Version floor.** The version of this node's record is persisted (store meta
  ``hint_version``) *before* the record is signed and served, so a restart never
  publishes a lower one (peers would ignore it and this node's hint would freeze). A
  newer record about this node met in gossip (a data directory restored from a backup)
  raises the floor, and the node republishes above it.
- **Republishing.** On a material change at most every ``republish_min_s``, and at least
  every ``republish_max_s`` even without one, so that a hint's age means liveness.
- **Peers.** The nodes of this node's membership view with an address, but itself and
  the departed; the control plane is one peer among others, so hints keep flowing while
  it is down.
- **Departed nodes.** A node on the revocation list this node holds, or whose lifecycle
  register (or its own signed hint) says ``retired`` or ``left``, is refused by identity
  (``hint_node_departed``); records signed by an unknown, revoked or retired key are
  ``hint_unknown_node``; by another node's key ``hint_forged``.
- **Failures.** A peer that does not answer, or answers badly, costs that exchange only:
  it is counted and logged at debug, never raised. A failed write of the version floor
  marks storage degraded and skips that publish (no record is ever served above an
  unpersisted floor).

Hints never authorize (safety rule 6): nothing here feeds a grant.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import ClassVar

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from populi_peer.agent.links import PeerLink
from populi_peer.agent.membership import Member, Membership
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.config import GossipConfig
from populi_peer.core.gossip import (
    DigestReply,
    GossipSettings,
    GossipState,
    MergeResult,
    first_round_delay_s,
    plan_round,
)
from populi_peer.core.hints import HintBody, HintView, next_hint_version
from populi_peer.core.hlc import Hlc
from populi_peer.core.messages import (
    GossipDigest,
    GossipPush,
    GossipPushAnswer,
    GossipRefusal,
    GossipReply,
    GpuDevice,
    HintsAnswer,
    NodeHint,
)
from populi_peer.errors import Forbidden, PopuliError, StoreError
from populi_peer.log import get_logger, log
from populi_peer.signed_hints import hint_verifier, sign_hint_record
from populi_peer.store import Store

#: The store's meta key of the version floor of this node's own hint.
VERSION_KEY = "hint_version"
#: Lifecycle states whose node's hints are refused from then on.
DEPARTED_STATES = frozenset({"retired", "left"})


@dataclass
class GossipStats:
    """Counters for ``/metrics`` and ``populi status``."""

    rounds: int = 0
    exchanges_ok: int = 0
    exchanges_failed: int = 0
    published: int = 0
    records_received: int = 0
    #: Refused records by reason code (``hint_*``).
    refused: Counter[str] = field(default_factory=Counter)
    #: Seconds between a received record's signing and its arrival here, last seen.
    last_lag_s: float | None = None


@dataclass(kw_only=True, eq=False, repr=False)
class HintGossip:
    """``body()`` is this node's hint body now; ``peers`` calls other nodes;
    ``timeout_s`` bounds one exchange step."""

    node_id: str
    node_key: Ed25519PrivateKey
    clock: Clock
    store: Store
    config: GossipConfig
    max_skew_s: InitVar[float]
    membership: Membership
    registry: Registry
    revocations: RevocationState
    peers: PeerLink
    body: Callable[[], HintBody]
    timeout_s: float
    rng: random.Random = field(default_factory=random.Random)
    logger: ClassVar[logging.Logger] = get_logger("gossip")

    def __post_init__(self, max_skew_s: float) -> None:
        self.settings: GossipSettings = self.config.settings(max_skew_s=max_skew_s)
        self.timeout_s = min(self.timeout_s, max(1.0, 5 * self.config.round_interval_s))
        self.state = GossipState(self.node_id, max_skew_ms=self.settings.max_skew_ms)
        saved = self.store.get_meta_json(VERSION_KEY)
        self.floor = Hlc.from_json(saved) if saved else Hlc(0, 0)
        self.stats = GossipStats()
        self._published_body: HintBody | None = None
        self._published_mono: float | None = None
        self._verify = hint_verifier(self._resolve_key)
        #: Set whenever the held hints change (a test or the placement may wait on it).
        self.changed = trio.Event()

    # -- who is who -------------------------------------------------------------------------

    def _resolve_key(self, node_id: str) -> Ed25519PublicKey | None:
        """A member node's key, unless revoked or retired (then ``hint_unknown_node``)."""
        principal = self.membership.principal(node_id)
        if principal is None or principal.kind != "node":
            return None
        if node_id != self.node_id and self.revocations.is_revoked(node_id):
            return None
        lifecycle = self.registry.lifecycle(node_id)
        if lifecycle is not None and lifecycle.state == "retired":
            return None
        return principal.public_key

    def departed(self) -> frozenset[str]:
        """Nodes whose records this node refuses: revoked, or retired or left by the
        signed records it holds (lifecycle registers, their own last hint)."""
        out = set()
        for member in self.membership.nodes():
            if member.id == self.node_id:
                continue
            lifecycle = self.registry.lifecycle(member.id)
            if self.revocations.is_revoked(member.id) or (
                lifecycle is not None and lifecycle.state in DEPARTED_STATES
            ):
                out.add(member.id)
        current = self.revocations.current
        if current is not None:
            out.update(n for n in current.node_ids if n != self.node_id)
        for node, record in self.state.records.items():
            if node != self.node_id and record.body.lifecycle in DEPARTED_STATES:
                out.add(node)
        return frozenset(out)

    def _forget_departed(self) -> None:
        dropped = self.state.depart(self.departed())
        if dropped:
            log(self.logger, logging.INFO, "hints of departed nodes dropped", nodes=dropped)
            self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- this node's record -----------------------------------------------------------------

    def publish(self, *, force: bool = False) -> bool:
        """Sign and hold a new record of this node when its body changed (at most every
        ``republish_min_s``) or it is ``republish_max_s`` old; returns whether it did."""
        body = self.body()
        now = self.clock.mono()
        since = None if self._published_mono is None else now - self._published_mono
        if not force and since is not None:
            if body == self._published_body and since < self.config.republish_max_s:
                return False
            if since < self.config.republish_min_s:
                return False
        now_ms = wall_ms(self.clock)
        version = next_hint_version(self.floor, now_ms)
        try:
            # Persisted before it is signed and served: no restart publishes a lower one.
            self.store.set_meta_json(VERSION_KEY, version.to_json())
        except StoreError as exc:
            # The store marks the node degraded until a write succeeds; publish later.
            log(self.logger, logging.WARNING, "hint version not persisted", error=str(exc))
            return False
        self.floor = version
        record = sign_hint_record(self.node_key, version=version, issued_ms=now_ms, body=body)
        self.state.publish(record)
        self._published_body = body
        self._published_mono = now
        self.stats.published += 1
        return True

    # -- merging ----------------------------------------------------------------------------

    def merge(self, texts: tuple[str, ...], *, source: str) -> MergeResult:
        """Merge records from ``source``; refusals are counted, never raised."""
        self._forget_departed()
        now_ms = wall_ms(self.clock)
        result = self.state.merge(texts, now_wall_ms=now_ms, verify=self._verify)
        for refusal in result.refused:
            self.stats.refused[refusal.code] += 1
            log(
                self.logger,
                logging.INFO,
                "hint refused",
                peer=source,
                node=refusal.node_id,
                reason=refusal.code,
                detail=refusal.detail,
            )
        self.stats.records_received += len(texts)
        for node in result.changed:
            record = self.state.get(node)
            if record is not None:
                self.stats.last_lag_s = max(0.0, (now_ms - record.issued_ms) / 1000)
        if result.own_newer is not None and result.own_newer > self.floor:
            # A record of ours newer than our floor (restored from a backup): rise above it.
            self.floor = result.own_newer
            self.publish(force=True)
        if result.changed:
            self._forget_departed()
            self._changed()
        return result

    # -- routes -----------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/gossip/digest",
                self._digest,
                roles=ANY_MEMBER,
                name="gossip_digest",
            ),
            Route(
                "POST",
                "/v1/populi/gossip/push",
                self._push,
                roles=ANY_MEMBER,
                name="gossip_push",
            ),
            Route(
                "GET",
                "/v1/populi/hints",
                self._hints,
                roles=ANY_MEMBER,
                name="hints",
            ),
        ]

    @staticmethod
    def _require_node(request: Request) -> None:
        if request.caller.kind != "node":
            raise Forbidden("only nodes gossip hints", code="forbidden")

    async def _digest(self, request: Request) -> GossipReply:
        self._require_node(request)
        self._forget_departed()
        digest = request.message(GossipDigest).exchange
        await trio.lowlevel.checkpoint()
        return GossipReply.of(self.state.answer(digest, max_bytes=self.settings.max_message_bytes))

    async def _push(self, request: Request) -> GossipPushAnswer:
        self._require_node(request)
        push = request.message(GossipPush).exchange
        result = self.merge(push.records, source=request.caller.id)
        await trio.lowlevel.checkpoint()
        return GossipPushAnswer(
            changed=len(result.changed),
            stale=result.stale,
            refused=tuple(
                GossipRefusal(node=r.node_id, code=r.code, detail=r.detail) for r in result.refused
            ),
        )

    async def _hints(self, request: Request) -> HintsAnswer:
        await trio.lowlevel.checkpoint()
        return self.hints_answer()

    def hints_answer(self) -> HintsAnswer:
        """Every hint held, with its age (``populi gpus`` while the control plane is
        down)."""
        now_ms = wall_ms(self.clock)
        return HintsAnswer(
            node_id=self.node_id,
            rounds=self.stats.rounds,
            nodes=tuple(self._node_hint(view) for view in self.state.view(now_wall_ms=now_ms)),
        )

    def _node_hint(self, view: HintView) -> NodeHint:
        record = view.record
        body = record.body
        member = self.membership.get(record.node_id)
        return NodeHint(
            node_id=record.node_id,
            name=member.name if member is not None else record.node_id,
            age_s=round(view.age_s, 3),
            stale=view.age_s > self.config.stale_after_s,
            version=f"{record.version.wall_ms}.{record.version.counter}",
            lifecycle=body.lifecycle,
            accepts_remote_work=body.accepts_remote_work,
            running_tasks=body.running_tasks,
            addresses=body.addresses,
            cpu_only_reason=body.facts.cpu_only_reason,
            devices=tuple(GpuDevice.of(g) for g in body.gpus),
        )

    # -- rounds -----------------------------------------------------------------------------

    def round_peers(self) -> tuple[Member, ...]:
        """This round's peers: ``fanout`` random member nodes with an address."""
        departed = self.departed()
        members = {
            m.id: m
            for m in self.membership.nodes()
            if m.id != self.node_id and m.addresses and m.id not in departed
        }
        chosen = plan_round(
            members,
            self_id=self.node_id,
            fanout=self.settings.fanout,
            rng=self.rng,
            exclude=departed,
        )
        return tuple(members[n] for n in chosen)

    async def exchange(self, member: Member) -> bool:
        """One push-pull exchange with ``member``; ``False`` when it failed (no raise)."""
        try:
            with trio.fail_after(self.timeout_s * 2):
                reply = await self.peers.call(
                    member,
                    method="POST",
                    path="/v1/populi/gossip/digest",
                    payload=GossipDigest.of(self.state.digest_request()),
                    attempts=1,
                    timeout_s=self.timeout_s,
                    answer=GossipReply,
                )
                self.merge(reply.exchange.records, source=member.id)
                push = self.state.push_for(
                    _without_departed(reply.exchange, self.departed()),
                    max_bytes=self.settings.max_message_bytes,
                )
                if push is not None:
                    await self.peers.call(
                        member,
                        method="POST",
                        path="/v1/populi/gossip/push",
                        payload=GossipPush.of(push),
                        attempts=1,
                        timeout_s=self.timeout_s,
                        answer=GossipPushAnswer,
                    )
        except (PopuliError, trio.TooSlowError) as exc:
            self.stats.exchanges_failed += 1
            log(
                self.logger, logging.DEBUG, "gossip exchange failed", peer=member.id, error=str(exc)
            )
            return False
        self.stats.exchanges_ok += 1
        return True

    async def round(self) -> None:
        """Publish if due, then one exchange with each of this round's peers, at once."""
        self.publish()
        self._forget_departed()
        async with trio.open_nursery() as nursery:
            for member in self.round_peers():
                nursery.start_soon(self.exchange, member)
        self.stats.rounds += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.publish(force=True)
        task_status.started()
        # Stagger the first round so that nodes started together do not fire in step.
        await trio.sleep(first_round_delay_s(self.settings.round_interval_s, self.rng))
        while True:
            await self.round()
            await trio.sleep(self.settings.round_interval_s)


def _without_departed(reply: DigestReply, departed: frozenset[str]) -> DigestReply:
    """A peer that still wants a departed node's record gets nothing of it from here."""
    return DigestReply(
        tuple(reply.records), tuple(n for n in reply.want if n not in departed), reply.more
    )


__all__ = ["DEPARTED_STATES", "VERSION_KEY", "GossipStats", "HintGossip"]
