"""Wrong input on every route of the agent: a clear 4xx, and nothing written.

One table, one row per wrong request: (route name, method, path, body, expected status,
expected ``error.code``). Each row runs against a fresh agent built as the ``virtual_agent``
fixture builds it (its URL carries a port, so that join tokens can be minted), through the
signed clients of ``support.clients``, which validate every answer against the OpenAPI
contract. For every row the test checks that the answer is the expected status and code,
a JSON error whose code is a stable snake_case word and whose message is one line with no
traceback, and that nothing was written: every table of the store and the in-memory lease
table are the same before and after.

``test_every_route_has_wrong_input`` keeps the table honest: a route added to the agent
without rows here fails it. Rows that show a bug are marked ``xfail(strict=True)`` with the
bug in one line; they pass the day the bug is fixed (and then fail until unmarked).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.cluster import InitResult
from populi_peer.config import Config
from populi_peer.core.registers import GPU_QUARANTINE_PREFIX
from populi_peer.joining import PEER_NODE_ID_EXTENSION, join_cluster
from populi_peer.testing.clock import require_mock_clock
from populi_peer.testing.cluster import open_virtual_agent
from support.clients import signed_client, unsigned_client
from support.state import differences
from support.vcluster import heard_from, vcluster

CODE_RE = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
LIMIT = Config().api.max_body_bytes
QUARANTINED_GPU = "GPU-00000000-0000-0000-0000-00000000dead"


# -- the agent --------------------------------------------------------------------------


@pytest.fixture
async def agent(cluster_dir: tuple[Path, InitResult]) -> AsyncIterator[Agent]:
    """Built as ``virtual_agent``, with a port in its URL; needs the test to name
    ``autojump_clock`` (it raises ``NotVirtualTime`` otherwise)."""
    require_mock_clock("the agent fixture")
    async with open_virtual_agent(cluster_dir[0], url="https://cp.virtual:443") as agent:
        yield agent


def client_for(agent: Agent, signer: str | None) -> httpx.AsyncClient:
    if signer is None:
        return unsigned_client(agent)
    if signer == "node":
        return signed_client(agent, credential=agent.certificates.identity.node_credential)
    return signed_client(agent)


def snapshot(agent: Agent) -> dict[str, Any]:
    """Everything the agent keeps: every row of every table, and the lease table."""
    store = agent.store
    tables = [
        row["name"]
        for row in store.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
    ]
    state: dict[str, Any] = {
        table: sorted(repr(tuple(row)) for row in store.execute(f"SELECT * FROM {table}"))
        for table in tables
    }
    table = agent.leases.table
    state["lease_table"] = (
        None if table is None else sorted((k, v.state) for k, v in table.leases.items())
    )
    state["membership_version"] = agent.membership.version
    return state


# -- what some rows need first ----------------------------------------------------------


async def second_node(agent: Agent, tmp_path: Path) -> dict[str, str]:
    """A node ``w1`` enrolled through the real join flow, against the agent's own app."""
    async with signed_client(agent) as client:
        answer = await client.post("/v1/populi/admin/tokens", json={"ttl_s": 600})
    assert answer.status_code == 200, answer.text
    result = await join_cluster(
        answer.json()["token"],
        data_dir=tmp_path / "w1",
        name="w1",
        listen="127.0.0.1:0",
        advertise=["w1.virtual:443"],
        clock=agent.clock,
        transports=lambda _ca: _AnsweredBy(agent),
    )
    return {"node2": result.node_id}


class _AnsweredBy(httpx.AsyncBaseTransport):
    """The agent's app, answering as the agent (what its TLS handshake would prove)."""

    def __init__(self, agent: Agent) -> None:
        self.inner = httpx.ASGITransport(app=agent.app)
        self.node_id = agent.node_id

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        response.extensions[PEER_NODE_ID_EXTENSION] = self.node_id
        return response


async def quarantined_gpu(agent: Agent, tmp_path: Path) -> dict[str, str]:
    """One of the agent's own GPUs quarantined, as the node itself records it."""
    agent.registry.apply(
        agent.registry.make_write(
            agent.node_id,
            GPU_QUARANTINE_PREFIX + QUARANTINED_GPU,
            {"quarantined": True, "reason": "xid 79"},
            writer_class="self",
            actor=agent.node_id,
            reason="xid 79",
            term=agent.control_plane.term,
        )
    )
    return {"gpu": QUARANTINED_GPU}


async def finished_task(agent: Agent, tmp_path: Path) -> dict[str, str]:
    """A task that timed out before it was placed: it exists and never ran a process."""
    async with signed_client(agent) as client:
        answer = await client.post(
            "/v1/populi/tasks", json={"command": ["true"], "timeout_s": 1e-300}
        )
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["task"]["task_id"]
    async with signed_client(agent) as client:
        shown = await client.get(f"/v1/populi/tasks/{task_id}", params={"wait_s": 5})
    assert shown.json()["task"]["state"] == "timed_out"
    assert shown.json()["task"]["attempts"] == []
    return {"task": task_id}


Setup = Callable[[Agent, Path], Any]


# -- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Wrong:
    route: str
    method: str
    path: str
    body: Any
    status: int
    code: str
    signer: str | None = "operator"
    setup: Setup | None = None


ROWS: list[Any] = []


def wrong(
    route: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
    label: str,
    *,
    signer: str | None = "operator",
    setup: Setup | None = None,
    bug: str | None = None,
) -> None:
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {bug}")] if bug else []
    ROWS.append(
        pytest.param(
            Wrong(route, method, path, body, status, code, signer, setup),
            id=f"{route}-{label}",
            marks=marks,
        )
    )


# The table is data: one row a line where it fits, so it is not reformatted.
# fmt: off
OVERSIZE = b'{"pad": "' + b"x" * LIMIT + b'"}'
NOT_JSON = b"{not json"
ARRAY = b'["an", "array"]'
DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b'{"ttl_s": ' + b"9" * 5000 + b"}"
LONG = "x" * 5000

