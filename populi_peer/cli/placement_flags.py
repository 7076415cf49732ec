"""What ``populi run`` says a task needs (placement v2) and how ``populi task show``
tells why nodes were refused. Kept apart from ``cmd_run`` so that the flags' parsing has
one home: sizes and model patterns are the core's rules (``core.placement``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from populi_peer.core.placement import check_gpu_model, parse_size
from populi_peer.errors import BadRequest, UsageError

if TYPE_CHECKING:
    from populi_peer.core.messages import TaskView


def add_need_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--gpu-mem",
        default=None,
        metavar="SIZE",
        help="free memory each GPU must have: 40G (10^9), 24GiB (2^30), 16000MiB",
    )
    run.add_argument(
        "--gpu-model",
        default=None,
        metavar="PATTERN",
        help="GPU name to match: H100 (substring), '*4090' (glob), A100,H100 (either)",
    )


def need_payload(args: argparse.Namespace) -> dict[str, Any]:
    """The submit request's ``gpu_mem_bytes`` / ``gpu_model``; :class:`UsageError` (exit
    2) for a bad size or pattern, or either one without ``--gpus N``."""
    out: dict[str, Any] = {}
    try:
        if args.gpu_mem is not None:
            out["gpu_mem_bytes"] = parse_size(args.gpu_mem)
        if args.gpu_model is not None:
            out["gpu_model"] = check_gpu_model(args.gpu_model)
    except BadRequest as exc:
        raise UsageError(f"{exc} ({exc.code})") from None
    if out and args.gpus < 1:
        raise UsageError("--gpu-mem and --gpu-model need --gpus N (N >= 1)")
    return out


def needs_line(task: TaskView) -> str | None:
    """``needs``: the task's per-GPU constraints, or ``None`` when it has none."""
    options = task.options
    parts = []
    if options.gpu_mem_bytes is not None:
        parts.append(f"gpu-mem {options.gpu_mem_bytes / 1e9:g} GB free")
    if options.gpu_model is not None:
        parts.append(f"gpu-model {options.gpu_model}")
    return ", ".join(parts) if parts else None


def rejected_lines(task: TaskView) -> list[str]:
    """One line per node each attempt's placement refused, with its reason codes."""
    return [
        f"  attempt {a.n}: {node}  {','.join(codes)}"
        for a in task.attempts
        for node, codes in a.rejected
    ]


__all__ = ["add_need_flags", "need_payload", "needs_line", "rejected_lines"]
