"""Encoding values to payloads and back: the codecs.

The payload a repository stores is text: deterministic, compact JSON (sorted
keys, no spaces, UTF-8 kept as is, ``NaN``/``Infinity`` rejected because JSON
has no such numbers). Encoding always uses the standard library so the same
value gives the same bytes (and checksum) on every machine; decoding uses
``orjson`` when it is installed, because reads dominate.

Codecs
    A store turns values into payloads with one :class:`Codec`, chosen with
    ``tiered_state.open(..., codec=...)``:

    * :class:`JSONCodec` (name ``json``, the default) takes JSON types only
      (dict with str keys, list, str, int, float, bool, None) and refuses
      everything that would read back different -- a tuple (it would come
      back a list), a set, a datetime, a non-str dict key, NaN -- with a
      :class:`~tiered_state.errors.SerializationError` that names the type.
      The module functions :func:`encode` and :func:`decode` are this codec.
    * :class:`TypedJSONCodec` (name ``typed-json``) also round-trips
      datetime, date, time, timedelta, Decimal, UUID, bytes, bytearray, set,
      frozenset, tuple, dicts with any hashable keys, NaN and the infinities,
      and the Enum, dataclass, NamedTuple and pydantic (v2) model classes it
      was given (``TypedJSONCodec(types=[Side, Order])``), as tagged JSON
      that stays readable in every tier.
    * Any object with a ``name``, ``encode(value) -> str`` and
      ``decode(payload) -> value`` (the :class:`Codec` protocol).

    Every record carries the name of the codec that wrote it in its
    ``encoding`` metadata field (``json+zlib``-style suffixes are a backend's
    packing and never leave it), and :func:`decode_entry` decodes it with
    that codec only: a store never reads a record with the wrong one. A store
    opened with any codec reads plain ``json`` records; a record of another
    codec raises ``SerializationError`` saying which codec to open the store
    with.

Tagged JSON (``typed-json``)
    A value JSON cannot hold is written as an object with the key ``"$type"``::

        {"$type": "datetime", "value": "2024-05-01T12:00:00+00:00"}
        {"$type": "enum", "class": "app.Side", "value": "BUY"}

    ``datetime``/``time``: ISO 8601 with the UTC offset of a
    ``datetime.timezone``, or ``[ISO 8601, zone]`` for a ``zoneinfo`` zone
    (other tzinfo types are refused), ``[ISO 8601, zone or null, 1]`` for
    ``fold=1`` where the offset does not already say it; ``date``: ISO 8601; ``timedelta``:
    ``[days, seconds, microseconds]``; ``decimal``: ``str()`` of the Decimal;
    ``uuid``: its canonical hex form; ``bytes``/``bytearray``: standard
    padded base64; ``float``: ``"nan"``, ``"inf"`` or ``"-inf"``;
    ``tuple``: the list of items; ``set``/``frozenset``: the items, sorted by
    their encoded text (so equal sets give equal payloads); ``dict``:
    ``[[key, value], ...]`` sorted the same way, for a dict with a key that
    is not a str. Every plain dict round-trips: its own key ``"$type"`` (or
    ``"$$type"``...) is written with one more ``$``, so only a tag is ever
    ``"$type"``. Registered classes carry ``"class"`` (the name
    they were registered under, ``module.QualName`` by default): ``enum``
    holds the member's name (a Flag's int value), ``dataclass`` and
    ``namedtuple`` a ``{field: value}`` object (a dataclass's ``init``
    fields; the constructor rebuilds the rest), ``pydantic`` the model's own
    JSON (``model_dump_json(round_trip=True)``, rebuilt with
    ``model_validate_json``, so fields round-trip as pydantic round-trips
    them; a set field's items are sorted as above). Everything else is plain
    JSON, and output is deterministic.

    Decoding never imports anything named by the data: a class tag is looked
    up among the classes the codec was given, and an unknown one raises
    ``SerializationError`` naming it. A payload that is not what this codec
    writes (bad base64, a malformed tag, an out-of-range Decimal) raises
    ``SerializationError``, never another exception.

Compression (zlib) is a storage detail some backends use for large payloads;
:func:`compress` is shared here so the ``json+zlib`` packing means the same
thing everywhere. Its inverse is :func:`tiered_state.record.inflate`, which
stops at the size the record says it has: a stored stream is never trusted to
be small.

No codec that can execute code on load (pickle) exists here: a payload is data.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import json
import math
import re
import sys
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigurationError, SerializationError

__all__ = [
    "ENCODING",
    "ZLIB_ENCODING",
    "Codec",
    "JSONCodec",
    "TypedJSONCodec",
    "compress",
    "decode",
    "decode_entry",
    "decode_stored",
    "encode",
    "resolve_codec",
]

#: The name (and ``encoding``) of the default codec, and its zlib packing.
ENCODING = "json"
ZLIB_ENCODING = "json+zlib"
#: The name of :class:`TypedJSONCodec`.
TYPED_ENCODING = "typed-json"


def _refuse(value: object) -> Any:
    """The JSON encoder's ``default``: called for every object it cannot write."""
    raise SerializationError(_json_refusal(type(value)))


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"), default=_refuse
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
_TYPED_HINT = "open the store with codec=TypedJSONCodec() (or codec='typed-json')"


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
                raise SerializationError(
                    f"dict keys must be str with JSONCodec, not {type(key).__name__} (JSON would "
                    f"read them back as str); {_TYPED_HINT}, which keeps other keys"
                )
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:  # a tuple (named tuples too): the one other container callers pass
        raise SerializationError(
            f"{type(value).__name__} is not stored by JSONCodec (it would read back as a list); "
            f"pass a list, or {_TYPED_HINT}, which keeps tuples"
        )
    for item in items:
        if isinstance(item, _CONTAINERS):
            big = _inspect(item) or big
        elif type(item) is int and not _INT_MIN <= item <= _INT_MAX:
            big = True
    return big