# Every route: its method, a path that reaches it, and who signs requests (None: nobody).
ROUTES: dict[str, tuple[str, str, str | None]] = {
    "join_ca": ("GET", "/v1/populi/join/ca", None),
    "join_challenge": ("POST", "/v1/populi/join/challenge", None),
    "join_enroll": ("POST", "/v1/populi/join/enroll", None),
    "token_create": ("POST", "/v1/populi/admin/tokens", "operator"),
    "token_list": ("GET", "/v1/populi/admin/tokens", "operator"),
    "token_revoke": ("POST", "/v1/populi/admin/tokens/abc/revoke", "operator"),
    "cert_renew": ("POST", "/v1/populi/certs/renew", "node"),
    "node_retire": ("POST", "/v1/populi/admin/nodes/cp/retire", "operator"),
    "node_delete": ("POST", "/v1/populi/admin/nodes/cp/delete", "operator"),
    "name_unretire": ("POST", "/v1/populi/admin/names/cp/unretire", "operator"),
    "revocations": ("GET", "/v1/populi/revocations", "operator"),
    "members": ("GET", "/v1/populi/members", "operator"),
    "heartbeat": ("POST", "/v1/populi/heartbeat", "node"),
    "node_lifecycle": ("POST", "/v1/populi/admin/nodes/cp/cordon", "operator"),
    "nodes": ("GET", "/v1/populi/nodes", "operator"),
    "events": ("GET", "/v1/populi/events", "operator"),
    "leave": ("POST", "/v1/populi/leave", "operator"),
    "inbox_deliver": ("POST", "/v1/populi/inbox", "operator"),
    "inbox_read": ("GET", "/v1/populi/inbox", "operator"),
    "lease_grant": ("POST", "/v1/populi/exec/leases", "operator"),
    "lease_list": ("GET", "/v1/populi/exec/leases", "operator"),
    "lease_get": ("GET", "/v1/populi/exec/leases/l-1", "operator"),
    "lease_renew": ("POST", "/v1/populi/exec/leases/l-1/renew", "operator"),
    "lease_release": ("POST", "/v1/populi/exec/leases/l-1/release", "operator"),
    "lease_fallback": ("POST", "/v1/populi/exec/fallback", "operator"),
    "lease_revoke": ("POST", "/v1/populi/admin/exec-lease-revoke", "operator"),
    "attempt_output": ("GET", "/v1/populi/exec/attempts/t-1/1/output", "operator"),
    "task_submit": ("POST", "/v1/populi/tasks", "operator"),
    "task_list": ("GET", "/v1/populi/tasks", "operator"),
    "task_show": ("GET", "/v1/populi/tasks/t-1", "operator"),
    "task_cancel": ("POST", "/v1/populi/tasks/t-1/cancel", "operator"),
    "task_output": ("GET", "/v1/populi/tasks/t-1/output", "operator"),
    "gpus": ("GET", "/v1/populi/gpus", "operator"),
    "gpu_resume": ("POST", f"/v1/populi/admin/gpus/cp/{QUARANTINED_GPU}/resume", "operator"),
    "health": ("GET", "/v1/populi/health", None),
    "status": ("GET", "/v1/populi/status", "operator"),
    "settings_show": ("GET", "/v1/populi/settings", "operator"),
    "settings_set": ("POST", "/v1/populi/admin/settings", "operator"),
    "settings_push": ("POST", "/v1/populi/records/settings", "node"),
    "gossip_digest": ("POST", "/v1/populi/gossip/digest", "node"),
    "gossip_push": ("POST", "/v1/populi/gossip/push", "node"),
    "hints": ("GET", "/v1/populi/hints", "operator"),
    "election": ("POST", "/v1/populi/election", "node"),
    "voter_change": ("POST", "/v1/populi/admin/voters", "operator"),
}

# Every route: a body over api.max_body_bytes is 413 before anything else happens.
for _route, (_method, _path, _signer) in ROUTES.items():
    wrong(_route, _method, _path, OVERSIZE, 413, "payload_too_large", "oversize", signer=_signer)

# Routes that read a JSON body: malformed JSON and a JSON array are 400 bad_json.
for _route in [
    "join_enroll",
    "token_create",
    "node_delete",
    "heartbeat",
    "node_lifecycle",
    "inbox_deliver",
    "lease_grant",
    "lease_release",
    "lease_fallback",
    "lease_revoke",
    "task_submit",
    "settings_set",
    # Routes whose handler reads no body: a body is still JSON or nothing, as everywhere.
    "join_challenge",
    "token_revoke",
    "cert_renew",
    "name_unretire",
    "task_cancel",
]:
    _method, _path, _signer = ROUTES[_route]
    wrong(_route, _method, _path, NOT_JSON, 400, "bad_json", "malformed-json", signer=_signer)
    wrong(_route, _method, _path, ARRAY, 400, "bad_json", "json-array", signer=_signer)
wrong("node_retire", "POST", "/v1/populi/admin/nodes/{node2}/retire", NOT_JSON, 400, "bad_json",
      "malformed-json", setup=second_node)
wrong("gpu_resume", "POST", "/v1/populi/admin/gpus/cp/{gpu}/resume", ARRAY, 400, "bad_json",
      "json-array", setup=quarantined_gpu)
wrong("token_create", "POST", "/v1/populi/admin/tokens", b"\xff\xfe{}", 400, "bad_json",
      "not-utf8")
wrong("settings_set", "POST", "/v1/populi/admin/settings", b"", 400, "bad_json", "empty-body")
wrong("task_submit", "POST", "/v1/populi/tasks", b"null", 400, "bad_json", "json-null")
wrong("token_create", "POST", "/v1/populi/admin/tokens", DEEP, 400, "bad_json", "deep-nesting")
wrong("token_create", "POST", "/v1/populi/admin/tokens", HUGE_INT, 400, "bad_json",
      "5000-digit-number")
wrong("settings_set", "POST", "/v1/populi/admin/settings",
      b'{"changes": {"max_lease_ttl_s": NaN}}', 400, "bad_json", "nan-literal")
wrong("token_create", "POST", "/v1/populi/admin/tokens", b'{"ttl_s": Infinity}', 400, "bad_json",
      "infinity-literal")

