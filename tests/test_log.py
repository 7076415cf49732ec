"""The agent's log: JSON for files and services, a short human form on a terminal, and
the access log (one line per request, heartbeats included) only at debug."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from trio.testing import MockClock

from populi_peer.agent.agent import Agent
from populi_peer.log import NOTICE, get_logger, log, resolve_logging, setup_logging
from support.clients import signed_client, unsigned_client


@pytest.mark.parametrize(
    ("fmt", "level", "tty", "expected"),
    [
        ("auto", "auto", True, ("text", "notice")),  # populi agent & in a terminal
        ("auto", "auto", False, ("json", "info")),  # a file, a pipe, journald
        ("json", "auto", True, ("json", "info")),  # JSON is for machines, even here
        ("text", "auto", False, ("text", "info")),
        ("auto", "debug", True, ("text", "debug")),
        ("json", "warning", False, ("json", "warning")),
    ],
)
def test_auto_is_text_at_notice_on_a_terminal_and_json_at_info_elsewhere(
    fmt: str, level: str, tty: bool, expected: tuple[str, str]
) -> None:
    assert resolve_logging(fmt, level, tty=tty) == expected


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``setup_logging`` configures the ``populi`` and ``hypercorn.error`` loggers."""
    loggers = [logging.getLogger(name) for name in ("populi", "hypercorn.error")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        yield
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def test_notice_passes_where_info_stays_quiet(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging(fmt="text", level="notice", stream=out)
    logger = get_logger("agent")
    log(logger, logging.INFO, "lease granted", lease_id="l-1")
    log(logger, NOTICE, "agent stopping")
    log(logger, logging.WARNING, "control plane unreachable", url="https://x")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("notice  agent: agent stopping")
    assert "warning agent: control plane unreachable url=https://x" in lines[1]
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_json_lines_name_the_notice_level(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging(fmt="json", level="info", stream=out)
    log(get_logger("agent"), NOTICE, "agent stopping")
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["level"] == "notice"


async def test_the_access_log_is_debug(
    autojump_clock: MockClock, virtual_agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request the API answers is one ``request`` line, at debug: a terminal running
    ``populi agent`` is not flooded by heartbeats."""
    caplog.set_level(logging.DEBUG, logger="populi.api")
    async with signed_client(virtual_agent) as client:
        assert (await client.get("/v1/populi/status")).status_code == 200
    async with unsigned_client(virtual_agent) as client:
        assert (await client.get("/v1/populi/status")).status_code == 401
    requests = [r for r in caplog.records if r.getMessage() == "request"]
    assert len(requests) == 2
    assert {r.levelno for r in requests} == {logging.DEBUG}
