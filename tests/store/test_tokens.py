"""Join tokens and their uses: typed records, one use taken with who took it."""

from __future__ import annotations

import pytest

from enrollment.keys import generate_key, node_id_for
from enrollment.tokens import JoinToken, mint_token
from populi_peer.errors import StoreError
from populi_peer.store import Store
from populi_peer.store.tokens import JoinTokenRecord, JoinTokens, RecordedJoin

NOW = 1_700_000_000_000
CP = node_id_for(generate_key().public_key())


def mint(token_byte: int, *, uses: int = 1, name: str | None = None) -> JoinToken:
    _, token = mint_token(
        signing_key=generate_key(),
        cluster_id="home",
        contacts=["10.0.0.1:7070"],
        recipients=[CP],
        roles=["worker", "submit"],
        now_ms=NOW,
        ttl_ms=3_600_000,
        uses=uses,
        name=name,
        token_id=bytes([token_byte]) * 16,
        token_seed=bytes(32),
    )
    return token


def test_a_token_reads_back_typed(store: Store) -> None:
    tokens = JoinTokens(store)
    token = mint(1, uses=2, name="gpu-box")
    tokens.add(token, digest="d1", created_ms=NOW, created_by="o-x")
    assert tokens.get(token.token_id) == JoinTokenRecord(
        token_id=token.token_id,
        digest="d1",
        roles=("submit", "worker"),
        name="gpu-box",
        uses_total=2,
        uses_left=2,
        not_before_ms=token.not_before_ms,
        expires_ms=token.expires_ms,
        created_ms=NOW,
        created_by="o-x",
        revoked_ms=None,
    )
    assert tokens.get("0" * 32) is None


def test_all_lists_tokens_by_creation_time(store: Store) -> None:
    tokens = JoinTokens(store)
    late, early = mint(1), mint(2)
    tokens.add(late, digest="d1", created_ms=NOW + 5, created_by="o-x")
    tokens.add(early, digest="d2", created_ms=NOW, created_by="o-x")
    assert [t.token_id for t in tokens.all()] == [early.token_id, late.token_id]


def test_consume_takes_one_use_and_records_the_join(store: Store) -> None:
    tokens = JoinTokens(store)
    token = mint(1, uses=2)
    tokens.add(token, digest="d1", created_ms=NOW, created_by="o-x")
    tokens.consume(token.token_id, node_id="n-b", at_ms=NOW + 20, certificate="CERT-B")
    tokens.consume(token.token_id, node_id="n-a", at_ms=NOW + 10, certificate="CERT-A")
    record = tokens.get(token.token_id)
    assert record is not None and record.uses_left == 0
    assert tokens.used_by(token.token_id) == ["n-a", "n-b"]  # by time of use
    assert tokens.recorded(token.token_id, "n-b") == RecordedJoin("n-b", NOW + 20, "CERT-B")
    assert tokens.recorded(token.token_id, "n-c") is None


def test_a_token_cannot_be_taken_past_its_last_use(store: Store) -> None:
    tokens = JoinTokens(store)
    token = mint(1)
    tokens.add(token, digest="d1", created_ms=NOW, created_by="o-x")
    tokens.consume(token.token_id, node_id="n-a", at_ms=NOW, certificate="C")
    with pytest.raises(StoreError):  # CHECK (uses_left >= 0): rolled back whole
        tokens.consume(token.token_id, node_id="n-b", at_ms=NOW, certificate="C")
    assert tokens.used_by(token.token_id) == ["n-a"]


def test_revoke_keeps_the_first_revocation_time(store: Store) -> None:
    tokens = JoinTokens(store)
    token = mint(1)
    tokens.add(token, digest="d1", created_ms=NOW, created_by="o-x")
    tokens.revoke(token.token_id, now_ms=NOW + 1)
    tokens.revoke(token.token_id, now_ms=NOW + 2)
    record = tokens.get(token.token_id)
    assert record is not None and record.revoked_ms == NOW + 1
