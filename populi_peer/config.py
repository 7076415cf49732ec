"""Node-local configuration: one frozen, typed object.

Layers, later wins: built-in defaults < ``<data dir>/populi.toml`` (written by ``populi
init`` / ``populi join``) < ``--config FILE`` < environment variables < command-line flags.

Environment mapping (documented in ``configs/README.md``): ``POPULI_<TABLE>__<KEY>``, with a
double underscore between levels and single underscores kept inside names, upper case —
``[gpu] refresh_s`` is ``POPULI_GPU__REFRESH_S``, ``[timings.overlay] stale_after_s`` is
``POPULI_TIMINGS__OVERLAY__STALE_AFTER_S``, ``[gpu.labels] model`` is
``POPULI_GPU__LABELS__MODEL``. Short aliases: ``POPULI_GPU_FIXTURE`` (``gpu.fixture``),
``POPULI_EXEC_REMOTE`` (``exec.remote``). ``POPULI_DATA_DIR`` and ``POPULI_CONFIG`` name the
data directory and a config file. ``POPULI_TASK_ID``, ``POPULI_ATTEMPT`` and
``POPULI_FENCING_TOKEN`` are reserved for tasks and never read as config. Any other
``POPULI_*`` variable draws one warning.

Every error names the key and where it came from, in one line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from populi_peer.core.gossip import GossipSettings
from populi_peer.core.leases import validate_stop_margin
from populi_peer.core.scope import Scope
from populi_peer.core.timings import DEFAULT_SCOPE_TIMINGS, ScopeTimings, TimingTable
from populi_peer.errors import ConfigError
from populi_peer.log import LOG_FORMATS, LOG_LEVELS

CONFIG_FILE_NAME = "populi.toml"
RESERVED_TASK_VARIABLES = frozenset({"POPULI_TASK_ID", "POPULI_ATTEMPT", "POPULI_FENCING_TOKEN"})
ENV_ALIASES = {"POPULI_GPU_FIXTURE": "gpu.fixture", "POPULI_EXEC_REMOTE": "exec.remote"}
#: Variables that are not config keys but are understood by Populi.
ENV_NON_CONFIG = frozenset({"POPULI_DATA_DIR", "POPULI_CONFIG", "POPULI_DEBUG"})
DEFAULT_PORT = 7431


def _meta(doc: str, unit: str = "", check: Callable[[Any], str | None] | None = None) -> Any:
    return {"doc": doc, "unit": unit, "check": check}


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _cidrs(value: Any) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not a CIDR block such as 10.8.0.0/24"
    return None


def parse_host_port(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` (default port). Raises ``ValueError``."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        ipaddress.IPv6Address(host)
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':' after ']'")
        port_text = rest[1:]
    elif text.count(":") > 1:
        ipaddress.IPv6Address(text)
        return text, default_port
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            return _check_host(host), default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number 0..65535")
    return _check_host(host), int(port_text)


def _check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return host


def reach_host(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine (a wildcard bind
    is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(value: Any) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def _addresses(value: Any) -> str | None:
    for item in value:
        problem = _address(item)
        if problem:
            return problem
    return None


def _node_name(value: Any) -> str | None:
    """``""`` (the host's name) or a node name by enrollment's rule (the one a token
    names and a join is checked against)."""
    if value == "":
        return None
    from enrollment.errors import NodeNameError
    from enrollment.tokens import validate_node_name

    try:
        validate_node_name(value)
    except NodeNameError as exc:
        return str(exc)
    return None


def default_node_name() -> str:
    raw = socket.gethostname().split(".")[0].lower()
    cleaned = re.sub(r"[^a-z0-9-]", "-", raw).strip("-")[:63]
    return cleaned or "node"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = field(
        default="", metadata=_meta("node name (default: the host name)", "", _node_name)
    )
    listen: str = field(
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metadata=_meta(
            "address the HTTPS API binds, host:port (port 0: any free port)", "", _address
        ),
    )
    advertise: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "addresses other nodes use to reach this one, any scope, first = preferred "
            "(default: the listen address; with a wildcard listen, every interface's, "
            "overlay first in an overlay cluster: docs/wan.md)",
            "",
            _addresses,
        ),
    )
    advertise_lan: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "addresses LAN peers use to reach this one (announced by mDNS too)", "", _addresses
        ),
    )
    advertise_overlay: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "addresses overlay peers (WireGuard, Nebula, Tailscale) use to reach this one",
            "",
            _addresses,
        ),
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = field(
        default="auto",
        metadata=_meta(
            "auto (text on a terminal, else JSON), json (one JSON object per line) or text",
            "",
            _one_of(*LOG_FORMATS),
        ),
    )
    level: str = field(
        default="auto",
        metadata=_meta(
            "auto (notice for text on a terminal, else info), debug (adds every request "
            "answered), info, notice (start, stop, lifecycle changes), warning or error",
            "",
            _one_of(*LOG_LEVELS),
        ),
    )


@dataclass(frozen=True, slots=True)
class ApiConfig:
    max_body_bytes: int = field(
        default=1 << 20, metadata=_meta("largest request body accepted", "bytes", _positive)
    )
    keep_alive_max_requests: int = field(
        default=1_000_000,
        metadata=_meta(
            "requests per connection before the server closes it", "requests", _positive
        ),
    )
    request_timeout_s: float = field(
        default=10.0, metadata=_meta("timeout of one peer request", "seconds", _positive)
    )
    shutdown_grace_s: float = field(
        default=10.0,
        metadata=_meta("how long SIGINT/SIGTERM waits for work to stop", "seconds", _positive),
    )


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    max_skew_s: float = field(
        default=300.0,
        metadata=_meta("clock skew budget for signatures and tokens", "seconds", _positive),
    )
    replay_cache_max_entries: int = field(
        default=1_000_000,
        metadata=_meta("nonces remembered; when full, requests are refused", "entries", _positive),
    )
    join_rate_per_min: int = field(
        default=30,
        metadata=_meta(
            "join requests accepted per minute per source address (0: no limit)",
            "requests/min",
            _non_negative,
        ),
    )


@dataclass(frozen=True, slots=True)
class ScopeConfig:
    local_cidrs: list[str] = field(
        default_factory=list, metadata=_meta("extra CIDR blocks treated as local", "", _cidrs)
    )
    lan_cidrs: list[str] = field(
        default_factory=list, metadata=_meta("extra CIDR blocks treated as trusted LAN", "", _cidrs)
    )
    overlay_cidrs: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "CIDR blocks of overlays (WireGuard, Nebula...); win over the defaults", "", _cidrs
        ),
    )


@dataclass(frozen=True, slots=True)
class ScopeTimingConfig:
    """``[timings.SCOPE]``: one row of the timing table (:mod:`populi_peer.core.timings`),
    whose defaults it takes."""

    heartbeat_interval_s: float = field(
        default=DEFAULT_SCOPE_TIMINGS["lan"].heartbeat_interval_s,
        metadata=_meta("heartbeat period on a path of this scope", "seconds", _positive),
    )
    heartbeat_timeout_s: float = field(
        default=DEFAULT_SCOPE_TIMINGS["lan"].heartbeat_timeout_s,
        metadata=_meta(
            "how long one heartbeat waits for its answer before it counts as lost",
            "seconds",
            _positive,
        ),
    )
    stale_after_s: float = field(
        default=DEFAULT_SCOPE_TIMINGS["lan"].stale_after_s,
        metadata=_meta(
            "heartbeat age after which the control plane calls a node stale", "seconds", _positive
        ),
    )

    @classmethod
    def default_for(cls, scope: Scope) -> ScopeTimingConfig:
        row = DEFAULT_SCOPE_TIMINGS[scope]
        return cls(
            heartbeat_interval_s=row.heartbeat_interval_s,
            heartbeat_timeout_s=row.heartbeat_timeout_s,
            stale_after_s=row.stale_after_s,
        )

    def timings(self) -> ScopeTimings:
        return ScopeTimings(
            heartbeat_interval_s=self.heartbeat_interval_s,
            stale_after_s=self.stale_after_s,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class TimingsConfig:
    local: ScopeTimingConfig = field(
        default_factory=lambda: ScopeTimingConfig.default_for("local"),
        metadata=_meta("timings on a local path"),
    )
    lan: ScopeTimingConfig = field(
        default_factory=lambda: ScopeTimingConfig.default_for("lan"),
        metadata=_meta("timings on a LAN path"),
    )
    overlay: ScopeTimingConfig = field(
        default_factory=lambda: ScopeTimingConfig.default_for("overlay"),
        metadata=_meta("timings on an overlay/WAN path"),
    )

    def table(self) -> TimingTable:
        """The one timing table these keys describe; ConfigError when a scope could not
        survive one lost heartbeat."""
        return TimingTable(
            local=self.local.timings(), lan=self.lan.timings(), overlay=self.overlay.timings()
        )


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    enabled: bool = field(
        default=True,
        metadata=_meta(
            "announce this node on the LAN (mDNS, _populi._tcp) and note the nodes seen "
            "there; hints only, admission still takes a token (false: no multicast at all)"
        ),
    )
    static_peers: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "host:port of Populi nodes to probe where multicast does not reach (overlays)",
            "",
            _addresses,
        ),
    )
    static_interval_s: float = field(
        default=60.0,
        metadata=_meta("how often static peers are probed", "seconds", _positive),
    )


@dataclass(frozen=True, slots=True)
class GpuConfig:
    fixture: str = field(
        default="", metadata=_meta("replay this NVML capture instead of the real GPU (path)")
    )
    keep_fixture_uuids: bool = field(
        default=False,
        metadata=_meta("keep a replayed capture's UUIDs instead of deriving per-node ones"),
    )
    refresh_s: float = field(
        default=5.0, metadata=_meta("period of the GPU metrics refresh", "seconds", _positive)
    )
    call_timeout_s: float = field(
        default=2.0,
        metadata=_meta(
            "bound on one NVML query; a hung query reads as unknown", "seconds", _positive
        ),
    )
    trust_advertised: bool = field(
        default=False,
        metadata=_meta("let advertised labels count as capacity (off: verified facts only)"),
    )
    labels: dict[str, str] = field(
        default_factory=dict, metadata=_meta("operator labels (advertised layer, policy only)")
    )


@dataclass(frozen=True, slots=True)
class GossipConfig:
    enabled: bool = field(
        default=True,
        metadata=_meta(
            "spread this node's signed hint (GPUs, load, lifecycle, addresses) to peers by "
            "push-pull gossip, and keep theirs; advisory only, the control plane re-checks "
            "at grant time (docs/adr/0010)"
        ),
    )
    round_interval_s: float = field(
        default=0.3,
        metadata=_meta("time between two gossip rounds of this node", "seconds", _positive),
    )
    fanout: int = field(
        default=3, metadata=_meta("random peers contacted per round", "peers", _positive)
    )
    max_message_bytes: int = field(
        default=64 * 1024,
        metadata=_meta(
            "signed hint records per gossip message (more wait for a later round; >= 1024)",
            "bytes",
            _positive,
        ),
    )
    republish_min_s: float = field(
        default=1.0,
        metadata=_meta(
            "this node re-signs its hint at most this often when it changes",
            "seconds",
            _positive,
        ),
    )
    republish_max_s: float = field(
        default=10.0,
        metadata=_meta(
            "this node re-signs its hint at least this often, changed or not (its age "
            "then means liveness)",
            "seconds",
            _positive,
        ),
    )
    stale_after_s: float = field(
        default=30.0,
        metadata=_meta(
            "a hint older than this is shown as stale and not placed on (hint_stale)",
            "seconds",
            _positive,
        ),
    )

    def settings(self, *, max_skew_s: float = 300.0) -> GossipSettings:
        """The core's gossip settings (its checks raise ConfigError)."""
        return GossipSettings(
            round_interval_s=self.round_interval_s,
            fanout=self.fanout,
            max_message_bytes=self.max_message_bytes,
            max_skew_ms=int(max_skew_s * 1000),
        )


#: The default port of the metrics listener (the API's is DEFAULT_PORT).
DEFAULT_METRICS_PORT = 7432


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = field(
        default=True,
        metadata=_meta(
            "serve Prometheus metrics (GET /metrics, plain HTTP) on their own listener; "
            "a listen address that cannot be bound leaves the node degraded, never down"
        ),
    )
    listen: str = field(
        default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
        metadata=_meta(
            "address the metrics listener binds, host:port (port 0: any free port); keep it "
            "on loopback or a monitoring network: it is not authenticated",
            "",
            _address,
        ),
    )


@dataclass(frozen=True, slots=True)
class ExecConfig:
    remote: bool = field(
        default=True,
        metadata=_meta("take part in remote execution (off: neither send nor accept remote work)"),
    )
    accept_from: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "node ids or names whose tasks this worker runs (empty: any node with the submit role)"
        ),
    )
    kill_grace_s: float = field(
        default=5.0,
        metadata=_meta(
            "time between SIGTERM and SIGKILL when a task is stopped", "seconds", _non_negative
        ),
    )
    kill_latency_s: float = field(
        default=1.0,
        metadata=_meta(
            "allowance for the kernel to end a killed process tree", "seconds", _non_negative
        ),
    )
    drift_ppm: float = field(
        default=500.0,
        metadata=_meta("worst clock drift rate assumed between nodes", "ppm", _non_negative),
    )
    stop_margin_s: float = field(
        default=7.0,
        metadata=_meta(
            "a task is stopped this long before its lease deadline; "
            "must be >= kill_grace_s + kill_latency_s + drift over one TTL",
            "seconds",
            _positive,
        ),
    )
    retain_finished_s: float = field(
        default=7 * 86400.0,
        metadata=_meta(
            "finished task directories (output kept on the worker) and inbox messages are removed after this long",
            "seconds",
            _positive,
        ),
    )
    output_cap_bytes: int = field(
        default=1 << 20,
        metadata=_meta("stdout/stderr tail kept per attempt and stream", "bytes", _positive),
    )

    def check_stop_margin(self, ttl_s: float | None) -> None:
        """Safety rule 3 for a lease of ``ttl_s`` (``None``: before any TTL is known):
        ConfigError when ``stop_margin_s`` is too small for it
        (:func:`populi_peer.core.leases.validate_stop_margin`, the one rule)."""
        validate_stop_margin(
            self.stop_margin_s,
            kill_grace_s=self.kill_grace_s,
            kill_latency_s=self.kill_latency_s,
            drift_ppm=self.drift_ppm,
            ttl_s=ttl_s,
        )


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig, metadata=_meta("this node"))
    log: LogConfig = field(default_factory=LogConfig, metadata=_meta("logging"))
    api: ApiConfig = field(default_factory=ApiConfig, metadata=_meta("HTTP API"))
    security: SecurityConfig = field(
        default_factory=SecurityConfig, metadata=_meta("authentication")
    )
    scope: ScopeConfig = field(
        default_factory=ScopeConfig, metadata=_meta("network scope of paths")
    )
    timings: TimingsConfig = field(
        default_factory=TimingsConfig, metadata=_meta("per-scope timings")
    )
    discovery: DiscoveryConfig = field(
        default_factory=DiscoveryConfig, metadata=_meta("LAN discovery and static peers")
    )
    gpu: GpuConfig = field(default_factory=GpuConfig, metadata=_meta("GPU probe"))
    exec: ExecConfig = field(default_factory=ExecConfig, metadata=_meta("task execution"))
    gossip: GossipConfig = field(
        default_factory=GossipConfig, metadata=_meta("hint gossip between nodes")
    )
    metrics: MetricsConfig = field(
        default_factory=MetricsConfig, metadata=_meta("Prometheus metrics listener")
    )

    def node_name(self) -> str:
        return self.node.name or default_node_name()

    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.node.listen)

    def advertise_addresses(self) -> list[str]:
        if self.node.advertise:
            return list(self.node.advertise)
        host, port = self.listen_address()
        if host in ("0.0.0.0", "::"):
            return []
        return [format_host_port(host, port)]


