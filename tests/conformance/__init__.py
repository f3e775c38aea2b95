"""The behaviour every repository must show, run against the real store.

A backend's test module subclasses :class:`RepositoryConformance` and provides
a ``repository`` fixture that yields a fresh, empty repository (its own
namespace, table, prefix or folder) and cleans up afterwards::

    class TestSQLiteConformance(RepositoryConformance):
        @pytest.fixture
        def repository(self, tmp_path):
            with SQLiteStateRepository(tmp_path / "warm.db") as repo:
                yield repo

The contract itself is documented in ``tiered_state/repositories/base.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tiered_state import codec
from tiered_state.errors import BatchError, IntegrityError, InvalidKeyError
from tiered_state.keys import matches
from tiered_state.record import Entry, Metadata, make_metadata, make_stub, make_tombstone
from tiered_state.repositories.base import StateRepository

#: Keys that break naive backends: SQL LIKE and glob metacharacters, path
#: tricks, whitespace, non-ASCII and the longest key allowed.
AWKWARD_KEYS = [
    "plain",
    "with space",
    "a/b/c",
    "/leading-slash",
    "..",
    "../escape",
    "a/../../b",
    ".hidden",
    "100%",
    "a_b",
    "a%b_c",
    "back\\slash",
    "star*key",
    "what?",
    "[bracket]",
    "caret^",
    "dollar$",
    "quote'\"",
    "colon:semi;",
    "CaseSensitive",
    "casesensitive",
    "ünïcödé-κλειδί-键",
    "emoji-🔑",
    "trailing.",
    "trailing ",
    "x" * 1024,
    "é" * 512,
]

#: Keys a repository must refuse before any I/O.
INVALID_KEYS: list[Any] = [
    "",
    "nul\x00byte",
    "new\nline",
    "tab\tkey",
    "del\x7f",
    "c1\x85",
    "x" * 1025,
    "é" * 513,
    "lone\ud800surrogate",
    None,
    42,
    b"bytes",
]

#: (pattern, keys it must select from AWKWARD_KEYS-like sets) is checked
#: against the reference matcher rather than spelled out.
PATTERNS = [
    "*",
    "a*",
    "a/*",
    "*%",
    "100%",
    "a_b",
    "a?b",
    "a%b*",
    "*\\*key",
    "what\\?",
    "\\[bracket]",
    "[ab]*",
    "[!a]*",
    "[^a-c]*",
    "*/*",
    "ünï*",
    "*🔑",
    "back\\\\slash",
    "[[]bracket]",
    "*e",
    "Case*",
    "?",
]


def make(
    value: Any, version: int = 1, *, ttl: float | None = None, now: float | None = None
) -> tuple[str, Metadata]:
    """A (payload, metadata) pair as the manager would store it."""
    payload = codec.encode(value)
    return payload, make_metadata(payload, version, now=time.time() if now is None else now, ttl=ttl)


def same_metadata(got: Metadata, want: Metadata) -> bool:
    """Metadata equal, allowing timestamps the store keeps to the microsecond."""
    for field in ("checksum", "size_bytes", "version", "encoding"):
        if got[field] != want[field]:
            return False
    for field in ("created_at", "updated_at", "expires_at"):
        a, b = got[field], want[field]  # type: ignore[literal-required]
        if (a is None) != (b is None):
            return False
        if a is not None and abs(a - b) > 0.002:
            return False
    return True


class RepositoryConformance:
    """Subclass and provide a ``repository`` fixture yielding an empty repository."""

    #: Seconds a short TTL test waits; stores with coarse expiry may raise it.
    ttl_seconds = 1.0

    # ------------------------------------------------------------ basics
    def test_interface_is_complete(self, repository: StateRepository) -> None:
        assert isinstance(repository, StateRepository)
        assert repository.backend != "base"
        for name in ("fetch", "fetch_record", "store", "delete", "keys", "stats",
                     "store_many", "delete_many", "fetch_many", "store_if_version",
                     "store_if_newer", "delete_if_version", "store_many_if_newer",
                     "store_many_if_version", "delete_many_if_version", "iter_keys",
                     "iter_all_keys", "scan", "touch_many", "clear", "changed_by_others",
                     "ping", "close"):
            assert callable(getattr(repository, name))

    def test_round_trip(self, repository: StateRepository) -> None:
        value = {"qty": 1.5, "side": "buy", "fills": [1, 2, 3], "note": "ünï", "none": None}
        payload, metadata = make(value, version=7)
        assert repository.store("position:BTC", payload, metadata) is True
        assert repository.fetch("position:BTC") == value
        entry = repository.fetch_record("position:BTC")
        assert isinstance(entry, Entry)
        assert entry.key == "position:BTC"
        assert codec.decode(entry.payload) == value
        assert entry.valid()
        assert same_metadata(entry.metadata, metadata)

    @pytest.mark.parametrize(
        "value", [0, -1, 2**70, 1.25, 1e300, "", "text", True, False, None, [], {}, [[{"a": [None]}]]]
    )
    def test_json_values(self, repository: StateRepository, value: Any) -> None:
        repository.store("v", *make(value))
        entry = repository.fetch_record("v")
        assert entry is not None and entry.valid()
        got = repository.fetch("v")
        assert got == value and type(got) is type(value)

    def test_overwrite(self, repository: StateRepository) -> None:
        repository.store("k", *make("one", 1))
        repository.store("k", *make("two", 2))
        assert repository.fetch("k") == "two"
        entry = repository.fetch_record("k")
        assert entry is not None and entry.version == 2
        assert repository.keys("*") == ["k"]

    def test_corrupt_payload_is_never_returned(self, repository: StateRepository) -> None:
        _, metadata = make({"a": 1})
        repository.store("k", codec.encode({"a": 2}), metadata)  # checksum of another payload
        with pytest.raises(IntegrityError):
            repository.fetch("k")
        entry = repository.fetch_record("k")
        assert entry is not None and not entry.valid()

    def test_absent_key(self, repository: StateRepository) -> None:
        assert repository.fetch("missing") is None
        assert repository.fetch_record("missing") is None
        assert repository.delete("missing") is False
        assert repository.fetch_many(["missing"]) == {}

    def test_delete_is_idempotent(self, repository: StateRepository) -> None:
        repository.store("k", *make(1))
        assert repository.delete("k") is True
        assert repository.delete("k") is False
        assert repository.fetch("k") is None
        assert repository.keys() == []

    def test_large_value(self, repository: StateRepository) -> None:
        value = {"blob": "x" * 300_000, "items": list(range(5000))}
        repository.store("big", *make(value))
        assert repository.fetch("big") == value

    # ------------------------------------------------------------ keys
    def test_awkward_keys_round_trip(self, repository: StateRepository) -> None:
        for i, key in enumerate(AWKWARD_KEYS):
            repository.store(key, *make({"i": i, "key": key}))
        for i, key in enumerate(AWKWARD_KEYS):
            assert repository.fetch(key) == {"i": i, "key": key}, key
        assert sorted(repository.keys("*")) == sorted(AWKWARD_KEYS)
        assert repository.delete_many(AWKWARD_KEYS) == len(AWKWARD_KEYS)
        assert repository.keys("*") == []

    @pytest.mark.parametrize("pattern", PATTERNS)
    def test_glob_matches_reference(self, repository: StateRepository, pattern: str) -> None:
        keys = [k for k in AWKWARD_KEYS if len(k) < 100] + [
            "a", "ab", "b", "abc", "a/x", "bb/cc", "100", "1000%", "aXb", "a%bzz", "e",
        ]
        repository.store_many({k: make(k) for k in keys})
        want = sorted(k for k in keys if matches(pattern, k))
        assert sorted(repository.keys(pattern)) == want
        assert sorted(repository.iter_keys(pattern)) == want

    @pytest.mark.parametrize("key", INVALID_KEYS, ids=repr)
    def test_invalid_keys_rejected_before_io(self, repository: StateRepository, key: Any) -> None:
        payload, metadata = make(1)
        with pytest.raises(InvalidKeyError):
            repository.store(key, payload, metadata)
        with pytest.raises(InvalidKeyError):
            repository.fetch(key)
        with pytest.raises(InvalidKeyError):
            repository.fetch_record(key)
        with pytest.raises(InvalidKeyError):
            repository.delete(key)
        with pytest.raises(InvalidKeyError):
            repository.store_many({"good": (payload, metadata), key: (payload, metadata)})
        with pytest.raises(InvalidKeyError):
            repository.delete_many(["good", key])
        with pytest.raises(InvalidKeyError):
            repository.fetch_many(["good", key])
        # nothing at all was written by the refused batch
        assert repository.fetch("good") is None
        assert repository.keys() == []

    # ------------------------------------------------------------ TTL
    def test_ttl_expiry(self, repository: StateRepository) -> None:
        repository.store("short", *make("s", ttl=self.ttl_seconds))
        repository.store("forever", *make("f"))
        assert repository.fetch("short") == "s"
        time.sleep(self.ttl_seconds + 0.3)
        assert repository.fetch("short") is None
        assert repository.fetch("forever") == "f"
        assert repository.keys("*") == ["forever"]
        assert repository.stats()["key_count"] == 1
        entry = repository.fetch_record("short")
        assert entry is None or entry.expired()

    def test_already_expired_record_is_never_shown(self, repository: StateRepository) -> None:
        payload, metadata = make("old", now=time.time() - 10, ttl=5)
        repository.store("gone", payload, metadata)
        repository.store_many({"gone2": (payload, metadata), "live": make("x")})
        assert repository.fetch("gone") is None
        assert repository.fetch("gone2") is None
        assert repository.keys() == ["live"]

    def test_expiry_kept_in_metadata(self, repository: StateRepository) -> None:
        payload, metadata = make("v", ttl=3600)
        repository.store("k", payload, metadata)
        entry = repository.fetch_record("k")
        assert entry is not None and entry.expires_at is not None
        assert abs(entry.expires_at - metadata["expires_at"]) < 0.002  # type: ignore[operator]

    # ------------------------------------------------------------ batches
    def test_store_many_empty(self, repository: StateRepository) -> None:
        assert repository.store_many({}) == set()
        assert repository.delete_many([]) == 0
        assert repository.fetch_many([]) == {}

    def test_store_many_and_fetch_many(self, repository: StateRepository) -> None:
        items = {f"k{i:05d}": make({"i": i}) for i in range(1500)}
        assert repository.store_many(items) == set(items)
        got = repository.fetch_many([*items, "absent"])
        assert set(got) == set(items)
        assert all(codec.decode(e.payload) == {"i": int(k[1:])} for k, e in got.items())
        assert all(e.valid() for e in got.values())
        assert len(repository.keys("k*")) == 1500
        assert repository.stats()["key_count"] == 1500

    def test_store_many_overwrites(self, repository: StateRepository) -> None:
        repository.store_many({"a": make(1, 1), "b": make(1, 1)})
        repository.store_many({"a": make(2, 2), "c": make(2, 2)})
        assert repository.fetch("a") == 2 and repository.fetch("b") == 1
        assert repository.fetch("c") == 2

    def test_store_many_mixed_ttls(self, repository: StateRepository) -> None:
        repository.store_many({
            "short": make("s", ttl=self.ttl_seconds),
            "long": make("l", ttl=3600),
            "none": make("n"),
        })
        time.sleep(self.ttl_seconds + 0.3)
        assert sorted(repository.keys()) == ["long", "none"]

    def test_delete_many_mixed(self, repository: StateRepository) -> None:
        repository.store_many({f"d{i}": make(i) for i in range(1200)})
        keys = [f"d{i}" for i in range(0, 1200, 2)] + ["absent1", "absent2"]
        assert repository.delete_many(keys) == 600
        assert len(repository.keys("d*")) == 600
        assert repository.fetch("d0") is None and repository.fetch("d1") == 1

    def test_delete_many_duplicates_count_once(self, repository: StateRepository) -> None:
        repository.store("a", *make(1))
        assert repository.delete_many(["a", "a"]) == 1

    # ------------------------------------------------------------ conditional
    def test_store_if_version(self, repository: StateRepository) -> None:
        assert repository.store_if_version("k", *make("v1", 10), expected=0) is True
        assert repository.store_if_version("k", *make("x", 11), expected=0) is False
        assert repository.store_if_version("k", *make("x", 11), expected=9) is False
        assert repository.fetch("k") == "v1"
        assert repository.store_if_version("k", *make("v2", 11), expected=10) is True
        assert repository.fetch("k") == "v2"

    def test_store_if_version_treats_expired_as_absent(self, repository: StateRepository) -> None:
        payload, metadata = make("old", 5, now=time.time() - 10, ttl=1)
        repository.store("k", payload, metadata)
        assert repository.store_if_version("k", *make("new", 6), expected=0) is True
        assert repository.fetch("k") == "new"

    def test_store_if_newer(self, repository: StateRepository) -> None:
        assert repository.store_if_newer("k", *make("v5", 5)) is True
        assert repository.store_if_newer("k", *make("v3", 3)) is False
        assert repository.store_if_newer("k", *make("v5b", 5)) is False
        assert repository.fetch("k") == "v5"
        assert repository.store_if_newer("k", *make("v9", 9)) is True
        assert repository.fetch("k") == "v9"

    def test_delete_if_version(self, repository: StateRepository) -> None:
        repository.store("k", *make("v", 4))
        assert repository.delete_if_version("k", 3) is False
        assert repository.fetch("k") == "v"
        assert repository.delete_if_version("k", 4) is True
        assert repository.fetch("k") is None
        assert repository.delete_if_version("k", 4) is False

    def test_version_above_2_53_compares_exactly(self, repository: StateRepository) -> None:
        base = 1 << 60  # versions are microseconds << 10: far above a double's 53 bits
        assert repository.store_if_newer("k", *make("a", base + 2)) is True
        assert repository.store_if_newer("k", *make("b", base + 1)) is False
        assert repository.store_if_newer("k", *make("c", base + 3)) is True
        assert repository.store_if_version("k", *make("d", base + 5), expected=base + 2) is False
        assert repository.store_if_version("k", *make("d", base + 5), expected=base + 3) is True
        assert repository.delete_if_version("k", base + 4) is False
        assert repository.delete_if_version("k", base + 6) is False
        assert repository.fetch_record("k").version == base + 5  # type: ignore[union-attr]
        assert repository.delete_if_version("k", base + 5) is True

    # ------------------------------------------------------------ entry kinds
    def test_stub_is_live_but_holds_no_value(self, repository: StateRepository) -> None:
        _, metadata = make({"a": 1}, 7)
        locator, stub = make_stub(metadata, '{"name":"elsewhere"}')
        repository.store("k", locator, stub)
        entry = repository.fetch_record("k")
        assert entry is not None and entry.kind == "stub" and entry.live() and entry.valid()
        assert entry.payload == locator and entry.version == 7
        assert entry.metadata["checksum"] == metadata["checksum"]
        assert repository.fetch("k") is None
        assert repository.keys() == ["k"] and list(repository.iter_keys("k*")) == ["k"]
        assert repository.stats()["key_count"] == 1
        placeholder = make_stub(metadata)  # empty payload: a HOT placeholder
        repository.store("p", *placeholder)
        assert repository.fetch_record("p").payload == ""  # type: ignore[union-attr]
        assert repository.fetch("p") is None

    def test_tombstone_is_never_live(self, repository: StateRepository) -> None:
        repository.store("k", *make("v", 5))
        assert repository.store_if_version("k", "", make_tombstone(6, now=time.time()),
                                           expected=5) is True
        assert repository.fetch("k") is None
        assert repository.keys() == [] and repository.stats()["key_count"] == 0
        entry = repository.fetch_record("k")
        if entry is not None:  # durable stores keep it; volatile ones drop it at once
            assert entry.kind == "tombstone" and not entry.live() and entry.version == 6
            assert "k" in list(repository.iter_all_keys())
            # A tombstone is "absent" to a create, but orders it after the delete.
            assert repository.store_if_version("k", *make("old", 4), expected=0) is False
            assert repository.store_if_newer("k", *make("old", 6)) is False
        assert repository.store_if_version("k", *make("new", 8), expected=0) is True
        assert repository.fetch("k") == "new"

    def test_tombstones_only_in_the_expired_scan(self, repository: StateRepository) -> None:
        now = time.time()
        repository.store("dead", "", make_tombstone(3, now=now - 100))
        repository.store("old", *make("o", now=now - 100))
        repository.store("moved", *make_stub(make("m", now=now - 100)[1], "loc"))
        seen = sorted(e.key for b in repository.scan(now=now, idle_before=now - 50) for e in b)
        if repository.volatile:
            assert seen == ["old"]
        else:
            assert seen == ["dead", "old"]
            assert sorted(repository.iter_all_keys()) == ["dead", "moved", "old"]

    def test_same_version_replace_is_a_migration(self, repository: StateRepository) -> None:
        payload, metadata = make({"x": 1}, 9)
        repository.store("k", payload, metadata)
        locator, stub = make_stub(metadata, "there")
        assert repository.store_if_version("k", locator, stub, expected=8) is False
        assert repository.store_if_version("k", locator, stub, expected=9) is True
        assert repository.fetch_record("k").kind == "stub"  # type: ignore[union-attr]
        # ... and back: a stub replaced by the value of the same version.
        assert repository.store_if_version("k", payload, metadata, expected=9) is True
        assert repository.fetch("k") == {"x": 1}
        # A newer entry is never replaced by an older one, even if "expected" matches.
        assert repository.store_if_version("k", *make("older", 3), expected=9) is False

    def test_optional_fetch_payload(self, repository: StateRepository) -> None:
        """Where a backend has the optional fast read, it tells the three cases apart."""
        read = getattr(repository, "fetch_payload", None)
        if read is None:
            return  # optional: the manager falls back to fetch_record
        payload, metadata = make({"a": 1}, 4)
        repository.store("v", payload, metadata)
        repository.store("s", *make_stub(metadata, "elsewhere"))
        repository.store("x", *make("gone", 5, now=time.time() - 10, ttl=1))
        assert read("v") == payload
        assert read("s") == ""
        assert read("x") in ("", None)  # volatile stores may have dropped it already
        assert read("absent") is None
        repository.store("bad", codec.encode({"a": 2}), metadata)
        with pytest.raises(IntegrityError):
            read("bad")

    # ------------------------------------------------------------ batch conditionals
    def test_store_many_if_newer(self, repository: StateRepository) -> None:
        repository.store_many({"a": make("a5", 5), "b": make("b5", 5), "t": make("t", 2)})
        repository.store_if_version("t", "", make_tombstone(9, now=time.time()), expected=2)
        tomb_kept = repository.fetch_record("t") is not None  # durable stores keep tombstones
        stored = repository.store_many_if_newer({
            "a": make("a6", 6), "b": make("b4", 4), "c": make("c1", 1), "t": make("t8", 8),
        })
        assert stored == ({"a", "c"} if tomb_kept else {"a", "c", "t"})
        assert repository.fetch("a") == "a6" and repository.fetch("b") == "b5"
        assert repository.fetch("c") == "c1"
        assert repository.store_many_if_newer({}) == set()

    def test_store_many_if_version(self, repository: StateRepository) -> None:
        repository.store_many({"a": make("a5", 5), "b": make("b5", 5)})
        stored = repository.store_many_if_version(
            {"a": make("a7", 7), "b": make("b7", 7), "c": make("c7", 7), "d": make("d7", 7)},
            {"a": 5, "b": 4, "c": 0, "d": 3},
        )
        assert stored == {"a", "c"}
        assert repository.fetch("a") == "a7" and repository.fetch("b") == "b5"
        assert repository.fetch("c") == "c7" and repository.fetch("d") is None
        assert repository.store_many_if_version({}, {}) == set()

    def test_batch_conditionals_over_many_keys(self, repository: StateRepository) -> None:
        n = 1200
        repository.store_many({f"k{i:04d}": make(i, 10) for i in range(n)})
        newer = repository.store_many_if_newer(
            {f"k{i:04d}": make(-i, 11 if i % 2 else 9) for i in range(n)})
        assert newer == {f"k{i:04d}" for i in range(1, n, 2)}
        swapped = repository.store_many_if_version(
            {f"k{i:04d}": make(i * 10, 12) for i in range(n)},
            {f"k{i:04d}": (10 if i % 3 == 0 else 11) for i in range(n)},
        )
        assert swapped == {f"k{i:04d}" for i in range(n) if (i % 3 == 0) == (i % 2 == 0)}
        deleted = repository.delete_many_if_version({f"k{i:04d}": 12 for i in range(n)})
        assert deleted == swapped

    def test_conditional_writes_race(self, repository: StateRepository) -> None:
        """Threads race store_if_newer / store_if_version on one key: the
        greatest version wins and every successful CAS saw the version it replaced."""
        repository.store("race", *make(0, 1))
        wins: list[tuple[int, int]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            try:
                for i in range(25):
                    current = repository.fetch_record("race")
                    assert current is not None
                    new = current.version + 1 + t  # distinct threads may pick the same
                    if repository.store_if_version("race", *make([t, i], new), expected=current.version):
                        with lock:
                            wins.append((current.version, new))
                    repository.store_many_if_newer({"newest": make([t, i], 1000 * t + i + 1)})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        # The successful swaps form one chain: each replaced the previous winner.
        chain = sorted(wins)
        assert [old for old, _ in chain][1:] == [new for _, new in chain][:-1]
        assert repository.fetch_record("race").version == chain[-1][1]  # type: ignore[union-attr]
        assert repository.fetch_record("newest").version == 1000 * 3 + 25  # type: ignore[union-attr]

    # ------------------------------------------------------------ sweep support
    def test_scan_finds_expired_and_idle(self, repository: StateRepository) -> None:
        now = time.time()
        repository.store("expired", *make("e", now=now - 100, ttl=10))
        repository.store("idle", *make("i", now=now - 100))
        repository.store("fresh", *make("f", now=now))
        for i in range(30):
            repository.store(f"idle{i}", *make(i, now=now - 100))
        seen: list[str] = []
        for batch in repository.scan(batch_size=7, now=now, idle_before=now - 50):
            assert 0 < len(batch) <= 7
            seen.extend(e.key for e in batch)
        if repository.volatile:  # expired records may already be gone natively
            seen = [k for k in seen if k != "expired"]
            assert sorted(seen) == sorted(["idle"] + [f"idle{i}" for i in range(30)])
        else:
            assert sorted(seen) == sorted(["expired", "idle"] + [f"idle{i}" for i in range(30)])
        only_expired = [e.key for b in repository.scan(batch_size=100, now=now) for e in b]
        if repository.volatile:
            assert only_expired in ([], ["expired"])
        else:
            assert only_expired == ["expired"]

    def test_scan_allows_deleting_while_iterating(self, repository: StateRepository) -> None:
        now = time.time()
        repository.store_many({f"s{i:04d}": make(i, now=now - 100) for i in range(250)})
        moved = 0
        for batch in repository.scan(batch_size=40, now=now, idle_before=now - 50):
            moved += repository.delete_many([e.key for e in batch])
        assert moved == 250
        assert repository.keys() == []

    def test_touch_many_marks_records_as_read(self, repository: StateRepository) -> None:
        now = time.time()
        repository.store_many({"read": make(1, now=now - 100), "unread": make(2, now=now - 100)})
        repository.touch_many(["read", "absent"], at=now)
        idle = [e.key for b in repository.scan(now=now, idle_before=now - 50) for e in b]
        assert "unread" in idle
        if type(repository).touch_many is not StateRepository.touch_many:
            assert "read" not in idle  # a backend that tracks reads must honour them
        assert repository.fetch("read") == 1

    # ------------------------------------------------------------ stats, lifecycle
    def test_stats(self, repository: StateRepository) -> None:
        repository.store_many({"a": make(1), "b": make(2)})
        stats = repository.stats()
        assert stats["backend"] == repository.backend
        assert "tier" in stats
        assert stats["key_count"] == 2

    def test_clear(self, repository: StateRepository) -> None:
        repository.store_many({f"c{i}": make(i) for i in range(20)})
        assert repository.clear() == 20
        assert repository.keys() == []

    def test_close_twice(self, repository: StateRepository) -> None:
        repository.close()
        repository.close()

    def test_ping(self, repository: StateRepository) -> None:
        assert repository.ping() >= 0.0

    def test_repr_has_no_secret(self, repository: StateRepository) -> None:
        text = repr(repository)
        assert "password" not in text.lower() and "secret" not in text.lower()

    def test_concurrent_writers(self, repository: StateRepository) -> None:
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(50):
                    repository.store(f"t{t}-{i}", *make([t, i]))
                    assert repository.fetch(f"t{t}-{i}") == [t, i]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(repository.keys("t*")) == 200

    def test_batch_error_type_exists(self) -> None:
        # Backends raise BatchError for part-way failures; its shape is fixed.
        err = BatchError("store_many", {"a": ValueError("x")}, ["b"], "memory")
        assert err.failed.keys() == {"a"} and err.succeeded == ["b"]
