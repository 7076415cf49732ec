"""The storage layer as a whole: the only SQL in the package, every write inside a
transaction, and a caller's transaction groups writes of several repositories."""

from __future__ import annotations

import ast
import contextlib
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from enrollment.keys import generate_key, node_id_for
from enrollment.tokens import mint_token
from populi_peer.core.fencing import FencingToken
from populi_peer.core.tasks import Task
from populi_peer.errors import StoreError
from populi_peer.store import Store, bind_request_nonce
from populi_peer.store.attempts import AttemptIdentity, Attempts
from populi_peer.store.db import _columns, from_row, json_tuple
from populi_peer.store.events import EventLog
from populi_peer.store.inbox import InboxMessages
from populi_peer.store.leases import Leases
from populi_peer.store.members import Members
from populi_peer.store.records import SignedRecords
from populi_peer.store.registers import Registers
from populi_peer.store.revocations import RevocationLists
from populi_peer.store.tasks import TaskRecord, Tasks
from populi_peer.store.tokens import JoinTokens
from support.members import node_member

ROOT = Path(__file__).resolve().parents[2]
SQL = re.compile(
    r"\b(SELECT\s+.+\s+FROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
    r"CREATE\s+TABLE|ALTER\s+TABLE)\b",
    re.I | re.S,
)
MEMBER = node_member("alpha", now_ms=1, roles=("worker",), node_id="n-a")

TASK = Task.new(
    "t-1", command=("true",), env={}, gpus_wanted=0, work_class="agent", created_wall_ms=1
)
TOKEN = mint_token(
    signing_key=generate_key(),
    cluster_id="home",
    contacts=["10.0.0.1:7070"],
    recipients=[node_id_for(generate_key().public_key())],
    roles=["worker"],
    now_ms=1_700_000_000_000,
    ttl_ms=3_600_000,
    token_id=bytes(16),
    token_seed=bytes(32),
)[1]


def test_no_sql_outside_the_storage_layer() -> None:
    """Every string literal of ``populi_peer`` that holds a statement is in
    ``populi_peer/store/`` (``testing/`` holds test doubles only)."""
    found = []
    for path in sorted((ROOT / "populi_peer").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("populi_peer/store/", "populi_peer/testing/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if SQL.search(node.value):
                    found.append(f"{rel}:{node.lineno}")
    assert found == []


WRITES: dict[str, Callable[[Store], object]] = {
    "members.insert": lambda s: Members(s).insert(MEMBER),
    "members.upsert": lambda s: Members(s).upsert(MEMBER),
    "members.delete": lambda s: Members(s).delete("n-a"),
    "members.replace_all": lambda s: Members(s).replace_all([MEMBER], version=2),
    "members.bump_version": lambda s: Members(s).bump_version(),
    "events.append": lambda s: EventLog(s).append(at_ms=1, node_id="n-a", kind="k", actor="a"),
    "tokens.add": lambda s: JoinTokens(s).add(TOKEN, digest="d", created_ms=1, created_by="o"),
    "tokens.revoke": lambda s: JoinTokens(s).revoke("t", now_ms=1),
    "tokens.consume": lambda s: JoinTokens(s).consume("t", node_id="n", at_ms=1, certificate="c"),
    "revocations.install": lambda s: RevocationLists(s).install(1, "x", stored_ms=1),
    "records.put": lambda s: SignedRecords(s).put("settings", serial=1, text="x", stored_ms=1),
    "registers.put": lambda s: Registers(s).put("n-a", "lifecycle", "x"),
    "registers.drop_node": lambda s: Registers(s).drop_node("n-a"),
    "leases.save": lambda s: Leases(s).save([], next_seq=2, now_ms=1),
    "tasks.insert": lambda s: Tasks(s).insert(TaskRecord(TASK), now_ms=1),
    "tasks.update": lambda s: Tasks(s).update(TaskRecord(TASK), now_ms=1),
    "attempts.save": lambda s: Attempts(s).save(
        AttemptIdentity("t", 1, "worker", "n", FencingToken(1, 1), None),
        state="accepted",
        body={},
        result=None,
        now_ms=1,
    ),
    "attempts.mark_delivered": lambda s: Attempts(s).mark_delivered("t", 1, now_ms=1),
    "attempts.set_fence": lambda s: Attempts(s).set_fence("t", FencingToken(1, 1), now_ms=1),
    "inbox.add": lambda s: InboxMessages(s).add(
        "n/m", sender="n", type="ack", body={}, received_ms=1
    ),
    "inbox.prune": lambda s: InboxMessages(s).prune(before_ms=1),
    "meta.insert": lambda s: s.insert_meta({"k": "v"}),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_every_write_runs_in_a_transaction(store: Store, write: str) -> None:
    """Called on its own, a write still commits through ``store.transaction()``: the
    request being handled leaves its nonce with it (a replay stays refused)."""
    binding = store.request_nonce("o-x", f"nonce-{write}", expires_s=300, now_s=0)
    with bind_request_nonce(binding):
        WRITES[write](store)
    assert binding.recorded
    assert store.nonce_used("o-x", f"nonce-{write}")


def test_writes_of_several_repositories_commit_together_or_not_at_all(store: Store) -> None:
    def join() -> None:
        with store.transaction():
            Members(store).upsert(MEMBER)
            Members(store).bump_version()
            Registers(store).put("n-a", "lifecycle", "signed")
            EventLog(store).append(at_ms=1, node_id="n-a", kind="joined", actor="o-x")

    with pytest.raises(RuntimeError), store.transaction():
        join()
        raise RuntimeError("the join failed before its commit")
    assert Members(store).all() == [] and EventLog(store).page() == []
    assert Registers(store).all() == [] and store.get_meta("membership_version") is None
    join()
    assert Members(store).all() == [MEMBER] and [e.kind for e in EventLog(store).page()] == [
        "joined"
    ]
    assert store.get_meta("membership_version") == "2"


def test_insert_meta_refuses_a_key_already_there(store: Store) -> None:
    store.insert_meta({"cluster_id": "c-1"})
    with pytest.raises(StoreError):
        store.insert_meta({"node_id": "n-a", "cluster_id": "c-2"})
    assert store.get_meta("cluster_id") == "c-1" and store.get_meta("node_id") is None


@dataclass(frozen=True)
class _Tagged:
    name: str
    tags: tuple[str, ...]


def test_from_row_fills_each_field_from_its_column_through_its_decoder() -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT 'a' AS name, '[\"x\", \"y\"]' AS tags, 1 AS extra").fetchone()
        assert from_row(_Tagged, row, tags=json_tuple) == _Tagged("a", ("x", "y"))
        assert from_row(_Tagged, row) == _Tagged("a", '["x", "y"]')  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="_Tagged has no field 'tag' to decode"):
            from_row(_Tagged, row, tag=json_tuple)


def test_from_row_finds_a_classes_columns_once_for_all_its_rows() -> None:
    @dataclass(frozen=True)
    class Pair:
        a: str
        b: tuple[str, ...]

    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT 'x' AS a, '[]' AS b UNION ALL SELECT 'y', '[\"z\"]'").fetchall()
        before = _columns.cache_info()
        read = [from_row(Pair, row, b=json_tuple) for row in rows * 3]
        after = _columns.cache_info()
    assert read[:2] == [Pair("x", ()), Pair("y", ("z",))]
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 5)
