from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.fencing import (
    TOKEN_PART_MAX,
    FenceBook,
    FencingToken,
    accept_result,
    one_of,
)
from populi_peer.errors import BadRequest

tokens = st.builds(FencingToken, st.integers(0, TOKEN_PART_MAX), st.integers(0, TOKEN_PART_MAX))
small_tokens = st.builds(FencingToken, st.integers(1, 3), st.integers(0, 4))


# -- names ---------------------------------------------------------------------------------


def test_one_of_is_the_choice_a_value_names_or_none() -> None:
    choices = ("grant", "local")
    assert one_of("local", choices) == "local"
    for value in ("Local", "grant ", "", None, 1, ["grant"]):
        assert one_of(value, choices) is None
    assert one_of("grant", ()) is None


# -- tokens -------------------------------------------------------------------------------


def test_term_outranks_seq() -> None:
    assert FencingToken(2, 1) > FencingToken(1, 999)
    assert FencingToken(1, 2) > FencingToken(1, 1)
    assert FencingToken(1, 1) == FencingToken(1, 1)
    assert sorted([FencingToken(2, 0), FencingToken(1, 5), FencingToken(1, 4)]) == [
        FencingToken(1, 4),
        FencingToken(1, 5),
        FencingToken(2, 0),
    ]


@given(tokens, tokens)
def test_order_is_total_and_matches_tuples(a: FencingToken, b: FencingToken) -> None:
    assert (a < b) == ((a.term, a.seq) < (b.term, b.seq))
    assert sum([a < b, a == b, a > b]) == 1


@given(tokens)
def test_string_form_round_trips(token: FencingToken) -> None:
    text = str(token)
    assert text == f"{token.term}.{token.seq}"
    assert FencingToken.parse(text) == token
    assert FencingToken.from_json(token.to_json()) == token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1.",
        ".1",
        "01.1",
        "1.01",
        "+1.2",
        "-1.2",
        " 1.2",
        "1.2 ",
        "1.2\n",
        "1.2.3",
        "1_0.2",
        "1,2",
        "\u0661.\u0662",  # Arabic-Indic digits: str.isdigit() would accept them
        "9223372036854775808.0",  # 2**63: does not fit SQLite's INTEGER
    ],
)
def test_parse_is_strict(text: str) -> None:
    with pytest.raises(BadRequest) as info:
        FencingToken.parse(text)
    assert info.value.code == "bad_fencing_token"


@pytest.mark.parametrize("value", [12, 1.5, None, b"1.2", ["1", "2"]])
def test_parse_refuses_non_strings(value: object) -> None:
    with pytest.raises(BadRequest):
        FencingToken.parse(value)


@pytest.mark.parametrize(
    ("term", "seq"), [(-1, 0), (0, -1), (True, 1), (1, False), (2**63, 0), (1.0, 1)]
)
def test_constructor_refuses_bad_parts(term: object, seq: object) -> None:
    with pytest.raises(BadRequest):
        FencingToken(term, seq)  # type: ignore[arg-type]


def test_accept_result_only_for_the_current_token() -> None:
    current = FencingToken(1, 7)
    assert accept_result(current, FencingToken(1, 7))
    assert not accept_result(current, FencingToken(1, 6))
    assert not accept_result(current, FencingToken(1, 8))
    assert not accept_result(current, None)
    assert not accept_result(None, None)
    assert not accept_result(None, FencingToken(1, 7))


# -- the worker's book --------------------------------------------------------------------


def test_handoff_start_duplicate_stale() -> None:
    book = FenceBook()
    book, verdict = book.check_handoff("t1", FencingToken(1, 5))
    assert verdict == "start"
    assert book.highest("t1") == FencingToken(1, 5)
    same, verdict = book.check_handoff("t1", FencingToken(1, 5))
    assert verdict == "duplicate"
    assert same is book
    same, verdict = book.check_handoff("t1", FencingToken(1, 4))
    assert verdict == "stale"
    assert same is book
    book, verdict = book.check_handoff("t1", FencingToken(2, 1))
    assert verdict == "start"
    assert book.highest("t1") == FencingToken(2, 1)


