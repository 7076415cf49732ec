"""Join tokens: signed, short-lived, single-use invitations that pin the cluster CA.

A join token is what ``populi join TOKEN`` consumes (docs/design.md, "Identity, enrollment and
peer authentication"). Its wire form is one line of ASCII::

    populi-join-1.<base64url-no-padding(signer_key[32] || signature[64] || payload)>

``payload`` is ``canonical_json(fields)``; the Ed25519 signature covers
``b"populi/join-token/v1\\x00" + payload``. The domain prefix keeps a token signature from
ever being replayed as another kind of signed object (a revocation list, a request).

There is no algorithm field: version 1 means Ed25519, and a new algorithm means a new
version prefix. Nothing is negotiated, so nothing can be downgraded.

:func:`decode_token` checks in this order, and each step runs only if the previous one
passed, so the payload is parsed only once its signature holds:

====  ==============================================  ===============================
step  check                                           code on failure
====  ==============================================  ===============================
1     text, at most 4096 chars once stripped          token_malformed, token_too_long
2     prefix ``populi-join-1.``                       token_unsupported_version,
                                                      token_malformed
3     strict base64url, long enough for key+sig       token_malformed
4     signature by the embedded key                   token_bad_signature
5     embedded key == ``trusted_root`` (if given)     token_foreign_signer
6     canonical JSON object with ``"v": 1``           token_malformed
7     ``ca_pin`` == sha256 of the embedded key        token_pin_mismatch
8     every field valid (one line naming the field)   token_malformed
9     ``cluster_id`` == ``expected_cluster_id``       token_wrong_cluster
10    not before / expiry, with the skew budget       token_not_yet_valid,
                                                      token_expired
====  ==============================================  ===============================

Unknown payload fields are ignored (docs/conventions.md, "Records and wire"); a field that
would *restrict* a token must therefore come with a new version, never as an optional
field a version-1 node would skip.

``not_before_ms`` is the minting time itself, not back-dated: the verifier already allows
``skew_ms`` on both edges, and a back-date would only widen that allowance and lengthen
the token's life past its TTL.

Single use is not decided here: the control plane counts uses by ``token_id`` and keeps
:func:`token_digest` of the text rather than the text, which is a secret (whoever holds
it can join). No error message ever contains the token text.

This module is pure (docs/conventions.md, "Layers"): time comes in as ``now_ms`` (UTC
milliseconds) and random token ids as bytes the caller drew.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    _json_type,
    _list_field,
    _parse_canonical_object,
    _raw_public_key,
    _required,
    _seal,
    _show,
    _unseal,
    _utc_iso_ms,
)
from enrollment.canonical import canonical_json
from enrollment.errors import TokenError
from populi_peer.errors import BadRequest

TOKEN_VERSION = 1
TOKEN_PREFIX = "populi-join-1."
TOKEN_DOMAIN = b"populi/join-token/v1\x00"
MAX_TOKEN_CHARS = 4096
MAX_TOKEN_TTL_MS = 24 * 60 * 60 * 1000
MAX_TOKEN_USES = 1000
MAX_CONTACTS = 8
TOKEN_ID_BYTES = 16
#: Roles a join token may grant. ``voter`` is reserved: voters hold issuing keys and are
#: chosen by election, not by whoever holds an invitation.
TOKEN_ROLES = frozenset({"operator", "submit", "worker"})
RESERVED_ROLES = frozenset({"voter"})

#: Millisecond times are JSON-safe integers (RFC 8259 §6: interoperable up to 2**53 - 1).

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", re.ASCII)
_TOKEN_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_PIN_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
# RFC 1123 §2.1 labels; the whole name at most 253 chars (RFC 1035 §2.3.4 less the root).
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_TOKEN_FAMILY_RE = re.compile(r"populi-join-([0-9]{1,9})", re.ASCII)


class TokenFieldError(TokenError, BadRequest):
    """A field given to :func:`mint_token` (or a :class:`JoinToken`) is invalid.

    Both a :class:`~enrollment.errors.TokenError` and a
    :class:`~populi_peer.errors.BadRequest`: the caller asked for a token that cannot
    exist. ``field`` names the field, ``problem`` says what is wrong with it.
    """

    code = "token_bad_field"

    def __init__(
        self, field: str, problem: str, *, code: str | None = None, message: str | None = None
    ) -> None:
        super().__init__(message or f"join token field {field}: {problem}", code=code, field=field)
        self.field = field
        self.problem = problem


# --- public validators ----------------------------------------------------------------


def validate_node_name(name: object) -> str:
    """Return ``name`` if it is a valid node name, else raise ``BadRequest``.

    A node name is 1-63 chars of ``[a-z0-9-]``, neither starting nor ending with ``-``:
    one DNS label (RFC 1123 §2.1), lower case so that names compare as they read.
    """
    if not isinstance(name, str):
        raise BadRequest(
            f"node name must be a string, got {_json_type(name)}", code="bad_node_name"
        )
    if len(name) > 63 or not _NAME_RE.fullmatch(name):
        raise BadRequest(
            f"node name {_show(name)} is invalid; use 1-63 lowercase letters, digits and "
            "'-', not starting or ending with '-'",
            code="bad_node_name",
        )
    return name


def ca_pin(public_key: Ed25519PublicKey) -> str:
    """The CA pin of a root key: ``sha256:`` + hex sha256 of its raw 32 bytes."""
    return "sha256:" + hashlib.sha256(_raw_public_key(public_key)).hexdigest()


def token_digest(text: str) -> str:
    """Hex sha256 of a token's text, surrounding whitespace removed.

    The control plane stores this, never the token: a leaked store then lets nobody join.
    Stripping matches :func:`decode_token`, so a pasted token with a trailing newline has
    the same digest.
    """
    return hashlib.sha256(text.strip().encode("utf-8", "surrogatepass")).hexdigest()


def _check_contact(index: int, value: object) -> str:
    field = f"contacts[{index}]"
    if not isinstance(value, str):
        raise _FieldProblem(field, f"must be a 'host:port' string, got {_json_type(value)}")
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
    not_before_ms: int
    expires_ms: int
    uses: int
    roles: tuple[str, ...]
    name: str | None
    #: The raw 32-byte Ed25519 key that signed the token; ``ca_pin`` is its sha256.
    signer_public_key: bytes

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
        if self.ca_pin != "sha256:" + hashlib.sha256(self.signer_public_key).hexdigest():
            raise _FieldProblem("ca_pin", "does not match the key that signs the token")
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
            except BadRequest as exc:
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
                raise _FieldProblem("roles", f"must hold strings, got {_json_type(role)}")
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
            "v": TOKEN_VERSION,
            "token_id": self.token_id,
            "cluster_id": self.cluster_id,
            "ca_pin": self.ca_pin,
            "contacts": list(self.contacts),
            "not_before_ms": self.not_before_ms,
            "expires_ms": self.expires_ms,
            "uses": self.uses,
            "roles": list(self.roles),
        }
        if self.name is not None:
            body["name"] = self.name
        return body

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
        }


def mint_token(
    *,
    signing_key: Ed25519PrivateKey,
    cluster_id: str,
    contacts: Sequence[str],
    roles: Iterable[str],
    now_ms: int,
    ttl_ms: int,
    uses: int = 1,
    name: str | None = None,
    token_id: bytes,
) -> tuple[str, JoinToken]:
    """Make a join token signed by ``signing_key`` (the cluster root).

    Returns ``(text, token)``: ``text`` is the secret to hand to the joining machine,
    ``token`` its content for the control plane (which stores ``token_digest(text)``).
    ``token_id`` is 16 random bytes the caller drew; ``ttl_ms`` is at most 24 h (the
    default of 1 h is the caller's). Raises :class:`TokenFieldError` naming the field.
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
    for field, value in (("contacts", contacts), ("roles", roles)):
        if isinstance(value, (str, bytes)):
            raise TokenFieldError(field, "must be a list of strings, not one string")
    signer = _raw_public_key(signing_key.public_key())
    token = JoinToken(
        token_id=token_id.hex(),
        cluster_id=cluster_id,
        ca_pin="sha256:" + hashlib.sha256(signer).hexdigest(),
        contacts=tuple(contacts),
        not_before_ms=now_ms,
        expires_ms=now_ms + ttl_ms,
        uses=uses,
        roles=tuple(roles),
        name=name,
        signer_public_key=signer,
    )
    text = _seal(TOKEN_PREFIX, TOKEN_DOMAIN, signing_key, canonical_json(token.to_json()))
    if len(text) > MAX_TOKEN_CHARS:  # unreachable with today's field limits; kept as a guard
        raise TokenFieldError(
            "contacts",
            f"the token would be {len(text)} chars, over the {MAX_TOKEN_CHARS} limit",
            code="token_too_long",
        )
    return text, token


def _refuse(code: str, message: str, **details: Any) -> TokenError:
    return TokenError(message, code=code, **details)


def decode_token(
    text: str,
    *,
    now_ms: int,
    skew_ms: int,
    trusted_root: Ed25519PublicKey | None = None,
    expected_cluster_id: str | None = None,
) -> JoinToken:
    """Check a join token and return its content; raise :class:`TokenError` otherwise.

    Without ``trusted_root`` (a machine that has never met the cluster) the token vouches
    for itself: it must be signed by the key its ``ca_pin`` names, and the joiner then
    holds the contacted node's chain to that pin. With ``trusted_root`` (a cluster node
    redeeming it) the signer must be that key. See the module docstring for the order of
    the checks. ``skew_ms`` is the clock-skew budget granted on both edges.
    """
    if isinstance(skew_ms, bool) or not isinstance(skew_ms, int) or skew_ms < 0:
        raise ValueError("skew_ms must be a non-negative integer")
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
    head, dot, body = text.partition(".")
    if head + dot != TOKEN_PREFIX:
        family = _TOKEN_FAMILY_RE.fullmatch(head)
        if family and dot:
            raise _refuse(
                "token_unsupported_version",
                f"join token version {family.group(1)} is not supported; this Populi "
                f"reads version {TOKEN_VERSION} (upgrade it, or ask for a version "
                f"{TOKEN_VERSION} token)",
            )
        raise _refuse(
            "token_malformed",
            f"token does not start with {TOKEN_PREFIX!r}; copy the whole token that was printed",
        )
    try:
        signer, payload = _unseal(body, TOKEN_DOMAIN)
    except _EnvelopeError as exc:
        code = "token_bad_signature" if exc.kind == "bad_signature" else "token_malformed"
        raise _refuse(code, f"token {exc.problem}; ask for a new token") from None
    signer_pin = "sha256:" + hashlib.sha256(signer).hexdigest()
    if trusted_root is not None and signer != _raw_public_key(trusted_root):
        raise _refuse(
            "token_foreign_signer",
            f"token is signed by {signer_pin[:23]}..., not by this cluster's root "
            f"{ca_pin(trusted_root)[:23]}...; it belongs to another cluster",
        )
    try:
        obj = _parse_canonical_object(payload)
        version = _required(obj, "v")
    except ValueError as exc:
        raise _refuse("token_malformed", f"token is malformed: {exc}") from None
    except _FieldProblem as problem:
        raise _refuse(
            "token_malformed", f"token is malformed: field {problem}", field=problem.field
        ) from None
    if isinstance(version, bool) or version != TOKEN_VERSION:
        raise _refuse(
            "token_malformed",
            f"token is malformed: field v is {_show(version)} but its prefix says version "
            f"{TOKEN_VERSION}",
            field="v",
        )
    if obj.get("ca_pin") != signer_pin:
        if not isinstance(obj.get("ca_pin"), str):
            raise _refuse(
                "token_malformed",
                "token is malformed: field ca_pin is missing or not a string",
                field="ca_pin",
            )
        raise _refuse(
            "token_pin_mismatch",
            "token's CA pin does not match the key that signed it; it was not made by a "
            "Populi cluster root, do not use it",
        )
    try:
        name = obj.get("name")
        token = JoinToken(
            token_id=_required(obj, "token_id"),
            cluster_id=_required(obj, "cluster_id"),
            ca_pin=signer_pin,
            contacts=_list_field(obj, "contacts"),
            not_before_ms=_required(obj, "not_before_ms"),
            expires_ms=_required(obj, "expires_ms"),
            uses=_required(obj, "uses"),
            roles=_list_field(obj, "roles"),
            name=name,
            signer_public_key=signer,
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
    return token


__all__ = [
    "MAX_CONTACTS",
    "MAX_TOKEN_CHARS",
    "MAX_TOKEN_TTL_MS",
    "MAX_TOKEN_USES",
    "RESERVED_ROLES",
    "TOKEN_DOMAIN",
    "TOKEN_ID_BYTES",
    "TOKEN_PREFIX",
    "TOKEN_ROLES",
    "TOKEN_VERSION",
    "JoinToken",
    "TokenFieldError",
    "ca_pin",
    "decode_token",
    "mint_token",
    "token_digest",
    "validate_node_name",
]
