"""The inbox: how nodes hand each other work and results (handoff, cancel, result, ack).

``POST /v1/populi/inbox`` delivers one message ``{"message_id", "type", ...}``; delivery is
idempotent by (sender, message id): a repeated message gets the first answer back, marked
``duplicate``, and its handler does not run again. Handlers are idempotent too (a handoff
is fenced by its token; a result by its attempt and token), so a crash between a handler
and the inbox record only costs a recomputed, identical answer.

``GET /v1/populi/inbox?cursor=&limit=`` reads the messages this node received, oldest
first, cursor-paged (the cursor is the last ``seq`` seen); callers: the node itself and
operators.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.api.auth import Principal
from populi_peer.core.wire import ID_RE
from populi_peer.errors import BadRequest, Forbidden
from populi_peer.store.inbox import InboxMessages

if TYPE_CHECKING:
    from populi_peer.agent.agent import Agent

NODES = frozenset({"worker", "submit", "voter"})
MESSAGE_TYPES = ("handoff", "cancel", "result", "ack")

Handler = Callable[[Principal, dict[str, Any]], Awaitable[dict[str, Any]]]


class Inbox:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.messages = InboxMessages(agent.store)
        self.handlers: dict[str, Handler] = {}

    def on(self, message_type: str, handler: Handler) -> None:
        if message_type not in MESSAGE_TYPES:
            raise ValueError(f"unknown inbox message type {message_type}")
        self.handlers[message_type] = handler

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/populi/inbox", self._deliver, roles=NODES, name="inbox_deliver"),
            Route("GET", "/v1/populi/inbox", self._read, roles=ANY_MEMBER, name="inbox_read"),
        ]

    async def _deliver(self, request: Request) -> dict[str, Any]:
        body = request.json()
        message_id = body.get("message_id")
        message_type = body.get("type")
        if not isinstance(message_id, str) or not ID_RE.match(message_id):
            raise BadRequest(
                "inbox message needs 'message_id' (1-128 of A-Z a-z 0-9 . _ : -)",
                code="bad_request",
            )
        if message_type not in MESSAGE_TYPES:
            raise BadRequest(
                f"inbox message 'type' must be one of {', '.join(MESSAGE_TYPES)}",
                code="bad_request",
            )
        handler = self.handlers.get(message_type)
        if handler is None:
            raise BadRequest(
                f"this node does not take {message_type} messages", code="unsupported_message"
            )
        sender = request.caller.id
        key = f"{sender}/{message_id}"
        stored = self.messages.body(key)
        if stored is not None:
            return {
                "message_id": message_id,
                "type": message_type,
                "duplicate": True,
                "result": stored.get("answer", {}),
            }
        answer = await handler(request.caller, body)
        with self.agent.store.transaction():
            self.messages.add(
                key,
                sender=sender,
                type=message_type,
                body={"message": _redacted(body), "answer": answer},
                received_ms=int(self.agent.clock.wall() * 1000),
            )
        return {
            "message_id": message_id,
            "type": message_type,
            "duplicate": False,
            "result": answer,
        }

    async def _read(self, request: Request) -> dict[str, Any]:
        caller = request.caller
        if caller.id != self.agent.node_id and "operator" not in caller.roles:
            raise Forbidden(
                "only this node or an operator may read its inbox", code="role_required"
            )
        cursor = request.query_int("cursor", 0, minimum=0)
        limit = request.query_int("limit", 100, minimum=1, maximum=1000)
        messages = []
        for row in self.messages.page(after=cursor, limit=limit):
            stored = row.body
            messages.append(
                {
                    "seq": row.seq,
                    "message_id": row.key.split("/", 1)[1],
                    "sender": row.sender,
                    "type": row.type,
                    "received_ms": row.received_ms,
                    "message": stored.get("message", {}),
                    "answer": stored.get("answer", {}),
                }
            )
        next_cursor = messages[-1]["seq"] if messages else cursor
        return {"messages": messages, "next_cursor": next_cursor, "more": len(messages) == limit}


def _redacted(body: dict[str, Any]) -> dict[str, Any]:
    """What the inbox keeps of a message: the environment's values are task secrets."""
    out = dict(body)
    if isinstance(out.get("env"), dict):
        out["env"] = {k: "…" for k in out["env"]}
    return out


__all__ = ["MESSAGE_TYPES", "Inbox"]
