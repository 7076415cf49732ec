"""Logging: JSON lines on stderr for files and services, short text lines on a terminal.

Every JSON line has ``ts`` (UTC ISO time), ``level``, ``logger``, ``event`` (the message)
and the fields passed with ``extra={"fields": {...}}``; inside a request the correlation id
(``cid``) is added from a context variable, so every line a request causes can be found.
Secrets (token texts, private keys) are never passed to the logger; ``redact`` exists for
the places that handle them.

Levels: ``debug`` (every request the API answered, heartbeats included), ``info`` (what the
protocol did: tasks, leases, records), ``notice`` (what an operator watching a terminal
wants to see: the agent starts and stops, this node's lifecycle changes, the control plane
goes and comes back, storage recovers, a node joins, new cluster records), ``warning``,
``error``. The format and level default to ``auto`` (:func:`resolve_logging`): on a
terminal, text at ``notice``; otherwise (a file, a pipe, journald) JSON at ``info``.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
from typing import Any

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "populi_correlation_id", default=None
)

#: Between info and warning (syslog's notice): what matters to a person at a terminal.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("auto", "debug", "info", "notice", "warning", "error")


def resolve_logging(fmt: str, level: str, *, tty: bool) -> tuple[str, str]:
    """The (format, level) an agent logs with: ``auto`` is text at ``notice`` when it logs
    to a terminal (``tty``), JSON at ``info`` otherwise; an explicit ``json`` keeps
    ``info`` on a terminal too (JSON is for machines)."""
    resolved = fmt if fmt != "auto" else ("text" if tty else "json")
    if level != "auto":
        return resolved, level
    return resolved, "notice" if (tty and resolved == "text") else "info"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid:
            line["cid"] = cid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        name = record.name.removeprefix("populi.")
        text = f"{ts} {record.levelname.lower():7} {name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        cid = correlation_id.get()
        if cid:
            text += f" cid={cid}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(*, fmt: str = "json", level: str = "info", stream: Any = None) -> None:
    root = logging.getLogger("populi")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # hypercorn logs through its own loggers; route its errors into ours.
    for name in ("hypercorn.error",):
        lib = logging.getLogger(name)
        lib.handlers = [handler]
        lib.setLevel(logging.WARNING)
        lib.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"populi.{name}")


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})


def redact(secret: str, keep: int = 6) -> str:
    return secret[:keep] + "…" if len(secret) > keep else "…"


__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "NOTICE",
    "correlation_id",
    "get_logger",
    "log",
    "redact",
    "resolve_logging",
    "setup_logging",
]
