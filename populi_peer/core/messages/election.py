"""The control-plane election between voters (``agent/election.py``, ADR 0011 / 0016).

- ``POST /v1/populi/election``: :class:`ElectionPost` → :class:`ElectionExchange`. The
  body carries election messages from the caller (each names the caller as its sender);
  the answer carries the messages the receiving voter sends back to the caller at once
  (a vote, an acknowledgement). Messages are the core's own
  (:func:`~populi_peer.core.election.message_to_json`), parsed with its checks.
"""

from __future__ import annotations

from typing import Final

from populi_peer.core.election import Message as ElectionMessage
from populi_peer.core.election import message_from_json, message_to_json
from populi_peer.core.messages._codec import Core, Message, Seq, message, wire

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


__all__ = ["ELECTION_MESSAGE", "MAX_ELECTION_MESSAGES", "ElectionExchange", "ElectionPost"]
