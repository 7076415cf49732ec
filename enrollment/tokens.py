"""Join tokens: signed, short-lived invitations that pin the cluster CA and name the nodes
allowed to receive them, and the proofs a joiner makes with them.

A join token is what ``populi join TOKEN`` consumes (docs/design.md, "Identity, enrollment and
peer authentication"; ADR 0008). Its wire form is one line of ASCII::

    populi-join-2.<envelope>.<secret>
    envelope = base64url-no-padding(signer_key[32] || signature[64] || payload)
    secret   = base64url-no-padding(token_key_seed[32])

``payload`` is ``canonical_json(fields)``; the Ed25519 signature of the cluster root covers
``b"populi/join-token/v2\x00" + payload``. The domain prefix keeps a token signature from
ever being replayed as another kind of signed object (a revocation list, a request).

The payload names the node ids allowed to receive the token (``recipients``: the control
plane that minted it; once elections exist, the voters of the signed voter record at
minting) and the public half of a per-token Ed25519 *token key*. The secret is that key's
32-byte seed; it sits *outside* the signed envelope and never leaves the joiner. The joiner
sends the envelope (not secret) and proves that it holds the seed with a signature over a
:class:`JoinClaim`, which binds the receiving node's id as the joiner verified it in TLS,
a fresh challenge from that node, the joiner's own public key, the cluster id, its name,
its addresses and the token id. A proof captured by any other node, or replayed with
another challenge or key, verifies nowhere; a leaked control-plane store (which keeps only
:func:`token_digest` of the envelope) or a captured request lets nobody join.

Version 3 (``populi-join-3.``, domain ``b"populi/join-token/v3\x00"``) is the same
envelope signed by a voter's *issuer* key instead of the root (ADR 0018): the payload adds
``root_key`` (the raw root public key, whose sha256 is ``ca_pin``) and ``issuer`` (the
DER issuer certificate, base64url), and step 6 becomes "``root_key`` is ``trusted_root``,
and ``issuer`` is a certificate of that root, CA with path length 0, valid when the token
was minted, not revoked, for the key that signed" (``token_foreign_signer``,
``token_bad_issuer``); it runs once the payload has been parsed, which the signature by
the embedded key already covers. A version-2-only node refuses a version 3 token with
``token_unsupported_version``. The pin stays the root's in both versions.

There is no algorithm field: version 2 means Ed25519 for every key, and a new algorithm
means a new version prefix. Nothing is negotiated, so nothing can be downgraded. Version 1
tokens (``populi-join-1.``, whose whole text was the secret and was sent to whichever node
answered) are refused with ``token_unsupported_version``.

:func:`decode_token` checks in this order, and each step runs only if the previous one
passed, so the payload is parsed only once its signature holds:

====  ==============================================  ===============================
step  check                                           code on failure
====  ==============================================  ===============================
1     text, at most 4096 chars once stripped          token_malformed, token_too_long
2     prefix ``populi-join-2.``                       token_unsupported_version,
                                                      token_malformed
3     at most one ``.`` after the prefix; the secret  token_malformed
      (if present) is strict base64url of 32 bytes
4     strict base64url, long enough for key+sig       token_malformed
5     signature by the embedded key                   token_bad_signature
6     embedded key == ``trusted_root`` (if given)     token_foreign_signer
7     canonical JSON object with ``"v": 2``           token_malformed
8     ``ca_pin`` == sha256 of the embedded key        token_pin_mismatch
9     every field valid (one line naming the field)   token_malformed
10    the secret (if present) is the token key's      token_key_mismatch
11    ``cluster_id`` == ``expected_cluster_id``       token_wrong_cluster
12    not before / expiry, with ``skew_ms``           token_not_yet_valid,
                                                      token_expired
====  ==============================================  ===============================

:func:`open_token` (the joiner) runs the same steps and requires the secret
(``token_incomplete``). :func:`redeem_token` (the control plane) runs steps 1-9 and 11 on
the envelope alone (a request that carries the secret is refused, ``token_secret_sent``),
then requires its own node id among the recipients (``token_wrong_recipient``); it does not
look at time. :func:`check_redeem_time` is the control plane's step 12.

Expiry. The node that checks a token's expiry is the node that minted it (the token names
it), so the check reads the same clock that set ``not_before_ms`` and ``expires_ms``. It
grants :data:`REDEEM_GRACE_MS` (2 s) on each edge, enough for a wall-clock step by NTP and
nothing more: the request skew budget (±5 min, for clocks of *different* nodes) is never
applied to a token's expiry, so a ``--ttl 1s`` token is refused 2 s after it expired.
The joiner's own pre-check (:func:`open_token`) stays lenient (``skew_ms``, the skew
budget): its clock is not the one that counts, and it only saves a round trip.

Unknown payload fields are ignored (docs/conventions.md, "Records and wire"); a field that
would *restrict* a token must therefore come with a new version, never as an optional
field an older node would skip (``recipients`` is why this is version 2).

``not_before_ms`` is the minting time itself, not back-dated.

Single use is not decided here: the control plane counts uses by ``token_id``. No error
message ever contains the token text.

This module is pure (docs/conventions.md, "Layers"): time comes in as ``now_ms`` (UTC
milliseconds), and random token ids and token-key seeds as bytes the caller drew.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from enrollment._sealed import (
    _KEY_BYTES,
    _check_ident,
    _check_int,
    _check_ms,
    _EnvelopeError,
    _FieldProblem,
    _human_ms,
    _list_field,
    _parse_canonical_object,
    _raw_public_key,
    _required,
    _seal,
    _show,
    _unseal,
    _utc_iso_ms,
)
from enrollment.ca import Revoked, certificate_der, check_signing_issuer
from enrollment.canonical import b64url_decode, b64url_encode, canonical_json, json_type
from enrollment.errors import CertificateError, ErrorKind, NodeNameError, TokenError

TOKEN_VERSION = 2
TOKEN_PREFIX = "populi-join-2."
TOKEN_DOMAIN = b"populi/join-token/v2\x00"
#: Version 3: signed by a voter's issuer key, carrying the issuer certificate (ADR 0018).
ISSUED_TOKEN_VERSION = 3
ISSUED_TOKEN_PREFIX = "populi-join-3."
ISSUED_TOKEN_DOMAIN = b"populi/join-token/v3\x00"
_PREFIXES = {2: TOKEN_PREFIX, 3: ISSUED_TOKEN_PREFIX}
_DOMAINS = {2: TOKEN_DOMAIN, 3: ISSUED_TOKEN_DOMAIN}
#: An issuer certificate is a few hundred bytes; this bounds what a token may carry.
MAX_ISSUER_BYTES = 2048
#: What the joiner's node key signs, and what the token key signs: the same claim under
#: two domains, so that neither signature can stand in for the other.
JOIN_PROOF_DOMAIN = b"populi/join-proof/v2\x00"
TOKEN_PROOF_DOMAIN = b"populi/join-token-proof/v2\x00"
MAX_TOKEN_CHARS = 4096
MAX_TOKEN_TTL_MS = 24 * 60 * 60 * 1000
MAX_TOKEN_USES = 1000
MAX_CONTACTS = 8
#: Recipients are the minting control plane today, the voters later (1, 3, 5, 7 or 9).
MAX_RECIPIENTS = 9
TOKEN_ID_BYTES = 16
TOKEN_SEED_BYTES = 32
#: What the control plane grants on each edge of a token's validity, on its own clock
#: (the one that minted the token): a wall-clock step, never the request skew budget.
REDEEM_GRACE_MS = 2_000
#: Roles a join token may grant. ``voter`` makes the joined node a candidate voter: the
#: control plane then adds it to the voter set, one change at a time (ADR 0016); only an
#: operator mints tokens. No role is reserved any more.
TOKEN_ROLES = frozenset({"operator", "submit", "voter", "worker"})
RESERVED_ROLES: frozenset[str] = frozenset()

#: Millisecond times are JSON-safe integers (RFC 8259 §6: interoperable up to 2**53 - 1).

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", re.ASCII)
_TOKEN_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_PIN_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
#: A node id: ``n-`` + 16 lowercase base32 characters of its key's sha256
#: (``enrollment.keys.node_id_for``).
_NODE_ID_RE = re.compile(r"n-[a-z2-7]{16}", re.ASCII)
# RFC 1123 §2.1 labels; the whole name at most 253 chars (RFC 1035 §2.3.4 less the root).
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_TOKEN_FAMILY_RE = re.compile(r"populi-join-([0-9]{1,9})", re.ASCII)


class TokenFieldError(TokenError):
    """A field given to :func:`mint_token` (or a :class:`JoinToken`) is invalid.

    Bad input (:attr:`ErrorKind.BAD_INPUT`): the caller asked for a token that cannot
    exist. ``field`` names the field, ``problem`` says what is wrong with it.
    """

    code = "token_bad_field"
    kind = ErrorKind.BAD_INPUT

    def __init__(
        self, field: str, problem: str, *, code: str | None = None, message: str | None = None
    ) -> None:
        super().__init__(message or f"join token field {field}: {problem}", code=code, field=field)
        self.field = field
        self.problem = problem


class JoinProofError(TokenError):
    """A join request's proofs, challenge or recipient do not hold
    (:attr:`ErrorKind.FORBIDDEN`).

    Codes: ``proof_invalid`` (the joiner's node-key signature), ``token_proof_invalid``
    (the token-key signature: the sender does not hold the token's secret, or signed for
    another node, challenge, key or name), ``token_wrong_recipient`` (this node is not
    among the token's recipients).
    """

    code = "proof_invalid"
    kind = ErrorKind.FORBIDDEN


# --- public validators ----------------------------------------------------------------


def validate_node_name(name: object) -> str:
    """Return ``name`` if it is a valid node name, else raise :class:`NodeNameError`.

    A node name is 1-63 chars of ``[a-z0-9-]``, neither starting nor ending with ``-``:
    one DNS label (RFC 1123 §2.1), lower case so that names compare as they read.
    """
    if not isinstance(name, str):
        raise NodeNameError(f"node name must be a string, got {json_type(name)}")
    if len(name) > 63 or not _NAME_RE.fullmatch(name):
        raise NodeNameError(
            f"node name {_show(name)} is invalid; use 1-63 lowercase letters, digits and "
            "'-', not starting or ending with '-'"
        )
    return name


def ca_pin(public_key: Ed25519PublicKey) -> str:
    """The CA pin of a root key: ``sha256:`` + hex sha256 of its raw 32 bytes."""
    return "sha256:" + hashlib.sha256(_raw_public_key(public_key)).hexdigest()


def _check_recipients(value: object) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise _FieldProblem("recipients", f"must be a tuple, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_RECIPIENTS:
        raise _FieldProblem(
            "recipients", f"must name 1 to {MAX_RECIPIENTS} node ids, got {len(value)}"
        )
    for index, node_id in enumerate(value):
        if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
            raise _FieldProblem(
                f"recipients[{index}]",
                f"{_show(node_id)} is not a node id ('n-' and 16 base32 characters)",
            )
        if value.index(node_id) != index:
            raise _FieldProblem(f"recipients[{index}]", f"{_show(node_id)} is listed twice")
    return value


def _check_contact(index: int, value: object) -> str:
    field = f"contacts[{index}]"
    if not isinstance(value, str):
        raise _FieldProblem(field, f"must be a 'host:port' string, got {json_type(value)}")
    if not value.isascii() or len(value) > 261:
        raise _FieldProblem(field, f"{_show(value)} is not an ASCII 'host:port' address")
    if value.startswith("["):
        host, close, rest = value[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise _FieldProblem(field, f"{_show(value)} must be '[IPv6]:port'")
        port = rest[1:]
        if "%" in host:
            raise _FieldProblem(
                field, f"{_show(value)} has an IPv6 zone, which means nothing on other hosts"
            )
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _FieldProblem(field, f"{_show(value)} is not a valid IPv6 address") from None
    else:
        host, colon, port = value.rpartition(":")
        if not colon:
            raise _FieldProblem(field, f"{_show(value)} has no ':port'")
        if ":" in host:
            raise _FieldProblem(
                field, f"{_show(value)}: write an IPv6 address in brackets, '[addr]:port'"
            )
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            labels = host.split(".")
            if (
                len(host) > 253
                or not all(_LABEL_RE.fullmatch(label) for label in labels)
                # An all-numeric last label is a mistyped IPv4 address, not a name
                # (RFC 3696 §2).
                or labels[-1].isdigit()
            ):
                raise _FieldProblem(
                    field, f"{_show(value)} is neither an IP address nor a valid hostname"
                ) from None
    if not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise _FieldProblem(field, f"{_show(value)} needs a port between 1 and 65535")
    return value


# --- the token --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinToken:
    """The content of a valid join token. Always valid: construction checks every field.

    It never holds the signature or the token text, so nothing in it is secret; the way
    in from the wire is :func:`decode_token` only (there is deliberately no
    ``from_json``: an unsigned dict must never become a token).
    """

    token_id: str
    cluster_id: str
    ca_pin: str
    contacts: tuple[str, ...]
    #: Node ids allowed to receive the token (and to redeem it), in minting order.
    recipients: tuple[str, ...]
    not_before_ms: int
    expires_ms: int
    uses: int
    roles: tuple[str, ...]
    name: str | None
    #: The raw 32-byte public half of the token key; the joiner proves it holds the seed.
    token_key: bytes
    #: The raw 32-byte Ed25519 key that signed the token: the root (version 2, and
    #: ``ca_pin`` is its sha256) or a voter's issuer key (version 3).
    signer_public_key: bytes
    #: Version 3: the DER certificate of the issuer that signed, and the root's raw key.
    issuer: bytes | None = None
    root_public_key: bytes | None = None

    def __post_init__(self) -> None:
        try:
            self._check()
        except _FieldProblem as problem:
            raise TokenFieldError(problem.field, problem.problem) from None
        object.__setattr__(self, "roles", tuple(sorted(self.roles)))

    def _check(self) -> None:
        if not isinstance(self.token_id, str) or not _TOKEN_ID_RE.fullmatch(self.token_id):
            raise _FieldProblem("token_id", f"must be {TOKEN_ID_BYTES * 2} lowercase hex digits")
        _check_ident("cluster_id", self.cluster_id)
        if not isinstance(self.ca_pin, str) or not _PIN_RE.fullmatch(self.ca_pin):
            raise _FieldProblem("ca_pin", "must be 'sha256:' followed by 64 lowercase hex digits")
        if (
            not isinstance(self.signer_public_key, bytes)
            or len(self.signer_public_key) != _KEY_BYTES
        ):
            raise _FieldProblem("signer_public_key", f"must be {_KEY_BYTES} raw key bytes")
        if self.issuer is None:
            if self.root_public_key not in (None, self.signer_public_key):
                raise _FieldProblem("root_key", "must be the signer when no issuer signs")
            root = self.signer_public_key
        else:
            if not isinstance(self.issuer, bytes) or not 0 < len(self.issuer) <= MAX_ISSUER_BYTES:
                raise _FieldProblem("issuer", f"must be 1 to {MAX_ISSUER_BYTES} DER bytes")
            if (
                not isinstance(self.root_public_key, bytes)
                or len(self.root_public_key) != _KEY_BYTES
            ):
                raise _FieldProblem("root_key", f"must be {_KEY_BYTES} raw key bytes")
            root = self.root_public_key
        if self.ca_pin != "sha256:" + hashlib.sha256(root).hexdigest():
            raise _FieldProblem("ca_pin", "does not match the cluster root of the token")
        if not isinstance(self.contacts, tuple):
            raise _FieldProblem("contacts", f"must be a tuple, got {type(self.contacts).__name__}")
        if not 1 <= len(self.contacts) <= MAX_CONTACTS:
            raise _FieldProblem(
                "contacts", f"must list 1 to {MAX_CONTACTS} addresses, got {len(self.contacts)}"
            )
        for index, contact in enumerate(self.contacts):
            _check_contact(index, contact)
            if self.contacts.index(contact) != index:
                raise _FieldProblem(f"contacts[{index}]", f"{_show(contact)} is listed twice")
        _check_recipients(self.recipients)
        if not isinstance(self.token_key, bytes) or len(self.token_key) != _KEY_BYTES:
            raise _FieldProblem("token_key", f"must be {_KEY_BYTES} raw key bytes")
        not_before_ms = _check_ms("not_before_ms", self.not_before_ms)
        expires_ms = _check_ms("expires_ms", self.expires_ms)
        if expires_ms <= not_before_ms:
            raise _FieldProblem("expires_ms", "must be later than not_before_ms")
        if expires_ms - not_before_ms > MAX_TOKEN_TTL_MS:
            # Enforced here too, so a buggy or old signer cannot issue a long-lived token.
            raise _FieldProblem(
                "expires_ms",
                f"gives a lifetime of {_human_ms(expires_ms - not_before_ms)}, "
                "over the 24h maximum",
            )
        _check_int("uses", self.uses, 1, MAX_TOKEN_USES)
        self._check_roles()
        if self.name is not None:
            try:
                validate_node_name(self.name)
            except NodeNameError as exc:
                raise _FieldProblem("name", str(exc)) from None

    def _check_roles(self) -> None:
        if not isinstance(self.roles, tuple):
            raise _FieldProblem("roles", f"must be a tuple, got {type(self.roles).__name__}")
        if not self.roles:
            raise _FieldProblem(
                "roles", f"must grant at least one of {', '.join(sorted(TOKEN_ROLES))}"
            )
        for role in self.roles:
            if not isinstance(role, str):
                raise _FieldProblem("roles", f"must hold strings, got {json_type(role)}")
            if role in RESERVED_ROLES:
                raise _FieldProblem(
                    "roles",
                    f"{role!r} is reserved: voters are chosen by election, "
                    "not granted by a join token",
                )
            if role not in TOKEN_ROLES:
                raise _FieldProblem(
                    "roles",
                    f"{_show(role)} is not a role; use {', '.join(sorted(TOKEN_ROLES))}",
                )
        if len(set(self.roles)) != len(self.roles):
            raise _FieldProblem("roles", "lists a role twice")

    def to_json(self) -> dict[str, Any]:
        """The signed payload fields (``name`` only when bound)."""
        body: dict[str, Any] = {
            "v": self.version,
            "token_id": self.token_id,
            "cluster_id": self.cluster_id,
            "ca_pin": self.ca_pin,
            "contacts": list(self.contacts),
            "recipients": list(self.recipients),
            "not_before_ms": self.not_before_ms,
            "expires_ms": self.expires_ms,
            "uses": self.uses,
            "roles": list(self.roles),
            "token_key": b64url_encode(self.token_key),
        }
        if self.name is not None:
            body["name"] = self.name
        if self.issuer is not None and self.root_public_key is not None:
            body["issuer"] = b64url_encode(self.issuer)
            body["root_key"] = b64url_encode(self.root_public_key)
        return body

    @property
    def version(self) -> int:
        """2: signed by the root; 3: signed by a voter's issuer key."""
        return TOKEN_VERSION if self.issuer is None else ISSUED_TOKEN_VERSION

    def names_recipient(self, node_id: str) -> bool:
        """Whether ``node_id`` may receive (and redeem) this token."""
        return node_id in self.recipients

    def summary(self) -> dict[str, Any]:
        """What ``populi token list`` shows. Safe to print: holds no secret."""
        return {
            "token_id": self.token_id,
            "cluster_id": self.cluster_id,
            "roles": list(self.roles),
            "name": self.name,
            "uses": self.uses,
            "not_before": _utc_iso_ms(self.not_before_ms),
            "expires": _utc_iso_ms(self.expires_ms),
            "contacts": list(self.contacts),
            "recipients": list(self.recipients),
        }


def mint_token(
    *,
    signing_key: Ed25519PrivateKey,
    cluster_id: str,
    contacts: Sequence[str],
    recipients: Sequence[str],
    roles: Iterable[str],
    now_ms: int,
    ttl_ms: int,
    uses: int = 1,
    name: str | None = None,
    token_id: bytes,
    token_seed: bytes,
    issuer: x509.Certificate | None = None,
    root_key: Ed25519PublicKey | None = None,
) -> tuple[str, JoinToken]:
    """Make a join token signed by ``signing_key``: the cluster root (version 2), or a
    voter's issuer key, whose certificate ``issuer`` under ``root_key`` the token then
    carries (version 3; both or neither). A voter whose issuer is not valid now, or not for
    ``signing_key``, refuses (``issuer_*``).

    Returns ``(text, token)``: ``text`` is the secret to hand to the joining machine,
    ``token`` its content for the control plane (which stores ``token_digest(text)``, the
    digest of the envelope). ``recipients`` are the node ids allowed to receive it (the
    minting control plane). ``token_id`` is 16 and ``token_seed`` 32 random bytes the
    caller drew; ``ttl_ms`` is at most 24 h (the default of 1 h is the caller's). Raises
    :class:`TokenFieldError` naming the field.
    """
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise TypeError("signing_key must be an Ed25519PrivateKey")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise TokenFieldError("ttl_ms", f"must be a positive number of ms, got {_show(ttl_ms)}")
    if ttl_ms > MAX_TOKEN_TTL_MS:
        raise TokenFieldError(
            "ttl_ms",
            f"{_human_ms(ttl_ms)} exceeds the 24h maximum",
            code="token_ttl_too_long",
            message=f"token TTL {_human_ms(ttl_ms)} exceeds the 24h maximum",
        )
    try:
        now_ms = _check_ms("now_ms", now_ms)
        _check_ms("now_ms + ttl_ms", now_ms + ttl_ms)
    except _FieldProblem as problem:
        raise TokenFieldError(problem.field, problem.problem) from None
    if not isinstance(token_id, bytes) or len(token_id) != TOKEN_ID_BYTES:
        raise TokenFieldError("token_id", f"must be {TOKEN_ID_BYTES} random bytes")
    if not isinstance(token_seed, bytes) or len(token_seed) != TOKEN_SEED_BYTES:
        raise TokenFieldError("token_seed", f"must be {TOKEN_SEED_BYTES} random bytes")
    for field_name, value in (("contacts", contacts), ("recipients", recipients), ("roles", roles)):
        if isinstance(value, (str, bytes)):
            raise TokenFieldError(field_name, "must be a list of strings, not one string")
    signer = _raw_public_key(signing_key.public_key())
    issuer_der: bytes | None = None
    root = signer
    if (issuer is None) != (root_key is None):
        raise TypeError("issuer and root_key come together")
    if issuer is not None and root_key is not None:
        issuer_der = certificate_der(issuer)
        root = _raw_public_key(root_key)
        try:
            check_signing_issuer(
                issuer_der,
                signer=signer,
                root_public=root_key,
                cluster_id=cluster_id,
                signed_ms=now_ms,
            )
        except CertificateError as exc:
            raise TokenError(str(exc), code=exc.code) from None
    token_key = Ed25519PrivateKey.from_private_bytes(token_seed)
    token = JoinToken(
        token_id=token_id.hex(),
        cluster_id=cluster_id,
        ca_pin="sha256:" + hashlib.sha256(root).hexdigest(),
        contacts=tuple(contacts),
        recipients=tuple(recipients),
        not_before_ms=now_ms,
        expires_ms=now_ms + ttl_ms,
        uses=uses,
        roles=tuple(roles),
        name=name,
        token_key=_raw_public_key(token_key.public_key()),
        signer_public_key=signer,
        issuer=issuer_der,
        root_public_key=None if issuer_der is None else root,
    )
    envelope = _seal(
        _PREFIXES[token.version],
        _DOMAINS[token.version],
        signing_key,
        canonical_json(token.to_json()),
    )
    text = envelope + "." + b64url_encode(token_seed)
    if len(text) > MAX_TOKEN_CHARS:  # unreachable with today's field limits; kept as a guard
        raise TokenFieldError(
            "contacts",
            f"the token would be {len(text)} chars, over the {MAX_TOKEN_CHARS} limit",
            code="token_too_long",
        )
    return text, token


def _refuse(code: str, message: str, **details: Any) -> TokenError:
    return TokenError(message, code=code, **details)


def token_envelope(text: str) -> str:
    """The signed part of a token's text: what a joiner sends, never its secret.

    Only splits (no check): :func:`decode_token` and :func:`redeem_token` check.
    """
    head, dot, rest = text.strip().partition(".")
    return head + dot + rest.partition(".")[0]


def token_digest(text: str) -> str:
    """Hex sha256 of a token's envelope (its text without the secret, surrounding
    whitespace removed).

    The control plane stores this and compares it with the envelope a joiner sends. The
    full text and the envelope alone have the same digest.
    """
    return hashlib.sha256(token_envelope(text).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class HeldToken:
    """A token as its holder (the joiner) has it: the content, the envelope it sends, and
    the token key it signs with (from the secret, which it never sends)."""

    token: JoinToken
    envelope: str
    token_key: Ed25519PrivateKey = field(repr=False)


def _split(text: object) -> tuple[int, str, str | None]:
    """Steps 1-3: the version, the envelope's base64url body and the secret's text (or
    ``None``)."""
    if not isinstance(text, str):
        raise _refuse("token_malformed", "token must be text")
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise _refuse(
            "token_too_long",
            f"token is {len(text)} chars, over the {MAX_TOKEN_CHARS} limit; "
            "copy exactly the token that was printed",
        )
    if not text:
        raise _refuse("token_malformed", "token is empty")
    head, dot, rest = text.partition(".")
    version = next((v for v, prefix in _PREFIXES.items() if head + dot == prefix), None)
    if version is None:
        family = _TOKEN_FAMILY_RE.fullmatch(head)
        if family and dot and family.group(1) == "1":
            raise _refuse(
                "token_unsupported_version",
                "join token version 1 is no longer accepted (its whole text was sent to "
                "whichever node answered); ask the operator for a new token",
            )
        if family and dot:
            raise _refuse(
                "token_unsupported_version",
                f"join token version {family.group(1)} is not supported; this Populi "
                f"reads versions {TOKEN_VERSION} and {ISSUED_TOKEN_VERSION} (upgrade it)",
            )
        raise _refuse(
            "token_malformed",
            f"token does not start with {TOKEN_PREFIX!r}; copy the whole token that was printed",
        )
    body, dot, secret = rest.partition(".")
    if not dot:
        return version, body, None
    if "." in secret:
        raise _refuse("token_malformed", "token has more than three parts; copy it exactly")
    return version, body, secret


def _seed(secret: str) -> bytes:
    try:
        seed = b64url_decode(secret)
    except ValueError as exc:
        raise _refuse(
            "token_malformed", f"token's secret part is not valid base64url ({exc})"
        ) from None
    if len(seed) != TOKEN_SEED_BYTES:
        raise _refuse(
            "token_malformed",
            f"token's secret part is {len(seed)} bytes, not {TOKEN_SEED_BYTES}; copy the "
            "whole token that was printed",
        )
    return seed


def _foreign(root: bytes, trusted_root: Ed25519PublicKey | None) -> None:
    """Step 6: the token's root is ``trusted_root`` (when the caller has one)."""
    if trusted_root is not None and root != _raw_public_key(trusted_root):
        root_pin = "sha256:" + hashlib.sha256(root).hexdigest()
        raise _refuse(
            "token_foreign_signer",
            f"token is signed under {root_pin[:23]}..., not under this cluster's root "
            f"{ca_pin(trusted_root)[:23]}...; it belongs to another cluster",
        )


def _issuer_of(
    obj: dict[str, Any],
    signer: bytes,
    trusted_root: Ed25519PublicKey | None,
    revoked: Revoked | None,
) -> tuple[bytes, bytes]:
    """Step 6 of version 3: ``(root key, issuer DER)``, the issuer checked under the root."""
    try:
        root = _key_field(obj, "root_key")
        issuer = _bytes_field(obj, "issuer", MAX_ISSUER_BYTES)
        signed_ms = _check_ms("not_before_ms", _required(obj, "not_before_ms"))
        cluster_id = _check_ident("cluster_id", _required(obj, "cluster_id"))
    except _FieldProblem as problem:
        raise _refuse(
            "token_malformed", f"token is malformed: field {problem}", field=problem.field
        ) from None
    _foreign(root, trusted_root)
    try:
        check_signing_issuer(
            issuer,
            signer=signer,
            root_public=Ed25519PublicKey.from_public_bytes(root),
            cluster_id=cluster_id,
            signed_ms=signed_ms,
            revoked=revoked,
        )
    except CertificateError as exc:
        raise _refuse(
            "token_bad_issuer", f"token's issuer does not hold: {exc}", issuer_code=exc.code
        ) from None
    return root, issuer


def _read(
    body: str,
    *,
    version: int = TOKEN_VERSION,
    trusted_root: Ed25519PublicKey | None,
    expected_cluster_id: str | None,
    revoked: Revoked | None = None,
) -> JoinToken:
    """Steps 4-9 and 11: the envelope's signature, then its payload."""
    try:
        signer, payload = _unseal(body, _DOMAINS[version])
    except _EnvelopeError as exc:
        code = "token_bad_signature" if exc.kind == "bad_signature" else "token_malformed"
        raise _refuse(code, f"token {exc.problem}; ask for a new token") from None
    if version == TOKEN_VERSION:
        _foreign(signer, trusted_root)
    try:
        obj = _parse_canonical_object(payload)
        version_field = _required(obj, "v")
    except ValueError as exc:
        raise _refuse("token_malformed", f"token is malformed: {exc}") from None
    except _FieldProblem as problem:
        raise _refuse(
            "token_malformed", f"token is malformed: field {problem}", field=problem.field
        ) from None
    if isinstance(version_field, bool) or version_field != version:
        raise _refuse(
            "token_malformed",
            f"token is malformed: field v is {_show(version_field)} but its prefix says "
            f"version {version}",
            field="v",
        )
    root, issuer = signer, None
    if version == ISSUED_TOKEN_VERSION:
        root, issuer = _issuer_of(obj, signer, trusted_root, revoked)
    signer_pin = "sha256:" + hashlib.sha256(root).hexdigest()
    if obj.get("ca_pin") != signer_pin:
        if not isinstance(obj.get("ca_pin"), str):
            raise _refuse(
                "token_malformed",
                "token is malformed: field ca_pin is missing or not a string",
                field="ca_pin",
            )
        raise _refuse(
            "token_pin_mismatch",
            "token's CA pin does not match the root it was signed under; it was not made "
            "by a Populi cluster, do not use it",
        )
    try:
        token = JoinToken(
            token_id=_required(obj, "token_id"),
            cluster_id=_required(obj, "cluster_id"),
            ca_pin=signer_pin,
            contacts=_list_field(obj, "contacts"),
            recipients=_list_field(obj, "recipients"),
            not_before_ms=_required(obj, "not_before_ms"),
            expires_ms=_required(obj, "expires_ms"),
            uses=_required(obj, "uses"),
            roles=_list_field(obj, "roles"),
            name=obj.get("name"),
            token_key=_key_field(obj, "token_key"),
            signer_public_key=signer,
            issuer=issuer,
            root_public_key=None if issuer is None else root,
        )
    except _FieldProblem as problem:
        raise _refuse(
            "token_malformed", f"token is malformed: field {problem}", field=problem.field
        ) from None
    except TokenFieldError as exc:
        raise _refuse(
            "token_malformed",
            f"token is malformed: field {exc.field}: {exc.problem}",
            field=exc.field,
        ) from None
    if expected_cluster_id is not None and token.cluster_id != expected_cluster_id:
        raise _refuse(
            "token_wrong_cluster",
            f"token is for cluster {_show(token.cluster_id)}, not {_show(expected_cluster_id)}; "
            "ask this cluster's operator for a token",
        )
    return token


def _base64url_field(obj: dict[str, Any], name: str) -> bytes:
    value = _required(obj, name)
    if not isinstance(value, str):
        raise _FieldProblem(name, f"must be a base64url string, got {json_type(value)}")
    try:
        return b64url_decode(value)
    except ValueError as exc:
        raise _FieldProblem(name, f"is not valid base64url ({exc})") from None


def _key_field(obj: dict[str, Any], name: str) -> bytes:
    raw = _base64url_field(obj, name)
    if len(raw) != _KEY_BYTES:
        raise _FieldProblem(name, f"must be {_KEY_BYTES} raw key bytes, got {len(raw)}")
    return raw


def _bytes_field(obj: dict[str, Any], name: str, limit: int) -> bytes:
    raw = _base64url_field(obj, name)
    if not 0 < len(raw) <= limit:
        raise _FieldProblem(name, f"must be 1 to {limit} bytes, got {len(raw)}")
    return raw


def _token_key_of(token: JoinToken, secret: str) -> Ed25519PrivateKey:
    """Step 10: the secret must be the seed of the key the signed payload names."""
    key = Ed25519PrivateKey.from_private_bytes(_seed(secret))
    if _raw_public_key(key.public_key()) != token.token_key:
        raise _refuse(
            "token_key_mismatch",
            "token's secret part does not belong to its signed part; copy the whole token "
            "that was printed, in one piece",
        )
    return key


def _check_skew(skew_ms: int) -> None:
    """The caller's skew budget is a non-negative integer (a programming error otherwise,
    not a refusal of the token)."""
    if isinstance(skew_ms, bool) or not isinstance(skew_ms, int) or skew_ms < 0:
        raise ValueError("skew_ms must be a non-negative integer")


def check_token_time(token: JoinToken, *, now_ms: int, skew_ms: int) -> None:
    """Step 12: refuse a token outside ``[not_before - skew, expires + skew)``.

    ``skew_ms`` is what the caller grants on both edges: the joiner's pre-check passes the
    request skew budget; the control plane calls :func:`check_redeem_time` instead.
    """
    _check_skew(skew_ms)
    if now_ms + skew_ms < token.not_before_ms:
        raise _refuse(
            "token_not_yet_valid",
            f"token is not valid until {_utc_iso_ms(token.not_before_ms)} and this clock "
            f"reads {_utc_iso_ms(now_ms)} (allowing {_human_ms(skew_ms)} of skew); "
            "check this machine's clock",
        )
    if now_ms - skew_ms >= token.expires_ms:
        raise _refuse(
            "token_expired",
            f"token expired at {_utc_iso_ms(token.expires_ms)} (this clock reads "
            f"{_utc_iso_ms(now_ms)}, allowing {_human_ms(skew_ms)} of skew); "
            "ask for a new token",
        )


def check_redeem_time(token: JoinToken, *, now_ms: int) -> None:
    """The control plane's expiry check, on the clock that minted the token: at most
    :data:`REDEEM_GRACE_MS` on each edge, never the request skew budget."""
    check_token_time(token, now_ms=now_ms, skew_ms=REDEEM_GRACE_MS)


def decode_token(
    text: str,
    *,
    now_ms: int,
    skew_ms: int,
    trusted_root: Ed25519PublicKey | None = None,
    expected_cluster_id: str | None = None,
    revoked: Revoked | None = None,
) -> JoinToken:
    """Check a join token (its whole text, or its envelope alone) and return its content;
    raise :class:`TokenError` otherwise.

    Without ``trusted_root`` (a machine that has never met the cluster) the token vouches
    for itself: it must be signed by the key its ``ca_pin`` names, and the joiner then
    holds the contacted node's chain to that pin. With ``trusted_root`` the signer must be
    that key. When the text carries the secret, it must be the token key's seed. See the
    module docstring for the order of the checks. ``skew_ms`` is the clock-skew budget
    granted on both edges.
    """
    _check_skew(skew_ms)
    version, body, secret = _split(text)
    if secret is not None:
        _seed(secret)
    token = _read(
        body,
        version=version,
        trusted_root=trusted_root,
        expected_cluster_id=expected_cluster_id,
        revoked=revoked,
    )
    if secret is not None:
        _token_key_of(token, secret)
    check_token_time(token, now_ms=now_ms, skew_ms=skew_ms)
    return token


def open_token(text: str, *, now_ms: int, skew_ms: int) -> HeldToken:
    """The joiner's view of its token: :func:`decode_token` on the whole text, which must
    carry the secret, and the token key to prove possession with."""
    _check_skew(skew_ms)
    version, body, secret = _split(text)
    if secret is None:
        raise _refuse(
            "token_incomplete",
            "token has no secret part (it ends at the second '.'); copy the whole token "
            "that was printed",
        )
    _seed(secret)
    token = _read(body, version=version, trusted_root=None, expected_cluster_id=None)
    key = _token_key_of(token, secret)
    check_token_time(token, now_ms=now_ms, skew_ms=skew_ms)
    return HeldToken(token=token, envelope=_PREFIXES[version] + body, token_key=key)


def redeem_token(
    envelope: str,
    *,
    trusted_root: Ed25519PublicKey,
    expected_cluster_id: str,
    recipient: str,
    revoked: Revoked | None = None,
) -> JoinToken:
    """The control plane's view of a token a joiner sent: the envelope alone, signed by
    ``trusted_root`` (or by an issuer of it that ``revoked`` does not revoke), for
    ``expected_cluster_id``, naming ``recipient`` (this node).

    Time is not checked here (:func:`check_redeem_time` does, once the caller knows the
    join is not a retry of one already recorded).
    """
    version, body, secret = _split(envelope)
    if secret is not None:
        raise _refuse(
            "token_secret_sent",
            "the join request carries the token's secret part, which a joiner never sends; "
            "this token must be considered leaked: revoke it and mint another",
        )
    token = _read(
        body,
        version=version,
        trusted_root=trusted_root,
        expected_cluster_id=expected_cluster_id,
        revoked=revoked,
    )
    if not token.names_recipient(recipient):
        raise JoinProofError(
            f"this token does not name this node ({recipient}) as a recipient; it was "
            f"minted for {', '.join(token.recipients)}",
            code="token_wrong_recipient",
        )
    return token


# --- proof of possession ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinClaim:
    """What a joiner's two proofs sign: everything the join binds.

    ``recipient`` is the node the joiner verified in TLS (the joiner fills it from the
    handshake; the receiving node fills it with its own id, so a proof made for another
    node fails). ``challenge`` is single use and comes from that node. ``public_key`` is
    the joiner's node key (base64url of its raw 32 bytes).
    """

    recipient: str
    challenge: str
    public_key: str
    cluster_id: str
    name: str
    token_id: str
    addresses: tuple[str, ...]

    def payload(self) -> bytes:
        return canonical_json(
            {
                "v": TOKEN_VERSION,
                "recipient": self.recipient,
                "challenge": self.challenge,
                "public_key": self.public_key,
                "cluster_id": self.cluster_id,
                "name": self.name,
                "token_id": self.token_id,
                "addresses": list(self.addresses),
            }
        )


@dataclass(frozen=True, slots=True)
class JoinProofs:
    """``proof``: the node key's signature; ``token_proof``: the token key's (base64url)."""

    proof: str
    token_proof: str


def prove_join(
    claim: JoinClaim, *, node_key: Ed25519PrivateKey, token_key: Ed25519PrivateKey
) -> JoinProofs:
    """Sign ``claim`` with the joiner's node key and with the token key."""
    payload = claim.payload()
    return JoinProofs(
        proof=b64url_encode(node_key.sign(JOIN_PROOF_DOMAIN + payload)),
        token_proof=b64url_encode(token_key.sign(TOKEN_PROOF_DOMAIN + payload)),
    )


def verify_join(claim: JoinClaim, proofs: JoinProofs, *, token: JoinToken) -> None:
    """Check both proofs of ``claim`` for ``token``; raise :class:`JoinProofError`.

    The caller builds ``claim`` from what it knows itself (its own node id, the challenge
    it issued) and what the joiner asks for (key, name, addresses): nothing the joiner says
    about *where* it sent the request is taken from the request.
    """
    if claim.token_id != token.token_id or claim.cluster_id != token.cluster_id:
        raise JoinProofError("the join claim is for another token", code="token_proof_invalid")
    payload = claim.payload()
    try:
        node_key = Ed25519PublicKey.from_public_bytes(b64url_decode(claim.public_key))
        node_key.verify(b64url_decode(proofs.proof), JOIN_PROOF_DOMAIN + payload)
    except (ValueError, InvalidSignature):
        raise JoinProofError(
            "proof of key possession does not verify", code="proof_invalid"
        ) from None
    try:
        Ed25519PublicKey.from_public_bytes(token.token_key).verify(
            b64url_decode(proofs.token_proof), TOKEN_PROOF_DOMAIN + payload
        )
    except (ValueError, InvalidSignature):
        raise JoinProofError(
            "proof of token possession does not verify (made for another node, challenge, "
            "key or name, or without the token's secret)",
            code="token_proof_invalid",
        ) from None


__all__ = [
    "ISSUED_TOKEN_DOMAIN",
    "ISSUED_TOKEN_PREFIX",
    "ISSUED_TOKEN_VERSION",
    "JOIN_PROOF_DOMAIN",
    "MAX_CONTACTS",
    "MAX_RECIPIENTS",
    "MAX_TOKEN_CHARS",
    "MAX_TOKEN_TTL_MS",
    "MAX_TOKEN_USES",
    "REDEEM_GRACE_MS",
    "RESERVED_ROLES",
    "TOKEN_DOMAIN",
    "TOKEN_ID_BYTES",
    "TOKEN_PREFIX",
    "TOKEN_PROOF_DOMAIN",
    "TOKEN_ROLES",
    "TOKEN_SEED_BYTES",
    "TOKEN_VERSION",
    "HeldToken",
    "JoinClaim",
    "JoinProofError",
    "JoinProofs",
    "JoinToken",
    "TokenFieldError",
    "ca_pin",
    "check_redeem_time",
    "check_token_time",
    "decode_token",
    "mint_token",
    "open_token",
    "prove_join",
    "redeem_token",
    "token_digest",
    "token_envelope",
    "validate_node_name",
    "verify_join",
]
