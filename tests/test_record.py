from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
import zlib
from typing import Any

import pytest

from tiered_state import Tier
from tiered_state.errors import ConfigurationError, IntegrityError, SerializationError
from tiered_state.record import (
    INFLATE_MARGIN,
    Entry,
    VersionClock,
    checksum,
    inflate,
    make_metadata,
    metadata_checksum,
    stored_metadata,
)


def test_metadata() -> None:
    md = make_metadata('{"a":"é"}', 7, now=100.0, ttl=5)
    assert md["checksum"] == hashlib.sha256('{"a":"é"}'.encode()).hexdigest() == checksum('{"a":"é"}')
    assert md["size_bytes"] == len('{"a":"é"}'.encode())
    assert (md["version"], md["created_at"], md["updated_at"], md["expires_at"]) == (7, 100.0, 100.0, 105.0)
    assert md["encoding"] == "json"
    with pytest.raises(SerializationError):
        make_metadata('"\ud800"', 1, now=0)


def test_entry_validity_and_expiry() -> None:
    payload = '{"a":1}'
    entry = Entry("k", payload, make_metadata(payload, 1, now=time.time() - 10, ttl=5))
    assert entry.valid() and entry.expired()
    forged = Entry("k", '{"a":2}', entry.metadata)
    assert not forged.valid()


def test_tier_parse() -> None:
    assert Tier.parse("HOT") is Tier.HOT and Tier.parse(Tier.COLD) is Tier.COLD
    assert Tier.WARM == "warm" and str(Tier.WARM) == "warm"
    with pytest.raises(ConfigurationError):
        Tier.parse("lukewarm")


def test_version_clock_never_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = VersionClock(node=5)
    first = clock.next()
    assert first & 0x3FF == 5
    monkeypatch.setattr(time, "time_ns", lambda: 0)  # the wall clock jumps back
    assert clock.next() > first
    assert clock.next(after=2**62) > 2**62
    clock.observe(2**62 + 2**20)
    assert clock.next() > 2**62 + 2**20


def test_version_clock_distinct_across_nodes_and_threads() -> None:
    a, b = VersionClock(node=1), VersionClock(node=2)
    seen: list[int] = []

    def work(clock: VersionClock) -> None:
        seen.extend(clock.next() for _ in range(2000))

    threads = [threading.Thread(target=work, args=(c,)) for c in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen)
    assert max(seen) < 2**63


# ---------------------------------------------------------------- hostile stored bytes
def test_a_payload_that_is_not_text_matches_no_checksum() -> None:
    """Bytes (a BLOB) or a lone surrogate (undecodable text kept as it was
    stored) never pass for a payload, whatever checksum is stored beside them."""
    assert checksum(b'{"a":1}') is None  # type: ignore[arg-type]
    assert checksum('"\udcff"') is None
    md = make_metadata('{"a":1}', 1, now=0.0)
    assert not Entry("k", b'{"a":1}', md).valid()  # type: ignore[arg-type]
    assert not Entry("k", '{"a":1}\udcff', md).valid()


def test_metadata_checksum_is_canonical_and_covers_every_field() -> None:
    md = make_metadata('"v"', 7, now=100.0, ttl=5)
    digest = metadata_checksum("k", md, "json")
    # Numbers hash alike whether they went through JSON (an int stays an int)
    # or through text (S3 headers: repr(float)).
    as_text: Any = {**md, "created_at": 100, "size_bytes": 3}
    assert metadata_checksum("k", as_text, "json") == digest
    changed: list[tuple[str, Any]] = [
        ("checksum", "0" * 64), ("size_bytes", 4), ("version", 8), ("created_at", 100.5),
        ("updated_at", 99.0), ("expires_at", None), ("encoding", "stub"),
    ]
    for field, value in changed:
        assert metadata_checksum("k", {**md, field: value}, "json") != digest, field  # type: ignore[misc]
    assert metadata_checksum("k2", md, "json") != digest
    assert metadata_checksum("k", md, "json+zlib") != digest


def test_stored_metadata_is_checked_before_it_is_trusted() -> None:
    md = make_metadata('"v"', 7, now=100.0)
    digest = metadata_checksum("k", md, "json")
    assert stored_metadata("k", dict(md), digest, "json") == md
    assert stored_metadata("k", dict(md), None, "json") == md  # written before the checksum
    bad: list[dict[str, Any]] = [
        {**md, "version": True},  # a bool is no version
        {**md, "version": "7"},
        {**md, "size_bytes": -1},
        {**md, "created_at": None},
        {**md, "encoding": 1},
        {k: v for k, v in md.items() if k != "checksum"},
    ]
    for fields in bad:
        with pytest.raises(IntegrityError) as info:
            stored_metadata("k", fields, None, "json")
        assert info.value.key == "k"
    for field, value in (("version", 8), ("expires_at", 1.0), ("checksum", "f" * 64)):
        with pytest.raises(IntegrityError) as info:
            stored_metadata("k", {**md, field: value}, digest, "json")
        assert str(value) not in str(info.value)
    with pytest.raises(IntegrityError):
        stored_metadata("other", dict(md), digest, "json")
    with pytest.raises(IntegrityError):
        stored_metadata("k", dict(md), digest, "json+zlib")


def test_inflate_is_bounded_by_the_recorded_size() -> None:
    text = '"' + "é" * 3000 + '"'
    data = text.encode()
    assert inflate(zlib.compress(data), len(data), "k") == text
    # Within the margin it inflates (and the payload checksum decides).
    assert inflate(zlib.compress(data), len(data) - 100, "k") == text
    bomb = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    packed = b"".join(bomb.compress(chunk) for _ in range(64)) + bomb.flush()
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            inflate(packed, 10, "k")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * INFLATE_MARGIN + len(packed) + 1024 * 1024
    damaged = [
        zlib.compress(data)[:-5],  # truncated
        zlib.compress(data) + b"trailing",
        b"not zlib at all",
        zlib.compress(b'"\xff"'),  # not UTF-8
    ]
    for body in damaged:
        with pytest.raises(IntegrityError):
            inflate(body, len(data), "k")