def encode(value: Any) -> str:
    """Encode ``value`` as deterministic compact JSON (:class:`JSONCodec`).

    :raises SerializationError: the value is not JSON (a tuple, a set, bytes,
        a datetime, an object, a non-str dict key, NaN, a circular
        reference...); the message names the type and the codec that stores it.
    """
    try:
        if isinstance(value, _CONTAINERS):
            big = _inspect(value)
        else:
            big = isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX
        payload = _encoder.encode(value)
    except SerializationError as exc:
        # Python 3.14's encoder notes the dict key it was in: part of the value.
        if hasattr(exc, "__notes__"):
            del exc.__notes__
        raise
    except ValueError as exc:
        if "Out of range float" in str(exc):
            raise SerializationError(
                f"cannot encode float NaN or Infinity with JSONCodec (JSON has no such numbers); "
                f"{_TYPED_HINT}, which stores them"
            ) from exc
        raise SerializationError(f"value cannot be encoded as JSON: {exc}") from exc
    except (TypeError, RecursionError) as exc:
        raise SerializationError(f"value cannot be encoded as JSON: {exc}") from exc
    return _BIG_INT_MARK + payload if big else payload


def decode(payload: str) -> Any:
    """Decode a payload written by :func:`encode` (:class:`JSONCodec`).

    :raises SerializationError: the payload is not JSON.
    """
    try:
        if payload[:1] == _BIG_INT_MARK:
            return json.loads(payload)
        return _fast_loads(payload)
    except (ValueError, IndexError, RecursionError) as exc:
        raise SerializationError(f"stored payload is not valid JSON: {exc}") from exc


def compress(payload: str, level: int = 6) -> bytes:
    """zlib-compress a payload's UTF-8 bytes (the ``json+zlib`` packing)."""
    return zlib.compress(payload.encode("utf-8"), level)


# ---------------------------------------------------------------- codecs
@runtime_checkable
class Codec(Protocol):
    """What ``open(..., codec=...)`` takes: turns values into payload text and back.

    ``name`` is written into every record's ``encoding``, so a store reads
    each record with the codec that wrote it: it must be stable (the same
    name must always mean the same format), 1 to 64 ASCII letters, digits,
    ``.``, ``_`` or ``-``; ``json`` and ``typed-json`` are taken by
    :class:`JSONCodec` and :class:`TypedJSONCodec`.

    ``encode`` must be deterministic (equal values, equal text: checksums
    depend on it) and raise :class:`~tiered_state.errors.SerializationError`
    for a value it cannot store; ``decode`` must raise ``SerializationError``
    for a payload it cannot read, and must never execute code named by the
    data.
    """

    @property
    def name(self) -> str: ...

    def encode(self, value: Any) -> str: ...

    def decode(self, payload: str) -> Any: ...


