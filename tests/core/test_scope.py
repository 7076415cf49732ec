from __future__ import annotations

import ast
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.scope import (
    SCOPES,
    best_path,
    parse_address,
    path_scope,
    validate_cidrs,
)
from populi_peer.errors import BadRequest, ConfigError


@pytest.mark.parametrize(
    ("address", "scope"),
    [
        ("127.0.0.1", "local"),
        ("127.8.9.10:7443", "local"),
        ("::1", "local"),
        ("[::1]:7443", "local"),
        ("::ffff:127.0.0.1", "local"),
        ("10.1.2.3", "lan"),
        ("172.16.0.1", "lan"),
        ("172.31.255.255:80", "lan"),
        ("192.168.1.20:7443", "lan"),
        ("169.254.10.1", "lan"),
        ("fd12:3456::1", "lan"),
        ("fc00::1", "lan"),
        ("fe80::1", "lan"),
        ("fe80::1%eth0", "lan"),
        ("[fe80::1%eth0]:7443", "lan"),
        ("::ffff:192.168.1.20", "lan"),
        ("100.64.0.1", "overlay"),
        ("100.101.102.103:7443", "overlay"),
        ("100.127.255.255", "overlay"),
        ("fd7a:115c:a1e0::1", "overlay"),
        ("[fd7a:115c:a1e0:ab12::1]:7443", "overlay"),
        ("8.8.8.8", "overlay"),
        ("2001:db8::1", "overlay"),
        ("2606:4700::1111", "overlay"),
        ("172.32.0.1", "overlay"),
        ("100.128.0.1", "overlay"),
        (" 10.0.0.1 ", "lan"),
    ],
)
def test_default_scopes(address: str, scope: str) -> None:
    assert path_scope(address) == scope


def test_configured_overlay_beats_rfc1918() -> None:
    # A WireGuard subnet inside RFC 1918.
    assert path_scope("10.8.0.4", overlay_cidrs=["10.8.0.0/24"]) == "overlay"
    assert path_scope("10.9.0.4", overlay_cidrs=["10.8.0.0/24"]) == "lan"


def test_configured_lists_take_precedence_in_order_overlay_lan_local() -> None:
    everything = {
        "overlay_cidrs": ["10.0.0.0/8"],
        "lan_cidrs": ["10.0.0.0/16"],
        "local_cidrs": ["10.0.0.0/24"],
    }
    assert path_scope("10.0.0.5", **everything) == "overlay"
    assert path_scope("10.0.0.5", lan_cidrs=["10.0.0.0/16"], local_cidrs=["10.0.0.0/24"]) == "lan"
    assert path_scope("10.0.0.5", local_cidrs=["10.0.0.0/24"]) == "local"
    # Configured lists can also claim public or CGNAT space.
    assert path_scope("203.0.113.7", lan_cidrs=["203.0.113.0/24"]) == "lan"
    assert path_scope("100.64.1.1", lan_cidrs=["100.64.0.0/16"]) == "lan"
    assert path_scope("127.0.0.1", overlay_cidrs=["127.0.0.0/8"]) == "overlay"


def test_configured_v6_and_mapped_v4() -> None:
    assert path_scope("2001:db8::5", lan_cidrs=["2001:db8::/32"]) == "lan"
    assert path_scope("::ffff:10.8.0.4", overlay_cidrs=["10.8.0.0/24"]) == "overlay"
    # A v4 range never matches a v6 address and the reverse.
    assert path_scope("2001:db8::5", lan_cidrs=["10.0.0.0/8"]) == "overlay"


@pytest.mark.parametrize(
    "address",
    [
        "example.com",
        "node-a.local:7443",
        "localhost",
        "",
        "[::1",
        "[::1]x",
        "[10.0.0.1]:80",
        "10.0.0.1:",
        "10.0.0.1:99999",
        "10.0.0.1:http",
        "[::1]:-1",
        "10.0.0.256",
        "https://10.0.0.1/",
        "0.0.0.0",
        "::",
        "[::]:7443",
    ],
)
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(BadRequest) as info:
        path_scope(address)
    assert "\n" not in str(info.value)


def test_hostname_message_says_to_resolve_first() -> None:
    with pytest.raises(BadRequest, match="resolve host names"):
        path_scope("gpu-box.lan")


