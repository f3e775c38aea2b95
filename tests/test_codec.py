"""The codecs: strict JSON (the default), tagged JSON for rich values, and
how each record's codec travels with it through every backend."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import subprocess
import sys
import time
import uuid
import zoneinfo
from collections import OrderedDict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiered_state
from tiered_state import codec
from tiered_state.catalog import Resolved
from tiered_state.codec import Codec, JSONCodec, TypedJSONCodec, decode_entry, decode_stored, resolve_codec
from tiered_state.errors import ConfigurationError, IntegrityError, SerializationError
from tiered_state.record import Entry, Tier, inflate, live_value, make_metadata, make_stub
from tiered_state.repositories.base import StateRepository

from .support import require_module, unique_name


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


# ====================================================================== typed JSON
class Side(enum.Enum):
    BUY = "buy"
    SELL = "sell"
    ALIAS = "buy"  # an alias reads back as the member it names


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Colour(str, enum.Enum):
    RED = "red"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


@dataclasses.dataclass(frozen=True)
class Fill:
    qty: Decimal
    at: datetime.datetime


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    side: Side
    fills: list[Fill]
    tags: frozenset[str] = frozenset()
    notional: Decimal = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.notional = sum((f.qty for f in self.fills), Decimal(0))


@dataclasses.dataclass
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


class Point(NamedTuple):
    x: int
    y: int


PARIS = zoneinfo.ZoneInfo("Europe/Paris")
UTC = datetime.timezone.utc

TYPES: list[type] = [Side, Level, Colour, Perm, Fill, Order, Checked, Point]


def typed(*extra: type) -> TypedJSONCodec:
    return TypedJSONCodec(types=[*TYPES, *extra])


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, Decimal) and a.is_nan():
        return str(a) == str(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            same(k, next(k2 for k2 in b if k2 == k)) and same(a[k], b[k]) for k in a
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return a == b and sorted(map(repr, a)) == sorted(map(repr, b))
    if isinstance(a, (datetime.datetime, datetime.time)):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold and a.isoformat() == b.isoformat()
    return bool(a == b)


ORDER = Order(uuid.UUID("12345678-1234-5678-1234-567812345678"), Side.SELL,
              [Fill(Decimal("0.5"), datetime.datetime(2024, 5, 1, 12, tzinfo=UTC)),
               Fill(Decimal("1.25"), datetime.datetime(2024, 5, 1, 13, tzinfo=PARIS))],
              frozenset({"urgent", "otc"}))

TYPED_VALUES: list[Any] = [
    # datetimes: naive, UTC, a fixed offset (sub-minute too), a zone, both sides of a DST fold
    datetime.datetime(2024, 5, 1, 12, 30, 15, 123456),
    datetime.datetime(2024, 5, 1, tzinfo=UTC),
    datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))),
    datetime.datetime(9999, 12, 31, 23, 59, 59, 999999,
                      tzinfo=datetime.timezone(datetime.timedelta(seconds=3661, microseconds=5))),
    datetime.datetime(2024, 7, 1, 9, tzinfo=PARIS),
    datetime.datetime(2024, 10, 27, 2, 30, fold=0, tzinfo=PARIS),
    datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS),
    datetime.date(2024, 2, 29),
    datetime.time(0, 0),
    datetime.time(23, 59, 59, 999999, tzinfo=UTC),
    datetime.time(8, 0, tzinfo=PARIS),
    datetime.datetime(2024, 10, 27, 2, 30, fold=1),  # naive, the second 02:30
    datetime.time(2, 30, fold=1), datetime.time(2, 30, fold=1, tzinfo=PARIS),
    datetime.timedelta(0),
    datetime.timedelta(days=-1, microseconds=1),
    datetime.timedelta(days=999999999, seconds=86399, microseconds=999999),
    Decimal("1.50"), Decimal("-0"), Decimal("1E+5"), Decimal("NaN"), Decimal("-Infinity"),
    Decimal("1E+999999999999999999"), Decimal("3." + "1" * 500),
    uuid.UUID(int=0), uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"", bytes(range(256)), bytearray(b"\x00mutable"),
    set(), {1, "1", 1.5, None, (1, 2), frozenset({3})}, frozenset({"a", b"a"}),
    (), (1,), (1, (2, [3, (4,)])), [(), {"t": ()}],
    Side.BUY, Side.ALIAS, Level.HIGH, Colour.RED, Perm.R | Perm.X, Perm(0),
    Fill(Decimal("2"), datetime.datetime(2024, 1, 1, tzinfo=UTC)), ORDER, Point(1, -2),
    {1: "int key", (1, "a"): "tuple key", Side.BUY: "enum key", None: "none key"},
    {"$type": "not a tag", "$$type": ["nor", "this"], "$": 1, "type": 2, "x$type": 3},
    [{"$type": {"$type": ()}}],
    float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324,
    2**64, -(2**63) - 1, 10**100,
    {"plain": [1, "two", None, True, 3.5, {"nested": {}}]},
    "", "$type", '{"$type":"tuple","value":[]}', "\u2028\x00\U0001f511",
]


@pytest.mark.parametrize("value", TYPED_VALUES, ids=lambda v: type(v).__name__)
def test_typed_round_trip(value: Any) -> None:
    c = typed()
    payload = c.encode(value)
    back = c.decode(payload)
    assert same(back, value), (payload, back)
    json.loads(payload)  # plain JSON, readable by anything
    assert c.encode(back) == payload  # and stable


def test_typed_round_trip_of_everything_at_once() -> None:
    c = typed()
    value = {"values": TYPED_VALUES[:-4], "order": ORDER, "by_day": {datetime.date(2024, 1, 1): ORDER}}
    back = c.decode(c.encode(value))
    assert all(same(a, b) for a, b in zip(back["values"], value["values"]))
    assert back["order"] == ORDER and back["by_day"] == value["by_day"]


def test_init_false_fields_are_rebuilt_by_the_class() -> None:
    back = typed().decode(typed().encode(ORDER))
    assert back.notional == Decimal("1.75") and back == ORDER


def test_tagged_json_is_plain_readable_json() -> None:
    c = typed()
    value = {
        "at": datetime.datetime(2024, 5, 1, 12, tzinfo=UTC),
        "zone": datetime.datetime(2024, 7, 1, 9, tzinfo=PARIS),
        "px": Decimal("1.50"),
        "side": Side.BUY,
        "perm": Perm.R | Perm.W,
        "raw": b"hi",
        "pair": (1, 2),
        "ids": {3, 1, 2},
        "dt": datetime.timedelta(hours=1),
        "p": Point(1, 2),
    }
    payload = c.encode(value)
    assert json.loads(payload) == {
        "at": {"$type": "datetime", "value": "2024-05-01T12:00:00+00:00"},
        "zone": {"$type": "datetime", "value": ["2024-07-01T09:00:00+02:00", "Europe/Paris"]},
        "px": {"$type": "decimal", "value": "1.50"},
        "side": {"$type": "enum", "class": f"{__name__}.Side", "value": "BUY"},
        "perm": {"$type": "enum", "class": f"{__name__}.Perm", "value": 3},
        "raw": {"$type": "bytes", "value": "aGk="},
        "pair": {"$type": "tuple", "value": [1, 2]},
        "ids": {"$type": "set", "value": [1, 2, 3]},
        "dt": {"$type": "timedelta", "value": [0, 3600, 0]},
        "p": {"$type": "namedtuple", "class": f"{__name__}.Point", "value": {"x": 1, "y": 2}},
    }
    # Compact and sorted, like every payload: the checksum of a value never varies.
    assert payload == codec.encode(json.loads(payload))


def test_plain_json_is_written_as_json_codec_writes_it() -> None:
    value = {"b": [1, 2.5, None, True], "a": {"x": "ü"}, "big": 2**70}
    assert TypedJSONCodec().encode(value) == codec.encode(value)
    assert TypedJSONCodec().decode(codec.encode(value)) == value


def test_registered_names_may_be_chosen() -> None:
    c = TypedJSONCodec(types={"side": Side, "fill": Fill})
    payload = c.encode(Side.BUY)
    assert json.loads(payload) == {"$type": "enum", "class": "side", "value": "BUY"}
    assert c.decode(payload) is Side.BUY
    assert c.types == {"side": Side, "fill": Fill}


def test_deterministic_output() -> None:
    c = typed()
    a = {"z": {3, 1, 2}, "a": frozenset({"y", "x"}), "k": {2: "b", 1: "a"}}
    b = {"k": {1: "a", 2: "b"}, "a": frozenset({"x", "y"}), "z": {2, 3, 1}}
    assert c.encode(a) == c.encode(b)
    assert c.encode({"$type": 1, "a": 2}) == c.encode({"a": 2, "$type": 1})


def test_set_order_does_not_depend_on_the_hash_seed() -> None:
    """Sets of str iterate in an order set by PYTHONHASHSEED: the payload must not."""
    script = ("from tiered_state.codec import TypedJSONCodec; "
              "print(TypedJSONCodec().encode({frozenset({'a','b','c','d'}), 'e', 'f', ('g',)}))")
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_dict_keys_that_look_like_the_tag_are_escaped() -> None:
    c = TypedJSONCodec()
    value = {"$type": "datetime", "value": "2024-01-01"}  # a plain dict that looks like a tag
    payload = c.encode(value)
    assert json.loads(payload) == {"$$type": "datetime", "value": "2024-01-01"}
    assert c.decode(payload) == value
    deep = {"$$$type": {"$type": ("x",)}}
    assert json.loads(c.encode(deep)) == {"$$$$type": {"$$type": {"$type": "tuple", "value": ["x"]}}}
    assert c.decode(c.encode(deep)) == deep


def test_subclasses_of_dict_and_list_read_back_as_the_plain_ones() -> None:
    """As with JSONCodec; but an int or str subclass (an IntEnum member) is never flattened."""
    c = TypedJSONCodec()
    assert c.decode(c.encode(OrderedDict(b=1, a=2))) == {"a": 2, "b": 1}
    with pytest.raises(SerializationError, match="register the class"):
        c.encode(Level.LOW)


# ------------------------------------------------------------------ refusals
def test_json_codec_points_to_the_typed_codec() -> None:
    with pytest.raises(SerializationError, match=r"cannot encode datetime with JSONCodec; open the "
                       r"store with codec=TypedJSONCodec\(\)"):
        codec.encode({"at": datetime.datetime(2024, 1, 1)})
    with pytest.raises(SerializationError, match=r"cannot encode Decimal with JSONCodec"):
        JSONCodec().encode([Decimal(1)])
    with pytest.raises(SerializationError, match=r"codec=TypedJSONCodec\(types=\[Fill\]\)"):
        codec.encode(Fill(Decimal(1), datetime.datetime(2024, 1, 1)))
    with pytest.raises(SerializationError, match=r"NaN or Infinity with JSONCodec.*TypedJSONCodec"):
        codec.encode([float("nan")])
    with pytest.raises(SerializationError, match=r"^tuple is not stored by JSONCodec.*TypedJSONCodec"):
        codec.encode((1,))
    with pytest.raises(SerializationError, match=r"dict keys must be str with JSONCodec, not int"):
        codec.encode({1: 2})
    with pytest.raises(SerializationError, match=r"cannot encode object with JSONCodec, which stores"):
        codec.encode(object())


def test_typed_codec_names_what_it_cannot_store() -> None:
    c = TypedJSONCodec()
    with pytest.raises(SerializationError, match=r"cannot encode Side with TypedJSONCodec: register "
                       r"the class, TypedJSONCodec\(types=\[Side, \.\.\.\]\)"):
        c.encode({"side": Side.BUY})
    with pytest.raises(SerializationError, match="cannot encode Fill with TypedJSONCodec: register"):
        c.encode([Fill(Decimal(1), datetime.datetime(2024, 1, 1))])
    with pytest.raises(SerializationError, match="cannot encode object with TypedJSONCodec, which stores"):
        c.encode(object())
    with pytest.raises(SerializationError, match="tzinfo is"):
        c.encode(datetime.datetime(2024, 1, 1, tzinfo=_OddZone()))
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="contains itself"):
        c.encode(loop)
    class Unlisted(enum.Enum):
        A = 1

    with pytest.raises(SerializationError, match="cannot encode Unlisted with TypedJSONCodec: register"):
        typed().encode(Order(uuid.UUID(int=1), Side.BUY, [], frozenset({Unlisted.A})))  # type: ignore[arg-type]


class _OddZone(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=1)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)


def test_refusals_name_no_value() -> None:
    class Secret:
        pass

    for c in (TypedJSONCodec(), JSONCodec()):
        with pytest.raises(SerializationError) as info:
            c.encode({"s3cret-value": Secret()})
        assert "s3cret-value" not in str(info.value) and "Secret" in str(info.value)


def test_only_registrable_classes_are_registered() -> None:
    class Plain:
        pass

    with pytest.raises(ConfigurationError, match="Plain"):
        TypedJSONCodec(types=[Plain])
    with pytest.raises(ConfigurationError):
        TypedJSONCodec(types=[int])
    def one() -> type:
        class Dup(enum.Enum):
            A = 1
        return Dup

    with pytest.raises(ConfigurationError, match="two classes"):
        TypedJSONCodec(types=[one(), one()])  # the same module.QualName
    TypedJSONCodec(types={"x": one(), "y": one()})  # unless given names of their own
    with pytest.raises(ConfigurationError, match="two names"):
        TypedJSONCodec(types={"a": Side, "b": Side})


# ------------------------------------------------------------------ hostile payloads
def test_unregistered_class_in_the_data_is_refused_by_name() -> None:
    payload = typed().encode({"o": ORDER})
    with pytest.raises(SerializationError) as info:
        TypedJSONCodec().decode(payload)
    message = str(info.value)
    assert f"{__name__}.Order" in message and "TypedJSONCodec(types=[" in message
    assert "never imported" in message
    # A class named by the data is never imported, however importable it is.
    hostile = json.dumps({"$type": "dataclass", "class": "subprocess.Popen", "value": {"args": ["id"]}})
    with pytest.raises(SerializationError, match=r"subprocess\.Popen"):
        typed().decode(hostile)


HOSTILE = [
    {"$type": "bytes", "value": "not base64!"},
    {"$type": "bytes", "value": "YQ"},  # unpadded
    {"$type": "bytes", "value": "ü"},
    {"$type": "bytes", "value": 5},
    {"$type": "bytearray", "value": None},
    {"$type": "decimal", "value": "1e9999999999999999999999"},  # past Decimal's exponent limit
    {"$type": "decimal", "value": "1e5"},  # not how a Decimal is written
    {"$type": "decimal", "value": " 1"},
    {"$type": "decimal", "value": "1_000"},
    {"$type": "decimal", "value": "x"},
    {"$type": "decimal", "value": 1.5},
    {"$type": "uuid", "value": "{12345678-1234-5678-1234-567812345678}"},
    {"$type": "uuid", "value": "nope"},
    {"$type": "datetime", "value": "yesterday"},
    {"$type": "datetime", "value": ["2024-01-01T00:00:00", "Europe/Paris"]},  # no offset
    {"$type": "datetime", "value": ["2024-01-01T00:00:00+00:00", "../../../etc/passwd"]},
    {"$type": "datetime", "value": ["2024-01-01T00:00:00+00:00", "No/Such_Zone"]},
    {"$type": "datetime", "value": ["2024-01-01T00:00:00+00:00", ""]},
    {"$type": "datetime", "value": ["2024-01-01T00:00:00+00:00"]},
    {"$type": "datetime", "value": {"iso": 1}},
    {"$type": "time", "value": ["08:00+01:00", "Europe/Paris"]},
    {"$type": "time", "value": "25:00"},
    {"$type": "time", "value": ["02:30", None, 2]},
    {"$type": "time", "value": ["02:30", None, True]},
    {"$type": "datetime", "value": ["2024-01-01T00:00:00+00:00", "Europe/Paris", 1]},
    {"$type": "datetime", "value": ["2024-01-01T00:00:00", None]},
    {"$type": "date", "value": "2024-02-30"},
    {"$type": "timedelta", "value": [10**20, 0, 0]},
    {"$type": "timedelta", "value": [1, 2]},
    {"$type": "timedelta", "value": [True, 0, 0]},
    {"$type": "timedelta", "value": "1 day"},
    {"$type": "float", "value": "NaN"},
    {"$type": "float", "value": 1},
    {"$type": "tuple", "value": {"a": 1}},
    {"$type": "set", "value": [[1], [2]]},  # unhashable items
    {"$type": "set", "value": [{"$type": "decimal", "value": "sNaN"}]},  # a signalling NaN cannot be hashed
    {"$type": "dict", "value": [[[1], 2]]},  # an unhashable key
    {"$type": "dict", "value": [[1, 2, 3]]},
    {"$type": "dict", "value": {"a": 1}},
    {"$type": "tuple"},
    {"$type": "tuple", "value": [], "extra": 1},
    {"$type": 7, "value": 1},
    {"$type": None, "value": 1},
    {"$type": "frobnicate", "value": 1},
    {"$type": "enum", "value": "BUY"},  # a class kind without its class
    {"$type": "enum", "class": 5, "value": "BUY"},
    {"$type": "enum", "class": f"{__name__}.Side", "value": "HOLD"},
    {"$type": "enum", "class": f"{__name__}.Side", "value": "__class__"},
    {"$type": "enum", "class": f"{__name__}.Side", "value": 1},
    {"$type": "enum", "class": f"{__name__}.Perm", "value": 64},
    {"$type": "enum", "class": f"{__name__}.Perm", "value": True},
    {"$type": "dataclass", "class": f"{__name__}.Side", "value": {}},  # registered, but as an enum
    {"$type": "dataclass", "class": f"{__name__}.Fill", "value": {"qty": 1}},
    {"$type": "dataclass", "class": f"{__name__}.Fill", "value": {"qty": 1, "at": 2, "evil": 3}},
    {"$type": "dataclass", "class": f"{__name__}.Fill", "value": [1, 2]},
    {"$type": "dataclass", "class": f"{__name__}.Checked", "value": {"n": -1}},  # __post_init__ raises
    {"$type": "dataclass", "class": f"{__name__}.Order", "value": {"id": 1, "side": 2, "fills": 3}},
    {"$type": "namedtuple", "class": f"{__name__}.Point", "value": {"x": 1}},
    {"$type": "namedtuple", "class": f"{__name__}.Nope", "value": {"x": 1}},
    {"$type": "pydantic", "class": f"{__name__}.Fill", "value": {}},
]


@pytest.mark.parametrize("data", HOSTILE, ids=lambda d: f"{d.get('$type')}-{str(d.get('value'))[:20]}")
def test_hostile_typed_payloads_raise_serialization_error(data: Any) -> None:
    c = typed()
    for payload in (json.dumps(data), json.dumps({"nested": [data]}), json.dumps([(1, data)])):
        with pytest.raises(SerializationError):
            c.decode(payload)


def test_hostile_payloads_beyond_tags() -> None:
    c = typed()
    for payload in ("", "{", '{"$type":', "[" * 100_000 + "]" * 100_000, "\ud800",
                    '{"$type": "tuple", "value": ' + "[" * 5000 + "]" * 5000 + "}",
                    " " + '{"$type":"tuple","value":[' + "1" * 5000 + "]}"):
        with pytest.raises(SerializationError):
            c.decode(payload)


def test_a_key_spelling_the_tag_with_escapes_is_just_a_key() -> None:
    """A payload that hides the tag behind \\u escapes is read as plain data."""
    assert typed().decode('{"\\u0024type":"tuple","value":[1]}') == {"$type": "tuple", "value": [1]}


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                       st.text(max_size=8), st.sampled_from(["$type", "value", "class", "tuple",
                                                             "dataclass", "enum", f"{__name__}.Fill"]))
_json_tree = st.recursive(
    _json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.sampled_from(["$type", "value", "class", "$$type", "a"]), kids, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json_tree)
def test_fuzzed_tagged_json_never_raises_anything_else(tree: Any) -> None:
    try:
        typed().decode(json.dumps(tree))
    except SerializationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
              st.binary(max_size=6), st.decimals(), st.uuids(), st.datetimes(), st.dates(),
              st.times(), st.timedeltas(), st.sampled_from(list(Side) + list(Perm))),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.tuples(kids, kids),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.sampled_from(["$type", "$$type"])),
                        kids, max_size=4),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=4)), max_size=4),
    ),
    max_leaves=15,
))
def test_fuzzed_values_round_trip(value: Any) -> None:
    c = typed()
    payload = c.encode(value)
    assert same(c.decode(payload), value)
    assert c.encode(c.decode(payload)) == payload


# ------------------------------------------------------------------ pydantic
class Models(NamedTuple):
    pydantic: Any
    Leg: Any
    Trade: Any
    StrictTrade: Any
    trade: Any


@pytest.fixture(scope="module")
def models() -> Models:
    """pydantic v2 models (pydantic is in the test extra; the no-extras tox
    envs, which prove the zero-dependency core, skip these tests)."""
    pydantic = require_module("pydantic", minversion="2")

    class Leg(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        venue: str
        px: Decimal

    class Trade(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        id: uuid.UUID
        at: datetime.datetime
        legs: list[Leg]
        side: Side
        tags: set[str] = set()
        window: tuple[int, int] = (0, 0)
        meta: dict[str, Any] = {}

    class StrictTrade(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        model_config = pydantic.ConfigDict(strict=True, frozen=True, ser_json_bytes="base64",
                                           val_json_bytes="base64")
        at: datetime.datetime
        raw: bytes

    trade = Trade(id=uuid.UUID(int=7), at=datetime.datetime(2024, 5, 1, 12, tzinfo=UTC),
                  legs=[Leg(venue="X", px=Decimal("101.25")), Leg(venue="$type", px=Decimal("-0"))],
                  side=Side.SELL, tags={"a", "b"}, window=(1, 2), meta={"$type": "plain", "n": 2**70})
    return Models(pydantic, Leg, Trade, StrictTrade, trade)


def test_pydantic_models_round_trip(models: Models) -> None:
    c = TypedJSONCodec(types=[models.Trade, models.StrictTrade])
    payload = c.encode({"trade": models.trade, "several": [models.trade, models.trade]})
    back = c.decode(payload)
    assert back["trade"] == models.trade and type(back["trade"]) is models.Trade
    assert back["trade"].legs[0].px == Decimal("101.25") and back["trade"].at.tzinfo is not None
    assert back["trade"].meta == {"$type": "plain", "n": 2**70}
    assert json.loads(payload)["trade"]["$type"] == "pydantic"
    assert c.encode(back) == payload
    strict = models.StrictTrade(at=datetime.datetime(2024, 1, 1, tzinfo=UTC), raw=b"\x00\xff")
    assert c.decode(c.encode(strict)) == strict


def test_pydantic_sets_give_equal_payloads(models: Models) -> None:
    """Equal models give equal payloads whatever order their sets iterate in:
    pydantic writes a set as it iterates, which for strings changes with each
    process's hash salt (a re-encoded value then differed on CI)."""
    class Basket(models.pydantic.BaseModel):  # type: ignore[misc,name-defined]
        ids: set[int]
        groups: list[frozenset[int]]
        by_name: dict[str, set[int]]

    # 1 and 9 share a slot of a small set's table, so insertion order decides iteration.
    one = Basket(ids=[1, 9], groups=[frozenset([1, 9])], by_name={"x": [1, 9]})
    other = Basket(ids=[9, 1], groups=[frozenset([9, 1])], by_name={"x": [9, 1]})
    assert one == other and list(one.ids) != list(other.ids)
    assert list(one.by_name["x"]) != list(other.by_name["x"])
    c = TypedJSONCodec(types=[Basket])
    payload = c.encode(one)
    assert c.encode(other) == payload
    assert json.loads(payload)["value"] == {"by_name": {"x": [1, 9]}, "groups": [[1, 9]], "ids": [1, 9]}
    assert c.decode(payload) == one


