"""Cluster settings: one signed record held by the control plane.

Safety timings, the work-class gates and the kill switch live here, not in node config, so
that every node obeys the same values. ``populi settings set KEY VALUE`` parses ``VALUE``
from text with :func:`parse_setting`; the control plane validates with
:func:`validate_settings` before it signs and stores a new record (serial + 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from populi_peer.core.election import (
    ElectionSettings,
    check_election_settings,
    check_election_settings_change,
)
from populi_peer.core.leases import MIN_LEASE_TTL_S
from populi_peer.errors import BadRequest, ConfigError

WORK_CLASSES = ("agent", "inference", "training", "collective")
SCOPES = ("local", "lan", "overlay")


@dataclass(frozen=True, slots=True)
class SettingSpec:
    key: str
    kind: str  # "float" | "bool" | "gates"
    default: Any
    unit: str
    doc: str
    minimum: float | None = None
    maximum: float | None = None


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "remote_exec_enabled",
        "bool",
        False,
        "",
        "allow tasks to run on other nodes (off: every task runs locally)",
    ),
    SettingSpec(
        "kill_switch",
        "bool",
        False,
        "",
        "stop all remote execution cluster-wide at once; wins over remote_exec_enabled",
    ),
    SettingSpec(
        "max_lease_ttl_s",
        "float",
        30.0,
        "seconds",
        "longest lease TTL the control plane grants (none is granted below "
        f"{MIN_LEASE_TTL_S:g} s, the shortest a holder can renew)",
        MIN_LEASE_TTL_S,
        3600.0,
    ),
    SettingSpec(
        "lease_expiry_margin_s",
        "float",
        5.0,
        "seconds",
        "a lease is dead only this long after it expired on the control plane's clock",
        0.5,
        600.0,
    ),
    SettingSpec(
        "leader_lease_s",
        "float",
        1.0,
        "seconds",
        "leader lease: how long a majority's acknowledgements keep the elected leader acting "
        "(counted from when they were sent); also part of the no-new-grants hold after a "
        "control plane starts. Must end before election_timeout_min_s with the drift and "
        "margin (unsafe_election_timing)",
        0.5,
        600.0,
    ),
    SettingSpec(
        "election_timeout_min_s",
        "float",
        2.0,
        "seconds",
        "a voter that hears no leader for a random time in [min, max] asks for votes; one "
        "that heard a leader within min refuses votes (stickiness)",
        0.1,
        3600.0,
    ),
    SettingSpec(
        "election_timeout_max_s",
        "float",
        3.0,
        "seconds",
        "upper end of the randomized election timeout (must be above the minimum)",
        0.1,
        3600.0,
    ),
    SettingSpec(
        "election_heartbeat_s",
        "float",
        0.25,
        "seconds",
        "how often the leader sends heartbeats (and record writes) to the voters; at least "
        "three per leader_lease_s",
        0.01,
        600.0,
    ),
    SettingSpec(
        "election_lease_margin_s",
        "float",
        0.5,
        "seconds",
        "time between the leader checking its lease and the effect of what it does",
        0.0,
        600.0,
    ),
    SettingSpec(
        "max_clock_drift_ppm",
        "float",
        10_000.0,
        "ppm",
        "bound on how far any voter's clock rate strays from real time (10000 = 1 %)",
        0.0,
        99_999.0,
    ),
    SettingSpec(
        "election_write_timeout_s",
        "float",
        10.0,
        "seconds",
        "a record write not stored by a majority of voters by then is 'outcome unknown'",
        0.1,
        3600.0,
    ),
    SettingSpec(
        "auto_revoke_stale_leases",
        "bool",
        False,
        "",
        "revoke leases whose holder is stale or quarantined (off: only flag them)",
    ),
    SettingSpec(
        "node_cert_lifetime_s",
        "float",
        30 * 86400.0,
        "seconds",
        "lifetime of node certificates issued from now on (renewed at two thirds)",
        60.0,
        366 * 86400.0,
    ),
    SettingSpec(
        "policy_gates",
        "gates",
        (),
        "",
        "gated work-class:scope pairs switched on, e.g. inference:overlay",
    ),
)
_BY_KEY = {spec.key: spec for spec in SETTINGS}
#: Settings added with the election (ADR 0016), with what a record or answer that leaves one
#: out means: its value then. A record signs an election timing only when it differs from
#: this value (:func:`signed_body`), so that a node of the version before the election,
#: which refuses keys it does not know, still takes the record; and a record signed before
#: ADR 0019 changed the defaults keeps meaning what it meant (a cluster keeps its timings
#: through an upgrade; ``populi settings set`` moves it to the new ones).
ELECTION_OMITTED: Mapping[str, float] = MappingProxyType(
    {
        "election_timeout_min_s": 8.0,
        "election_timeout_max_s": 16.0,
        "election_heartbeat_s": 1.0,
        "election_lease_margin_s": 0.5,
        "max_clock_drift_ppm": 10_000.0,
        "election_write_timeout_s": 10.0,
    }
)
ELECTION_KEYS = frozenset(ELECTION_OMITTED)
#: What a record body that leaves a key out means, where that is not today's default: the
#: election timings (:data:`ELECTION_OMITTED`), and ``leader_lease_s``, which every record
#: has signed since the first version but whose default ADR 0019 lowered from 5 s — a body
#: without it means what it meant to the versions before.
MISSING_MEANS: Mapping[str, float] = MappingProxyType({**ELECTION_OMITTED, "leader_lease_s": 5.0})


def defaults() -> dict[str, Any]:
    return {
        spec.key: (list(spec.default) if spec.kind == "gates" else spec.default)
        for spec in SETTINGS
    }


def _check_gate(text: str) -> str:
    work_class, sep, scope = text.partition(":")
    if not sep or work_class not in WORK_CLASSES or scope not in SCOPES:
        raise BadRequest(
            f"policy gate {text!r} must be CLASS:SCOPE with CLASS in {', '.join(WORK_CLASSES)} "
            f"and SCOPE in {', '.join(SCOPES)}",
            code="bad_setting",
        )
    return f"{work_class}:{scope}"


def _spec(key: str) -> SettingSpec:
    """The spec of setting ``key``, or 400 ``unknown_setting`` naming the known keys."""
    spec = _BY_KEY.get(key)
    if spec is None:
        raise BadRequest(
            f"unknown cluster setting {key!r} (known: {', '.join(_BY_KEY)})", code="unknown_setting"
        )
    return spec


def validate_value(key: str, value: Any) -> Any:
    spec = _spec(key)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise BadRequest(f"cluster setting {key}: expected true or false", code="bad_setting")
        return value
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(
                f"cluster setting {key}: expected a number of {spec.unit}", code="bad_setting"
            )
        number = float(value)
        if (spec.minimum is not None and number < spec.minimum) or (
            spec.maximum is not None and number > spec.maximum
        ):
            raise BadRequest(
                f"cluster setting {key}: {number:g} is outside {spec.minimum:g}..{spec.maximum:g} {spec.unit}",
                code="bad_setting",
            )
        return number
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise BadRequest(
            f"cluster setting {key}: expected a list of CLASS:SCOPE gates", code="bad_setting"
        )
    return sorted({_check_gate(item) for item in value})


def validate_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, validated settings mapping (missing keys take their defaults, a missing
    election timing or leader lease its :data:`MISSING_MEANS` value: the mapping is a
    record's body or a complete one); the election timings together must be safe
    (:func:`check_election_settings`: 400 ``unsafe_election_timing`` with
    ``details["reason"]``)."""
    out = {**defaults(), **MISSING_MEANS}
    for key, value in values.items():
        out[key] = validate_value(key, value)
    try:
        check_election_settings(election_settings(out))
    except ConfigError as exc:
        raise BadRequest(str(exc), code="unsafe_election_timing", **exc.details) from None
    return out


