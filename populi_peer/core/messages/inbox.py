"""``/v1/populi/inbox``: the envelope of a message between nodes and its payloads
(handoff, cancel, result, ack), the delivery answer, and the inbox listing.

On the wire an inbox message is flat: ``{"message_id", "type", ...the payload's fields}``.
:class:`InboxMessage` keeps the two apart (``message_id`` and a typed ``payload``) and
picks the payload's type by ``type``; the answer's ``result`` is typed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal, get_args

from populi_peer.core.fencing import FencingToken
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Codec,
    Ident,
    Int,
    JsonObject,
    Message,
    Nested,
    Num,
    Seq,
    Text,
    bad_field,
    message,
    wire,
)
from populi_peer.core.messages.records import TOKEN, WORK_CLASS, AttemptResult
from populi_peer.core.policy import WorkClass
from populi_peer.core.wire import MAX_ATTEMPT, check_command, check_cwd, check_env
from populi_peer.errors import BadRequest

MessageType = Literal["handoff", "cancel", "result", "ack"]
MESSAGE_TYPES: Final[tuple[MessageType, ...]] = get_args(MessageType)
#: The longest cancel reason a worker keeps.
MAX_CANCEL_REASON_CHARS: Final = 200
ATTEMPT = Int(minimum=1, maximum=MAX_ATTEMPT)


class Payload(Message):
    """An inbox payload: its ``type`` on the wire is :attr:`TYPE`."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]


