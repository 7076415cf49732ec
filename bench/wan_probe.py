"""Time control-plane calls from one node, as its agent makes them: its own credential,
TLS with the cluster CA, a signed request, the address of the control plane it holds.
Run inside the node's namespace by ``bench/wan.py``; prints one JSON object.

- ``rtt``: signed ``GET /v1/populi/status`` on a kept-alive connection (a heartbeat's
  cost on the wire, without its writes);
- ``cold``: the same on a new connection each time (TCP + TLS 1.3 handshakes first: what
  a heartbeat pays after a connection was lost);
- ``lease``: grant, renew and release of a local lease on this node's GPU (a holder's
  calls: the grant a local attempt asks for, the renewal every TTL/3, the release).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    answer = call()
    return (time.perf_counter() - started) * 1000, answer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["rtt", "cold", "lease"])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    from populi_peer.cli.common import Local, open_local
    from populi_peer.errors import PopuliError

    local: Local = open_local(argparse.Namespace(data_dir=args.data_dir))
    out: dict[str, Any] = {"what": args.what, "ms": [], "errors": []}
    try:
        url, node_id = local.control_plane()
        out["control_plane"] = url
        if args.what in ("rtt", "cold"):
            for _ in range(args.n):
                if args.what == "cold" and local._client is not None:
                    local._client.close()  # the next call opens a new connection
                    local._client = None
                try:
                    ms, _ = timed(
                        lambda: local.client().call(
                            url=url, node_id=node_id, method="GET", path="/v1/populi/status"
                        )
                    )
                    out["ms"].append(round(ms, 2))
                except PopuliError as exc:
                    out["errors"].append(exc.code)
                time.sleep(0.2)
        else:
            me = local.identity.node_id
            out.update({"grant_ms": [], "renew_ms": [], "release_ms": []})

            def post(path: str, payload: dict[str, Any]) -> tuple[float, Any]:
                """A timed lease call to the control plane: (ms, its answer)."""
                return timed(
                    lambda: local.client().call(
                        url=url, node_id=node_id, method="POST", path=path, payload=payload
                    )
                )

            for _ in range(args.n):
                task = f"t-bench-{uuid.uuid4().hex[:12]}"
                try:
                    ms, answer = post(
                        "/v1/populi/exec/leases",
                        {
                            "task_id": task,
                            "attempt": 1,
                            "work_class": "inference",
                            "target": me,
                            "gpus_wanted": 1,
                            "ttl_s": 30,
                        },
                    )
                    out["grant_ms"].append(round(ms, 2))
                    lease = f"/v1/populi/exec/leases/{answer['lease']['lease_id']}"
                    for _ in range(3):
                        ms, _ = post(f"{lease}/renew", {})
                        out["renew_ms"].append(round(ms, 2))
                    ms, _ = post(f"{lease}/release", {"outcome": "completed"})
                    out["release_ms"].append(round(ms, 2))
                except PopuliError as exc:
                    out["errors"].append(f"{exc.code}: {str(exc)[:200]}")
                time.sleep(0.2)
    finally:
        local.close()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