# -- join (unauthenticated) --
for _label, _body, _code in [
    ("missing-fields", {}, "bad_request"),
    ("token-not-string", {"token": 5, "public_key": "k", "name": "w1", "challenge": "c",
                          "proof": "p", "token_proof": "q"}, "bad_request"),
    ("empty-proof", {"token": "t", "public_key": "k", "name": "w1", "challenge": "c",
                     "proof": "", "token_proof": "q"}, "bad_request"),
    ("addresses-not-list", {"token": "t", "public_key": "k", "name": "w1", "challenge": "c",
                            "proof": "p", "token_proof": "q", "addresses": "h:1"}, "bad_request"),
    ("nine-addresses", {"token": "t", "public_key": "k", "name": "w1", "challenge": "c",
                        "proof": "p", "token_proof": "q", "addresses": ["h:1"] * 9}, "bad_request"),
    ("address-too-long", {"token": "t", "public_key": "k", "name": "w1", "challenge": "c",
                          "proof": "p", "token_proof": "q", "addresses": ["h" * 262]}, "bad_request"),
    ("garbage-token", {"token": "populi", "public_key": "k", "name": "w1", "challenge": "c",
                       "proof": "p", "token_proof": "q"}, "token_malformed"),
    ("no-token-proof", {"token": "t", "public_key": "k", "name": "w1", "challenge": "c",
                        "proof": "p"}, "bad_request"),
    ("version-1-token", {"token": "populi-join-1.AAAA", "public_key": "k", "name": "w1",
                         "challenge": "c", "proof": "p", "token_proof": "q"},
     "token_unsupported_version"),
    ("over-long-token", {"token": LONG, "public_key": "k", "name": "w1", "challenge": "c",
                         "proof": "p", "token_proof": "q"}, "token_too_long"),
]:
    wrong("join_enroll", "POST", "/v1/populi/join/enroll", _body, 400, _code, _label, signer=None)

# -- tokens --
for _label, _body, _code in [
    ("ttl-string", {"ttl_s": "60"}, "bad_request"),
    ("ttl-bool", {"ttl_s": True}, "bad_request"),
    ("ttl-negative", {"ttl_s": -5}, "token_bad_field"),
    ("ttl-over-24h", {"ttl_s": 86401}, "token_ttl_too_long"),
    ("uses-string", {"uses": "2"}, "token_bad_field"),
    ("uses-zero", {"uses": 0}, "token_bad_field"),
    ("uses-huge", {"uses": 10**30}, "token_bad_field"),
    ("uses-float", {"uses": 1.5}, "token_bad_field"),
    ("roles-string", {"roles": "worker"}, "bad_request"),
    ("roles-unknown", {"roles": ["king"]}, "token_bad_field"),
    ("roles-empty", {"roles": []}, "token_bad_field"),
    ("name-number", {"name": 5}, "bad_request"),
    ("name-too-long", {"name": "a" * 300}, "token_bad_field"),
    ("name-uppercase", {"name": "BAD NAME"}, "token_bad_field"),
]:
    wrong("token_create", "POST", "/v1/populi/admin/tokens", _body, 400, _code, _label)
wrong("token_create", "POST", "/v1/populi/admin/tokens", {"ttl_s": 1e308}, 400, "token_ttl_too_long",
      "ttl-1e308")
wrong("token_revoke", "POST", "/v1/populi/admin/tokens/nope/revoke", None, 404, "unknown_token",
      "unknown-id")
wrong("token_revoke", "POST", f"/v1/populi/admin/tokens/{LONG}/revoke", None, 404,
      "unknown_token", "long-id")

# -- certificates, retirement, names --
wrong("cert_renew", "POST", "/v1/populi/certs/renew", None, 403, "not_a_node", "operator-caller")
wrong("node_retire", "POST", "/v1/populi/admin/nodes/nope/retire", None, 404, "unknown_node",
      "unknown-node")
wrong("node_retire", "POST", f"/v1/populi/admin/nodes/{LONG}/retire", None, 404, "unknown_node",
      "long-node")
for _label, _reason in [("reason-201", "r" * 201), ("reason-two-lines", "a\nb"),
                        ("reason-cr", "a\rb"), ("reason-number", 5), ("reason-list", ["a"])]:
    wrong("node_retire", "POST", "/v1/populi/admin/nodes/{node2}/retire", {"reason": _reason},
          400, "bad_request", _label, setup=second_node)
    wrong("node_delete", "POST", "/v1/populi/admin/nodes/cp/delete", {"reason": _reason}, 400,
          "bad_request", _label)
    wrong("node_lifecycle", "POST", "/v1/populi/admin/nodes/{node2}/quarantine",
          {"reason": _reason}, 400, "bad_request", _label, setup=second_node)
    wrong("gpu_resume", "POST", "/v1/populi/admin/gpus/cp/{gpu}/resume", {"reason": _reason},
          400, "bad_request", _label, setup=quarantined_gpu)
    wrong("lease_revoke", "POST", "/v1/populi/admin/exec-lease-revoke",
          {"lease_id": "l-1", "reason": _reason}, 400, "bad_request", _label)
wrong("node_delete", "POST", "/v1/populi/admin/nodes/nope/delete", None, 404, "unknown_node",
      "unknown-node")
wrong("name_unretire", "POST", "/v1/populi/admin/names/BAD/unretire", None, 400, "bad_node_name",
      "uppercase")
wrong("name_unretire", "POST", f"/v1/populi/admin/names/{'a' * 64}/unretire", None, 400,
      "bad_node_name", "64-chars")
wrong("name_unretire", "POST", "/v1/populi/admin/names/-a/unretire", None, 400, "bad_node_name",
      "leading-dash")
wrong("name_unretire", "POST", "/v1/populi/admin/names/free/unretire", None, 404,
      "name_not_blocked", "not-blocked")

# -- membership views, events, nodes --
for _label, _query in [("since-below-minus-one", "since=-2"), ("since-word", "since=x"),
                       ("since-20-digits", "since=99999999999999999999"),
                       ("since-twice", "since=1&since=2")]:
    wrong("revocations", "GET", f"/v1/populi/revocations?{_query}", None, 400, "bad_request",
          _label)
for _label, _query in [("after-negative", "after=-1"), ("limit-zero", "limit=0"),
                       ("limit-over-1000", "limit=1001"), ("limit-word", "limit=ten"),
                       ("after-twice", "after=1&after=2"), ("limit-float", "limit=1.5")]:
    wrong("events", "GET", f"/v1/populi/events?{_query}", None, 400, "bad_request", _label)
for _label, _query in [("since-negative", "since_ms=-1"), ("wait-over-60", "wait_s=61"),
                       ("wait-word", "wait_s=soon"), ("kind-twice", "kind=left&kind=left")]:
    wrong("events", "GET", f"/v1/populi/events?{_query}", None, 400, "bad_request", _label)
