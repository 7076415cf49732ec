"""Joining, tokens, certificates, retirement, membership views, node lifecycle, events and
leaving: the bodies of the routes in ``agent/enrollment.py`` and ``agent/nodes.py``.

Token and join fields are checked here for their shape only; what the token format allows
(TTL at most 24 h, 1-1000 uses, grantable roles, the name syntax) stays with
``enrollment.tokens``, which answers with its own reason codes (``token_bad_field``,
``token_ttl_too_long``...). Where that module also refuses a wrong type (``uses``), the
field here carries its code, so a client sees one code per field whichever check refused.
"""

from __future__ import annotations

from typing import Final, Literal

from populi_peer.core.messages._codec import (
    Bool,
    Const,
    Int,
    Message,
    Nested,
    Nullable,
    Num,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import (
    ADDRESSES,
    REASON,
    ROLE_LIST,
    ClusterRef,
    ControlPlaneRef,
    EventView,
    MemberView,
    NodeView,
    Role,
    TokenSummary,
)
from populi_peer.errors import BadRequest

#: ``enrollment.tokens``'s code for a token field of the wrong shape.
TOKEN_FIELD: Final = "token_bad_field"
#: The text of a join token, as ``enrollment.tokens`` mints it: its signed envelope and
#: its 32-byte secret, base64url.
TOKEN_TEXT: Final = r"populi-join-[23]\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}"
#: How long a token lives unless asked (seconds).
DEFAULT_TOKEN_TTL_S: Final = 3600.0

# -- join (unauthenticated) ---------------------------------------------------------------


@message
class JoinCaAnswer(Message):
    cluster_id: str = wire(Text(min_len=1))
    ca_certificate: str = wire(Text(min_len=1))


@message
class JoinChallengeAnswer(Message):
    challenge: str = wire(Text(min_len=1))
    #: The control plane's node id.
    node_id: str = wire(Text(min_len=1))
    cluster_id: str = wire(Text(min_len=1))
    expires_in_s: float = wire(Num(above=0))


@message
class JoinEnrollRequest(Message):
    """The token's signed envelope (never its secret), the joiner's key and name, and the
    two proofs over the join claim (``enrollment.tokens.JoinClaim``)."""

    token: str = wire(Text(min_len=1))
    public_key: str = wire(Text(min_len=1))
    name: str = wire(Text(min_len=1))
    challenge: str = wire(Text(min_len=1))
    proof: str = wire(Text(min_len=1))
    token_proof: str = wire(Text(min_len=1))
    addresses: tuple[str, ...] = wire(ADDRESSES, default=())


@message
class JoinEnrollAnswer(Message):
    """Everything a new node needs (the same again for a retried join)."""

    node_id: str = wire(Text(min_len=1))
    name: str = wire(Text(min_len=1))
    roles: tuple[Role, ...] = wire(ROLE_LIST)
    cluster: ClusterRef = wire(Nested(ClusterRef))
    certificate: str = wire(Text(min_len=1))
    ca_certificate: str = wire(Text(min_len=1))
    term: int = wire(Int(minimum=1))
    control_plane: ControlPlaneRef = wire(Nested(ControlPlaneRef))
    membership_version: int = wire(Int())
    members: tuple[MemberView, ...] = wire(Seq(Nested(MemberView)))
    revocations: str | None = wire(Nullable(Text()))
    settings_record: str | None = wire(Nullable(Text()))


# -- tokens and certificates (operator, control plane) ------------------------------------


@message
class TokenCreateRequest(Message):
    #: Seconds; its bounds (at most 24 h) are ``enrollment.tokens``'s rule.
    ttl_s: float = wire(Num(), default=DEFAULT_TOKEN_TTL_S)
    #: 1-1000 (``enrollment.tokens``'s rule); not an integer: ``token_bad_field`` too.
    uses: int = wire(Int(code=TOKEN_FIELD), default=1)
    #: Grantable roles (``enrollment.tokens``'s rule: ``token_bad_field``).
    roles: tuple[str, ...] = wire(Seq(Text()), default=("worker", "submit"))
    #: Bind the token to this node name (its syntax: ``enrollment.tokens``).
    name: str | None = wire(Nullable(Text()), default=None)


@message
class TokenCreateAnswer(Message):
    #: ``populi-join-3.<envelope>.<secret>``: a secret, shown once.
    token: str = wire(
        Text(pattern=TOKEN_TEXT, what="a join token (populi-join-3.<envelope>.<secret>)")
    )
    summary: TokenSummary = wire(Nested(TokenSummary))


@message
class TokenListAnswer(Message):
    tokens: tuple[TokenSummary, ...] = wire(Seq(Nested(TokenSummary)))


@message
class TokenRevokeAnswer(Message):
    summary: TokenSummary = wire(Nested(TokenSummary))
    #: False when the token was revoked already (nothing changed).
    changed: bool = wire(Bool(), default=True)


@message
class CertRenewAnswer(Message):
    certificate: str = wire(Text(min_len=1))


# -- retirement ---------------------------------------------------------------------------


@message
class ReasonRequest(Message):
    """An operator action's optional ``reason`` (``ReasonRequest``): one line of at most
    200 characters; absent or empty means the operation's default."""

    reason: str | None = wire(REASON, default=None)

    def reason_or(self, default: str) -> str:
        return self.reason or default


@message
class NodeRetireAnswer(Message):
    node_id: str = wire(Text(min_len=1))
    state: Literal["retired"] = wire(Const("retired"))
    revocation_serial: int = wire(Int(minimum=0))
    #: False when the node was retired and revoked already (nothing changed).
    changed: bool = wire(Bool(), default=True)


@message
class NodeDeleteAnswer(Message):
    node_id: str = wire(Text(min_len=1))
    deleted: Literal[True] = wire(Const(True))
    #: The name stays blocked after a retire until ``name_unretire``.
    name_blocked: bool = wire(Bool())


@message
class NameUnretireAnswer(Message):
    name: str = wire(Text(min_len=1))
    blocked: Literal[False] = wire(Const(False))
    revocation_serial: int = wire(Int(minimum=0))


# -- membership views ---------------------------------------------------------------------


@message
class RevocationsAnswer(Message):
    #: -1 when no list is held.
    serial: int = wire(Int(minimum=-1))
    #: The signed list, when newer than the caller's ``since``.
    revocations: str | None = wire(Nullable(Text()))


@message
class MembersAnswer(Message):
    version: int = wire(Int(minimum=1))
    members: tuple[MemberView, ...] = wire(Seq(Nested(MemberView)))


# -- node lifecycle, listing, events, leave -----------------------------------------------

#: Ten years: the longest relative deadline a lifecycle command takes.
MAX_RELATIVE_S: Final = 10 * 365 * 86400.0


@message
class LifecycleCommandRequest(Message):
    """``LifecycleCommandRequest``: a deadline belongs to ``drain``, ``until`` to
    ``maintenance``, each relative (``*_in_s``) or absolute (``*_wall_ms``), not both
    (:meth:`deadline_ms` / :meth:`until_ms` resolve them on the control plane's clock)."""

    reason: str | None = wire(REASON, default=None)
    deadline_in_s: float | None = wire(Num(above=0, maximum=MAX_RELATIVE_S), omit_none=True)
    deadline_wall_ms: int | None = wire(Int(minimum=1), omit_none=True)
    until_in_s: float | None = wire(Num(above=0, maximum=MAX_RELATIVE_S), omit_none=True)
    until_wall_ms: int | None = wire(Int(minimum=1), omit_none=True)

    def __post_init__(self) -> None:
        for name in ("deadline", "until"):
            if (
                getattr(self, f"{name}_in_s") is not None
                and getattr(self, f"{name}_wall_ms") is not None
            ):
                raise BadRequest(
                    f"give {name}_in_s or {name}_wall_ms, not both",
                    code="bad_request",
                    field=f"{name}_in_s",
                )

    @staticmethod
    def _resolve(in_s: float | None, wall_ms: int | None, now_wall_ms: int) -> int | None:
        if in_s is not None:
            return now_wall_ms + int(in_s * 1000)
        return wall_ms

    def deadline_ms(self, now_wall_ms: int) -> int | None:
        return self._resolve(self.deadline_in_s, self.deadline_wall_ms, now_wall_ms)

    def until_ms(self, now_wall_ms: int) -> int | None:
        return self._resolve(self.until_in_s, self.until_wall_ms, now_wall_ms)


@message
class LifecycleCommandAnswer(Message):
    node: NodeView = wire(Nested(NodeView))
    #: False for a no-op re-issue.
    changed: bool = wire(Bool())


@message
class NodesAnswer(Message):
    term: int = wire(Int(minimum=1))
    membership_version: int = wire(Int())
    nodes: tuple[NodeView, ...] = wire(Seq(Nested(NodeView)))


@message
class EventsAnswer(Message):
    #: Oldest first, so the newest is last.
    events: tuple[EventView, ...] = wire(Seq(Nested(EventView)))
    #: The cursor to ask with next (``after``): the last event's seq; for an empty page,
    #: ``after`` when it was given, else the newest seq in the log (so that a follower
    #: starts from now).
    next_after: int = wire(Int(minimum=0))
    #: Older events that match were left out (a page without ``after`` holds the newest
    #: ``limit``).
    earlier: bool = wire(Bool(), default=False)


@message
class LeaveAnswer(Message):
    node_id: str = wire(Text(min_len=1))
    left: Literal[True] = wire(Const(True))
    #: The control plane answered the leaving heartbeat with lifecycle ``left``.
    acknowledged: bool = wire(Bool())
    tasks_stopped: int = wire(Int(minimum=0))


__all__ = [
    "DEFAULT_TOKEN_TTL_S",
    "CertRenewAnswer",
    "EventsAnswer",
    "JoinCaAnswer",
    "JoinChallengeAnswer",
    "JoinEnrollAnswer",
    "JoinEnrollRequest",
    "LeaveAnswer",
    "LifecycleCommandAnswer",
    "LifecycleCommandRequest",
    "MembersAnswer",
    "NameUnretireAnswer",
    "NodeDeleteAnswer",
    "NodeRetireAnswer",
    "NodesAnswer",
    "ReasonRequest",
    "RevocationsAnswer",
    "TokenCreateAnswer",
    "TokenCreateRequest",
    "TokenListAnswer",
    "TokenRevokeAnswer",
]