@message
class HandoffMessage(Payload):
    """A submitter hands an attempt to a worker under a lease (``HandoffMessage``).
    ``command`` and ``env`` are checked by the one rule every route shares
    (:mod:`populi_peer.core.wire`)."""

    TYPE: ClassVar[MessageType] = "handoff"

    task_id: str = wire(Ident())
    lease_id: str = wire(Ident())
    attempt: int = wire(ATTEMPT)
    token: FencingToken = wire(TOKEN)
    command: tuple[str, ...] = wire(Seq(Text(), min_items=1))
    env: Mapping[str, str] = wire(JsonObject(), default_factory=dict)
    #: UUIDs of the worker's GPUs.
    gpus: tuple[str, ...] = wire(Seq(Ident()), default=())
    ttl_s: float = wire(Num(above=0))
    work_class: WorkClass = wire(WORK_CLASS, default="agent")
    #: The settings record the submitter placed this under.
    settings_serial: int | None = wire(Int(minimum=0), omit_none=True)
    #: ``--cwd``: the directory to run in here (absent: a fresh one); the worker refuses
    #: the handoff with ``cwd_missing`` when it has no such directory.
    cwd: str | None = wire(Text(min_len=1), omit_none=True)
    #: The lease's own attempt number (the grant request's; the task's ``attempt`` may
    #: differ): the worker reports the lease under it (ADR 0015).
    lease_attempt: int | None = wire(ATTEMPT, omit_none=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", check_command(list(self.command)))
        object.__setattr__(self, "env", check_env(self.env))
        check_cwd(self.cwd)


@message
class CancelMessage(Payload):
    """The submitter (or an operator) stops an attempt on a worker."""

    TYPE: ClassVar[MessageType] = "cancel"

    task_id: str = wire(Ident())
    attempt: int = wire(ATTEMPT)
    reason: str | None = wire(Text(), omit_none=True)

    def reason_or(self, default: str) -> str:
        return (self.reason or default)[:MAX_CANCEL_REASON_CHARS]


@message
class ResultMessage(Payload):
    """A worker reports a finished attempt to its submitter, with its output tails."""

    TYPE: ClassVar[MessageType] = "result"

    result: AttemptResult = wire(Nested(AttemptResult), flatten=True)
    stdout_tail_b64: str | None = wire(Text(), omit_none=True)
    stderr_tail_b64: str | None = wire(Text(), omit_none=True)


@message
class AckMessage(Payload):
    """An acknowledgement; no node takes it yet (400 ``unsupported_message``)."""

    TYPE: ClassVar[MessageType] = "ack"


PAYLOADS: Final[Mapping[str, type[Payload]]] = {
    cls.TYPE: cls for cls in (HandoffMessage, CancelMessage, ResultMessage, AckMessage)
}


class TaggedPayload(Codec[Payload]):
    """A payload beside the envelope's fields, its class picked by ``type`` (flattened)."""

    def parse(self, value: object, path: str) -> Payload:
        assert isinstance(value, Mapping)  # a flattened field gets the enclosing object
        kind = value.get("type")
        payload_cls = PAYLOADS.get(kind) if isinstance(kind, str) else None
        if payload_cls is None:
            raise bad_field(_at(path, "type"), "one of " + ", ".join(MESSAGE_TYPES), kind)
        return payload_cls.parse_at(value, path)

    def dump(self, value: Payload) -> Any:
        return {"type": value.TYPE, **value.to_json()}


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@message
class InboxMessage(Message):
    """``InboxMessage``: one message, idempotent by (sender, ``message_id``)."""

    message_id: str = wire(Ident())
    payload: Payload = wire(TaggedPayload(), flatten=True)

    @property
    def type(self) -> MessageType:
        return self.payload.TYPE


# -- answers ------------------------------------------------------------------------------


@message
class HandoffAnswer(Message):
    verdict: Literal["start", "duplicate"] = wire(Choice(("start", "duplicate")))
    #: The attempt's state on the worker, for a duplicate.
    state: str | None = wire(Text(), omit_none=True)


@message
class CancelAnswer(Message):
    cancelled: bool = wire(Bool())
    state: str = wire(Text())


@message
class ResultAnswer(Message):
    accepted: bool = wire(Bool())
    #: The task's state at the submitter after the result.
    state: str = wire(Text())


ANSWERS: Final[Mapping[str, type[Message]]] = {
    "handoff": HandoffAnswer,
    "cancel": CancelAnswer,
    "result": ResultAnswer,
}


class TaggedAnswer(Codec[Message]):
    """The delivery answer's ``result``, its class picked by the answer's ``type``
    (flattened: it reads both keys of the enclosing object)."""

    def parse(self, value: object, path: str) -> Message:
        assert isinstance(value, Mapping)
        kind = value.get("type")
        answer_cls = ANSWERS.get(kind) if isinstance(kind, str) else None
        if answer_cls is None:
            raise bad_field(_at(path, "type"), "one of " + ", ".join(ANSWERS), kind)
        if "result" not in value:
            raise BadRequest(
                f"missing field {_at(path, 'result')!r}",
                code="bad_request",
                field=_at(path, "result"),
            )
        return answer_cls.parse_at(value["result"], _at(path, "result"))

    def dump(self, value: Message) -> Any:
        return {"result": value.to_json()}


@message
class InboxDeliverAnswer(Message):
    """The handler's answer (or the first one again, ``duplicate``): ``result`` is a
    :class:`HandoffAnswer`, :class:`CancelAnswer` or :class:`ResultAnswer` by ``type``."""

    message_id: str = wire(Text())
    type: MessageType = wire(Choice(MESSAGE_TYPES))
    duplicate: bool = wire(Bool())
    result: Message = wire(TaggedAnswer(), flatten=True)

    def __post_init__(self) -> None:
        if not isinstance(self.result, ANSWERS.get(self.type, ())):
            raise BadRequest(
                f"a {self.type} message is not answered with {type(self.result).__name__}",
                code="bad_request",
                field="result",
            )


@message
class InboxRecord(Message):
    """One received message as the inbox keeps it (environment values redacted)."""

    seq: int = wire(Int(minimum=1))
    message_id: str = wire(Text())
    sender: str = wire(Text())
    type: str = wire(Text())
    received_ms: int = wire(Int())
    message: Mapping[str, Any] = wire(JsonObject())
    answer: Mapping[str, Any] = wire(JsonObject())


@message
class InboxReadAnswer(Message):
    messages: tuple[InboxRecord, ...] = wire(Seq(Nested(InboxRecord)))
    next_cursor: int = wire(Int(minimum=0))
    #: The page is full; ask again from ``next_cursor``.
    more: bool = wire(Bool())


__all__ = [
    "MESSAGE_TYPES",
    "PAYLOADS",
    "AckMessage",
    "CancelAnswer",
    "CancelMessage",
    "HandoffAnswer",
    "HandoffMessage",
    "InboxDeliverAnswer",
    "InboxMessage",
    "InboxReadAnswer",
    "InboxRecord",
    "MessageType",
    "Payload",
    "ResultAnswer",
    "ResultMessage",
    "TaggedAnswer",
    "TaggedPayload",
]