class JSONCodec:
    """The default codec (``json``): JSON types only, strict.

    dict (str keys), list, str, int (any size), float (finite), bool and
    None; anything that would read back different raises
    :class:`~tiered_state.errors.SerializationError`. It is :func:`encode`
    and :func:`decode`.

    >>> codec = JSONCodec()
    >>> codec.encode({"side": "buy", "qty": 1.5})  # sorted keys, no spaces
    '{"qty":1.5,"side":"buy"}'
    >>> codec.decode('{"qty":1.5}')
    {'qty': 1.5}
    >>> codec.encode({"window": (9, 17)})
    Traceback (most recent call last):
      ...
    tiered_state.errors.SerializationError: tuple is not stored by JSONCodec ...
    """

    name = ENCODING
    encode = staticmethod(encode)
    decode = staticmethod(decode)

    def __repr__(self) -> str:
        return "JSONCodec()"


#: The one :class:`JSONCodec` every store without a codec of its own uses.
JSON = JSONCodec()

_TAG = "$type"
_KINDS = ("enum", "dataclass", "namedtuple", "pydantic")
_CODEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: ``encoding`` of the record kinds that are not values (see tiered_state.record).
_NOT_CODEC_NAMES = ("stub", "tombstone")

# The canonical text of part of a tree (set items, dict keys): what they sort by.
_canonical = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
).encode


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _pydantic_model(cls: type) -> bool:
    # pydantic is never imported here: a class derived from its BaseModel
    # means it is loaded already.
    pydantic = sys.modules.get("pydantic")
    base = getattr(pydantic, "BaseModel", None)
    return isinstance(base, type) and issubclass(cls, base)


def _kind_of(cls: type) -> str | None:
    """The kind a class is registered as, or None if it cannot be."""
    if not isinstance(cls, type):
        return None
    if issubclass(cls, enum.Enum):
        return "enum"
    if _pydantic_model(cls):
        return "pydantic"
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    if issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple):
        return "namedtuple"
    return None


_JSON_TYPES = "dict (str keys), list, str, int, float, bool and None"
#: The types TypedJSONCodec stores without registration, for messages.
_TYPED_TYPES = ("datetime, date, time, timedelta, Decimal, UUID, bytes, bytearray, set, "
                "frozenset, tuple")


def _json_refusal(cls: type) -> str:
    name = cls.__name__
    if cls in _ENCODERS:
        return f"cannot encode {name} with JSONCodec; {_TYPED_HINT}, which stores it as tagged JSON"
    if _kind_of(cls) is not None:
        return (f"cannot encode {name} with JSONCodec; open the store with "
                f"codec=TypedJSONCodec(types=[{name}]), which stores it as tagged JSON")
    return (f"cannot encode {name} with JSONCodec, which stores {_JSON_TYPES}; "
            f"TypedJSONCodec() also stores {_TYPED_TYPES}, Enum members, dataclasses, "
            "NamedTuples and pydantic models")


def _float_tag(value: float) -> dict[str, Any]:
    return {_TAG: "float", "value": "nan" if value != value else "inf" if value > 0 else "-inf"}


def _zone(tz: _dt.tzinfo | None, what: str) -> str | None:
    """None for a naive value or a fixed offset (both in the ISO text); a
    zoneinfo zone's key; anything else is refused (it would not read back)."""
    if tz is None or type(tz) is _dt.timezone:
        return None
    zoneinfo = sys.modules.get("zoneinfo")
    key = getattr(tz, "key", None)
    if zoneinfo is not None and type(tz) is zoneinfo.ZoneInfo and isinstance(key, str):
        return key
    raise SerializationError(
        f"cannot encode a {what} whose tzinfo is {type(tz).__name__}: TypedJSONCodec keeps "
        "datetime.timezone offsets and zoneinfo.ZoneInfo zones"
    )


def _enc_datetime(codec: TypedJSONCodec, value: _dt.datetime) -> Any:
    zone = _zone(value.tzinfo, "datetime")
    text = value.isoformat()
    if zone is not None:
        return {_TAG: "datetime", "value": [text, zone]}  # the offset settles the fold
    return {_TAG: "datetime", "value": [text, None, 1] if value.fold else text}


def _enc_time(codec: TypedJSONCodec, value: _dt.time) -> Any:
    zone = _zone(value.tzinfo, "time")
    text = value.isoformat()
    if value.fold:
        return {_TAG: "time", "value": [text, zone, 1]}
    return {_TAG: "time", "value": text if zone is None else [text, zone]}