def signed_body(values: Mapping[str, Any]) -> dict[str, Any]:
    """What a settings record signs: every value, except an election timing at its
    :data:`ELECTION_OMITTED` value, so that a node of the version before the election,
    which refuses keys it does not know, still takes the record (a rolling upgrade). The
    defaults of ADR 0019 differ from those values: a new cluster's record names them."""
    return {
        key: value
        for key, value in values.items()
        if key not in ELECTION_OMITTED or value != ELECTION_OMITTED[key]
    }


def election_settings(values: Mapping[str, Any], *, max_skew_ms: int = 300_000) -> ElectionSettings:
    """The election timings these (validated) settings name."""
    return ElectionSettings(
        election_timeout_min_s=float(values["election_timeout_min_s"]),
        election_timeout_max_s=float(values["election_timeout_max_s"]),
        heartbeat_interval_s=float(values["election_heartbeat_s"]),
        leader_lease_s=float(values["leader_lease_s"]),
        lease_margin_s=float(values["election_lease_margin_s"]),
        max_clock_drift_ppm=int(values["max_clock_drift_ppm"]),
        write_timeout_s=float(values["election_write_timeout_s"]),
        max_skew_ms=max_skew_ms,
    )


def check_settings_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse a change of election timings under which a voter still on the old ones and
    a leader on the new ones (or the reverse) could overlap (400
    ``unsafe_election_timing``, reason ``unsafe_timing_change``): change them in steps."""
    before, after = election_settings(old), election_settings(new)
    if before == after:
        return
    try:
        check_election_settings_change(before, after)
    except ConfigError as exc:
        raise BadRequest(str(exc), code="unsafe_election_timing", **exc.details) from None


def remote_refusal(values: Mapping[str, Any]) -> str | None:
    """Why these settings forbid remote execution now, if they do: ``kill_switch`` (it wins
    over everything) or ``remote_disabled``. The one rule the control plane applies at grant
    time and at a worker's pre-start renewal, and every node applies to its own work."""
    if values.get("kill_switch"):
        return "kill_switch"
    if not values.get("remote_exec_enabled"):
        return "remote_disabled"
    return None


