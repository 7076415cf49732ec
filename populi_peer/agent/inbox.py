"""The inbox: how nodes hand each other work and results (handoff, cancel, result, ack).

``POST /v1/populi/inbox`` delivers one message (:class:`~populi_peer.core.messages.
InboxMessage`: a ``message_id`` and a typed payload, parsed before the handler runs);
delivery is idempotent by (sender, message id): a repeated message gets the first answer
back, marked ``duplicate``, and its handler does not run again. Handlers are idempotent too
(a handoff is fenced by its token; a result by its attempt and token), so a crash between a
handler and the inbox record only costs a recomputed, identical answer.

``GET /v1/populi/inbox?cursor=&limit=`` reads the messages this node received, oldest
first, cursor-paged (the cursor is the last ``seq`` seen); callers: the node itself and
operators.

The handlers are the worker's (``handoff``, ``cancel``) and the submitter's (``result``),
registered by the composition root with :meth:`Inbox.on`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.api.auth import Principal
from populi_peer.clock import Clock
from populi_peer.core.messages import (
    InboxDeliverAnswer,
    InboxMessage,
    InboxReadAnswer,
    InboxRecord,
    Message,
)
from populi_peer.core.messages.inbox import ANSWERS, MESSAGE_TYPES, MessageType
from populi_peer.core.messages.records import REDACTED
from populi_peer.errors import BadRequest, Forbidden
from populi_peer.store.inbox import InboxMessages

NODES = frozenset({"worker", "submit", "voter"})

#: A handler of one message type: the signer and the typed payload in, the answer out.
Handler = Callable[[Principal, Any], Awaitable[Message]]


@dataclass(kw_only=True, eq=False, repr=False)
class Inbox:
    node_id: str
    messages: InboxMessages
    clock: Clock

    def __post_init__(self) -> None:
        self.handlers: dict[MessageType, Handler] = {}

    def on(self, message_type: MessageType, handler: Handler) -> None:
        if message_type not in MESSAGE_TYPES:
            raise ValueError(f"unknown inbox message type {message_type}")
        self.handlers[message_type] = handler

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/populi/inbox", self._deliver, NODES, "inbox_deliver"),
            Route("GET", "/v1/populi/inbox", self._read, ANY_MEMBER, "inbox_read"),
        ]

    async def _deliver(self, request: Request) -> InboxDeliverAnswer:
        message = request.message(InboxMessage)
        message_type = message.type
        handler = self.handlers.get(message_type)
        if handler is None:
            raise BadRequest(
                f"this node does not take {message_type} messages", code="unsupported_message"
            )
        sender = request.caller.id
        key = f"{sender}/{message.message_id}"
        stored = self.messages.body(key)
        if stored is not None:
            return InboxDeliverAnswer(
                message_id=message.message_id,
                type=message_type,
                duplicate=True,
                result=ANSWERS[message_type].from_json(stored.get("answer", {})),
            )
        answer = await handler(request.caller, message.payload)
        self.messages.add(
            key,
            sender=sender,
            type=message_type,
            body={"message": _redacted(message), "answer": answer.to_json()},
            received_ms=int(self.clock.wall() * 1000),
        )
        return InboxDeliverAnswer(
            message_id=message.message_id, type=message_type, duplicate=False, result=answer
        )

    async def _read(self, request: Request) -> InboxReadAnswer:
        caller = request.caller
        if caller.id != self.node_id and "operator" not in caller.roles:
            raise Forbidden(
                "only this node or an operator may read its inbox", code="role_required"
            )
        cursor = request.query_int("cursor", 0, minimum=0)
        limit = request.query_int("limit", 100, minimum=1, maximum=1000)
        records = tuple(
            InboxRecord(
                seq=row.seq,
                message_id=row.key.split("/", 1)[1],
                sender=row.sender,
                type=row.type,
                received_ms=row.received_ms,
                message=row.body.get("message", {}),
                answer=row.body.get("answer", {}),
            )
            for row in self.messages.page(after=cursor, limit=limit)
        )
        return InboxReadAnswer(
            messages=records,
            next_cursor=records[-1].seq if records else cursor,
            more=len(records) == limit,
        )


def _redacted(message: InboxMessage) -> dict[str, Any]:
    """What the inbox keeps of a message: the environment's values are task secrets."""
    out = message.to_json()
    if isinstance(out.get("env"), dict):
        out["env"] = {name: REDACTED for name in out["env"]}
    return out


__all__ = ["NODES", "Handler", "Inbox"]