def test_bare_ipv6_is_taken_whole() -> None:
    assert parse_address("::1:8080") == ipaddress.IPv6Address("::1:8080")
    assert parse_address("[::1]:8080") == ipaddress.IPv6Address("::1")
    assert parse_address("10.0.0.1:8080") == ipaddress.IPv4Address("10.0.0.1")
    assert parse_address("::ffff:10.0.0.1") == ipaddress.IPv4Address("10.0.0.1")


@given(st.ip_addresses())
def test_every_address_gets_exactly_one_scope(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    judged = parse_address(str(ip))  # an IPv4-mapped address is judged as IPv4
    if judged.is_unspecified:
        with pytest.raises(BadRequest):
            path_scope(str(ip))
        return
    scope = path_scope(str(ip))
    assert scope in SCOPES
    if ip.version == 6:
        assert path_scope(f"[{ip}]:7443") == scope
    else:
        assert path_scope(f"{ip}:7443") == scope
    if judged.is_loopback:
        assert scope == "local"
    # An address claimed by a configured overlay range is overlay, whatever the defaults say.
    claim = f"{judged}/{judged.max_prefixlen}"
    assert path_scope(str(ip), overlay_cidrs=[claim]) == "overlay"
    assert path_scope(str(ip), lan_cidrs=[claim]) == "lan"


def test_validate_cidrs_parses() -> None:
    assert validate_cidrs(["10.8.0.0/24", "fd00::/8", "192.0.2.7"], "network.overlay_cidrs") == (
        ipaddress.ip_network("10.8.0.0/24"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert validate_cidrs([], "k") == ()


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        (
            ["10.8.0.0/24", "10.8.0.1/24"],
            "'10.8.0.1/24' is not a valid CIDR; did you mean '10.8.0.0/24'?",
        ),
        (["not-a-cidr"], "'not-a-cidr' is not a valid CIDR"),
        (["10.0.0.0/33"], "'10.0.0.0/33'"),
        ([7], "entry 7 is not a string"),
        ("10.0.0.0/8", "must be a list"),
    ],
)
def test_validate_cidrs_names_key_and_entry(entries: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_cidrs(entries, "network.overlay_cidrs")
    message = str(info.value)
    assert message.startswith("network.overlay_cidrs")
    assert fragment in message
    assert "\n" not in message


def test_path_scope_names_the_bad_list() -> None:
    with pytest.raises(ConfigError, match=r"^lan_cidrs: 'x' is not a valid CIDR"):
        path_scope("10.0.0.1", lan_cidrs=["x"])
    with pytest.raises(ConfigError, match=r"^local_cidrs: entry None"):
        path_scope("10.0.0.1", local_cidrs=[None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"^overlay_cidrs must be a list"):
        path_scope("10.0.0.1", overlay_cidrs="10.0.0.0/8")


# --- purity of the modules of this part of the core ----------------------------------------

PURE_MODULES = ("hlc", "registers", "lifecycle", "eligibility", "scope")
FORBIDDEN_IMPORTS = {"trio", "socket", "time", "random", "secrets", "asyncio", "threading"}


@pytest.mark.parametrize("name", PURE_MODULES)
def test_module_is_pure(name: str) -> None:
    path = Path(__file__).parents[2] / "populi_peer" / "core" / f"{name}.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
            if roots == {"datetime"}:
                assert all(alias.name != "datetime" for alias in node.names), f"{name}: datetime"
        else:
            if isinstance(node, ast.Attribute) and node.attr in ("now", "utcnow", "today"):
                pytest.fail(f"{name}.py reads a clock at line {node.lineno}")
            continue
        assert not roots & FORBIDDEN_IMPORTS, f"{name}.py imports {roots & FORBIDDEN_IMPORTS}"


def test_best_path_takes_the_nearest_scope_then_the_first_listed() -> None:
    addresses = ["gpu.example.net:7443", "100.64.1.2:7443", "10.0.0.7:7443", "10.0.0.8:7443"]
    assert best_path(addresses) == ("lan", "10.0.0.7:7443")
    assert best_path([*addresses, "[::1]:7443"]) == ("local", "[::1]:7443")
    # An operator CIDR wins over the defaults, as in path_scope.
    assert best_path(addresses, overlay_cidrs=["10.0.0.0/24"]) == (
        "overlay",
        "gpu.example.net:7443",
    )
    assert best_path(["gpu.example.net:7443"]) == ("overlay", "gpu.example.net:7443")
    assert best_path([]) is None
