"""Clients that talk to an agent's ASGI app directly (no sockets)."""

from __future__ import annotations

import httpx

from populi_peer.agent.agent import Agent
from populi_peer.api.client import SignedAuth
from support.contract import async_hook


def signed_client(
    agent: Agent, *, credential=None, recipient: str | None = None, validate: bool = True
) -> httpx.AsyncClient:
    """A client that talks to ``agent``'s ASGI app, signing as the operator by default and
    validating every response against the OpenAPI contract."""
    credential = (
        credential
        or agent.certificates.identity.operator
        or agent.certificates.identity.node_credential
    )
    hooks = {"response": [async_hook]} if validate else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=agent.app),
        base_url="https://cp.virtual",
        auth=SignedAuth(credential, recipient or agent.node_id, agent.clock),
        event_hooks=hooks,
    )


def unsigned_client(agent: Agent, *, validate: bool = True) -> httpx.AsyncClient:
    hooks = {"response": [async_hook]} if validate else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=agent.app),
        base_url="https://cp.virtual",
        event_hooks=hooks,
    )
