"""Signed requests from inside one host of the lab: this process cannot reach the agents
(``LabHost.reachable`` is false), so a :class:`Caller` keeps a Python process in that host's
namespace (``ip netns exec``) that makes each request for it, and answers what came back.

    with Caller(mesh, "wa") as wa:
        status, body = wa.call("v2", "POST", "/v1/populi/exec/leases", json={...})
        status, body = wa.call("v2", "GET", "/v1/populi/status", operator=True)

Each request is signed with the host's own node key (``operator=True``: the operator's,
which ``cp``'s data directory holds), made over real TLS to the node it names (the
cluster CA; the handshake proves whom it reached), on a fresh connection (a kept-alive
one across a partition hangs until its timeout), and checked against the OpenAPI contract
(``support.contract``) as :meth:`support.mesh.Mesh.client` checks every answer. A request
that gets no answer (refused, timed out) comes back as status ``None`` with the error.

The process in the namespace is this file run as a script: one JSON request a line on
its stdin, one JSON answer a line on its stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

TESTS = Path(__file__).resolve().parents[1]


class CallerError(AssertionError):
    """The caller process failed, or an answer broke the contract."""


class Caller:
    """Signed requests from host ``name``'s namespace (see the module's docstring)."""

    def __init__(self, mesh: Any, name: str) -> None:
        self.mesh = mesh
        self.name = name
        self.proc = subprocess.Popen(
            mesh.host.argv(name, [sys.executable, str(Path(__file__).resolve())]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def call(
        self,
        to: str,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        operator: bool = False,
        timeout_s: float = 5.0,
    ) -> tuple[int | None, dict[str, Any]]:
        """One request to node ``to``: (status, JSON body); (``None``, ``{"error": ...}``)
        when no answer came."""
        node, cp = self.mesh[to], self.mesh["cp"]
        request = {
            "ca": str(cp.data_dir / "tls" / "ca.crt"),
            "url": f"https://{node.listen}",
            "node_id": node.node_id,
            "signer": str((cp if operator else self.mesh[self.name]).data_dir),
            "operator": operator,
            "method": method,
            "path": path,
            "json": json_body,
            "timeout_s": timeout_s,
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise CallerError(f"the caller in {self.name} is gone: {exc}") from None
        line = self.proc.stdout.readline()
        if not line:
            raise CallerError(f"the caller in {self.name} exited {self.proc.wait()}")
        answer = json.loads(line)
        if "contract" in answer:
            raise CallerError(f"{method} {path} at {to}: {answer['contract']}")
        return answer["status"], answer["body"]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # the script ends at the end of its input
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # by its PID
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> Caller:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def serve() -> None:
    """The script's loop (inside the namespace): a request a line in, an answer a line out."""
    sys.path.insert(0, str(TESTS))
    import httpx

    from support.mesh import credential_of, signed_client

    # Each key is read once (a data directory whose agent was SIGKILLed keeps the
    # database's write-ahead log, which a read-only open may wait on).
    credentials: dict[tuple[str, bool], Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        signer = (request["signer"], request["operator"])
        if signer not in credentials:
            credentials[signer] = credential_of(Path(signer[0]), operator=signer[1])
        credential = credentials[signer]
        answer: dict[str, Any]
        try:
            with signed_client(
                Path(request["ca"]),
                request["url"],
                request["node_id"],
                credential,
                timeout=request["timeout_s"],
            ) as client:
                response = client.request(request["method"], request["path"], json=request["json"])
            answer = {"status": response.status_code, "body": response.json()}
        except httpx.HTTPError as exc:
            answer = {"status": None, "body": {"error": f"{type(exc).__name__}: {exc}"}}
        except Exception as exc:  # the contract's check (openapi-core's own errors)
            answer = {"contract": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()


__all__ = ["Caller", "CallerError"]
