"""Delay packets with NFQUEUE: a stand-in for ``tc netem delay`` where the kernel has no
netem (``../shared/LAB.md``). Run inside a network namespace, as root:

    python bench/netem.py --queue 7 --delay-ms 75 &
    iptables -A OUTPUT -o eth0 -p udp --dport 51820 -j NFQUEUE --queue-num 7

Every packet the rule queues is held ``--delay-ms`` and then accepted, in arrival order
(a constant delay keeps the order). One thread, one ``select`` loop: the kernel queue's
socket is read when it has packets, and the held ones are released when their time
comes. Loss is not done here: ``iptables -m statistic --mode random --probability P -j
DROP`` does it in the kernel.

Needs ``pip install NetfilterQueue`` (with ``libnetfilter-queue-dev`` to build it).
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    from netfilterqueue import NetfilterQueue

    delay = args.delay_ms / 1000
    held: collections.deque[tuple[float, object]] = collections.deque()

    def hold(packet: object) -> None:
        held.append((time.monotonic() + delay, packet))

    queue = NetfilterQueue()
    queue.bind(args.queue, hold, max_len=65536)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fd = queue.get_fd()
    print(f"netem: queue {args.queue}, delay {args.delay_ms:g} ms", flush=True)
    try:
        while not stop:
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()  # type: ignore[attr-defined]
            wait = max(0.0, held[0][0] - now) if held else 0.5
            try:
                ready, _, _ = select.select([fd], [], [], wait)
            except InterruptedError:
                continue
            if ready:
                queue.run(block=False)
    finally:
        while held:
            held.popleft()[1].accept()  # type: ignore[attr-defined]
        queue.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
