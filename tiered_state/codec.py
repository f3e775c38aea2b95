"""Encoding values to payloads and back.

The payload a repository stores is text: deterministic, compact JSON (sorted
keys, no spaces, UTF-8 kept as is, ``NaN``/``Infinity`` rejected because JSON
has no such numbers). Encoding always uses the standard library so the same
value gives the same bytes (and checksum) on every machine; decoding uses
``orjson`` when it is installed, because reads dominate.

Compression (zlib) is a storage detail some backends use for large payloads;
:func:`compress` is shared here so the ``encoding`` metadata field (``json``
or ``json+zlib``) means the same thing everywhere. Its inverse is
:func:`tiered_state.record.inflate`, which stops at the size the record says
it has: a stored stream is never trusted to be small.

No codec that can execute code on load (pickle) exists here: a payload is data.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from .errors import SerializationError

__all__ = ["ENCODING", "ZLIB_ENCODING", "compress", "decode", "encode"]

ENCODING = "json"
ZLIB_ENCODING = "json+zlib"

_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)

# orjson decodes several times faster than json, but turns integers beyond
# 64 bits into floats without a word. The encoder marks the (rare) payloads
# holding such integers with one leading space -- still plain JSON, and
# deterministic -- and only those are decoded by the exact standard decoder.
_BIG_INT_MARK = " "
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

_fast_loads: Callable[[str], Any]
try:  # pragma: no cover - depends on what is installed
    import orjson as _orjson

    _fast_loads = _orjson.loads
except ImportError:  # pragma: no cover
    _fast_loads = json.loads

# Tuples count as containers only so that _inspect can refuse them.
_CONTAINERS = (dict, list, tuple)


def _inspect(value: Any) -> bool:
    """Refuse tuples and non-str dict keys; return True if an integer needs
    more than 64 bits.

    json would write ``(1, 2)`` as ``[1, 2]`` and ``{1: "x"}`` as
    ``{"1": "x"}``, so the value read back would silently differ from the
    value stored (a list where a tuple was, a str key where an int was).
    """
    big = False
    items: Iterable[Any]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                # The type only: a key is part of the value, never shown.
                raise SerializationError(f"dict keys must be str, not {type(key).__name__}")
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:  # a tuple (named tuples too): the one other container callers pass
        raise SerializationError(
            f"{type(value).__name__} is not stored (it would read back as a list); pass a list"
        )
    for item in items:
        if isinstance(item, _CONTAINERS):
            big = _inspect(item) or big
        elif type(item) is int and not _INT_MIN <= item <= _INT_MAX:
            big = True
    return big


def encode(value: Any) -> str:
    """Encode ``value`` as deterministic compact JSON.

    :raises SerializationError: the value is not JSON (a tuple, a set, bytes,
        an object, a non-str dict key, NaN, a circular reference...).
    """
    try:
        if isinstance(value, _CONTAINERS):
            big = _inspect(value)
        else:
            big = isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX
        payload = _encoder.encode(value)
    except SerializationError:
        raise
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"value cannot be encoded as JSON: {exc}") from exc
    return _BIG_INT_MARK + payload if big else payload


def decode(payload: str) -> Any:
    """Decode a payload written by :func:`encode`.

    :raises SerializationError: the payload is not JSON.
    """
    try:
        if payload[:1] == _BIG_INT_MARK:
            return json.loads(payload)
        return _fast_loads(payload)
    except (ValueError, IndexError) as exc:
        raise SerializationError(f"stored payload is not valid JSON: {exc}") from exc


def compress(payload: str, level: int = 6) -> bytes:
    """zlib-compress a payload's UTF-8 bytes (``encoding`` = ``json+zlib``)."""
    return zlib.compress(payload.encode("utf-8"), level)
