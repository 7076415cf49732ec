"""The task directory: file names, atomic writes, the deadline file and bounded output tails.

Layout of ``TASK_DIR``::

    spec.json        TaskSpec, written once by the launcher
    deadline         lease deadline, text float seconds on CLOCK_BOOTTIME (launcher)
    cancel           present = stop the task (launcher)
    state.json       SupervisorState (supervisor)
    stdout, stderr   bounded output tails (supervisor), see TailWriter
    supervisor.log   the supervisor's own log

Every file another process reads is replaced atomically (write a temporary file, then
``os.replace``), so a reader sees the old or the new content, never half of one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPEC = "spec.json"
DEADLINE = "deadline"
CANCEL = "cancel"
STATE = "state.json"
LOG = "supervisor.log"

_HEADER_FORMAT = b"POPULI-TAIL v1 cap=%020d base=%020d\n"
HEADER_LEN = len(_HEADER_FORMAT % (0, 0))
#: Smallest amount a tail file grows past its cap before it is compacted: compaction
#: copies ``cap`` bytes, so growing by at least that much keeps the copying linear.
_MIN_SLACK_BYTES = 64 * 1024


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` so that readers never see a partial file.

    ``durable`` also fsyncs the file and its directory (for final records that must
    survive a power cut); the deadline and intermediate states do not need it, since they
    mean nothing after a reboot.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any, *, durable: bool = False) -> None:
    write_atomic(
        path, json.dumps(value, sort_keys=True, indent=1).encode() + b"\n", durable=durable
    )


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ``OSError`` or ``ValueError`` when missing or garbled."""
    with open(path, "rb") as f:
        return json.loads(f.read())


def format_deadline(deadline_boot: float) -> bytes:
    return repr(float(deadline_boot)).encode() + b"\n"


def read_deadline(path: Path) -> float | None:
    """The deadline in ``path``, or None when it is missing, garbled or not finite.

    None means expired to the supervisor: without a readable deadline it cannot prove
    the lease is live, so it stops the task (fail safe).
    """
    try:
        with open(path, "rb") as f:
            text = f.read(128)
        value = float(text.decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if math.isfinite(value) else None


class TailWriter:
    """Keeps the last ``cap_bytes`` of a stream in one file, and counts all of it.

    The file is a fixed-size ASCII header (``POPULI-TAIL v1 cap=N base=B``) followed by
    the stream's bytes from offset ``B`` on. Data is appended; when more than
    ``cap + max(cap, 64 KiB)`` bytes are held, the last ``cap`` bytes are copied to a new
    file with a new base, which replaces the old one atomically. A reader therefore sees
    one consistent (base, bytes) pair per open file, and :func:`read_tail` exposes only
    the last ``cap`` bytes. :meth:`close` compacts to exactly the last ``cap`` bytes.
    """

    def __init__(self, path: Path, cap_bytes: int) -> None:
        self.path = path
        self.cap_bytes = cap_bytes
        self._slack = max(cap_bytes, _MIN_SLACK_BYTES)
        self.base = 0
        self.held = 0
        self.total_bytes = 0
        #: The first storage failure (a full disk...); from then on bytes are only counted.
        self.error: OSError | None = None
        self._fd = -1
        self._guard(lambda: self._replace_with(0, b""))

    @property
    def kept_bytes(self) -> int:
        return min(self.held, self.cap_bytes)

    def write(self, chunk: bytes) -> None:
        """Store ``chunk``; never raises: a storage failure is kept in :attr:`error`."""
        self.total_bytes += len(chunk)
        self._guard(lambda: self._append(chunk))

    def close(self) -> None:
        """Compact to the last ``cap`` bytes, make them durable, and close the file."""
        self._guard(self._finish)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _guard(self, action: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            action()
        except OSError as exc:
            self.error = exc

    def _append(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.held += len(chunk)
        if self.held > self.cap_bytes + self._slack:
            self._compact()

    def _finish(self) -> None:
        if self.held > self.cap_bytes:
            self._compact()
        os.fsync(self._fd)

    def _compact(self) -> None:
        keep = min(self.held, self.cap_bytes)
        tail = _pread_all(self._fd, keep, HEADER_LEN + self.held - keep)
        new_base = self.base + self.held - keep
        self._replace_with(new_base, tail)
        self.base = new_base
        self.held = keep

    def _replace_with(self, base: int, data: bytes) -> None:
        write_atomic(self.path, (_HEADER_FORMAT % (self.cap_bytes, base)) + data)
        new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = new_fd


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def read_tail(path: Path, offset: int, limit: int) -> tuple[bytes, int, int]:
    """Read kept output of a stream from absolute ``offset``: ``(data, next_offset, total)``.

    ``total`` counts every byte the stream produced. Bytes before the kept tail are gone:
    an ``offset`` before it reads from the start of the tail, so ``next_offset -
    len(data)`` says where the data begins. A missing file reads as an empty stream.
    """
    offset = max(0, offset)
    limit = max(0, limit)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return b"", 0, 0
    with f:
        header = f.read(HEADER_LEN)
        cap, base = _parse_header(header)
        held = os.fstat(f.fileno()).st_size - HEADER_LEN
        total = base + max(0, held)
        start = min(max(offset, base, total - cap), total)
        f.seek(HEADER_LEN + start - base)
        data = f.read(min(limit, total - start))
    return data, start + len(data), total


def _parse_header(header: bytes) -> tuple[int, int]:
    parts = header.split()
    if len(header) != HEADER_LEN or len(parts) != 4 or parts[0] != b"POPULI-TAIL":
        raise ValueError("not a populi output tail")
    return int(parts[2].removeprefix(b"cap=")), int(parts[3].removeprefix(b"base="))