def _enc_items(codec: TypedJSONCodec, value: Any) -> Any:
    tree = codec._tree
    return {_TAG: type(value).__name__, "value": [tree(item) for item in value]}


def _enc_set(codec: TypedJSONCodec, value: Any) -> Any:
    tree = codec._tree
    items = [tree(item) for item in value]
    items.sort(key=_canonical)
    return {_TAG: type(value).__name__, "value": items}


def _sorted_sets(python: Any, data: Any) -> Any:
    """``data`` (a pydantic model's JSON) with every list that is a set in
    ``python`` (the same model dumped as Python objects) sorted by its items'
    text: pydantic writes a set in iteration order, which differs from one
    process to the next (string hashing is salted), and equal values must
    give equal payloads. Where the two dumps differ in shape (a serializer
    only for JSON), ``data`` is left as pydantic wrote it.
    """
    if isinstance(python, (set, frozenset)) and isinstance(data, list) and len(data) == len(python):
        return sorted(data, key=_canonical)
    if isinstance(python, dict) and isinstance(data, dict):
        return {key: _sorted_sets(python[key], item) if key in python else item
                for key, item in data.items()}
    if isinstance(python, (list, tuple)) and isinstance(data, list) and len(data) == len(python):
        return [_sorted_sets(p, d) for p, d in zip(python, data)]
    return data


def _enc_bytes(codec: TypedJSONCodec, value: bytes | bytearray) -> Any:
    return {_TAG: type(value).__name__, "value": base64.b64encode(value).decode("ascii")}


_Encoder = Callable[["TypedJSONCodec", Any], Any]
#: Exact type -> its tag writer (subclasses are refused: they would read back
#: as the base type).
_ENCODERS: dict[type, _Encoder] = {
    tuple: _enc_items,
    set: _enc_set,
    frozenset: _enc_set,
    bytes: _enc_bytes,
    bytearray: _enc_bytes,
    _dt.datetime: _enc_datetime,
    _dt.date: lambda codec, v: {_TAG: "date", "value": v.isoformat()},
    _dt.time: _enc_time,
    _dt.timedelta: lambda codec, v: {_TAG: "timedelta", "value": [v.days, v.seconds, v.microseconds]},
    Decimal: lambda codec, v: {_TAG: "decimal", "value": str(v)},
    uuid.UUID: lambda codec, v: {_TAG: "uuid", "value": str(v)},
}


def _text(value: Any) -> str:
    if type(value) is not str:
        raise SerializationError("malformed typed-json payload: a tag's value is not a string")
    return value


def _time_parts(value: Any) -> tuple[str, str | None, int]:
    """ISO text, zone (None: none) and fold of a datetime's or time's tag value:
    ``"iso"``, ``[iso, zone]`` or ``[iso, zone or null, 1]``."""
    if type(value) is not list:
        return _text(value), None, 0
    if len(value) == 2 and type(value[1]) is str:
        return _text(value[0]), value[1], 0
    if len(value) == 3 and (value[1] is None or type(value[1]) is str) and value[2] == 1 \
            and type(value[2]) is int:
        return _text(value[0]), value[1], 1
    raise SerializationError("malformed typed-json payload: a datetime or time of an unknown form")


def _dec_datetime(codec: TypedJSONCodec, value: Any) -> _dt.datetime:
    text, zone, fold = _time_parts(value)
    parsed = _dt.datetime.fromisoformat(text)
    if zone is None:
        return parsed.replace(fold=1) if fold else parsed
    if parsed.tzinfo is None or fold:
        raise SerializationError("malformed typed-json payload: a zoned datetime needs its offset")
    return parsed.astimezone(_zoneinfo(zone))


def _dec_time(codec: TypedJSONCodec, value: Any) -> _dt.time:
    text, zone, fold = _time_parts(value)
    parsed = _dt.time.fromisoformat(text)
    if zone is not None:
        if parsed.tzinfo is not None:
            raise SerializationError("malformed typed-json payload: a zoned time has an offset")
        parsed = parsed.replace(tzinfo=_zoneinfo(zone))
    return parsed.replace(fold=1) if fold else parsed


def _zoneinfo(key: str) -> _dt.tzinfo:
    import zoneinfo  # only a payload with a zone pays for it

    try:
        return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise SerializationError("typed-json payload names a time zone this system does not have") from exc