def test_a_model_pydantic_cannot_write_as_json_is_refused_by_name(models: Models) -> None:
    class Blob(models.pydantic.BaseModel):  # type: ignore[misc,name-defined]
        raw: bytes  # written as UTF-8 text by default: not every bytes is

    with pytest.raises(SerializationError, match="cannot encode Blob: pydantic cannot write it"):
        TypedJSONCodec(types=[Blob]).encode(Blob(raw=b"\xff"))


def test_pydantic_models_must_be_registered(models: Models) -> None:
    with pytest.raises(SerializationError, match="cannot encode Trade with TypedJSONCodec: register"):
        TypedJSONCodec().encode(models.trade)
    payload = TypedJSONCodec(types=[models.Trade]).encode(models.trade)
    with pytest.raises(SerializationError, match="Trade"):
        TypedJSONCodec().decode(payload)
    name = f"{models.Trade.__module__}.{models.Trade.__qualname__}"
    with pytest.raises(SerializationError, match="could not be rebuilt"):
        TypedJSONCodec(types=[models.Trade]).decode(
            json.dumps({"$type": "pydantic", "class": name, "value": {"id": "x"}}))


# ====================================================================== choosing and decoding
class Rot13:
    """A custom codec: JSON with its strings rot13'd (stands for any format)."""

    name = "rot13-json"

    def encode(self, value: Any) -> str:
        return codec.encode(value).translate(_ROT)

    def decode(self, payload: str) -> Any:
        return codec.decode(payload.translate(_ROT))


