"""Hypothesis strategies for fuzzing what a parser reads: JSON values of any shape, the
places inside a valid body to spoil, and near misses of a valid text (a token, a signed
list) one to four characters away."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

#: The base64url alphabet (RFC 4648 section 5), without padding.
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def json_trees(
    leaves: st.SearchStrategy[Any], *, width: int, key_size: int, max_leaves: int
) -> st.SearchStrategy[Any]:
    """``leaves`` and lists and objects of them, nested: at most ``width`` items a level,
    keys of at most ``key_size`` characters, ``max_leaves`` leaves in all."""
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=width)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=width)
        ),
        max_leaves=max_leaves,
    )


#: Any JSON value without floats, for the enrollment wire forms.
json_values = json_trees(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    width=4,
    key_size=8,
    max_leaves=12,
)


def json_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path (keys and list indexes) of every value inside the JSON ``value``, depth
    first, the root itself left out: the places a fuzz test may replace or drop."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += json_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += json_paths(item, (*path, index))
    return found


@st.composite
def mutations_of(draw: st.DrawFn, text: str) -> str:
    """``text`` with one to four characters replaced, inserted or deleted (base64url, the
    envelope's punctuation, a non-ASCII letter or white space); never emptied."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(chars) - 1))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.sampled_from(B64URL + ".=!é \n"))
        if action == "replace":
            chars[index] = char
        elif action == "insert":
            chars.insert(index, char)
        elif len(chars) > 1:
            del chars[index]
    return "".join(chars)


__all__ = ["B64URL", "json_paths", "json_trees", "json_values", "mutations_of"]
