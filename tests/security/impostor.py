"""A retired node's rogue server, for the man-in-the-middle lab (``test_mitm_lab.py``).

It serves HTTPS with the retired node's own certificate and key (valid, and chaining to
the cluster CA) and answers what a worker and a submitter ask the control plane the way
an attacker would like them answered:

- ``POST /v1/populi/exec/leases/{id}/renew`` and ``GET /v1/populi/exec/leases/{id}``:
  the lease from ``--forge`` (a JSON object lease id -> lease record, written by the
  test while the lease was live), state ``live`` — a renewal that never happened;
- ``GET /v1/populi/nodes``: every node of ``--forge``'s ``nodes`` list, free;
- ``POST /v1/populi/exec/leases``: a grant of a made-up lease on the asked node;
- anything else: 503.

Every request it receives is appended to ``--log`` (``METHOD PATH``), so the test can
show that none arrived. It writes ``--ready`` once it listens.

    python tests/security/impostor.py --listen IP:PORT --cert C --key K \\
        --forge F --log L --ready R
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from populi_peer.api.server import answer_lifespan

LEASE_PATH = re.compile(r"^/v1/populi/exec/leases/([^/]+)(/renew)?$")


def answer(method: str, path: str, forge: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    leases: dict[str, Any] = forge.get("leases", {})
    match = LEASE_PATH.match(path)
    if match and match.group(1) in leases:
        return 200, {"v": 1, "lease": {**leases[match.group(1)], "state": "live"}}
    if method == "GET" and path == "/v1/populi/nodes":
        return 200, {"v": 1, "nodes": forge.get("nodes", [])}
    if method == "POST" and path == "/v1/populi/exec/leases":
        return 200, {"v": 1, "lease": forge.get("grant", {})}
    return 503, {"v": 1, "error": {"code": "unavailable", "message": "try later"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--listen", "--cert", "--key", "--forge", "--log", "--ready"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    log = Path(args.log)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        method, path = scope["method"], scope["path"]
        with log.open("a") as handle:
            handle.write(f"{method} {path}\n")
        while (await receive()).get("more_body"):
            pass
        try:
            forge = json.loads(Path(args.forge).read_text())
        except (OSError, ValueError):
            forge = {}
        status, body = answer(method, path, forge)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    config = Config()
    config.bind = [args.listen]
    config.certfile = args.cert
    config.keyfile = args.key
    config.accesslog = None
    config.keep_alive_max_requests = 100000

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, app, config)
            Path(args.ready).write_text("ready\n")

    trio.run(run)


if __name__ == "__main__":
    main()
