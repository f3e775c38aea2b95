from __future__ import annotations

import hashlib
import threading
import time

import pytest

from tiered_state import Tier
from tiered_state.errors import ConfigurationError, SerializationError
from tiered_state.record import Entry, VersionClock, checksum, make_metadata


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