_ROT = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")


def test_resolve_codec() -> None:
    assert (tiered_state.Codec, tiered_state.JSONCodec, tiered_state.TypedJSONCodec) == (
        Codec, JSONCodec, TypedJSONCodec)
    assert resolve_codec(None) is resolve_codec("json") is codec.JSON
    assert isinstance(resolve_codec("typed-json"), TypedJSONCodec)
    mine = typed()
    assert resolve_codec(mine) is mine
    rot = Rot13()
    assert resolve_codec(rot) is rot and isinstance(rot, Codec)
    with pytest.raises(ConfigurationError, match="unknown codec 'pickle'"):
        resolve_codec("pickle")
    with pytest.raises(ConfigurationError, match="not int"):
        resolve_codec(5)  # type: ignore[arg-type]
    for name in ("", "json", "typed-json", "stub", "tombstone", "json+zlib", "spaced name", "é", "x" * 65, 7):
        bad = Rot13()
        bad.name = name  # type: ignore[assignment]
        with pytest.raises(ConfigurationError):
            resolve_codec(bad)


def test_decode_entry_uses_the_records_codec() -> None:
    t = typed()
    plain = codec.encode({"$type": "tuple", "value": [1]})  # a plain json record that looks tagged
    assert decode_entry(plain, "json", t) == {"$type": "tuple", "value": [1]}  # never mis-decoded
    assert decode_entry(plain, "json", codec.JSON) == {"$type": "tuple", "value": [1]}
    payload = t.encode((1, Side.BUY))
    assert decode_entry(payload, "typed-json", t) == (1, Side.BUY)
    with pytest.raises(SerializationError) as info:
        decode_entry(payload, "typed-json", codec.JSON)
    assert "written with codec 'typed-json'" in str(info.value)
    assert "codec=TypedJSONCodec(types=[...])" in str(info.value)
    rot = Rot13()
    assert decode_entry(rot.encode({"a": "b"}), "rot13-json", rot) == {"a": "b"}
    with pytest.raises(SerializationError, match=r"with codec 'rot13-json'.*a Codec named 'rot13-json'"):
        decode_entry(rot.encode({"a": "b"}), "rot13-json", t)
    with pytest.raises(SerializationError, match=r"'json\+zlib'"):  # packings never reach a reader
        decode_entry(plain, "json+zlib", codec.JSON)