# --- generic loading over the dataclass schema -------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, *, key: str, source: str, from_env: bool) -> Any:
    origin = typing.get_origin(tp)
    where = f"{key} in {source}"
    if tp is bool:
        if from_env:
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false (or 1/0), got {value!r}", key=key)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}", key=key)
        return value
    if tp is int:
        if from_env:
            try:
                return int(str(value).strip())
            except ValueError as exc:
                raise ConfigError(f"{where}: expected an integer, got {value!r}", key=key) from exc
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}", key=key)
        return value
    if tp is float:
        if from_env:
            try:
                return float(str(value).strip())
            except ValueError as exc:
                raise ConfigError(f"{where}: expected a number, got {value!r}", key=key) from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}", key=key)
        return value
    if origin is list:
        if from_env:
            value = [item.strip() for item in str(value).split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(
                f"{where}: expected a list of strings, got {_describe(value)}", key=key
            )
        return list(value)
    raise ConfigError(f"{where}: unsupported type", key=key)  # pragma: no cover - schema bug


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"{type(value).__name__} {value!r}"


def _merge_section(
    cls: type, current: Any, data: Mapping[str, Any], *, prefix: str, source: str, from_env: bool
) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix or 'config'} in {source}: expected a table, got {_describe(data)}", key=prefix
        )
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else raw_key
        if raw_key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{key}' in {source} (known here: {known})", key=key)
        tp = hints[raw_key]
        old = getattr(current, raw_key)
        if _is_section(tp):
            changes[raw_key] = _merge_section(
                tp, old, value, prefix=key, source=source, from_env=from_env
            )
        elif typing.get_origin(tp) is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{key} in {source}: expected a table, got {_describe(value)}", key=key
                )
            merged = dict(old)
            for label, text in value.items():
                if not isinstance(text, str):
                    raise ConfigError(
                        f"{key}.{label} in {source}: expected a string, got {_describe(text)}",
                        key=f"{key}.{label}",
                    )
                merged[str(label)] = text
            changes[raw_key] = merged
        else:
            coerced = _coerce(value, tp, key=key, source=source, from_env=from_env)
            check = names[raw_key].metadata.get("check")
            if check is not None:
                problem = check(coerced)
                if problem:
                    raise ConfigError(f"{key} in {source}: {problem} (got {coerced!r})", key=key)
            changes[raw_key] = coerced
    return dataclasses.replace(current, **changes)