def test_tasks_are_fenced_independently() -> None:
    book, _ = FenceBook().check_handoff("a", FencingToken(1, 9))
    book, verdict = book.check_handoff("b", FencingToken(1, 1))
    assert verdict == "start"
    assert book.entries() == (("a", FencingToken(1, 9)), ("b", FencingToken(1, 1)))


def test_check_handoff_leaves_the_old_book_untouched() -> None:
    # The shell persists the entry, then adopts the new book. If the write fails it keeps
    # the old book, and a retried handoff must still start the task (not be a duplicate).
    old = FenceBook()
    new, verdict = old.check_handoff("t", FencingToken(1, 1))
    assert verdict == "start"
    assert old.highest("t") is None
    assert old.verdict("t", FencingToken(1, 1)) == "start"
    assert new.verdict("t", FencingToken(1, 1)) == "duplicate"


def test_from_entries_keeps_the_highest_and_json_round_trips() -> None:
    book = FenceBook.from_entries(
        [("t", FencingToken(1, 3)), ("t", FencingToken(1, 9)), ("t", FencingToken(1, 2))]
    )
    assert book.highest("t") == FencingToken(1, 9)
    assert FenceBook.from_json(book.to_json()) == book
    assert book.to_json() == {"highest": {"t": "1.9"}}
    assert len(book) == 1


def test_from_json_is_tolerant_of_unknown_fields_and_strict_on_tokens() -> None:
    assert FenceBook.from_json({"highest": {"t": "2.1"}, "extra": 1}).highest("t") == (
        FencingToken(2, 1)
    )
    with pytest.raises(BadRequest):
        FenceBook.from_json({"highest": {"t": "2.01"}})
    with pytest.raises(BadRequest):
        FenceBook.from_json({"highest": ["t"]})
    with pytest.raises(BadRequest):
        FenceBook.from_json({})


def test_empty_task_id_is_refused() -> None:
    with pytest.raises(BadRequest):
        FenceBook().check_handoff("", FencingToken(1, 1))


handoffs = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), small_tokens, st.booleans()), max_size=60
)


@given(handoffs)
def test_book_never_starts_twice_and_never_goes_backwards(
    steps: list[tuple[str, FencingToken, bool]],
) -> None:
    """Each step is a handoff; ``persisted`` False plays a failed durable write, after which
    the shell keeps its old book."""
    book = FenceBook()
    started: set[tuple[str, FencingToken]] = set()
    model: dict[str, FencingToken] = {}
    for task_id, token, persisted in steps:
        before = book.highest(task_id)
        new, verdict = book.check_handoff(task_id, token)
        expected = (
            "start"
            if before is None or token > before
            else ("duplicate" if token == before else "stale")
        )
        assert verdict == expected
        if verdict == "start":
            assert (task_id, token) not in started  # never started twice
            assert new.highest(task_id) == token
            if persisted:
                book = new
                started.add((task_id, token))
                model[task_id] = token
        else:
            assert new is book
        after = book.highest(task_id)
        if before is not None:
            assert after is not None and after >= before  # never backwards
        # The book agrees with the model of what was durably recorded.
        assert dict(book.entries()) == model
    assert FenceBook.from_json(book.to_json()) == book


# -- purity of the whole core slice -------------------------------------------------------

_FORBIDDEN = {"trio", "socket", "time", "random", "secrets", "datetime", "os", "asyncio"}
_MODULES = ["fencing", "leases", "tasks", "policy", "placement"]


@pytest.mark.parametrize("name", _MODULES)
def test_module_imports_nothing_impure(name: str) -> None:
    root = pathlib.Path(__file__).resolve().parents[2] / "populi_peer" / "core"
    tree = ast.parse((root / f"{name}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & _FORBIDDEN, imported & _FORBIDDEN