def test_decode_stored_reads_the_built_in_codecs() -> None:
    payload = TypedJSONCodec().encode({"d": Decimal("1.5")})
    assert decode_stored(payload, "typed-json") == {"d": Decimal("1.5")}
    assert decode_stored("[1]", "json") == [1]
    with pytest.raises(SerializationError, match="Side"):
        decode_stored(typed().encode(Side.BUY), "typed-json")  # classes are the store's to give
    with pytest.raises(SerializationError, match="rot13-json"):
        decode_stored("[]", "rot13-json")


def _typed_entry(key: str, value: Any, c: Codec | None = None, version: int = 1) -> Entry:
    c = c or TypedJSONCodec()
    payload = c.encode(value)
    return Entry(key, payload, make_metadata(payload, version, now=time.time(), encoding=c.name))


def test_live_value_and_resolved_record_decode_with_the_records_codec() -> None:
    t = typed()
    entry = _typed_entry("k", {"side": Side.BUY, "at": datetime.date(2024, 1, 1)}, t)
    assert live_value(entry, codec=t) == {"side": Side.BUY, "at": datetime.date(2024, 1, 1)}
    with pytest.raises(SerializationError, match="typed-json"):
        live_value(entry, codec=codec.JSON)
    with pytest.raises(SerializationError, match="Side"):
        live_value(entry)  # a repository's view: the built-in typed codec, no classes
    record = Resolved(entry, Tier.WARM).record(t)
    assert record.value["side"] is Side.BUY and record.version == 1
    with pytest.raises(SerializationError, match="open the store with codec=TypedJSONCodec"):
        Resolved(entry, Tier.WARM).record()