def load_toml_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist", key="") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", key="") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", key="") from exc


def apply_mapping(
    config: Config, data: Mapping[str, Any], *, source: str, from_env: bool = False
) -> Config:
    merged = _merge_section(Config, config, data, prefix="", source=source, from_env=from_env)
    _cross_check(merged, source)
    return typing.cast(Config, merged)


def _cross_check(config: Config, source: str) -> None:
    for scope in ("local", "lan", "overlay"):
        timing = getattr(config.timings, scope)
        if timing.stale_after_s <= timing.heartbeat_interval_s:
            raise ConfigError(
                f"timings.{scope}.stale_after_s in {source}: must be greater than "
                f"timings.{scope}.heartbeat_interval_s ({timing.heartbeat_interval_s})",
                key=f"timings.{scope}.stale_after_s",
            )
    try:
        config.timings.table()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})", key=exc.details.get("key", "timings")) from None
    try:
        # Safety rule 3 before the cluster's TTL is known (the agent checks it again,
        # with max_lease_ttl_s, at start): the one rule, core.leases.validate_stop_margin.
        config.exec.check_stop_margin(None)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})", key="exec.stop_margin_s") from None
    try:
        config.gossip.settings()  # the core's own checks (core.gossip.GossipSettings)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})", key="gossip") from None
    if config.gossip.republish_max_s < config.gossip.republish_min_s:
        raise ConfigError(
            f"gossip.republish_max_s in {source}: must be >= gossip.republish_min_s "
            f"({config.gossip.republish_min_s})",
            key="gossip.republish_max_s",
        )


