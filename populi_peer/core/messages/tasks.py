"""Tasks on their submitter (``agent/submitter.py``) and attempt output on a worker
(``agent/worker.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, get_args

from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Int,
    JsonObject,
    Message,
    Nested,
    Nullable,
    Num,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import WORK_CLASS, OutputChunk, TaskView
from populi_peer.core.placement import check_gpu_model
from populi_peer.core.policy import WorkClass
from populi_peer.core.wire import check_command, check_cwd, check_env
from populi_peer.errors import BadRequest

#: The most GPUs one task may ask for.
MAX_TASK_GPUS: Final = 64
Where = Literal["remote", "local"]


@message
class TaskSubmitRequest(Message):
    """``TaskSubmitRequest``: ``command`` and ``env`` are checked by the rule every route
    shares (:mod:`populi_peer.core.wire`: the same a worker applies to a handoff)."""

    command: tuple[str, ...] = wire(Seq(Text(), min_items=1))
    env: Mapping[str, str] = wire(JsonObject(), default_factory=dict)
    gpus: int = wire(Int(minimum=0, maximum=MAX_TASK_GPUS), default=0)
    #: Default: inference with GPUs, agent without (:meth:`chosen_work_class`).
    work_class: WorkClass | None = wire(WORK_CLASS, omit_none=True)
    #: The only node the task may run on (id or unique name; the submitter resolves it).
    node: str | None = wire(Nullable(Text(min_len=1)), default=None)
    #: When ``node`` cannot take the task, it may run on the submitter instead.
    node_fallback: bool = wire(Bool(), default=False)
    no_fallback: bool = wire(Bool(), default=False)
    queue_timeout_s: float | None = wire(Nullable(Num(above=0)), default=None)
    timeout_s: float | None = wire(Nullable(Num(above=0)), default=None)
    #: The directory the task runs in, on whichever node runs it (absolute).
    cwd: str | None = wire(Nullable(Text(min_len=1)), default=None)
    #: ``--gpu-mem``: free memory each GPU must have, in bytes (needs ``gpus`` >= 1).
    gpu_mem_bytes: int | None = wire(Nullable(Int(minimum=1)), default=None)
    #: ``--gpu-model``: a pattern on the verified GPU name (``core.placement``).
    gpu_model: str | None = wire(Nullable(Text(min_len=1)), default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", check_command(list(self.command)))
        object.__setattr__(self, "env", check_env(self.env))
        check_cwd(self.cwd)
        if self.node_fallback and self.node is None:
            raise BadRequest("--node-fallback needs --node", code="bad_request")
        if self.gpu_model is not None:
            check_gpu_model(self.gpu_model)
        if self.gpus == 0 and (self.gpu_mem_bytes is not None or self.gpu_model is not None):
            raise BadRequest(
                "gpu_mem_bytes and gpu_model need gpus >= 1", code="bad_request", field="gpus"
            )

    def chosen_work_class(self) -> WorkClass:
        if self.work_class is not None:
            return self.work_class
        return "inference" if self.gpus else "agent"


@message
class TaskAnswer(Message):
    """``TaskAnswer``: task submit and show."""

    task: TaskView = wire(Nested(TaskView))


@message
class TaskListAnswer(Message):
    tasks: tuple[TaskView, ...] = wire(Seq(Nested(TaskView)))


@message
class TaskCancelAnswer(Message):
    task: TaskView = wire(Nested(TaskView))
    #: False when the task had already finished.
    cancelled: bool = wire(Bool())


@message
class OutputChunkAnswer(Message):
    """``OutputChunkAnswer``: output of an attempt this node runs or ran as a worker."""

    chunk: OutputChunk = wire(Nested(OutputChunk), flatten=True)


@message
class TaskOutputAnswer(Message):
    """``TaskOutputAnswer``: a chunk of one attempt's output, and where the task stands."""

    chunk: OutputChunk = wire(Nested(OutputChunk), flatten=True)
    #: 0 while the task has no attempt.
    attempt: int = wire(Int(minimum=0))
    where: Where | None = wire(Nullable(Choice(get_args(Where))))
    #: The attempt's node; absent while the task has no attempt.
    node: str | None = wire(Text(), omit_none=True)
    task_state: str = wire(Text())
    #: The task's number of attempts so far, whichever attempt this chunk is of.
    latest_attempt: int = wire(Int(minimum=0))


__all__ = [
    "MAX_TASK_GPUS",
    "OutputChunkAnswer",
    "TaskAnswer",
    "TaskCancelAnswer",
    "TaskListAnswer",
    "TaskOutputAnswer",
    "TaskSubmitRequest",
]
