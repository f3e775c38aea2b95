from __future__ import annotations

import datetime
import json
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import tiered_state
from tiered_state import codec
from tiered_state.errors import IntegrityError, SerializationError
from tiered_state.record import inflate


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -5, 2**64 + 1, 10**30, 1.5, 1e-300, "", "ünï 🔑", [], {},
     {"b": 1, "a": [1, {"c": None}]}],
)
def test_round_trip(value: Any) -> None:
    payload = codec.encode(value)
    assert codec.decode(payload) == value
    assert type(codec.decode(payload)) is type(value)


def test_deterministic_compact_sorted() -> None:
    assert codec.encode({"b": 1, "a": [1, 2], "é": "ü"}) == '{"a":[1,2],"b":1,"é":"ü"}'
    assert codec.encode({"x": 1, "y": 2}) == codec.encode({"y": 2, "x": 1})


def test_big_integers_survive_decoding() -> None:
    # orjson, when installed, reads these as floats; the codec must not.
    assert codec.decode(codec.encode([2**70, -(2**80)])) == [2**70, -(2**80)]


@pytest.mark.parametrize(
    "value", [{1, 2}, b"x", float("nan"), float("inf"), object(), {1: "x"}, {"a": {(1,): 2}}, [{"a": {2: 3}}]]
)
def test_unencodable_values(value: Any) -> None:
    with pytest.raises(SerializationError):
        codec.encode(value)


class _Point(NamedTuple):
    x: int
    y: int


@pytest.mark.parametrize(
    "value",
    [
        (1, 2), (), _Point(1, 2),  # at the top
        [1, (2, 3)], {"a": (1,)}, {"a": [{"b": ("deep",)}]}, [[[[()]]]],  # at any depth
        {"k": _Point(0, 0)}, [{"a": 1}, {"b": [1, 2, (3,)]}],
    ],
)
def test_tuples_are_refused(value: Any) -> None:
    """json writes a tuple as a list, so it would read back as one: refused,
    like every other type JSON cannot give back as it was."""
    with pytest.raises(SerializationError, match=r"^(tuple|_Point) is not stored"):
        codec.encode(value)


@pytest.mark.parametrize(
    "value",
    [
        frozenset({1}), bytearray(b"x"), Decimal("1.5"), datetime.date(2024, 1, 1), 1j,
        {None: 1}, {True: 1}, {1.5: "x"}, {"a": [{"b": {2: "x"}}]}, float("-inf"),
        [1, {"a": {3}}], {"a": b"bytes"},
    ],
)
def test_everything_else_json_cannot_give_back_is_refused(value: Any) -> None:
    with pytest.raises(SerializationError):
        codec.encode(value)


@pytest.mark.parametrize(
    "value", [("s3cret-value",), {"s3cret-value": (1,)}, {("s3cret-value",): 1}, {7355608: "x"}]
)
def test_refusals_never_quote_the_value(value: Any) -> None:
    with pytest.raises(SerializationError) as info:
        codec.encode(value)
    assert "s3cret-value" not in str(info.value) and "7355608" not in str(info.value)


def test_tuples_are_refused_before_any_io(tmp_path: Path) -> None:
    """Through the public API: set and set_many raise, nothing is written."""
    with tiered_state.open(tmp_path) as state:
        with pytest.raises(SerializationError):
            state.set("k", {"point": (1, 2)})
        with pytest.raises(SerializationError):
            state.set_many({"a": [1], "b": (1,)})
        assert state.get("k") is None and state.get("a") is None and state.get("b") is None
        state.set("k", {"point": [1, 2]})
        assert state.get("k") == {"point": [1, 2]}


def test_the_fast_decoder_reads_what_encode_writes() -> None:
    """Encoding is the standard library's alone (same bytes, same checksum
    with or without orjson); orjson, when installed, only decodes -- and
    gives back exactly what was encoded, never a tuple or a float for an int."""
    value = {"a": [1, 2**63, -(2**63)], "b": {"c": [None, True, 1.5, "ü"]}}
    payload = codec.encode(value)
    assert codec.decode(payload) == value
    assert type(codec.decode(payload)["a"]) is list
    assert payload == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_circular_reference() -> None:
    value: list[Any] = []
    value.append(value)
    with pytest.raises(SerializationError):
        codec.encode(value)


def test_decode_rejects_garbage() -> None:
    with pytest.raises(SerializationError):
        codec.decode("{not json")


def test_compression_round_trip() -> None:
    payload = json.dumps({"x": "y" * 200_000})
    data = codec.compress(payload)
    assert len(data) < len(payload) / 10
    assert inflate(data, len(payload), "k") == payload  # the inverse, bounded
    with pytest.raises(IntegrityError):
        inflate(b"not zlib", len(payload), "k")
    with pytest.raises(IntegrityError):
        inflate(data, 100, "k")  # more than the record says it holds (and the margin)


def test_no_pickle_anywhere() -> None:
    import tiered_state

    source = open(tiered_state.codec.__file__).read()
    assert "pickle" not in source.replace("No codec that can execute code on load (pickle)", "")