# ====================================================================== through every backend
def _plain_entry(key: str, value: Any) -> Entry:
    payload = codec.encode(value)
    return Entry(key, payload, make_metadata(payload, 1, now=time.time()))


@pytest.fixture
def memory_repo() -> Iterator[StateRepository]:
    from tiered_state.repositories.memory_repository import MemoryStateRepository

    with MemoryStateRepository() as repo:
        yield repo


@pytest.fixture
def sqlite_repo(tmp_path: Path) -> Iterator[StateRepository]:
    from tiered_state.repositories.sqlite_repository import SQLiteStateRepository

    with SQLiteStateRepository(tmp_path / "warm.db") as repo:
        yield repo


@pytest.fixture
def filesystem_repo(tmp_path: Path) -> Iterator[StateRepository]:
    from tiered_state.repositories.filesystem_repository import FileSystemStateRepository

    with FileSystemStateRepository(tmp_path / "cold", fsync=False, compress_above=64) as repo:
        yield repo


@pytest.fixture
def postgres_repo(request: pytest.FixtureRequest) -> Iterator[StateRepository]:
    psycopg2 = require_module("psycopg2")
    postgres_url: str = request.getfixturevalue("postgres_url")
    from tiered_state.repositories.postgres_repository import PostgresStateRepository

    table = unique_name("ts_codec")
    with PostgresStateRepository(postgres_url, table=table) as repo:
        yield repo
    conn = psycopg2.connect(postgres_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        conn.close()


@pytest.fixture
def s3_repo(request: pytest.FixtureRequest) -> Iterator[StateRepository]:
    require_module("boto3")
    from tiered_state.config import open_repository

    with open_repository(request.getfixturevalue("s3_url"), compress_min_bytes=64) as repo:
        yield repo


@pytest.fixture
def redis_repo(request: pytest.FixtureRequest) -> Iterator[StateRepository]:
    redis = require_module("redis")
    redis_url: str = request.getfixturevalue("redis_url")
    from tiered_state.config import open_repository

    prefix = unique_name("ts") + ":"
    with open_repository(redis_url, prefix=prefix) as repo:
        yield repo
    client = redis.Redis.from_url(redis_url)
    try:
        leftovers = list(client.scan_iter(match=prefix + "*", count=1000))
        if leftovers:
            client.unlink(*leftovers)
    finally:
        client.close()


BACKENDS = ["memory", "sqlite", "filesystem", "postgres", "s3", "redis"]

#: Rich values a repository without the store's classes can still decode.
STORED = {
    "small": {"at": datetime.datetime(2024, 5, 1, tzinfo=PARIS), "px": Decimal("1.50"), "ids": {1, 2}},
    # Past every backend's compression threshold, and compressible.
    "large": {"rows": [(i, datetime.date(2024, 1, 1) + datetime.timedelta(days=i), b"\x00" * 8)
                       for i in range(200)], "$type": "escaped key"},
    "suspect": {"neg0": -0.0, "e": 1e300, "big": 2**80, "nul": "\x00"},  # JSONB would alter these
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_keep_a_records_codec(backend: str, request: pytest.FixtureRequest) -> None:
    repo: StateRepository = request.getfixturevalue(f"{backend}_repo")
    t = TypedJSONCodec()
    entries = {key: _typed_entry(key, value, t) for key, value in STORED.items()}
    entries["plain"] = _plain_entry("plain", {"$type": "tuple", "value": [1]})  # json, looks tagged
    for key, entry in entries.items():
        repo.store(key, entry.payload, entry.metadata)
    for key, entry in entries.items():
        got = repo.fetch_record(key)
        assert got is not None and got.payload == entry.payload, key  # byte-exact: checksums hold
        assert got.metadata["encoding"] == entry.metadata["encoding"], key  # never "+zlib"
        assert got.valid(), key
    many = repo.fetch_many(list(entries))
    assert {k: (e.payload, e.metadata["encoding"]) for k, e in many.items()} == {
        k: (e.payload, e.metadata["encoding"]) for k, e in entries.items()}
    # fetch decodes each record with its own codec (the built-in one of that name).
    for key, value in STORED.items():
        assert same(repo.fetch(key), value) or repo.fetch(key) == value, key
    assert repo.fetch("plain") == {"$type": "tuple", "value": [1]}
    fetch_payload = getattr(repo, "fetch_payload", None)
    if fetch_payload is not None:
        # The payload-only read serves plain json alone: for anything else the
        # caller takes the path that sees the encoding.
        for key in STORED:
            assert fetch_payload(key) == "", key
            # ...unless the caller names the codec it reads with.
            assert fetch_payload(key, "typed-json") == entries[key].payload, key
        assert fetch_payload("plain") == entries["plain"].payload
        assert fetch_payload("plain", "typed-json") == ""
        assert fetch_payload("absent") is None


def test_a_compressed_file_keeps_the_codec_apart_from_the_packing(filesystem_repo: StateRepository,
                                                                  tmp_path: Path) -> None:
    entry = _typed_entry("k", STORED["large"])
    filesystem_repo.store("k", entry.payload, entry.metadata)
    (stored,) = [p for p in (tmp_path / "cold").rglob("*") if p.is_file() and not p.name.startswith(".")]
    header = json.loads(stored.read_bytes().split(b"\n", 1)[0])
    assert (header["encoding"], header["body"]) == ("typed-json", "json+zlib")
    got = filesystem_repo.fetch_record("k")
    assert got is not None and got.metadata["encoding"] == "typed-json" and got.payload == entry.payload


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_keep_a_custom_codecs_payload(backend: str, request: pytest.FixtureRequest) -> None:
    repo: StateRepository = request.getfixturevalue(f"{backend}_repo")
    rot = Rot13()
    entry = _typed_entry("k", {"hello": "world" * 100}, rot)  # not JSON a backend may parse
    repo.store("k", entry.payload, entry.metadata)
    got = repo.fetch_record("k")
    assert got is not None and got.payload == entry.payload and got.metadata["encoding"] == "rot13-json"
    assert live_value(got, codec=rot) == {"hello": "world" * 100}
    with pytest.raises(SerializationError, match="rot13-json"):
        repo.fetch("k")  # no store codec: the repository cannot read it, and says why


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres"])
def test_a_stub_keeps_its_value_codec_for_the_payload_below(backend: str,
                                                            request: pytest.FixtureRequest) -> None:
    repo: StateRepository = request.getfixturevalue(f"{backend}_repo")
    entry = _typed_entry("k", {"at": datetime.date(2024, 1, 1)})
    locator, stub = make_stub(entry.metadata, '{"name":"k@1","tier":"cold"}')
    repo.store("k", locator, stub)
    got = repo.fetch_record("k")
    assert got is not None and got.kind == "stub" and repo.fetch("k") is None


def test_postgres_keeps_typed_json_queryable_and_exact(postgres_repo: StateRepository,
                                                       postgres_url: str) -> None:
    import psycopg2

    t = TypedJSONCodec()
    entry = _typed_entry("k", {"px": Decimal("1.50"), "at": datetime.date(2024, 1, 1)}, t)
    postgres_repo.store("k", entry.payload, entry.metadata)
    table = postgres_repo.table  # type: ignore[attr-defined]
    conn = psycopg2.connect(postgres_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT data ->> 'px', payload, encoding FROM {table} WHERE key = 'k'")
            px, verbatim, encoding = cur.fetchone()
    finally:
        conn.close()
    assert json.loads(px) == {"$type": "decimal", "value": "1.50"}
    assert verbatim is None and encoding == "typed-json"  # held as JSONB, read back exactly
    got = postgres_repo.fetch_record("k")
    assert got is not None and got.payload == entry.payload and got.valid()


# ====================================================================== end to end
def test_open_refuses_an_unknown_codec_before_opening_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown codec"):
        tiered_state.open(tmp_path / "state", codec="yaml")
    assert not (tmp_path / "state").exists()


def test_manager_round_trips_typed_values(tmp_path: Path) -> None:
    value = {"order": ORDER, "seen": {datetime.date(2024, 1, 1)}, "pt": Point(1, 2)}
    with tiered_state.open(tmp_path, codec=typed()) as state:
        version = state.set("order:1", value)
        assert state.get("order:1") == value
        state.set_many({"a": (1, 2), "b": Decimal("0.1"), "c": [1, 2]}, tier="warm")
        assert state.get_many(["a", "b", "c", "zz"]) == {"a": (1, 2), "b": Decimal("0.1"), "c": [1, 2]}
        record = state.get_record("order:1")
        assert record is not None and record.value == value and record.version == version
        stored = state.repositories[Tier.WARM].fetch_record("order:1")
        assert stored is not None and stored.metadata["encoding"] == "typed-json"
        assert json.loads(stored.payload)["order"]["$type"] == "dataclass"  # readable in the tier
    with tiered_state.open(tmp_path, codec=typed()) as state:  # a new process: nothing cached
        assert state.get("order:1") == value and state.get("a") == (1, 2)


def test_manager_typed_values_survive_cold_and_compression(tmp_path: Path) -> None:
    big = {"rows": [(i, Decimal(i) / 7, datetime.date(2024, 1, 1)) for i in range(500)]}
    with tiered_state.open(tmp_path, codec="typed-json") as state:
        state.set("big", big)
        state.demote("big", to="cold")
        record = state.get_record("big")  # the first read after the demote: from COLD
        assert record is not None and record.tier == Tier.COLD and record.value == big
        assert state.get("big") == big
        state.promote("big", to="hot")
        assert state.get("big") == big and state.get_many(["big"]) == {"big": big}


def test_manager_with_a_typed_codec_reads_plain_json_records(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path) as state:
        state.set("old", {"$type": "tuple", "value": [1]})  # plain JSON that looks tagged
    with tiered_state.open(tmp_path, codec=typed()) as state:
        assert state.get("old") == {"$type": "tuple", "value": [1]}
        state.set("new", (1,))
        assert state.get_many(["old", "new"]) == {"old": {"$type": "tuple", "value": [1]}, "new": (1,)}


def test_manager_never_reads_a_record_with_the_wrong_codec(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path, codec=typed()) as state:
        state.set("k", {"at": datetime.date(2024, 1, 1)})
    with tiered_state.open(tmp_path) as state:
        for read in (lambda: state.get("k"), lambda: state.get_many(["k"]), lambda: state.get_record("k")):
            with pytest.raises(SerializationError, match="written with codec 'typed-json'"):
                read()
    with tiered_state.open(tmp_path, codec=TypedJSONCodec()) as state:
        assert state.get("k") == {"at": datetime.date(2024, 1, 1)}
        with pytest.raises(SerializationError, match="register the class"):
            state.set("e", Side.BUY)
        assert state.get("e") is None


def test_manager_typed_values_through_a_shared_hot_tier(tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    require_module("redis")
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = unique_name("ts") + ":"
    value = {"at": datetime.datetime(2024, 5, 1, tzinfo=PARIS), "side": Side.SELL}
    try:
        with tiered_state.open(tmp_path, hot=f"{redis_url}?prefix={prefix}", codec=typed()) as state:
            state.set("k", value, tier="hot")
            assert state.get("k") == value and state.get("k") == value  # a HOT hit too
            assert state.get_many(["k"]) == {"k": value}
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        leftovers = list(client.scan_iter(match=prefix + "*", count=1000))
        if leftovers:
            client.unlink(*leftovers)
        client.close()
