"""Enrollment on the control plane: join tokens, the join handshake, certificates,
retirement and revocation.

Join, in three unauthenticated steps (challenge and enroll rate-limited per client address;
ADR 0008):

1. ``GET /v1/populi/join/ca`` — the CA certificate; the joiner checks it against the
   token's pin, then trusts only it and checks that the node it reached over that TLS is
   one the token names (it sends nothing before that).
2. ``POST /v1/populi/join/challenge`` — a fresh single-use challenge.
3. ``POST /v1/populi/join/enroll`` — the token's envelope (never its secret), the joiner's
   public key, its name and addresses, the challenge and two proofs over a
   :class:`~enrollment.tokens.JoinClaim` bound to this node's id: one by the joiner's key,
   one by the token key. The token is consumed atomically and durably (one SQLite
   transaction, ``synchronous=FULL``) together with the new member record, its lifecycle
   register, the event and the certificate issued; memory adopts the member only after
   that commit, so a failed commit (a full disk: 503 ``storage_unavailable``) leaves
   nothing of the joiner anywhere. A retry with the same token and key is answered from
   the recorded use; a consumed token never works again.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, replace
from typing import Any, ClassVar, Literal

import trio

from enrollment.ca import (
    Issuer,
    cert_to_pem,
    certificate_public_key,
    make_node_certificate,
    node_certificate_info,
)
from enrollment.canonical import b64url_encode
from enrollment.errors import ErrorKind, TokenError
from enrollment.keys import node_id_for, public_from_text, public_to_text
from enrollment.revocation import RevokedNode
from enrollment.tokens import (
    JoinClaim,
    JoinProofs,
    JoinToken,
    check_redeem_time,
    mint_token,
    redeem_token,
    token_digest,
    validate_node_name,
    verify_join,
)
from populi_peer.agent.address import OwnAddress
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.agent.membership import Member, Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.replica import ClusterWrites
from populi_peer.agent.revocations import RevocationState
from populi_peer.api.app import ANY_MEMBER, OPERATOR, Request, Route
from populi_peer.clock import Clock, wall_ms
from populi_peer.config import SecurityConfig, parse_host_port
from populi_peer.core.cluster_state import (
    IssuedToken,
    NameReleased,
    TokenConsumed,
    TokenRevoked,
    consumption_item,
    issued_token_item,
    member_removal_item,
    name_release_item,
    node_revocation_item,
    token_revocation_item,
)
from populi_peer.core.messages import (
    CertRenewAnswer,
    ClusterRef,
    ControlPlaneRef,
    JoinCaAnswer,
    JoinChallengeAnswer,
    JoinEnrollAnswer,
    JoinEnrollRequest,
    MembersAnswer,
    MemberView,
    NameUnretireAnswer,
    NodeDeleteAnswer,
    NodeRetireAnswer,
    ReasonRequest,
    RevocationsAnswer,
    TokenCreateAnswer,
    TokenCreateRequest,
    TokenListAnswer,
    TokenRevokeAnswer,
    TokenSummary,
)
from populi_peer.core.messages.records import ROLES, EventKind, Role
from populi_peer.core.ratelimit import RateLimiter
from populi_peer.errors import (
    Conflict,
    Forbidden,
    NotFound,
    PopuliError,
    RateLimited,
    StorageUnavailable,
    enrollment_boundary,
)
from populi_peer.identity import Identity
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import Store
from populi_peer.store.events import EventLog
from populi_peer.store.tokens import JoinTokenRecord, JoinTokens

CHALLENGE_TTL_S = 120.0
MAX_CHALLENGES = 10_000
#: Far beyond the 24 h maximum (and possibly beyond an integer of milliseconds): refused
#: here before the token is minted (``enrollment.tokens`` checks the maximum itself).
ABSURD_TOKEN_TTL_S = 48 * 3600.0

#: Told after membership or revocations changed on the control plane.
MembershipListener = Callable[[], None]


class TokenUsed(TokenError, Conflict):
    """Both an enrollment :class:`TokenError` and a Populi :class:`Conflict` (HTTP 409)."""

    code = "token_already_used"
    kind = ErrorKind.CONFLICT
    http_status = 409


class JoinNotStored(StorageUnavailable):
    """The join could not be committed (a full disk, an I/O error): nothing of it was kept
    and the token was not consumed; the joiner may try again later (HTTP 503)."""


@dataclass(kw_only=True, eq=False, repr=False)
class Enrollment:
    """``identity`` holds the issuer this control plane enrolls with: its own issuer
    key, or the root key of a cluster made before issuers (a node with neither refuses:
    ``no_issuer_key``); ``writes`` proposes every change through the election (ADR
    0017): the tables change only once this node stored it."""

    identity: Identity
    clock: Clock
    store: Store
    security: InitVar[SecurityConfig]
    control_plane: ControlPlaneLink
    address: OwnAddress
    membership: Membership
    registry: Registry
    revocations: RevocationState
    records: ClusterRecords
    events: EventLog
    writes: ClusterWrites
    membership_listeners: Sequence[MembershipListener] = ()
    logger: ClassVar[logging.Logger] = get_logger("enrollment")

    def __post_init__(self, security: SecurityConfig) -> None:
        self.node_id = self.identity.node_id
        self.max_skew_s = security.max_skew_s
        self.membership_listeners = tuple(self.membership_listeners)
        #: Called with each member record a join stored (a voter join: a voter change).
        self.joined_listeners: list[Callable[[Member], None]] = []
        self.limiter = RateLimiter(security.join_rate_per_min)
        self._challenges: OrderedDict[str, float] = OrderedDict()
        self._joining = trio.Lock()
        self.tokens = JoinTokens(self.store)

    # -- routes ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/populi/join/ca",
                self._join_ca,
                roles=None,
                name="join_ca",
            ),
            Route(
                "POST",
                "/v1/populi/join/challenge",
                self._join_challenge,
                roles=None,
                name="join_challenge",
            ),
            Route(
                "POST",
                "/v1/populi/join/enroll",
                self._join_enroll,
                roles=None,
                name="join_enroll",
            ),
            Route(
                "POST",
                "/v1/populi/admin/tokens",
                self._token_create,
                roles=OPERATOR,
                name="token_create",
            ),
            Route(
                "GET",
                "/v1/populi/admin/tokens",
                self._token_list,
                roles=OPERATOR,
                name="token_list",
            ),
            Route(
                "POST",
                "/v1/populi/admin/tokens/{token_id}/revoke",
                self._token_revoke,
                roles=OPERATOR,
                name="token_revoke",
            ),
            Route(
                "POST",
                "/v1/populi/certs/renew",
                self._cert_renew,
                roles=ANY_MEMBER,
                name="cert_renew",
            ),
            Route(
                "POST",
                "/v1/populi/admin/nodes/{node}/retire",
                self._retire,
                roles=OPERATOR,
                name="node_retire",
            ),
            Route(
                "POST",
                "/v1/populi/admin/nodes/{node}/delete",
                self._delete,
                roles=OPERATOR,
                name="node_delete",
            ),
            Route(
                "POST",
                "/v1/populi/admin/names/{name}/unretire",
                self._unretire,
                roles=OPERATOR,
                name="name_unretire",
            ),
            Route(
                "GET",
                "/v1/populi/revocations",
                self._revocations,
                roles=ANY_MEMBER,
                name="revocations",
            ),
            Route(
                "GET",
                "/v1/populi/members",
                self._members,
                roles=ANY_MEMBER,
                name="members",
            ),
        ]

    # -- helpers --------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return wall_ms(self.clock)

    def _require_cp(self) -> None:
        self.control_plane.require_self()

    def _rate_limit(self, request: Request) -> None:
        key = request.client[0] if request.client else "unknown"
        if not self.limiter.allow(key, now_mono=self.clock.mono()):
            wait = self.limiter.retry_after_s(key)
            raise RateLimited(
                f"too many join requests from {key}; retry in {wait:.0f} s",
                retry_after_s=round(wait, 1),
            )

    def _issuer(self, now_ms: int) -> Issuer:
        """What signs certificates, tokens and revocation lists here (ADR 0018)."""
        issuer = self.identity.issuer
        if issuer is None:
            raise Conflict(
                "this node holds no issuer key (nor the cluster root key); it cannot enroll "
                "nodes until the root signs it an issuer (runbooks/offline-root.md)",
                code="no_issuer_key",
            )
        if issuer.certificate is not None:
            not_after_ms = node_certificate_info(issuer.certificate).not_after_s * 1000
            if now_ms >= not_after_ms:
                raise Conflict(
                    "this node's issuer certificate has expired; the root must sign it a new "
                    "one (runbooks/offline-root.md)",
                    code="issuer_expired",
                )
        return issuer

    def _issue(
        self, member_key: Any, member_id: str, addresses: Sequence[str], now_ms: int
    ) -> tuple[Any, str]:
        """A node certificate and its PEM with the chain, signed by this node's issuer; it
        never outlives the issuer."""
        issuer = self._issuer(now_ms)
        days = self.records.settings["node_cert_lifetime_s"] / 86400
        if issuer.certificate is not None:
            left_s = node_certificate_info(issuer.certificate).not_after_s - now_ms / 1000
            days = min(days, left_s / 86400)
        cert = make_node_certificate(
            ca_key=issuer.key,
            ca_cert=issuer.signing_certificate,
            subject_key=member_key,
            principal_id=member_id,
            cluster_id=self.identity.cluster_id,
            addresses=[_host_of(a) for a in addresses],
            now_wall_s=now_ms / 1000,
            serial=secrets.randbits(63) | 1,
            days=days,
        )
        return cert, issuer.chain_pem(cert)

    def _membership_changed(self) -> None:
        for listener in self.membership_listeners:
            listener()

    def contacts(self) -> list[str]:
        member = self.membership.get(self.node_id)
        addresses = list(member.addresses) if member else []
        return addresses or [self.address.host_port]

    def _ca_pem(self) -> str:
        return cert_to_pem(self.identity.ca_cert).decode("ascii")

    # -- join -----------------------------------------------------------------------------

    async def _join_ca(self, request: Request) -> JoinCaAnswer:
        # Public and static: not counted against the join rate (a join is challenge + enroll).
        await trio.lowlevel.checkpoint()
        return JoinCaAnswer(cluster_id=self.identity.cluster_id, ca_certificate=self._ca_pem())

    async def _join_challenge(self, request: Request) -> JoinChallengeAnswer:
        self._rate_limit(request)
        self._require_cp()
        now = self.clock.mono()
        while self._challenges and (
            len(self._challenges) >= MAX_CHALLENGES or next(iter(self._challenges.values())) < now
        ):
            self._challenges.popitem(last=False)
        challenge = b64url_encode(secrets.token_bytes(32))
        self._challenges[challenge] = now + CHALLENGE_TTL_S
        await trio.lowlevel.checkpoint()
        return JoinChallengeAnswer(
            challenge=challenge,
            node_id=self.node_id,
            cluster_id=self.identity.cluster_id,
            expires_in_s=CHALLENGE_TTL_S,
        )

    async def _join_enroll(self, request: Request) -> JoinEnrollAnswer:
        self._rate_limit(request)
        self._require_cp()
        body = request.message(JoinEnrollRequest)
        identity = self.identity
        token = redeem_token(
            body.token,
            trusted_root=certificate_public_key(identity.ca_cert),
            expected_cluster_id=identity.cluster_id,
            recipient=self.node_id,
            revoked=self.revocations.is_certificate_revoked,
        )
        expires = self._challenges.pop(body.challenge, None)
        if expires is None or expires < self.clock.mono():
            raise Forbidden(
                "join challenge unknown or expired; start the join again", code="challenge_invalid"
            )
        name = validate_node_name(body.name)
        # The recipient is this node, whatever the joiner believes it reached: a proof made
        # for another node (an impostor that relays) does not verify here.
        verify_join(
            JoinClaim(
                recipient=self.node_id,
                challenge=body.challenge,
                public_key=body.public_key,
                cluster_id=identity.cluster_id,
                name=name,
                token_id=token.token_id,
                addresses=body.addresses,
            ),
            JoinProofs(proof=body.proof, token_proof=body.token_proof),
            token=token,
        )
        public_key = public_from_text(body.public_key)
        node_id = node_id_for(public_key)
        # One join at a time on this control plane: its checks (key, name, token) and its
        # writes, which wait on a majority in between, see no other join half-done.
        async with self._joining:
            replayed = await self._recorded_join(token, node_id, name)
            if replayed is not None:
                return replayed
            now_ms = self._now_ms()
            check_redeem_time(token, now_ms=now_ms)
            return await self._enroll(
                token,
                envelope=body.token,
                public_key=public_key,
                name=name,
                addresses=body.addresses,
                now_ms=now_ms,
            )

    async def _recorded_join(
        self, token: JoinToken, node_id: str, name: str
    ) -> JoinEnrollAnswer | None:
        """The first answer again, when this key already joined with this token (the
        joiner lost the answer and retried): same node, same certificate, no second use."""
        recorded = self.tokens.recorded(token.token_id, node_id)
        if recorded is None or recorded.certificate is None:
            return None
        member = self.membership.get(node_id)
        if member is None or self.revocations.is_revoked(node_id) or member.name != name:
            raise Conflict(
                f"key {node_id} already joined with this token and is no longer a member "
                "under that name; every join needs a fresh key",
                code="key_reused",
            )
        if self.registry.registers.lifecycle(node_id) is None:
            # The join was cut short after its member record: finish it.
            actor = f"token:{token.token_id}"
            await self.writes.propose(
                self.registry.initial_write(node_id, actor=actor, term=self.writes.term)
            )
        log(
            self.logger,
            logging.INFO,
            "join retried; answering with the recorded outcome",
            node_id=node_id,
            token_id=token.token_id,
        )
        return self._join_answer(member, recorded.certificate)

    async def _enroll(
        self,
        token: JoinToken,
        *,
        envelope: str,
        public_key: Any,
        name: str,
        addresses: tuple[str, ...],
        now_ms: int,
    ) -> JoinEnrollAnswer:
        skew_ms = int(self.max_skew_s * 1000)
        if token.name is not None and token.name != name:
            raise Forbidden(
                f"this token is bound to the name {token.name!r}, not {name!r}",
                code="token_name_mismatch",
            )
        if self.revocations.is_name_blocked(name):
            raise Forbidden(
                f"the name {name!r} belongs to a retired node; an operator must run 'populi node unretire {name}' first",
                code="name_retired",
            )
        node_id = node_id_for(public_key)
        if self.membership.get(node_id) is not None or self.revocations.is_revoked(node_id):
            raise Conflict(
                f"key {node_id} is already enrolled; every join needs a fresh key",
                code="key_reused",
            )
        # A name is held by a live node: not retired, certificate not expired. A retired
        # node keeps its record (until deleted) but, once unretired, not its name.
        holder = next(
            (
                m
                for m in self.membership.nodes()
                if m.name == name and not self.revocations.is_revoked(m.id)
            ),
            None,
        )
        if holder is not None and holder.cert_not_after_ms > now_ms - skew_ms:
            raise Conflict(
                f"node name {name!r} is taken by {holder.id}; pick another --name",
                code="name_taken",
            )

        cert, certificate = self._issue(public_key, node_id, addresses, now_ms)
        serial = cert.serial_number
        roles = tuple(sorted(token.roles))
        member = Member(
            id=node_id,
            kind="node",
            name=name,
            public_key=public_to_text(public_key),
            roles=roles,
            addresses=tuple(addresses),
            cert_serial=format(serial, "x"),
            cert_not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000),
            joined_ms=now_ms,
            token_id=token.token_id,
            updated_ms=now_ms,
        )
        actor = f"token:{token.token_id}"
        writes = self.writes
        use = self._take_use(token, envelope, node_id)
        # One majority write each, in this order (ADR 0017): the token use first — only
        # the leader consumes, checking and adding in one write, so a second consumer is
        # refused — then the member record with the certificate it issued (a retried
        # join is answered with it), then the node's first lifecycle. A join cut short
        # in between is finished by the joiner's retry: the same key takes the same use.
        try:
            await writes.propose(
                consumption_item(TokenConsumed(token.token_id, use, node_id), stamp=writes.stamp())
            )
        except Conflict as exc:
            if exc.code == "token_already_consumed":
                raise TokenUsed("token already used", code="token_already_used") from exc
            raise
        except StorageUnavailable as exc:
            log(
                self.logger,
                logging.ERROR,
                "join not recorded; the token was not consumed",
                token_id=token.token_id,
                node_id=node_id,
                error=str(exc),
            )
            raise JoinNotStored(
                "the control plane could not record the join (its storage failed); nothing "
                "was kept and the token is unused, try again later",
                **exc.details,
            ) from exc
        if holder is not None:
            await writes.propose(
                member_removal_item(
                    holder.id,
                    stamp=writes.stamp(),
                    writer_class="leader",
                    actor=actor,
                    reason=f"name {name} taken by {node_id}",
                    at_wall_ms=now_ms,
                )
            )
        await writes.propose_member(
            member, certificate=certificate, actor=actor, reason="joined", at_wall_ms=now_ms
        )
        await writes.propose(self.registry.initial_write(node_id, actor=actor, term=writes.term))
        self._event(
            node_id=node_id,
            kind="node_joined",
            actor=actor,
            detail={"name": name, "roles": list(roles)},
        )
        log(
            self.logger,
            NOTICE,
            "node joined",
            node_id=node_id,
            name=name,
            token_id=token.token_id,
            roles=list(roles),
        )
        self._membership_changed()
        for listener in self.joined_listeners:
            listener(member)
        return self._join_answer(member, certificate)

    def _take_use(self, token: JoinToken, envelope: str, node_id: str) -> int:
        """The use of ``token`` this join takes (the one ``node_id`` already holds when it
        retries a join cut short); refuses an unknown, revoked or used-up token."""
        row = self.tokens.get(token.token_id)
        if row is None or row.digest != token_digest(envelope):
            raise Forbidden("this token was not issued by this control plane", code="token_unknown")
        if row.revoked_ms is not None:
            raise Forbidden("this token was revoked", code="token_revoked")
        retried = self.tokens.recorded(token.token_id, node_id) is not None
        use = self.writes.token_use(token.token_id, node_id, row.uses_total)
        if use is None or (row.uses_left <= 0 and not retried):
            raise TokenUsed("token already used", code="token_already_used")
        return use

    def _event(self, *, node_id: str, kind: EventKind, actor: str, **fields: Any) -> None:
        """Log a control-plane event; the change it tells of is already stored by a
        majority, so a failed append is logged, never the caller's error."""
        try:
            self.events.append(
                at_ms=self._now_ms(), node_id=node_id, kind=kind, actor=actor, **fields
            )
        except PopuliError as exc:
            log(self.logger, logging.WARNING, "event not recorded", kind=kind, error=str(exc))

    def _join_answer(self, member: Member, certificate: str) -> JoinEnrollAnswer:
        identity = self.identity
        settings_record = self.records.settings_record
        return JoinEnrollAnswer(
            node_id=member.id,
            name=member.name,
            roles=_roles(member.roles),
            cluster=ClusterRef(id=identity.cluster_id, name=identity.cluster_name),
            certificate=certificate,
            ca_certificate=self._ca_pem(),
            term=self.control_plane.term,
            control_plane=ControlPlaneRef(node_id=self.node_id, url=self.address.url),
            membership_version=self.membership.version,
            members=self._member_views(),
            revocations=self.revocations.text,
            settings_record=settings_record.text if settings_record else None,
        )

    def _member_views(self) -> tuple[MemberView, ...]:
        return tuple(MemberView.of(m) for m in self.membership.all())

    # -- tokens ---------------------------------------------------------------------------

    async def _token_create(self, request: Request) -> TokenCreateAnswer:
        self._require_cp()
        body = request.message(TokenCreateRequest)
        if body.ttl_s > ABSURD_TOKEN_TTL_S:
            raise TokenError(
                f"token TTL {body.ttl_s:g} s exceeds the 24h maximum", code="token_ttl_too_long"
            )
        name = body.name
        if name is not None and self.revocations.is_name_blocked(name):
            raise Conflict(
                f"the name {name!r} belongs to a retired node; run 'populi node unretire {name}' first",
                code="name_retired",
            )
        now_ms = self._now_ms()
        issuer = self._issuer(now_ms)
        text, token = mint_token(
            signing_key=issuer.key,
            issuer=issuer.certificate,
            root_key=None if issuer.certificate is None else certificate_public_key(issuer.root),
            cluster_id=self.identity.cluster_id,
            contacts=self.contacts(),
            # The node that redeems the token is the one that mints it: this control plane
            # (with elections, the voters of the voter record at minting).
            recipients=[self.node_id],
            roles=list(body.roles),
            now_ms=now_ms,
            ttl_ms=int(body.ttl_s * 1000),
            uses=body.uses,
            name=name,
            token_id=secrets.token_bytes(16),
            token_seed=secrets.token_bytes(32),
        )
        await self.writes.propose(
            issued_token_item(
                IssuedToken(
                    token_id=token.token_id,
                    digest=token_digest(text),
                    roles=tuple(sorted(token.roles)),
                    name=token.name,
                    uses=token.uses,
                    not_before_ms=token.not_before_ms,
                    expires_ms=token.expires_ms,
                    created_ms=now_ms,
                    created_by=request.caller.id,
                ),
                stamp=self.writes.stamp(),
            )
        )
        self._event(
            node_id=self.node_id,
            kind="token_created",
            actor=request.caller.id,
            detail={"token_id": token.token_id, "roles": sorted(token.roles), "name": token.name},
        )
        log(
            self.logger,
            logging.INFO,
            "join token created",
            token_id=token.token_id,
            roles=sorted(token.roles),
            uses=token.uses,
        )
        return TokenCreateAnswer(token=text, summary=self._summary(self._token_row(token.token_id)))

    def _token_row(self, token_id: str) -> JoinTokenRecord:
        row = self.tokens.get(token_id)
        if row is None:
            raise NotFound(f"no join token {token_id}", code="unknown_token")
        return row

    def _summary(self, row: JoinTokenRecord) -> TokenSummary:
        now_ms = self._now_ms()
        state: TokenState
        if row.revoked_ms is not None:
            state = "revoked"
        elif row.uses_left <= 0:
            state = "used"
        elif row.expires_ms <= now_ms:
            state = "expired"
        else:
            state = "active"
        return TokenSummary(
            token_id=row.token_id,
            state=state,
            roles=_roles(row.roles),
            name=row.name,
            uses_total=row.uses_total,
            uses_left=row.uses_left,
            used_by=tuple(self.tokens.used_by(row.token_id)),
            not_before_ms=row.not_before_ms,
            expires_ms=row.expires_ms,
            created_ms=row.created_ms,
            created_by=row.created_by,
            revoked_ms=row.revoked_ms,
        )

    async def _token_list(self, request: Request) -> TokenListAnswer:
        self._require_cp()
        await trio.lowlevel.checkpoint()
        return TokenListAnswer(tokens=tuple(self._summary(row) for row in self.tokens.all()))

    async def _token_revoke(self, request: Request) -> TokenRevokeAnswer:
        self._require_cp()
        token_id = request.path_params["token_id"]
        row = self._token_row(token_id)
        changed = row.revoked_ms is None
        if changed:
            await self.writes.propose(
                token_revocation_item(
                    TokenRevoked(token_id, self._now_ms(), request.caller.id),
                    stamp=self.writes.stamp(),
                )
            )
            self._event(
                node_id=self.node_id,
                kind="token_revoked",
                actor=request.caller.id,
                detail={"token_id": token_id},
            )
        await trio.lowlevel.checkpoint()
        return TokenRevokeAnswer(summary=self._summary(self._token_row(token_id)), changed=changed)

    # -- certificates ---------------------------------------------------------------------

    async def issue_certificate(self, member: Member) -> str:
        """A new certificate for ``member``: its PEM, followed by the issuer's."""
        now_ms = self._now_ms()
        cert, pem = self._issue(
            public_from_text(member.public_key), member.id, member.addresses, now_ms
        )
        updated = replace(
            member,
            cert_serial=format(cert.serial_number, "x"),
            cert_not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000),
            updated_ms=now_ms,
        )
        await self.writes.propose_member(
            updated,
            certificate=None,
            actor=member.id,
            reason="certificate renewed",
            at_wall_ms=now_ms,
        )
        self._event(
            node_id=member.id,
            kind="certificate_renewed",
            actor=member.id,
            detail={"serial": updated.cert_serial, "not_after_ms": updated.cert_not_after_ms},
        )
        return pem

    async def issue_own_certificate(self) -> str:
        """The control plane renews its own certificate."""
        member = self.membership.get(self.node_id)
        if member is None:
            raise PopuliError("the control plane is missing from its own membership")
        return await self.issue_certificate(member)

    async def _cert_renew(self, request: Request) -> CertRenewAnswer:
        self._require_cp()
        member = self.membership.get(request.caller.id)
        if member is None or member.kind != "node":
            raise Forbidden("only enrolled nodes renew certificates", code="not_a_node")
        pem = await self.issue_certificate(member)
        return CertRenewAnswer(certificate=pem)

    # -- retirement -----------------------------------------------------------------------

    async def _retire(self, request: Request) -> NodeRetireAnswer:
        self._require_cp()
        member = self.membership.resolve_node(request.path_params["node"])
        if member.id == self.node_id:
            raise Conflict("the control plane cannot retire itself", code="retire_self")
        reason = request.message(ReasonRequest).reason_or("retired by operator")
        self._issuer(self._now_ms())  # the list derived from the revocation is signed with it
        before, after = await self.writes.lifecycle_command(
            member.id, "retire", actor=request.caller.id, reason=reason
        )
        revoked_now = not self.revocations.is_revoked(member.id)
        if revoked_now:
            with enrollment_boundary():  # the list's own checks, before anything is proposed
                revoked = RevokedNode(
                    node_id=member.id,
                    name=member.name,
                    reason=" ".join(reason.split()) or "retired",
                    revoked_ms=self._now_ms(),
                    cert_serials=(member.cert_serial,) if member.cert_serial else (),
                )
            await self.writes.import_revocations()
            await self.writes.propose(node_revocation_item(revoked, stamp=self.writes.stamp()))
        # Retiring a retired node again is a no-op: no event, and the answer says so.
        changed = revoked_now or before != after
        if changed:
            self._event(
                node_id=member.id,
                kind="lifecycle",
                actor=request.caller.id,
                reason=reason,
                detail={
                    "command": "retire",
                    "from": before.state if before else None,
                    "to": "retired",
                },
            )
            self._membership_changed()
        await trio.lowlevel.checkpoint()
        return NodeRetireAnswer(
            node_id=member.id,
            state="retired",
            revocation_serial=self.revocations.serial,
            changed=changed,
        )

    async def _delete(self, request: Request) -> NodeDeleteAnswer:
        self._require_cp()
        member = self.membership.resolve_node(request.path_params["node"])
        reason = request.message(ReasonRequest).reason_or("deleted by operator")
        # The tombstone drops the node's registers and its member record on every voter.
        await self.writes.lifecycle_command(
            member.id, "delete", actor=request.caller.id, reason=reason
        )
        self._event(
            node_id=member.id,
            kind="node_deleted",
            actor=request.caller.id,
            reason=reason,
            detail={"name": member.name},
        )
        self._membership_changed()
        await trio.lowlevel.checkpoint()
        return NodeDeleteAnswer(
            node_id=member.id,
            deleted=True,
            name_blocked=self.revocations.is_name_blocked(member.name),
        )

    async def _unretire(self, request: Request) -> NameUnretireAnswer:
        self._require_cp()
        name = validate_node_name(request.path_params["name"])
        if not self.revocations.is_name_blocked(name):
            raise NotFound(f"the name {name!r} is not blocked", code="name_not_blocked")
        self._issuer(self._now_ms())  # the derived list is signed with it
        await self.writes.import_revocations()
        now_ms = self._now_ms()
        current = self.revocations.empty_or_current(now_ms=now_ms)
        for node in current.revoked:
            if node.name == name and not self.writes.name_released(node.node_id):
                await self.writes.propose(
                    name_release_item(
                        NameReleased(node.node_id, name, now_ms), stamp=self.writes.stamp()
                    )
                )
        self._event(
            node_id=self.node_id,
            kind="name_unretired",
            actor=request.caller.id,
            detail={"name": name},
        )
        self._membership_changed()
        await trio.lowlevel.checkpoint()
        return NameUnretireAnswer(
            name=name, blocked=False, revocation_serial=self.revocations.serial
        )

    # -- views ----------------------------------------------------------------------------

    async def _revocations(self, request: Request) -> RevocationsAnswer:
        since = request.query_int("since", -1, minimum=-1)
        serial = self.revocations.serial
        await trio.lowlevel.checkpoint()
        return RevocationsAnswer(
            serial=serial, revocations=self.revocations.text if serial > since else None
        )

    async def _members(self, request: Request) -> MembersAnswer:
        await trio.lowlevel.checkpoint()
        return MembersAnswer(version=self.membership.version, members=self._member_views())


TokenState = Literal["active", "used", "expired", "revoked"]


def _roles(roles: Sequence[str]) -> tuple[Role, ...]:
    """Roles as the wire names them (a record holds only known roles)."""
    return tuple(role for role in roles if role in ROLES)


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _host_of(address: str) -> str:
    try:
        return parse_host_port(address)[0]
    except ValueError:
        return ""


__all__ = ["Enrollment", "JoinNotStored", "TokenUsed"]
