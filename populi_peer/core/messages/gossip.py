"""Hint gossip between nodes (``agent/gossip.py``) and the hints a node holds.

The three steps of one push-pull exchange carry the core's own types
(:mod:`populi_peer.core.gossip`): ``of()`` writes one, ``exchange`` reads it back with the
core's checks (node ids, bounds).

- ``POST /v1/populi/gossip/digest``: :class:`GossipDigest` → :class:`GossipReply`;
- ``POST /v1/populi/gossip/push``: :class:`GossipPush` → :class:`GossipPushAnswer`;
- ``GET /v1/populi/hints``: :class:`HintsAnswer`, every hint this node holds, with its age.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from populi_peer.core.gossip import (
    MAX_DIGEST_ENTRIES,
    REFUSAL_CODES,
    DigestReply,
    DigestRequest,
    HintPush,
)
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Const,
    Dict,
    Int,
    Message,
    Nested,
    Num,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import GpuDevice

#: At most one version per node a peer holds (the core's bound, checked here once).
_VERSION = Seq(Int(minimum=0, code="bad_gossip"), min_items=2, max_items=2, code="bad_gossip")
_RECORDS = Seq(Text(min_len=1, code="bad_gossip"), code="bad_gossip")


@message
class GossipDigest(Message):
    """Step 1: the initiator's digest, node id → ``[wall_ms, counter]``."""

    digest: Mapping[str, tuple[int, ...]] = wire(
        Dict(_VERSION, max_items=MAX_DIGEST_ENTRIES, code="bad_gossip")
    )

    @classmethod
    def of(cls, request: DigestRequest) -> GossipDigest:
        return cls(digest=MappingProxyType(request.to_json()["digest"]))

    @property
    def exchange(self) -> DigestRequest:
        """The core's form (its own checks: node ids, versions)."""
        return DigestRequest.from_json({"digest": {k: list(v) for k, v in self.digest.items()}})


@message
class GossipReply(Message):
    """Step 2: the records the initiator lacks, and the ids the responder wants."""

    records: tuple[str, ...] = wire(_RECORDS)
    want: tuple[str, ...] = wire(Seq(Text(min_len=1), max_items=MAX_DIGEST_ENTRIES))
    more: bool = wire(Bool(), default=False)

    @classmethod
    def of(cls, reply: DigestReply) -> GossipReply:
        return cls(records=reply.records, want=reply.want, more=reply.more)

    @property
    def exchange(self) -> DigestReply:
        return DigestReply.from_json(self.to_json())


@message
class GossipPush(Message):
    """Step 3: the records the responder asked for."""

    records: tuple[str, ...] = wire(_RECORDS)
    more: bool = wire(Bool(), default=False)

    @classmethod
    def of(cls, push: HintPush) -> GossipPush:
        return cls(records=push.records, more=push.more)

    @property
    def exchange(self) -> HintPush:
        return HintPush.from_json(self.to_json())


@message
class GossipRefusal(Message):
    """One pushed record refused, with its ``hint_*`` reason code."""

    node: str | None = wire(Text(), omit_none=True)
    code: str = wire(Choice(REFUSAL_CODES))
    detail: str = wire(Text())


@message
class GossipPushAnswer(Message):
    """What the responder did with a push: records taken, refused (one code each)."""

    changed: int = wire(Int(minimum=0))
    stale: int = wire(Int(minimum=0))
    refused: tuple[GossipRefusal, ...] = wire(Seq(Nested(GossipRefusal)), default=())


@message
class NodeHint(Message):
    """One node's hint as this node holds it: never authoritative, with its age."""

    node_id: str = wire(Text(min_len=1))
    name: str = wire(Text())
    age_s: float = wire(Num(minimum=0))
    stale: bool = wire(Bool())
    version: str = wire(Text())
    lifecycle: str = wire(Text())
    accepts_remote_work: bool = wire(Bool())
    running_tasks: int = wire(Int(minimum=0))
    addresses: tuple[str, ...] = wire(Seq(Text()))
    cpu_only_reason: str | None = wire(Text(), omit_none=True)
    devices: tuple[GpuDevice, ...] = wire(Seq(Nested(GpuDevice)))


@message
class HintsAnswer(Message):
    """``GET /v1/populi/hints``: the hints this node holds (``source`` is always
    ``hints``: gossip, not the control plane's view)."""

    source: Literal["hints"] = wire(Const("hints"), default="hints")
    node_id: str = wire(Text(min_len=1))
    rounds: int = wire(Int(minimum=0))
    nodes: tuple[NodeHint, ...] = wire(Seq(Nested(NodeHint)))


__all__ = [
    "GossipDigest",
    "GossipPush",
    "GossipPushAnswer",
    "GossipRefusal",
    "GossipReply",
    "HintsAnswer",
    "NodeHint",
]