def _dec_timedelta(codec: TypedJSONCodec, value: Any) -> _dt.timedelta:
    if type(value) is not list or len(value) != 3 or any(type(v) is not int for v in value):
        raise SerializationError("malformed typed-json payload: a timedelta is not [days, seconds, us]")
    return _dt.timedelta(days=value[0], seconds=value[1], microseconds=value[2])


def _dec_decimal(codec: TypedJSONCodec, value: Any) -> Decimal:
    number = Decimal(_text(value))  # InvalidOperation (an ArithmeticError) past Decimal's limits
    if str(number) != value:
        raise SerializationError("malformed typed-json payload: a Decimal is not in its canonical form")
    return number


def _dec_uuid(codec: TypedJSONCodec, value: Any) -> uuid.UUID:
    found = uuid.UUID(_text(value))
    if str(found) != value:
        raise SerializationError("malformed typed-json payload: a UUID is not in its canonical form")
    return found


def _dec_bytes(codec: TypedJSONCodec, value: Any) -> bytes:
    return base64.b64decode(_text(value).encode("ascii"), validate=True)


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _dec_float(codec: TypedJSONCodec, value: Any) -> float:
    found = _FLOATS.get(_text(value))
    if found is None:
        raise SerializationError("malformed typed-json payload: unknown float tag")
    return found


def _items(value: Any) -> list[Any]:
    if type(value) is not list:
        raise SerializationError("malformed typed-json payload: a tag's value is not a list")
    return value


def _dec_dict(codec: TypedJSONCodec, value: Any) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    decode_node = codec._node
    for pair in _items(value):
        if type(pair) is not list or len(pair) != 2:
            raise SerializationError("malformed typed-json payload: a dict item is not [key, value]")
        out[decode_node(pair[0])] = decode_node(pair[1])
    return out


_Decoder = Callable[["TypedJSONCodec", Any], Any]
_DECODERS: dict[str, _Decoder] = {
    "tuple": lambda codec, v: tuple(codec._nodes(_items(v))),
    "set": lambda codec, v: set(codec._nodes(_items(v))),
    "frozenset": lambda codec, v: frozenset(codec._nodes(_items(v))),
    "bytes": _dec_bytes,
    "bytearray": lambda codec, v: bytearray(_dec_bytes(codec, v)),
    "datetime": _dec_datetime,
    "date": lambda codec, v: _dt.date.fromisoformat(_text(v)),
    "time": _dec_time,
    "timedelta": _dec_timedelta,
    "decimal": _dec_decimal,
    "uuid": _dec_uuid,
    "float": _dec_float,
    "dict": _dec_dict,
}
#: What a hostile or damaged payload can make the decoders raise; each
#: becomes a SerializationError.
_DECODE_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
                  ArithmeticError, RecursionError, UnicodeError)


