"""Populi: the machines you own as one GPU mesh.

The package is split by what a module may touch:

- ``populi_peer.core``: pure protocol logic (no trio, sockets, clocks or global random).
- ``populi_peer.agent``: the trio shell that drives the core.
- ``populi_peer.api``: the HTTP API (ASGI app, server, peer client).
- ``populi_peer.gpu``: NVML probe, replay backend, health verdicts.
- ``populi_peer.exec``: task processes and their supervisors.
- ``populi_peer.testing``: clocks, memory network and virtual cluster for tests.
- ``populi_peer.cli``: the ``populi`` command.

Importing this package is cheap: it imports nothing but the error tree.
"""

from populi_peer.errors import PopuliError

__version__ = "0.1.0"

#: Version of every message on the wire. Version N talks to N-1; unknown fields are ignored.
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "PopuliError", "__version__"]
