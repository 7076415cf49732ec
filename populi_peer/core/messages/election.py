"""The control-plane election between voters (``agent/election.py``, ADR 0011 / 0016).

- ``POST /v1/populi/admin/voters``: :class:`VoterChangeRequest` →
  :class:`VoterChangeAnswer`, an operator's one voter added or removed (the leader writes
  the new ``voters`` record through the election);
- ``POST /v1/populi/election/cluster-key``: :class:`ClusterKeyRequest` →
  :class:`ClusterKeyAnswer`, a voter fetching the cluster key from the leader (sealed to
  a fresh key of the request);
- ``POST /v1/populi/election``: :class:`ElectionPost` → :class:`ElectionExchange`. The
  body carries election messages from the caller (each names the caller as its sender);
  the answer carries the messages the receiving voter sends back to the caller at once
  (a vote, an acknowledgement). Messages are the core's own
  (:func:`~populi_peer.core.election.message_to_json`), parsed with its checks.
"""

from __future__ import annotations

from typing import Final, Literal

from populi_peer.core.election import Message as ElectionMessage
from populi_peer.core.election import message_from_json, message_to_json
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Core,
    Int,
    Message,
    Nullable,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import REASON

#: How many election messages one request or answer may carry.
MAX_ELECTION_MESSAGES = 64

#: One election message, parsed by the core's own parser.
ELECTION_MESSAGE: Final[Core[ElectionMessage]] = Core(message_from_json, message_to_json)
_MESSAGES = Seq(ELECTION_MESSAGE, max_items=MAX_ELECTION_MESSAGES, code="bad_record")


@message
class ElectionPost(Message):
    """Election messages from the caller to the voter it calls."""

    messages: tuple[ElectionMessage, ...] = wire(_MESSAGES)


@message
class ElectionExchange(Message):
    """The messages the called voter answers the caller with at once."""

    messages: tuple[ElectionMessage, ...] = wire(_MESSAGES, default=())


@message
class ClusterKeyRequest(Message):
    """A voter's fresh X25519 public key (base64url, 32 bytes) to seal the cluster key to."""

    public_key: str = wire(Text(min_len=43, max_len=44))


@message
class ClusterKeyAnswer(Message):
    """The cluster key sealed to the request's key (``enrollment/keyshare.py``)."""

    sender_public: str = wire(Text(min_len=43, max_len=44))
    nonce: str = wire(Text(min_len=16, max_len=16))
    sealed: str = wire(Text(min_len=1, max_len=128))


VoterAction = Literal["add", "remove"]


@message
class VoterChangeRequest(Message):
    """Add or remove one voter (a node id or unique name)."""

    action: VoterAction = wire(Choice(("add", "remove")))
    node: str = wire(Text(min_len=1, max_len=128))
    reason: str | None = wire(REASON, default=None)


@message
class VoterChangeAnswer(Message):
    """The voter set after the change (``changed`` false: it already was so), with the
    term of the leader that wrote it and the record's serial."""

    changed: bool = wire(Bool())
    term: int = wire(Int(minimum=0))
    serial: int = wire(Int(minimum=0))
    voters: tuple[str, ...] = wire(Seq(Text(min_len=1)))
    previous: tuple[str, ...] = wire(Seq(Text(min_len=1)))
    leader: str | None = wire(Nullable(Text()), default=None)


__all__ = [
    "ELECTION_MESSAGE",
    "MAX_ELECTION_MESSAGES",
    "ClusterKeyAnswer",
    "ClusterKeyRequest",
    "ElectionExchange",
    "ElectionPost",
    "VoterAction",
    "VoterChangeAnswer",
    "VoterChangeRequest",
]