def env_key_path(name: str) -> str | None:
    """``POPULI_GPU__REFRESH_S`` -> ``gpu.refresh_s``; ``None`` if not of config form."""
    if name in ENV_ALIASES:
        return ENV_ALIASES[name]
    if not name.startswith("POPULI_"):
        return None
    rest = name[len("POPULI_") :]
    if "__" not in rest:
        return None
    parts = rest.split("__")
    if any(not part for part in parts):
        return None
    return ".".join(part.lower() for part in parts)


def _nest(path: str, value: Any) -> dict[str, Any]:
    parts = path.split(".")
    out: dict[str, Any] = {}
    cursor = out
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return out


def apply_environment(
    config: Config, environ: Mapping[str, str], *, warn: Callable[[str], None]
) -> Config:
    for name in sorted(environ):
        if not name.startswith("POPULI_"):
            continue
        if name in RESERVED_TASK_VARIABLES or name in ENV_NON_CONFIG:
            continue
        path = env_key_path(name)
        if path is None:
            warn(f"populi: warning: unknown environment variable {name} ignored")
            continue
        try:
            config = apply_mapping(
                config,
                _nest(path, environ[name]),
                source=f"environment variable {name}",
                from_env=True,
            )
        except ConfigError as exc:
            if "unknown key" in str(exc):
                warn(f"populi: warning: unknown environment variable {name} ignored")
                continue
            raise
    return config