def gates_enabled(values: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The gated ``(work class, scope)`` cells these settings switch on (the
    ``policy_gates`` setting, each ``CLASS:SCOPE`` checked when it was set), as
    :func:`populi_peer.core.policy.decide` takes them."""
    out = set()
    for gate in values.get("policy_gates") or ():
        work_class, _, scope = str(gate).partition(":")
        out.add((work_class, scope))
    return frozenset(out)


def parse_setting(key: str, text: str) -> Any:
    """Parse the text of ``populi settings set KEY VALUE``."""
    spec = _spec(key)
    if spec.kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("true", "on", "yes", "1"):
            return True
        if lowered in ("false", "off", "no", "0"):
            return False
        raise BadRequest(
            f"cluster setting {key}: expected true or false, got {text!r}", code="bad_setting"
        )
    if spec.kind == "float":
        try:
            return validate_value(key, float(text))
        except ValueError as exc:
            raise BadRequest(
                f"cluster setting {key}: expected a number, got {text!r}", code="bad_setting"
            ) from exc
    items = [item.strip() for item in text.split(",") if item.strip()]
    return validate_value(key, items)


__all__ = [
    "ELECTION_KEYS",
    "ELECTION_OMITTED",
    "MISSING_MEANS",
    "SCOPES",
    "SETTINGS",
    "WORK_CLASSES",
    "SettingSpec",
    "check_settings_change",
    "defaults",
    "election_settings",
    "gates_enabled",
    "parse_setting",
    "remote_refusal",
    "signed_body",
    "validate_settings",
    "validate_value",
]
