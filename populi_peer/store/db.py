"""The data directory's SQLite database: connection, migrations, transactions, meta,
durable request nonces, storage-fault translation. The tables' own statements live in the
repositories beside this module (:mod:`populi_peer.store`).

One file, ``populi.db``, in WAL mode with ``synchronous=FULL`` (safety rule 7: grants,
consumed tokens, lifecycle records and tasks are durable before they are acknowledged; we
use FULL for every commit rather than pick per record, and keep high-rate, derivable state
such as heartbeat arrival times in memory). ``PRAGMA user_version`` is the schema version;
migrations only move forward, one step at a time, each in its own transaction. A database
newer than this code is refused with a clear message.

All access runs on the caller's thread: in the agent that is the trio thread, so one
transaction is atomic with respect to every other task (commits are short).

Failures are translated once, here. A statement the database refuses (a constraint, a bug)
is a :class:`StoreError`; a write the *storage* could not take — the disk is full, the
device failed, the file became read-only, the database stayed locked — is a
:class:`StorageUnavailable` (HTTP 503 ``storage_unavailable``): the same write may succeed
later, so the caller retries. Either way the transaction is rolled back whole (SQLite
rolls some of these back by itself; the store never leaves one open), nothing was
acknowledged, and the caller's in-memory state must not adopt the change. The agent
listens (:attr:`Store.write_listener`) to report a degraded node while writes fail.

Signed requests are never accepted twice, across restarts too (docs/design.md, "Identity
... and peer authentication"). The API binds each authenticated request's (signer, nonce)
to the context it is handled in (:func:`bind_request_nonce`); the first transaction that
request commits inserts the nonce into ``request_nonces`` inside that same commit. So a
request with a durable effect leaves its nonce on disk together with the effect, and a
request that commits nothing (a heartbeat, a renewal) costs no write at all. A replay
finds the row (at authentication, or as a duplicate key in its own transaction, which then
rolls back with nothing written). Rows are pruned once their request could no longer pass
the ``created`` check (created + skew budget).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from populi_peer.errors import (
    DatabaseTooNew,
    NoDataDir,
    StorageUnavailable,
    StoreError,
    Unauthenticated,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Row = TypeVar("_Row", bound="DataclassInstance")

DB_FILE_NAME = "populi.db"

#: Forward migrations; ``MIGRATIONS[i]`` moves the schema from version i to i+1.
MIGRATIONS: list[str] = [
    # 1: identity, membership, registers, events, enrollment.
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE principals (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('node', 'operator')),
        name TEXT NOT NULL,
        public_key TEXT NOT NULL,
        roles TEXT NOT NULL,
        addresses TEXT NOT NULL DEFAULT '[]',
        cert_serial TEXT NOT NULL DEFAULT '',
        cert_not_after_ms INTEGER NOT NULL DEFAULT 0,
        joined_ms INTEGER NOT NULL,
        token_id TEXT NOT NULL DEFAULT '',
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX principals_name ON principals (name);
    CREATE TABLE registers (
        node_id TEXT NOT NULL,
        attribute TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (node_id, attribute)
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_node ON events (node_id, seq);
    CREATE TABLE join_tokens (
        token_id TEXT PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        roles TEXT NOT NULL,
        name TEXT,
        uses_total INTEGER NOT NULL,
        uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
        not_before_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        revoked_ms INTEGER
    );
    CREATE TABLE token_uses (
        token_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (token_id, node_id)
    );
    CREATE TABLE revocation_lists (
        serial INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        stored_ms INTEGER NOT NULL
    );
    CREATE TABLE cluster_records (
        kind TEXT PRIMARY KEY,
        serial INTEGER NOT NULL,
        text TEXT NOT NULL,
        stored_ms INTEGER NOT NULL
    );
    """,
    # 2: execution plane — leases (control plane), tasks (submitter), fences and attempts
    # (worker and local runs), the inbox.
    """
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        holder TEXT NOT NULL,
        state TEXT NOT NULL,
        body TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX leases_task ON leases (task_id);
    CREATE INDEX leases_holder ON leases (holder, state);
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE fences (
        task_id TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE attempts (
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('worker', 'local')),
        submitter TEXT NOT NULL,
        token TEXT NOT NULL,
        lease_id TEXT,
        state TEXT NOT NULL,
        body TEXT NOT NULL,
        result TEXT,
        delivered_ms INTEGER,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (task_id, attempt, role)
    );
    CREATE TABLE inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        sender TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        received_ms INTEGER NOT NULL
    );
    """,
    # 3: a join's outcome (the certificate it issued) kept with its token use, in the same
    # transaction, so that a retried join (same token, same key) gets the first answer.
    """
    ALTER TABLE token_uses ADD COLUMN certificate TEXT;
    """,
    # 4: nonces of signed requests that committed something, kept until their request
    # could no longer pass the skew check (``expires_s``): replays stay refused across
    # restarts.
    """
    CREATE TABLE request_nonces (
        signer TEXT NOT NULL,
        nonce TEXT NOT NULL,
        expires_s INTEGER NOT NULL,
        PRIMARY KEY (signer, nonce)
    ) WITHOUT ROWID;
    CREATE INDEX request_nonces_expiry ON request_nonces (expires_s);
    """,
    # 5: full reports and node-local claims (ADR 0015): when an attempt's release was
    # acknowledged (until then its end rides the node's reports; attempts finished before
    # this version count as released), and the claims this node holds on its own GPUs.
    """
    ALTER TABLE attempts ADD COLUMN released_ms INTEGER;
    UPDATE attempts SET released_ms = updated_ms WHERE state = 'finished';
    CREATE TABLE claims (
        claim_id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        body TEXT NOT NULL,
        made_ms INTEGER NOT NULL
    );
    """,
    # 6: the control-plane election (ADR 0011 Decision 7, ADR 0016): this voter's term
    # and vote (one row), the winning record entries by key, and the digest of every
    # write id the replica has seen (JSON, ranges per term).
    """
    CREATE TABLE election_vote (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        term INTEGER NOT NULL,
        voted_for TEXT,
        digest TEXT NOT NULL
    );
    CREATE TABLE election_entries (
        key_kind TEXT NOT NULL,
        key_a TEXT NOT NULL,
        key_b TEXT NOT NULL,
        write_term INTEGER NOT NULL,
        write_seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (key_kind, key_a, key_b)
    ) WITHOUT ROWID;
    """,
    # 7 (ADR 0017): the replicated records this node has put into its tables, one winning
    # entry per key (``populi_peer.agent.replica``): what the tables hold, item by item, so
    # that a later entry is applied only if it beats it, and a restart catches up.
    """
    CREATE TABLE replica_applied (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,
        entry TEXT NOT NULL,
        PRIMARY KEY (kind, name, key)
    ) WITHOUT ROWID;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

#: SQLite primary result codes that mean the storage failed, not the statement
#: (https://sqlite.org/rescode.html): the same write may succeed once it clears.
_UNAVAILABLE_CODES = {
    5: "busy",  # SQLITE_BUSY: another writer held the database past busy_timeout
    6: "locked",  # SQLITE_LOCKED
    7: "out_of_memory",  # SQLITE_NOMEM
    8: "read_only",  # SQLITE_READONLY: the file, its directory or the mount is read-only
    10: "io_error",  # SQLITE_IOERR (and its extended codes)
    13: "disk_full",  # SQLITE_FULL: no space left, or max_page_count reached
    14: "cannot_open",  # SQLITE_CANTOPEN: e.g. no room for the -wal or -shm file
    15: "locking_protocol",  # SQLITE_PROTOCOL
}
#: errno values of file writes that mean the same for the files beside the database.
_UNAVAILABLE_ERRNOS = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EIO: "io_error",
    errno.EROFS: "read_only",
}


def store_error(exc: sqlite3.Error, what: str) -> StoreError:
    """``exc`` as the error tree has it: :class:`StorageUnavailable` (with ``details
    ["condition"]``: ``disk_full``, ``io_error``, ``read_only``...) when the storage
    failed, else :class:`StoreError`."""
    code = getattr(exc, "sqlite_errorcode", None)
    condition = None if code is None else _UNAVAILABLE_CODES.get(code & 0xFF)
    if condition is not None:
        return StorageUnavailable(f"{what}: {exc}", condition=condition)
    return StoreError(f"{what}: {exc}")


def file_error(exc: OSError, what: str) -> StoreError:
    """A failed write of a file in the data directory, translated like :func:`store_error`."""
    condition = _UNAVAILABLE_ERRNOS.get(exc.errno or 0)
    message = f"{what}: {exc.strerror or exc}"
    if condition is not None:
        return StorageUnavailable(message, condition=condition)
    return StoreError(message)


#: How often (seconds of request time) expired nonces are pruned, inside a commit that
#: happens anyway.
NONCE_PRUNE_INTERVAL_S = 60.0


@dataclass(eq=False)
class RequestNonce:
    """The (signer, nonce) of one authenticated request, bound to the store that records it.

    ``expires_s`` is when the request could no longer pass the ``created`` check (created
    + skew budget); ``now_s`` the wall time it was received at (for pruning). ``recorded``
    turns true once a commit carried the row; ``replayed`` once a commit found it there.
    """

    store: Store
    signer: str
    nonce: str
    expires_s: int
    now_s: float
    recorded: bool = False
    replayed: bool = False


_REQUEST_NONCE: contextvars.ContextVar[RequestNonce | None] = contextvars.ContextVar(
    "populi_request_nonce", default=None
)


@contextlib.contextmanager
def bind_request_nonce(binding: RequestNonce | None) -> Iterator[None]:
    """Handle a request with ``binding`` as its nonce: its first commit records it. Bind
    ``None`` for an unsigned request, so that it never records an outer request's nonce
    (in-process transports run one app's handler inside another's)."""
    token = _REQUEST_NONCE.set(binding)
    try:
        yield
    finally:
        _REQUEST_NONCE.reset(token)


def _replayed(binding: RequestNonce) -> Unauthenticated:
    return Unauthenticated(
        f"request replayed: nonce of {binding.signer} was already used",
        code="signature_replayed",
    )


class Store:
    """A connection to ``<data dir>/populi.db``."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                uri = f"file:{path}?mode=ro"
                self.conn = sqlite3.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout = 5000")
            if not readonly:
                self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise store_error(exc, f"cannot open database {path}") from exc
        self._depth = 0
        self._nonces_pruned_s = 0.0
        # Meta values are read on every request (term, control plane); cache them and
        # forget the cache whenever this connection commits (any commit may change meta).
        self._meta_cache: dict[str, str | None] = {}
        #: Told of every write transaction's outcome: ``None`` after a commit, the
        #: :class:`StorageUnavailable` after a write the storage could not take.
        self.write_listener: Callable[[StoreError | None], None] | None = None

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        create: bool = False,
        readonly: bool = False,
        migrate_ok: bool = True,
    ) -> Store:
        path = data_dir / DB_FILE_NAME
        if not path.exists() and not create:
            raise NoDataDir(
                f"{data_dir} is not a Populi data directory (no {DB_FILE_NAME}); "
                "run 'populi init' or 'populi join' first, or pass --data-dir"
            )
        if create:
            data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(data_dir, 0o700)
        store = cls(path, readonly=readonly)
        try:
            store.migrate(allow_write=migrate_ok and not readonly)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.conn.close()

    # -- schema ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, *, allow_write: bool = True) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise DatabaseTooNew(
                f"database {self.path} has schema version {version}, newer than this Populi "
                f"understands ({SCHEMA_VERSION}); upgrade Populi, or use another --data-dir"
            )
        if version == SCHEMA_VERSION:
            return
        if not allow_write:
            raise StoreError(
                f"database {self.path} has schema version {version}; start the agent once to "
                f"upgrade it to {SCHEMA_VERSION}",
                code="database_too_old",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                for statement in _split_sql(MIGRATIONS[target - 1]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {target}")

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (nested calls join the outer one)."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        # A transaction a failed rollback left open would refuse every BEGIN after it.
        self._rollback()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._failed(store_error(exc, f"database {self.path} is busy or broken")) from exc
        self._depth = 1
        try:
            binding = self._record_request_nonce()
            yield self.conn
        except sqlite3.Error as exc:
            self._depth = 0
            self._rollback()
            raise self._failed(store_error(exc, "database error")) from exc
        except BaseException as exc:
            self._depth = 0
            self._rollback()
            if isinstance(exc, StorageUnavailable):
                self._failed(exc)
            raise
        self._depth = 0
        self._meta_cache.clear()
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # SQLite may have rolled back by itself (SQLITE_FULL, SQLITE_IOERR) or left
            # the transaction open (SQLITE_BUSY): either way nothing of it is kept.
            self._rollback()
            raise self._failed(store_error(exc, f"cannot commit to {self.path}")) from exc
        if binding is not None:
            binding.recorded = True
        if self.write_listener is not None:
            self.write_listener(None)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def _failed(self, error: StoreError) -> StoreError:
        if isinstance(error, StorageUnavailable) and self.write_listener is not None:
            self.write_listener(error)
        return error

    def _record_request_nonce(self) -> RequestNonce | None:
        """Inside a transaction just begun: insert the nonce of the request being handled,
        if it has one for this store and no earlier commit carried it. A duplicate is a
        replay: refused, and the transaction rolls back with nothing written."""
        binding = _REQUEST_NONCE.get()
        if binding is None or binding.store is not self or binding.recorded:
            return None
        if binding.replayed:
            raise _replayed(binding)
        try:
            self.conn.execute(
                "INSERT INTO request_nonces (signer, nonce, expires_s) VALUES (?, ?, ?)",
                (binding.signer, binding.nonce, binding.expires_s),
            )
        except sqlite3.IntegrityError:
            binding.replayed = True
            raise _replayed(binding) from None
        if binding.now_s - self._nonces_pruned_s >= NONCE_PRUNE_INTERVAL_S:
            self._nonces_pruned_s = binding.now_s
            self.conn.execute(
                "DELETE FROM request_nonces WHERE expires_s < ?", (int(binding.now_s),)
            )
        return binding

    # -- request nonces -------------------------------------------------------------------

    def nonce_used(self, signer: str, nonce: str) -> bool:
        """Whether a commit already carried this request nonce (a replay)."""
        row = self.execute(
            "SELECT 1 FROM request_nonces WHERE signer = ? AND nonce = ?", (signer, nonce)
        ).fetchone()
        return row is not None

    def request_nonce(
        self, signer: str, nonce: str, *, expires_s: float, now_s: float
    ) -> RequestNonce:
        """A binding for :func:`bind_request_nonce` that this store records."""
        return RequestNonce(self, signer, nonce, int(expires_s) + 1, now_s)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            error = store_error(exc, "database error")
            # Inside a transaction the transaction reports it, once.
            raise (error if self._depth else self._failed(error)) from exc

    # -- meta -----------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        if key not in self._meta_cache or self._depth:
            row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            value = None if row is None else str(row[0])
            if self._depth:
                return default if value is None else value
            self._meta_cache[key] = value
        cached = self._meta_cache[key]
        return default if cached is None else cached

    def require_meta(self, key: str) -> str:
        value = self.get_meta(key)
        if value is None:
            raise StoreError(
                f"data directory is incomplete: no {key!r}; re-run init or join", code="no_identity"
            )
        return value

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def insert_meta(self, values: dict[str, str]) -> None:
        """Add keys that must not exist yet (a fresh data directory: ``populi init`` and
        ``join``); one already there is a :class:`StoreError` and nothing is written."""
        with self.transaction():
            for key, value in values.items():
                self.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta_json(self, key: str, default: Any = None) -> Any:
        raw = self.get_meta(key)
        return default if raw is None else json.loads(raw)

    def set_meta_json(self, key: str, value: Any) -> None:
        self.set_meta(key, json.dumps(value, sort_keys=True))


def from_row(cls: type[_Row], row: sqlite3.Row, **decode: Callable[[Any], Any]) -> _Row:
    """The dataclass ``cls`` built from ``row``, whose columns are named like its fields:
    each field takes its column's value, passed through ``decode[field]`` where the
    column holds an encoded form (JSON text, a fencing token's string)."""
    names = _columns(cls, frozenset(decode))
    return cls(**{name: decode.get(name, _as_stored)(row[name]) for name in names})


@functools.cache
def _columns(cls: type[DataclassInstance], decoded: frozenset[str]) -> tuple[str, ...]:
    """The field names of ``cls`` (its columns), found once per class and set of decoded
    fields, each of which must be one of them."""
    names = tuple(field.name for field in fields(cls))
    unknown = decoded - set(names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r} to decode")
    return names


def _as_stored(value: Any) -> Any:
    return value


def json_tuple(text: str) -> tuple[Any, ...]:
    """A column that holds a JSON list, read as a tuple (``from_row``'s decoder)."""
    return tuple(json.loads(text))


def _split_sql(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


__all__ = [
    "DB_FILE_NAME",
    "MIGRATIONS",
    "NONCE_PRUNE_INTERVAL_S",
    "SCHEMA_VERSION",
    "RequestNonce",
    "Store",
    "bind_request_nonce",
    "file_error",
    "from_row",
    "json_tuple",
    "store_error",
]
