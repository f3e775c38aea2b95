from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_state.errors import InvalidKeyError
from tiered_state.keys import (
    has_class,
    literal_prefix,
    matches,
    to_like,
    validate_key,
    validate_keys,
    validate_pattern,
)
from tiered_state.testing import AWKWARD_KEYS, INVALID_KEYS, PATTERNS


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_awkward_keys_are_valid(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", INVALID_KEYS, ids=repr)
def test_invalid_keys(key: object) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_every_control_character_is_refused() -> None:
    for code in [*range(0x20), *range(0x7F, 0xA0)]:
        with pytest.raises(InvalidKeyError, match="control character"):
            validate_key(f"a{chr(code)}b")
    validate_key("a\u00a0b")  # NBSP is not a control character
    validate_key("x" * 1024)
    validate_key("é" * 512)  # 1024 bytes


def test_validate_keys_refuses_a_bare_string() -> None:
    with pytest.raises(InvalidKeyError):
        validate_keys("abc")
    assert validate_keys(["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("*", "anything/at all", True),
        ("a*", "a/b/c", True),  # * crosses /
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("[ab]x", "bx", True),
        ("[!ab]x", "cx", True),
        ("[^ab]x", "ax", False),
        ("[a-c]", "b", True),
        ("[a-c]", "d", False),
        ("100%", "100%", True),
        ("100%", "1000", False),
        ("a_b", "axb", False),
        ("\\*", "*", True),
        ("\\*", "x", False),
        ("what\\?", "what?", True),
        ("\\[x]", "[x]", True),
        ("[]]", "]", True),
        ("back\\\\slash", "back\\slash", True),
        ("trailing\\", "trailing\\", True),
    ],
)
def test_reference_matcher(pattern: str, key: str, expected: bool) -> None:
    assert matches(pattern, key) is expected


def test_bad_patterns() -> None:
    for pattern in ["", "[unterminated", "a\x00", 5]:
        with pytest.raises(InvalidKeyError):
            validate_pattern(pattern)  # type: ignore[arg-type]


def test_literal_prefix() -> None:
    assert literal_prefix("orders/2024-*") == "orders/2024-"
    assert literal_prefix("a\\*b*") == "a*b"
    assert literal_prefix("*x") == ""
    assert literal_prefix("ab[cd]") == "ab"


def _like(pattern: str, keys: list[str]) -> list[str]:
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA case_sensitive_like = ON")
    db.execute("CREATE TABLE t (k TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [(k,) for k in keys])
    rows = db.execute("SELECT k FROM t WHERE k LIKE ? ESCAPE '\\'", (to_like(pattern),))
    found = sorted(r[0] for r in rows)
    if has_class(pattern):  # LIKE over-matches classes; callers filter
        found = [k for k in found if matches(pattern, k)]
    return found


@pytest.mark.parametrize("pattern", PATTERNS)
def test_like_translation_agrees_with_reference(pattern: str) -> None:
    keys = [*AWKWARD_KEYS, "a", "ab", "axb", "a%bq", "1000", "100", "%", "_", "\\"]
    assert _like(pattern, keys) == sorted(k for k in keys if matches(pattern, k))


_alphabet = st.sampled_from(list("ab%_\\*?[]!^-/ é"))


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.text(_alphabet, min_size=1, max_size=6),
    keys=st.lists(st.text(_alphabet, min_size=1, max_size=6), max_size=20),
)
def test_like_translation_agrees_with_reference_on_random_input(pattern: str, keys: list[str]) -> None:
    try:
        validate_pattern(pattern)
    except InvalidKeyError:
        return
    assert _like(pattern, keys) == sorted(k for k in keys if matches(pattern, k))
