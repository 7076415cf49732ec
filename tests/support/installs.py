"""Nodes of a real-process mesh that run ``populi`` from another install: the single file
(``E2E_POPULI_BINARY``, made by ``scripts/build-binary``) or an older version's
virtual environment (docs/adr/0013-single-file-executable.md)."""

from __future__ import annotations

from collections.abc import Sequence

from support.mesh import Host
from support.procs import POPULI


class Installs(Host):
    """Loopback, with each node's ``populi`` taken from the install named for it (this
    checkout's package where none is): an upgrade changes :attr:`commands`."""

    def __init__(self, commands: dict[str, list[str] | None], *, reachable: bool = True) -> None:
        self.commands = commands
        #: False where the control plane's install is another version: this process's
        #: own storage code may not read its database (schema), so the mesh uses the
        #: control plane's own CLI instead of its operator API.
        self.reachable = reachable

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        command = self.commands.get(name)
        if command and list(argv[: len(POPULI)]) == POPULI:
            return [*command, *argv[len(POPULI) :]]
        return list(argv)


__all__ = ["Installs"]
