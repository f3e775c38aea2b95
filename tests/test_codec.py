from __future__ import annotations

import json
from typing import Any

import pytest

from tiered_state import codec
from tiered_state.errors import SerializationError


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


def test_circular_reference() -> None:
    value: list[Any] = []
    value.append(value)
    with pytest.raises(SerializationError):
        codec.encode(value)


def test_decode_rejects_garbage() -> None:
    with pytest.raises(SerializationError):
        codec.decode("{not json")


def test_compression_round_trip() -> None:
    payload = json.dumps({"x": "y" * 10_000})
    data = codec.compress(payload)
    assert len(data) < len(payload) / 10
    assert codec.decompress(data) == payload
    with pytest.raises(SerializationError):
        codec.decompress(b"not zlib")


def test_no_pickle_anywhere() -> None:
    import tiered_state

    source = open(tiered_state.codec.__file__).read()
    assert "pickle" not in source.replace("No codec that can execute code on load (pickle)", "")
