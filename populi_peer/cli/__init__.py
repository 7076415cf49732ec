"""The ``populi`` command."""

from populi_peer.cli.main import main

__all__ = ["main"]