def load_config(
    *,
    data_dir: Path | None,
    config_file: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Config:
    """Build the node config from all layers; raise :class:`ConfigError` on bad input."""
    environ = os.environ if environ is None else environ
    warn = warn or (lambda message: None)
    config = Config()
    if data_dir is not None:
        node_file = data_dir / CONFIG_FILE_NAME
        if node_file.exists():
            config = apply_mapping(config, load_toml_file(node_file), source=str(node_file))
    if config_file is None and environ.get("POPULI_CONFIG"):
        config_file = Path(environ["POPULI_CONFIG"])
    if config_file is not None:
        config = apply_mapping(config, load_toml_file(config_file), source=str(config_file))
    config = apply_environment(config, environ, warn=warn)
    for path, value in (overrides or {}).items():
        if value is None:
            continue
        config = apply_mapping(config, _nest(path, value), source="command line")
    return config


def iter_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dict[str, Any]]]:
    """Every leaf key with its type and metadata (for docs and tests)."""
    out: list[tuple[str, Any, dict[str, Any]]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if _is_section(tp):
            out.extend(iter_keys(tp, key))
        else:
            out.append((key, tp, dict(f.metadata)))
    return out


def default_value(key: str) -> Any:
    value: Any = Config()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("POPULI_DATA_DIR"):
        return Path(environ["POPULI_DATA_DIR"])
    base = environ.get("XDG_DATA_HOME") or str(
        Path(environ.get("HOME", "~")).expanduser() / ".local" / "share"
    )
    return Path(base) / "populi"


__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_PORT",
    "RESERVED_TASK_VARIABLES",
    "Config",
    "apply_environment",
    "apply_mapping",
    "default_data_dir",
    "default_node_name",
    "default_value",
    "env_key_path",
    "format_host_port",
    "iter_keys",
    "load_config",
    "load_toml_file",
    "parse_host_port",
    "reach_host",
]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    return repr(value)


def example_toml() -> str:
    """The documented example config: every key, its unit, default and meaning."""
    lines = [
        "# Populi node configuration: every key, with its unit and default.",
        "# Layers (later wins): defaults < <data dir>/populi.toml < --config FILE <",
        "# POPULI_<TABLE>__<KEY> environment variables < command-line flags.",
        "# Unknown keys, wrong types and impossible values are refused, naming the key.",
        "# Generated from populi_peer/config.py (python -m populi_peer.config); a test keeps",
        "# this file and the code in step.",
    ]
    current_table = None
    for key, _tp, meta in iter_keys():
        table, _, name = key.rpartition(".")
        if table != current_table:
            lines.append("")
            lines.append(f"[{table}]")
            current_table = table
        default = default_value(key)
        env = "POPULI_" + key.upper().replace(".", "__")
        unit = f" [{meta['unit']}]" if meta.get("unit") else ""
        lines.append(f"# {meta['doc']}{unit}. Env: {env}")
        if isinstance(default, dict):
            lines.append(f'# {name} = {{ model = "RTX 4090" }}  (free-form strings; default empty)')
            continue
        lines.append(f"{name} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.stdout.write(example_toml())