wrong("events", "GET", "/v1/populi/events?node=w9", None, 404, "unknown_node", "unknown-node")
wrong("events", "GET", "/v1/populi/events?kind=bogus", None, 400, "unknown_event_kind",
      "unknown-kind")
wrong("members", "GET", "/v1/populi/members", None, 401, "signature_missing", "unsigned",
      signer=None)
wrong("nodes", "GET", "/v1/populi/nodes", None, 401, "signature_missing", "unsigned",
      signer=None)

# -- heartbeat (a node signs it) --
for _label, _body in [
    ("status-unknown", {"status": "dead"}),
    ("addresses-string", {"addresses": "h:1"}),
    ("nine-addresses", {"addresses": [f"h{i}:1" for i in range(9)]}),
    ("address-too-long", {"addresses": ["h" * 300 + ":1"]}),
    ("address-bad-port", {"addresses": ["h:99999"]}),
    ("registers-object", {"registers": {}}),
    ("registers-257", {"registers": [{}] * 257}),
    ("register-number", {"registers": [5]}),
    ("register-missing-fields", {"registers": [{"attribute": "lifecycle"}]}),
    ("serial-string", {"revocation_serial": "1"}),
    ("serial-bool", {"settings_serial": True}),
    ("version-float", {"membership_version": 1.5}),
]:
    wrong("heartbeat", "POST", "/v1/populi/heartbeat", _body, 400, "bad_request", _label,
          signer="node")
wrong("heartbeat", "POST", "/v1/populi/heartbeat", {}, 403, "not_a_node", "operator-caller")
wrong("heartbeat", "POST", "/v1/populi/heartbeat",
      {"addresses": ["elsewhere.virtual:443"], "registers": [5]}, 400, "bad_request",
      "new-address-and-bad-register", signer="node")

# -- node lifecycle --
for _label, _path, _body, _status, _code in [
    ("unknown-node", "/v1/populi/admin/nodes/nope/cordon", None, 404, "unknown_node"),
    ("unknown-action", "/v1/populi/admin/nodes/cp/explode", None, 404, "no_route"),
    ("deadline-on-cordon", "/v1/populi/admin/nodes/cp/cordon", {"deadline_in_s": 60}, 400,
     "bad_request"),
    ("until-on-drain", "/v1/populi/admin/nodes/cp/drain", {"until_in_s": 60}, 400,
     "bad_request"),
    ("deadline-negative", "/v1/populi/admin/nodes/cp/drain", {"deadline_in_s": -1}, 400,
     "bad_request"),
    ("deadline-string", "/v1/populi/admin/nodes/cp/drain", {"deadline_in_s": "60"}, 400,
     "bad_request"),
    ("deadline-over-10y", "/v1/populi/admin/nodes/cp/drain", {"deadline_in_s": 1e308}, 400,
     "bad_request"),
    ("deadline-both", "/v1/populi/admin/nodes/cp/drain",
     {"deadline_in_s": 60, "deadline_wall_ms": 1}, 400, "bad_request"),
    ("deadline-ms-float", "/v1/populi/admin/nodes/cp/drain", {"deadline_wall_ms": 1.5}, 400,
     "bad_request"),
    ("until-in-the-past", "/v1/populi/admin/nodes/cp/maintenance", {"until_wall_ms": 1}, 400,
     "bad_request"),
    ("until-bool", "/v1/populi/admin/nodes/cp/maintenance", {"until_wall_ms": True}, 400,
     "bad_request"),
]:
    wrong("node_lifecycle", "POST", _path, _body, _status, _code, _label)

# -- leave: the body is parsed first (a bad reason is 400, ADR 0012); on the control plane
# a good one is refused before anything is done --
wrong("leave", "POST", "/v1/populi/leave", {"reason": "a\nb"}, 400, "bad_request",
      "reason-two-lines")
wrong("leave", "POST", "/v1/populi/leave", {"reason": "bye"}, 409,
      "control_plane_cannot_leave", "control-plane")

# -- inbox --
_HANDOFF = {"message_id": "h-1", "type": "handoff", "task_id": "t-1", "lease_id": "l-1",
            "attempt": 1, "token": "1.1", "command": ["true"], "ttl_s": 30.0}
