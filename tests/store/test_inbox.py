"""The inbox: the first answer to a message is kept, read back in order, pruned by age."""

from __future__ import annotations

from populi_peer.store import Store
from populi_peer.store.inbox import InboxMessages, StoredMessage


def test_a_message_keeps_its_first_answer(store: Store) -> None:
    inbox = InboxMessages(store)
    assert inbox.body("n-a/m-1") is None
    inbox.add("n-a/m-1", sender="n-a", type="result", body={"answer": {"n": 1}}, received_ms=10)
    inbox.add("n-a/m-1", sender="n-a", type="result", body={"answer": {"n": 2}}, received_ms=20)
    assert inbox.body("n-a/m-1") == {"answer": {"n": 1}}
    assert inbox.page(after=0, limit=10) == [
        StoredMessage(
            seq=1,
            key="n-a/m-1",
            sender="n-a",
            type="result",
            body={"answer": {"n": 1}},
            received_ms=10,
        )
    ]


def test_pages_in_order_and_prunes_by_age(store: Store) -> None:
    inbox = InboxMessages(store)
    for n in range(1, 6):
        inbox.add(f"n-a/m-{n}", sender="n-a", type="ack", body={}, received_ms=n * 100)
    assert [m.seq for m in inbox.page(after=0, limit=2)] == [1, 2]
    assert [m.seq for m in inbox.page(after=2, limit=10)] == [3, 4, 5]
    assert inbox.prune(before_ms=300) == 2
    assert inbox.prune(before_ms=300) == 0
    assert [m.key for m in inbox.page(after=0, limit=10)] == ["n-a/m-3", "n-a/m-4", "n-a/m-5"]
