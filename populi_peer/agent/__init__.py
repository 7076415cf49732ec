"""The trio shell: the agent and its services."""

from __future__ import annotations

from pathlib import Path

from populi_peer.agent.agent import Agent
from populi_peer.clock import SystemClock
from populi_peer.config import Config
from populi_peer.discovery.site import Site, with_site


def build_agent(*, data_dir: Path, config: Config) -> Agent:
    """The agent as ``populi agent`` runs it: real clock, TLS network, HTTPS server, this
    machine's interfaces (its tunnel networks count as overlay: docs/wan.md)."""
    site = Site.detect()
    return Agent(data_dir=data_dir, config=with_site(config, site), clock=SystemClock(), site=site)


__all__ = ["Agent", "build_agent"]