class TypedJSONCodec:
    """Tagged JSON (``typed-json``): JSON plus the types in the module
    docstring, and the classes given in ``types``.

    :param types: Enum, dataclass, NamedTuple and pydantic (v2) model
        classes to store and rebuild. A mapping ``{name: class}`` gives the
        name stored in the data (keep it when a class moves); a plain list
        stores ``module.QualName``. Decoding only ever builds these classes.
    :raises ConfigurationError: a class of another kind, or two classes
        under one name.

    >>> import datetime, decimal
    >>> codec = TypedJSONCodec()
    >>> codec.encode({"at": datetime.date(2024, 5, 1), "px": decimal.Decimal("1.50")})
    '{"at":{"$type":"date","value":"2024-05-01"},"px":{"$type":"decimal","value":"1.50"}}'

    Registered classes round-trip too; the mapping fixes the name stored:

    >>> import dataclasses, enum
    >>> class Side(enum.Enum):
    ...     BUY = "buy"
    ...     SELL = "sell"
    >>> @dataclasses.dataclass
    ... class Fill:
    ...     side: Side
    ...     qty: decimal.Decimal
    >>> codec = TypedJSONCodec(types={"Side": Side, "Fill": Fill})
    >>> codec.encode(Side.BUY)
    '{"$type":"enum","class":"Side","value":"BUY"}'
    >>> codec.decode(codec.encode(Fill(Side.BUY, decimal.Decimal("0.5"))))
    Fill(side=<Side.BUY: 'buy'>, qty=Decimal('0.5'))
    """

    name = TYPED_ENCODING

    def __init__(self, types: Iterable[type] | Mapping[str, type] = ()) -> None:
        #: class -> (kind, name); name -> (kind, class).
        self._by_class: dict[type, tuple[str, str]] = {}
        self._by_name: dict[str, tuple[str, type]] = {}
        #: dataclass -> the names of its init fields.
        self._fields: dict[type, tuple[str, ...]] = {}
        named: Iterable[tuple[str | None, type]] = (
            types.items() if isinstance(types, Mapping) else ((None, cls) for cls in types)
        )
        for name, cls in named:
            self._register(cls, name)

    def _register(self, cls: type, name: str | None) -> None:
        kind = _kind_of(cls)
        if kind is None:
            raise ConfigurationError(
                f"TypedJSONCodec cannot register {getattr(cls, '__qualname__', type(cls).__name__)}: "
                "it takes Enum, dataclass, NamedTuple and pydantic model classes"
            )
        name = _qualname(cls) if name is None else name
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"the name of {cls.__qualname__} must be a non-empty str")
        known = self._by_name.get(name)
        if known is not None and known[1] is not cls:
            raise ConfigurationError(f"TypedJSONCodec: two classes registered as {name!r}")
        previous = self._by_class.get(cls)
        if previous is not None and previous[1] != name:
            raise ConfigurationError(f"TypedJSONCodec: {cls.__qualname__} registered under two names")
        self._by_class[cls] = (kind, name)
        self._by_name[name] = (kind, cls)
        if kind == "dataclass":
            self._fields[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @property
    def types(self) -> dict[str, type]:
        """The registered classes by the name they are stored under."""
        return {name: cls for name, (_, cls) in self._by_name.items()}

    def __repr__(self) -> str:
        return f"TypedJSONCodec(types=[{', '.join(cls.__qualname__ for cls in self._by_class)}])"

    # ------------------------------------------------------------ encoding
    def encode(self, value: Any) -> str:
        """Tagged, deterministic compact JSON of ``value``.

        :raises SerializationError: a type this codec does not store (the
            message names it and says how to register a class).
        """
        try:
            tree = self._tree(value)
        except SerializationError:
            raise
        except RecursionError as exc:
            raise SerializationError("value is nested too deeply, or contains itself") from exc
        except (TypeError, ValueError, AttributeError) as exc:  # a class's own dump failed
            raise SerializationError(f"value cannot be encoded: {type(exc).__name__}") from exc
        return encode(tree)

    def _tree(self, value: Any) -> Any:
        """``value`` as a tree of plain JSON types (exact types only)."""
        cls = type(value)
        if cls is str or cls is int or cls is bool or value is None:
            return value
        if cls is float:
            return value if value - value == 0.0 else _float_tag(value)  # nan, inf: nan
        if cls is dict:
            return self._dict(value)
        if cls is list:
            tree = self._tree
            return [tree(item) for item in value]
        writer = _ENCODERS.get(cls)
        if writer is not None:
            return writer(self, value)
        registered = self._by_class.get(cls)
        if registered is not None:
            return self._object(registered[0], registered[1], value)
        # Like JSONCodec: an OrderedDict or a list subclass reads back as the
        # plain one. (str, int and float subclasses are refused: an IntEnum
        # member must not come back as an int.)
        if isinstance(value, dict):
            return self._dict(value)
        if isinstance(value, list):
            tree = self._tree
            return [tree(item) for item in value]
        raise SerializationError(self._refusal(cls))

    def _dict(self, value: dict[Any, Any]) -> Any:
        escape = False
        for key in value:
            if type(key) is not str:
                return self._pairs(value)
            if key[-5:] == "$type" and _tag_like(key):
                escape = True
        tree = self._tree
        if escape:
            return {("$" + key if _tag_like(key) else key): tree(item) for key, item in value.items()}
        return {key: tree(item) for key, item in value.items()}

    def _pairs(self, value: dict[Any, Any]) -> Any:
        tree = self._tree
        pairs = [[tree(key), tree(item)] for key, item in value.items()]
        pairs.sort(key=lambda pair: _canonical(pair[0]))
        return {_TAG: "dict", "value": pairs}

    def _object(self, kind: str, name: str, value: Any) -> Any:
        tree = self._tree
        data: Any
        if kind == "enum":
            data = value.value if isinstance(value, enum.Flag) else value.name
        elif kind == "dataclass":
            data = {field: tree(getattr(value, field)) for field in self._fields[type(value)]}
        elif kind == "namedtuple":
            data = {field: tree(getattr(value, field)) for field in type(value)._fields}
        else:  # pydantic: the model's own JSON, which its validator reads back
            try:
                data = json.loads(value.model_dump_json(round_trip=True))
                data = _sorted_sets(value.model_dump(round_trip=True), data)
            except ValueError as exc:  # PydanticSerializationError: bytes not UTF-8...
                raise SerializationError(
                    f"cannot encode {type(value).__name__}: pydantic cannot write it as JSON "
                    f"({type(exc).__name__}; e.g. bytes need ser_json_bytes='base64')"
                ) from exc
        return {_TAG: kind, "class": name, "value": data}

    @staticmethod
    def _refusal(cls: type) -> str:
        name = cls.__name__
        if _kind_of(cls) is not None:
            return (f"cannot encode {name} with TypedJSONCodec: register the class, "
                    f"TypedJSONCodec(types=[{name}, ...])")
        return (f"cannot encode {name} with TypedJSONCodec, which stores {_JSON_TYPES}, "
                f"{_TYPED_TYPES}, and the Enum, dataclass, NamedTuple and pydantic model classes "
                "given in TypedJSONCodec(types=[...])")

    # ------------------------------------------------------------ decoding
    def decode(self, payload: str) -> Any:
        """The value :meth:`encode` wrote.

        :raises SerializationError: the payload is not tagged JSON this codec
            can read (malformed, or a class it was not given).
        """
        tree = decode(payload)
        if '$type"' not in payload:
            # No tag and no escaped key anywhere: plain JSON, as fast as
            # JSONCodec. (A key that spells them with \u escapes is read
            # as the key it is, never as a tag.)
            return tree
        try:
            return self._node(tree)
        except SerializationError:
            raise
        except _DECODE_ERRORS as exc:
            raise SerializationError(
                f"stored typed-json payload is malformed ({type(exc).__name__})"
            ) from exc

    def _node(self, node: Any) -> Any:
        # Plain loops, no comprehensions: one frame per level, so anything
        # encode (two frames per level) could write, decode can read.
        cls = type(node)
        if cls is dict:
            if _TAG in node:
                return self._tagged(node)
            out: dict[str, Any] = {}
            for key, item in node.items():
                if key[-5:] == "$type" and _tag_like(key):
                    key = key[1:]  # an escaped key: "$$type" was "$type"
                out[key] = self._node(item) if type(item) in _NESTED else item
            return out
        if cls is list:
            return self._nodes(node)
        return node

    def _nodes(self, items: list[Any]) -> list[Any]:
        out: list[Any] = []
        append = out.append
        for item in items:
            append(self._node(item) if type(item) in _NESTED else item)
        return out

    def _tagged(self, node: dict[str, Any]) -> Any:
        tag = node[_TAG]
        if "value" not in node or type(tag) is not str:
            raise SerializationError("malformed typed-json payload: a tagged object without its value")
        if len(node) == 2:
            reader = _DECODERS.get(tag)
            if reader is not None:
                return reader(self, node["value"])
        elif len(node) == 3 and tag in _KINDS and "class" in node:
            return self._rebuild(tag, node["class"], node["value"])
        raise SerializationError(f"malformed typed-json payload: unknown tag {tag[:40]!r}")

    def _rebuild(self, kind: str, name: Any, data: Any) -> Any:
        if type(name) is not str:
            raise SerializationError("malformed typed-json payload: a class name is not a string")
        found = self._by_name.get(name)
        if found is None:
            raise SerializationError(
                f"stored value is a {kind} of class {name[:200]!r}, which this TypedJSONCodec does "
                f"not know: open the store with codec=TypedJSONCodec(types=[<that class>, ...]) "
                "to read it (classes are never imported from the data)"
            )
        registered, cls = found
        if registered != kind:
            raise SerializationError(
                f"stored {kind} {name[:200]!r} is registered as a {registered}: not the same class"
            )
        if kind == "enum":
            try:
                if type(data) is str:
                    return cls[data]  # type: ignore[index]
                if type(data) is int and issubclass(cls, enum.Flag):
                    return cls(data)
            except (KeyError, ValueError):
                pass
            raise SerializationError(f"stored member of {name[:200]!r} is not one of its members")
        if kind == "pydantic":
            text = _canonical(data)
            build = cls.model_validate_json  # type: ignore[attr-defined]
            return self._call(name, build, text)
        if type(data) is not dict:
            raise SerializationError(f"stored {name[:200]!r} is not an object of its fields")
        fields = {}
        for key, item in data.items():
            fields[key] = self._node(item) if type(item) in _NESTED else item
        return self._call(name, cls, **fields)

    @staticmethod
    def _call(name: str, build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A registered class's constructor or validator, whose errors (any
        kind: it is the application's code) become a SerializationError."""
        try:
            return build(*args, **kwargs)
        except Exception as exc:  # the class's own code: any error means "not readable"
            raise SerializationError(
                f"stored {name[:200]!r} could not be rebuilt by its class ({type(exc).__name__})"
            ) from exc


_NESTED = (dict, list)


def _tag_like(key: str) -> bool:
    """True for ``"$type"``, ``"$$type"``...: keys a plain dict writes with one
    more ``$`` so that only a tag is ever ``"$type"``."""
    return key.lstrip("$") == "type" and key[:1] == "$"

#: A TypedJSONCodec with no classes, for reading records without a store's
#: codec (:func:`decode_stored`); built on first use.
_plain_typed: TypedJSONCodec | None = None


# ---------------------------------------------------------------- choosing
def resolve_codec(spec: Codec | str | None) -> Codec:
    """The codec ``open(..., codec=spec)`` means.

    None or ``"json"``: :class:`JSONCodec`; ``"typed-json"``: a
    :class:`TypedJSONCodec` with no classes; a :class:`Codec` as it is.

    :raises ConfigurationError: an unknown name, an object that is not a
        codec, or a codec whose ``name`` is not a valid, free codec name.
    """
    if spec is None:
        return JSON
    if isinstance(spec, str):
        if spec == ENCODING:
            return JSON
        if spec == TYPED_ENCODING:
            return TypedJSONCodec()
        raise ConfigurationError(
            f"unknown codec {spec[:64]!r}: use 'json', 'typed-json' or a Codec object"
        )
    if not (callable(getattr(spec, "encode", None)) and callable(getattr(spec, "decode", None))):
        raise ConfigurationError(
            f"codec= takes 'json', 'typed-json' or an object with name, encode() and decode(), "
            f"not {type(spec).__name__}"
        )
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not _CODEC_NAME.fullmatch(name) or name in _NOT_CODEC_NAMES:
        raise ConfigurationError(
            f"codec name {name!r:.70} is not usable: 1-64 ASCII letters, digits, '.', '_' or '-', "
            "and not 'stub' or 'tombstone'"
        )
    if (name == ENCODING and not isinstance(spec, JSONCodec)) or (
            name == TYPED_ENCODING and not isinstance(spec, TypedJSONCodec)):
        raise ConfigurationError(
            f"the codec name {name!r} belongs to the built-in codec: every store reads records "
            "marked with it that way; give your codec a name of its own"
        )
    return spec


def decode_entry(payload: str, encoding: str, codec: Codec) -> Any:
    """The value of a record whose payload is ``payload`` and whose
    ``encoding`` metadata is ``encoding``, read by a store that uses ``codec``.

    The one decode of a stored value: the store's codec if the record was
    written by it, :class:`JSONCodec` for a plain ``json`` record (every codec
    reads those), and nothing else -- a record of another codec is never
    decoded by the wrong one. ``payload`` is the inflated text (a backend's
    ``+zlib`` packing never reaches here).

    :raises SerializationError: the record was written with another codec
        (the message says which, and how to open the store), or the payload
        is not what its codec writes.
    """
    if encoding == codec.name:
        return codec.decode(payload)
    if encoding == ENCODING:
        return decode(payload)
    if encoding == TYPED_ENCODING:
        how = "codec=TypedJSONCodec(types=[...]) (or codec='typed-json')"
    else:
        how = f"codec= a Codec named {encoding[:64]!r}"
    raise SerializationError(
        f"the record was written with codec {encoding[:64]!r}, but this store uses {codec.name!r}: "
        f"open the store with {how} to read it"
    )


def decode_stored(payload: str, encoding: str) -> Any:
    """:func:`decode_entry` for a reader that has no codec of its own (a
    repository's ``fetch``): ``json`` and ``typed-json`` records are read with
    the built-in codec (a ``typed-json`` one knows no registered classes).

    :raises SerializationError: as :func:`decode_entry`.
    """
    if encoding == ENCODING:
        return decode(payload)
    if encoding == TYPED_ENCODING:
        global _plain_typed
        if _plain_typed is None:
            _plain_typed = TypedJSONCodec()
        return _plain_typed.decode(payload)
    return decode_entry(payload, encoding, JSON)