for _label, _changes, _code in [
    ("no-message-id", {"message_id": None}, "bad_request"),
    ("message-id-slash", {"message_id": "a/b"}, "bad_request"),
    ("message-id-129", {"message_id": "m" * 129}, "bad_request"),
    ("message-id-number", {"message_id": 7}, "bad_request"),
    ("type-unknown", {"type": "gift"}, "bad_request"),
    ("type-ack", {"type": "ack"}, "unsupported_message"),
    ("task-id-missing", {"task_id": None}, "bad_request"),
    ("task-id-newline", {"task_id": "t\n1"}, "bad_request"),
    ("lease-id-long", {"lease_id": "l" * 129}, "bad_request"),
    ("attempt-zero", {"attempt": 0}, "bad_request"),
    ("attempt-string", {"attempt": "1"}, "bad_request"),
    ("attempt-bool", {"attempt": True}, "bad_request"),
    ("token-missing", {"token": None}, "bad_request"),
    ("token-leading-zero", {"token": "01.1"}, "bad_fencing_token"),
    ("token-over-2-63", {"token": "1.99999999999999999999"}, "bad_fencing_token"),
    ("token-negative", {"token": "-1.1"}, "bad_fencing_token"),
    ("command-empty", {"command": []}, "bad_request"),
    ("command-string", {"command": "true"}, "bad_request"),
    ("command-nul", {"command": ["tr\u0000ue"]}, "bad_request"),
    ("command-4097", {"command": ["x"] * 4097}, "bad_request"),
    ("env-list", {"env": ["A=1"]}, "bad_request"),
    ("env-number", {"env": {"A": 1}}, "bad_request"),
    ("env-reserved", {"env": {"POPULI_FENCING_TOKEN": "9.9"}}, "bad_env"),
    ("env-cuda", {"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "bad_env"),
    ("gpus-string", {"gpus": "GPU-1"}, "bad_request"),
    ("gpus-slash", {"gpus": ["a/b"]}, "bad_request"),
    ("ttl-zero", {"ttl_s": 0}, "bad_request"),
    ("ttl-string", {"ttl_s": "30"}, "bad_request"),
    ("work-class-unknown", {"work_class": "mining"}, "unknown_work_class"),
]:
    _body = {k: v for k, v in {**_HANDOFF, **_changes}.items() if v is not None}
    wrong("inbox_deliver", "POST", "/v1/populi/inbox", _body, 400, _code, _label)
for _label, _body, _status, _code in [
    ("cancel-no-attempt", {"message_id": "c-1", "type": "cancel", "task_id": "t-1"}, 400,
     "bad_request"),
    ("cancel-unknown", {"message_id": "c-1", "type": "cancel", "task_id": "t-1", "attempt": 1},
     404, "unknown_attempt"),
    ("result-no-task", {"message_id": "r-1", "type": "result", "attempt": 1}, 400,
     "bad_request"),
    # A result names the node that ran it (the contract requires it; the submitter then
    # takes the signer instead): without it, 400 before any task is looked up.
    ("result-no-node", {"message_id": "r-1", "type": "result", "task_id": "t-1",
                        "attempt": 1}, 400, "bad_request"),
    ("result-unknown-task", {"message_id": "r-1", "type": "result", "task_id": "t-1",
                             "attempt": 1, "node": "n-x"}, 404, "unknown_task"),
]:
    wrong("inbox_deliver", "POST", "/v1/populi/inbox", _body, _status, _code, _label)
for _label, _query in [("cursor-negative", "cursor=-1"), ("cursor-word", "cursor=x"),
                       ("limit-zero", "limit=0"), ("limit-over-1000", "limit=1001"),
                       ("cursor-twice", "cursor=1&cursor=1")]:
    wrong("inbox_read", "GET", f"/v1/populi/inbox?{_query}", None, 400, "bad_request", _label)

# -- leases --
_GRANT = {"task_id": "t-1", "attempt": 1, "work_class": "agent", "target": "cp",
          "gpus_wanted": 0, "ttl_s": 30}
for _label, _changes, _status, _code in [
    ("empty", None, 400, "bad_request"),
    ("task-id-number", {"task_id": 5}, 400, "bad_request"),
    ("task-id-empty", {"task_id": ""}, 400, "bad_request"),
    ("task-id-129", {"task_id": "t" * 129}, 400, "bad_request"),
    ("attempt-zero", {"attempt": 0}, 400, "bad_request"),
    ("attempt-negative", {"attempt": -1}, 400, "bad_request"),
    ("attempt-float", {"attempt": 1.5}, 400, "bad_request"),
    ("attempt-bool", {"attempt": True}, 400, "bad_request"),
    ("work-class-unknown", {"work_class": "mining"}, 400, "unknown_work_class"),
    ("work-class-list", {"work_class": ["agent"]}, 400, "bad_request"),
    ("target-number", {"target": 5}, 400, "bad_request"),
    ("gpus-negative", {"gpus_wanted": -1}, 400, "bad_request"),
    ("gpus-string", {"gpus_wanted": "1"}, 400, "bad_request"),
    ("ttl-zero", {"ttl_s": 0}, 400, "bad_request"),
    ("ttl-negative", {"ttl_s": -30}, 400, "bad_request"),
    ("ttl-string", {"ttl_s": "30"}, 400, "bad_request"),
    ("ttl-1e308", {"ttl_s": 1e308}, 409, "lease_refused"),
    ("ttl-1e-300", {"ttl_s": 1e-300}, 409, "lease_refused"),
    ("ttl-below-minimum", {"ttl_s": 2.999}, 409, "lease_refused"),
    ("gpus-huge", {"gpus_wanted": 10**30}, 400, "bad_request"),
    ("target-unknown", {"target": "nope"}, 409, "lease_refused"),
]:
    _body = {} if _changes is None else {**_GRANT, **_changes}
    wrong("lease_grant", "POST", "/v1/populi/exec/leases", _body, _status, _code, _label)
wrong("lease_grant", "POST", "/v1/populi/exec/leases", {**_GRANT, "task_id": "t\n1"}, 400,
      "bad_request", "task-id-newline")
_FALLBACK = {"task_id": "t-1", "attempt": 1, "gpus_wanted": 0, "ttl_s": 30, "work_class": "agent"}
for _label, _changes, _status, _code in [
    ("empty", None, 400, "bad_request"),
    ("task-id-number", {"task_id": 5}, 400, "bad_request"),
    ("task-id-129", {"task_id": "t" * 129}, 400, "bad_request"),
    # The typed request checks shape first (ADR 0012): `bad_request`, as for a grant.
    ("attempt-zero", {"attempt": 0}, 400, "bad_request"),
    ("attempt-negative", {"attempt": -1}, 400, "bad_request"),
    ("attempt-string", {"attempt": "1"}, 400, "bad_request"),
    ("gpus-negative", {"gpus_wanted": -1}, 400, "bad_request"),
    ("ttl-zero", {"ttl_s": 0}, 400, "bad_request"),
    ("ttl-string", {"ttl_s": "30"}, 400, "bad_request"),
    ("work-class-unknown", {"work_class": "mining"}, 400, "unknown_work_class"),
    ("work-class-number", {"work_class": 5}, 400, "bad_request"),
    ("work-class-missing", {"work_class": None}, 400, "bad_request"),
    ("gpus-huge", {"gpus_wanted": 10**30}, 400, "bad_request"),
]:
    _body = (
        {} if _changes is None
        else {k: v for k, v in {**_FALLBACK, **_changes}.items() if v is not None}
    )
    wrong("lease_fallback", "POST", "/v1/populi/exec/fallback", _body, _status, _code, _label)
wrong("lease_fallback", "POST", "/v1/populi/exec/fallback", {**_FALLBACK, "task_id": "t\n1"},
      400, "bad_request", "task-id-newline")
for _label, _body, _status, _code in [
    ("empty", {}, 400, "bad_request"),
    ("lease-id-number", {"lease_id": 5}, 400, "bad_request"),
    ("lease-id-empty", {"lease_id": ""}, 400, "bad_request"),
    ("lease-id-129", {"lease_id": "l" * 129}, 400, "bad_request"),
    ("unknown-lease", {"lease_id": "l-1"}, 404, "lease_not_found"),
]:
    wrong("lease_revoke", "POST", "/v1/populi/admin/exec-lease-revoke", _body, _status, _code,
          _label)
for _label, _body, _status, _code in [
    ("no-outcome", {}, 400, "bad_request"),
    ("outcome-unknown", {"outcome": "vanished"}, 400, "bad_request"),
    ("outcome-number", {"outcome": 1}, 400, "bad_request"),
    ("unknown-lease", {"outcome": "stopped"}, 404, "lease_not_found"),
]:
    wrong("lease_release", "POST", "/v1/populi/exec/leases/l-1/release", _body, _status, _code,
          _label)
wrong("lease_renew", "POST", "/v1/populi/exec/leases/l-1/renew", None, 404, "lease_not_found",
      "unknown-lease")
wrong("lease_renew", "POST", f"/v1/populi/exec/leases/{LONG}/renew", None, 404,
      "lease_not_found", "long-id")
wrong("lease_get", "GET", "/v1/populi/exec/leases/l-1", None, 404, "lease_not_found",
      "unknown-lease")
wrong("lease_get", "GET", "/v1/populi/exec/leases/%20", None, 404, "lease_not_found", "space")
wrong("lease_list", "GET", "/v1/populi/exec/leases?node=nope", None, 404, "unknown_node",
      "unknown-node")
wrong("lease_list", "GET", "/v1/populi/exec/leases?state=live&state=expired", None, 400,
      "bad_request", "state-twice")

# -- the worker's attempts --
wrong("attempt_output", "GET", "/v1/populi/exec/attempts/t-1/one/output", None, 400,
      "bad_request", "attempt-word")
wrong("attempt_output", "GET", "/v1/populi/exec/attempts/t-1/1.0/output", None, 400,
      "bad_request", "attempt-float")
wrong("attempt_output", "GET", "/v1/populi/exec/attempts/t-1/-1/output", None, 404,
      "unknown_attempt", "attempt-negative")
wrong("attempt_output", "GET", "/v1/populi/exec/attempts/t-1/1/output", None, 404,
      "unknown_attempt", "unknown-attempt")
wrong("attempt_output", "GET", f"/v1/populi/exec/attempts/t-1/{'9' * 23}/output", None, 404,
      "unknown_attempt", "attempt-huge")

# -- tasks (nothing here is accepted, so no task process ever starts) --
for _label, _body, _status, _code in [
    ("no-command", {}, 400, "bad_request"),
    ("command-string", {"command": "true"}, 400, "bad_request"),
    ("command-empty", {"command": []}, 400, "bad_request"),
    ("command-empty-program", {"command": [""]}, 400, "bad_request"),
    ("command-number", {"command": [5]}, 400, "bad_request"),
    ("command-nul", {"command": ["true", "a\u0000b"]}, 400, "bad_request"),
    ("command-4097", {"command": ["x"] * 4097}, 400, "bad_request"),
    ("env-list", {"command": ["true"], "env": ["A=1"]}, 400, "bad_request"),
    ("env-number", {"command": ["true"], "env": {"A": 1}}, 400, "bad_request"),
    ("env-257", {"command": ["true"], "env": {f"V{i}": "1" for i in range(257)}}, 400,
     "bad_request"),
    ("env-reserved", {"command": ["true"], "env": {"POPULI_ATTEMPT": "1"}}, 400, "bad_env"),
    ("env-populi-prefix", {"command": ["true"], "env": {"POPULI_ANYTHING": "1"}}, 400,
     "bad_env"),
    ("env-cuda", {"command": ["true"], "env": {"CUDA_VISIBLE_DEVICES": "0"}}, 400, "bad_env"),
    ("env-empty-name", {"command": ["true"], "env": {"": "1"}}, 400, "bad_env"),
    ("env-equals-name", {"command": ["true"], "env": {"A=B": "1"}}, 400, "bad_env"),
    ("gpus-negative", {"command": ["true"], "gpus": -1}, 400, "bad_request"),
    ("gpus-65", {"command": ["true"], "gpus": 65}, 400, "bad_request"),
    ("gpus-string", {"command": ["true"], "gpus": "1"}, 400, "bad_request"),
    ("gpus-bool", {"command": ["true"], "gpus": True}, 400, "bad_request"),
    ("work-class-unknown", {"command": ["true"], "work_class": "mining"}, 400,
     "unknown_work_class"),
    ("node-number", {"command": ["true"], "node": 5}, 400, "bad_request"),
    ("node-unknown", {"command": ["true"], "node": "nope"}, 404, "unknown_node"),
    ("timeout-zero", {"command": ["true"], "timeout_s": 0}, 400, "bad_request"),
    ("timeout-string", {"command": ["true"], "timeout_s": "60"}, 400, "bad_request"),
    ("queue-timeout-negative", {"command": ["true"], "queue_timeout_s": -1}, 400,
     "bad_request"),
]:
    wrong("task_submit", "POST", "/v1/populi/tasks", _body, _status, _code, _label)
# Should these ever be accepted, the task times out before placement: no process either.
wrong("task_submit", "POST", "/v1/populi/tasks",
      {"command": ["true"], "no_fallback": "false", "timeout_s": 1e-300}, 400, "bad_request",
      "no-fallback-string")
wrong("task_submit", "POST", "/v1/populi/tasks",
      {"command": ["true"], "env": {"A": "x\u0000y"}, "timeout_s": 1e-300}, 400, "bad_env",
      "env-value-nul")
for _label, _query in [("limit-zero", "limit=0"), ("limit-over-1000", "limit=1001"),
                       ("limit-word", "limit=all"), ("limit-twice", "limit=1&limit=2")]:
    wrong("task_list", "GET", f"/v1/populi/tasks?{_query}", None, 400, "bad_request", _label)
wrong("task_show", "GET", "/v1/populi/tasks/t-nope", None, 404, "unknown_task", "unknown-task")
wrong("task_show", "GET", f"/v1/populi/tasks/{LONG}", None, 404, "unknown_task", "long-id")
for _label, _query in [("wait-negative", "wait_s=-1"), ("wait-over-600", "wait_s=601"),
                       ("wait-word", "wait_s=soon")]:
    wrong("task_show", "GET", f"/v1/populi/tasks/{{task}}?{_query}", None, 400, "bad_request",
          _label, setup=finished_task)
wrong("task_cancel", "POST", "/v1/populi/tasks/t-nope/cancel", None, 404, "unknown_task",
      "unknown-task")
wrong("task_output", "GET", "/v1/populi/tasks/t-nope/output", None, 404, "unknown_task",
      "unknown-task")
for _label, _query in [("stream-unknown", "stream=stdin"), ("offset-negative", "offset=-1"),
                       ("limit-zero", "limit=0"), ("limit-over-1mib", "limit=1048577"),
                       ("stream-twice", "stream=stdout&stream=stderr")]:
    wrong("task_output", "GET", f"/v1/populi/tasks/{{task}}/output?{_query}", None, 400,
          "bad_request", _label, setup=finished_task)
wrong("task_output", "GET", "/v1/populi/tasks/{task}/output?attempt=first", None, 400,
      "bad_request", "attempt-word", setup=finished_task)

# -- GPUs --
wrong("gpus", "GET", "/v1/populi/gpus?node=nope", None, 404, "unknown_node", "unknown-node")
wrong("gpus", "GET", "/v1/populi/gpus?node=cp&node=cp", None, 400, "bad_request", "node-twice")
wrong("gpu_resume", "POST", "/v1/populi/admin/gpus/nope/GPU-1/resume", None, 404, "unknown_node",
      "unknown-node")
wrong("gpu_resume", "POST", f"/v1/populi/admin/gpus/cp/{'u' * 129}/resume", None, 400,
      "bad_request", "uuid-129")
wrong("gpu_resume", "POST", "/v1/populi/admin/gpus/cp/GPU-1/resume", None, 404,
      "gpu_not_quarantined", "not-quarantined")

# -- agent --
wrong("status", "GET", "/v1/populi/status", None, 401, "signature_missing", "unsigned",
      signer=None)
wrong("settings_show", "GET", "/v1/populi/settings", None, 401, "signature_missing", "unsigned",
      signer=None)
for _label, _body, _code in [
    ("no-changes", {}, "bad_request"),
    ("changes-list", {"changes": [["kill_switch", True]]}, "bad_request"),
    ("changes-empty", {"changes": {}}, "bad_request"),
    ("unknown-setting", {"changes": {"turbo": True}}, "unknown_setting"),
    ("margin-too-big", {"changes": {"lease_expiry_margin_s": 1e9}}, "bad_setting"),
    ("margin-too-small", {"changes": {"lease_expiry_margin_s": 0.1}}, "bad_setting"),
    ("leader-lease-string", {"changes": {"leader_lease_s": "5"}}, "bad_setting"),
    # The election's timing rule (ADR 0011 Decision 3): the lease must end before the
    # minimum election timeout, drift and margin counted.
    ("lease-outlives-election", {"changes": {"leader_lease_s": 9}}, "unsafe_election_timing"),
    ("timeouts-equal", {"changes": {"election_timeout_max_s": 2}}, "unsafe_election_timing"),
    # Each set alone is safe, but a voter on the old timings and a leader on the new ones
    # could overlap: change in steps.
    ("timing-jump", {"changes": {"leader_lease_s": 9, "election_timeout_min_s": 14,
                                 "election_timeout_max_s": 28}}, "unsafe_election_timing"),
    ("cert-lifetime-bool", {"changes": {"node_cert_lifetime_s": True}}, "bad_setting"),
    ("cert-lifetime-1e308", {"changes": {"node_cert_lifetime_s": 1e308}}, "bad_setting"),
    ("switch-string", {"changes": {"remote_exec_enabled": "yes"}}, "bad_setting"),
    ("gates-string", {"changes": {"policy_gates": "inference:overlay"}}, "bad_setting"),
    ("gate-unknown", {"changes": {"policy_gates": ["mining:moon"]}}, "bad_setting"),
    ("gate-number", {"changes": {"policy_gates": [5]}}, "bad_setting"),
]:
    wrong("settings_set", "POST", "/v1/populi/admin/settings", _body, 400, _code, _label)
for _label, _value in [("ttl-too-big", 1e9), ("ttl-string", "30")]:
    wrong("settings_set", "POST", "/v1/populi/admin/settings",
          {"changes": {"max_lease_ttl_s": _value}}, 400, "bad_setting", _label)
wrong("settings_push", "POST", "/v1/populi/records/settings", {}, 400, "bad_request", "no-record",
      signer="node")
wrong("settings_push", "POST", "/v1/populi/records/settings", {"record": 5}, 400, "bad_request",
      "record-number", signer="node")
wrong("settings_push", "POST", "/v1/populi/records/settings", {"record": "populi-record-1.xx"}, 400,
      "record_malformed", "record-garbage", signer="node")
wrong("settings_push", "POST", "/v1/populi/records/settings", NOT_JSON, 400, "bad_json",
      "malformed-json", signer="node")
wrong("settings_push", "POST", "/v1/populi/records/settings", {"record": "x"}, 403,
      "role_required", "operator-is-no-voter")
wrong("gossip_digest", "POST", "/v1/populi/gossip/digest", {}, 400, "bad_gossip", "no-digest",
      signer="node")
wrong("gossip_digest", "POST", "/v1/populi/gossip/digest", {"digest": 5}, 400, "bad_gossip",
      "digest-number", signer="node")
wrong("gossip_digest", "POST", "/v1/populi/gossip/digest", {"digest": {"n-1": [1]}}, 400,
      "bad_gossip", "version-one-number", signer="node")
wrong("gossip_digest", "POST", "/v1/populi/gossip/digest", {"digest": {"": [1, 0]}}, 400,
      "bad_gossip", "empty-node-id", signer="node")
wrong("gossip_digest", "POST", "/v1/populi/gossip/digest", NOT_JSON, 400, "bad_json",
      "malformed-json", signer="node")
wrong("gossip_digest", "POST", "/v1/populi/gossip/digest", {"digest": {}}, 403, "forbidden",
      "operator-does-not-gossip")
wrong("gossip_push", "POST", "/v1/populi/gossip/push", {"records": 5}, 400, "bad_gossip",
      "records-number", signer="node")
wrong("gossip_push", "POST", "/v1/populi/gossip/push", {"records": [""]}, 400, "bad_gossip",
      "empty-record", signer="node")
wrong("gossip_push", "POST", "/v1/populi/gossip/push", {"records": []}, 403, "forbidden",
      "operator-does-not-gossip")
wrong("election", "POST", "/v1/populi/election", NOT_JSON, 400, "bad_json", "malformed-json",
      signer="node")
wrong("election", "POST", "/v1/populi/election", {"messages": 5}, 400, "bad_record",
      "messages-number", signer="node")
wrong("election", "POST", "/v1/populi/election", {"messages": [{"type": "coup", "sender": "x",
      "term": 1}]}, 400, "bad_record", "unknown-type", signer="node")
wrong("election", "POST", "/v1/populi/election", {"messages": [{"type": "prevote_request",
      "sender": "n-someone-else", "term": 1}]}, 403, "election_sender_mismatch",
      "another-sender", signer="node")
wrong("election", "POST", "/v1/populi/election", {"messages": []}, 403, "forbidden",
      "operator-does-not-vote")
wrong("voter_change", "POST", "/v1/populi/admin/voters", {"action": "promote", "node": "cp"}, 400,
      "bad_request", "unknown-action")
wrong("voter_change", "POST", "/v1/populi/admin/voters", {"action": "add"}, 400, "bad_request",
      "no-node")
wrong("voter_change", "POST", "/v1/populi/admin/voters", {"action": "remove", "node": "cp"}, 409,
      "last_voter", "last-voter")
wrong("voter_change", "POST", "/v1/populi/admin/voters", {"action": "add", "node": "cp"}, 403,
      "role_required", "node-is-no-operator", signer="node")
wrong("lease_renew", "POST", "/v1/populi/exec/leases/l-1/renew", {"before_start": "yes"}, 400,
      "bad_request", "before-start-string")
wrong("health", "GET", "/v1/populi/health?verbose=%ff%fe", b"x" * (LIMIT + 1), 413,
      "payload_too_large", "junk-query-and-oversize", signer=None)

# fmt: on


# -- the tests --------------------------------------------------------------------------


def encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=False).encode("utf-8")


@pytest.mark.parametrize("row", ROWS)
async def test_wrong_input_is_a_clear_4xx_and_writes_nothing(
    autojump_clock: trio.testing.MockClock, agent: Agent, tmp_path: Path, row: Wrong
) -> None:
    names = {route.name for route in agent.app.route_table()}
    assert row.route in names
    values = await row.setup(agent, tmp_path) if row.setup else {}
    path = row.path.format(**values) if values else row.path
    content = encode(row.body)
    headers = {"content-type": "application/json"} if content is not None else {}
    before = snapshot(agent)
    async with client_for(agent, row.signer) as client:
        response = await client.request(row.method, path, content=content, headers=headers)
    after = snapshot(agent)
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert response.headers["content-type"] == "application/json"
    error = response.json().get("error")
    assert error is not None, f"{response.status_code}: {text[:300]}"
    assert (response.status_code, error["code"]) == (row.status, row.code), error
    assert re.match(CODE_RE, error["code"])
    message = error["message"]
    assert message and "\n" not in message and "\r" not in message, message
    assert before == after, f"a refused request changed: {differences(before, after)}"


async def test_every_route_has_wrong_input(
    autojump_clock: trio.testing.MockClock, agent: Agent
) -> None:
    """Every route of a real agent has rows, and the 413 row (the contract coverage test
    compares the same route table with the contract)."""
    covered = {param.values[0].route for param in ROWS}
    oversize = {param.values[0].route for param in ROWS if param.id.endswith("-oversize")}
    table = {route.name for route in agent.app.route_table()}
    assert covered == table, f"routes without wrong input: {sorted(table - covered)}"
    assert oversize == table, f"routes without the 413 row: {sorted(table - oversize)}"


@pytest.mark.parametrize("ttl_s", [1e-300, 2.999])
async def test_a_grant_below_the_minimum_ttl_says_ttl_too_short(
    agent: Agent, ttl_s: float, autojump_clock: trio.testing.MockClock
) -> None:
    """A lease can never be born dead: the refusal names ``ttl_too_short`` (beside
    whatever else is wrong with the request), and the minimum itself is not too short."""
    async with client_for(agent, "operator") as client:
        short = await client.post("/v1/populi/exec/leases", json={**_GRANT, "ttl_s": ttl_s})
        least = await client.post("/v1/populi/exec/leases", json={**_GRANT, "ttl_s": 3})
    assert short.status_code == 409, short.text
    assert "ttl_too_short" in short.json()["error"]["details"]["reasons"]
    assert "ttl_too_short" not in least.json()["error"]["details"]["reasons"]
    assert agent.leases.table is not None and not agent.leases.table.leases


async def test_a_malformed_gpu_summary_cannot_break_the_listings(
    autojump_clock: trio.testing.MockClock, agent: Agent
) -> None:
    summary = {"facts_version": "v-bad", "static": {"devices": 5}, "metrics": {}}
    async with client_for(agent, "node") as node, client_for(agent, "operator") as operator:
        beat = await node.post("/v1/populi/heartbeat", json={"gpu": summary})
        gpus = await operator.get("/v1/populi/gpus")
        nodes = await operator.get("/v1/populi/nodes")
    # Either the heartbeat is refused, or what it carried is kept out of the listings.
    assert beat.status_code in (200, 400)
    assert gpus.status_code == 200, gpus.text
    assert nodes.status_code == 200, nodes.text


async def test_a_leave_with_a_bad_reason_does_not_leave(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``leave`` is refused on the control plane before it reads anything, so its wrong
    input is checked on a worker: refused, and the node stays."""
    async with vcluster(tmp_path, workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        await heard_from(cluster, "w1")
        events_before = w1.store.execute("SELECT COUNT(*) AS n FROM events").fetchone()["n"]
        answers = []
        async with cluster.operator_client(via="w1") as op:
            for body in (NOT_JSON, ARRAY, *(encode({"reason": r}) for r in ("r" * 201, "a\nb", 7))):
                answers.append(
                    await op.post(
                        "/v1/populi/leave",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                )
        await trio.sleep(3)  # a few heartbeat periods: nothing follows a refused leave
        events_after = w1.store.execute("SELECT COUNT(*) AS n FROM events").fetchone()["n"]
        codes = [(a.status_code, a.json()["error"]["code"]) for a in answers]
        assert codes == [(400, "bad_json")] * 2 + [(400, "bad_request")] * 3
        assert not w1.leave_state.started
        assert cluster.nodes["w1"].running
        assert cp.registry.lifecycle(w1.node_id).state == "active"
        assert events_after == events_before
