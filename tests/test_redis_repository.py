"""RedisStateRepository against the real Redis (TIERED_STATE_TEST_REDIS_URL).

Each test gets its own prefix and the fixture deletes everything under it
afterwards, so runs never see each other's keys.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tiered_state import codec
from tiered_state.config import open_repository
from tiered_state.errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    ConfigurationError,
    IntegrityError,
    SerializationError,
)
from tiered_state.keys import matches
from tiered_state.record import Tier, make_stub, make_tombstone
from tiered_state.testing import RepositoryContract, make

from .support import free_port, require_module, unique_name

redis = require_module("redis")

from tiered_state.repositories.redis_repository import (  # noqa: E402
    CHUNK,
    EPOCH_MARK,
    FORMAT_MARK,
    HEADER_SIZE,
    META_MARK,
    RedisStateRepository,
    pack_record,
    unpack_record,
)


@pytest.fixture
def prefix() -> str:
    return unique_name("ts") + ":"


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def repository(redis_url: str, prefix: str, raw: redis.Redis) -> Iterator[RedisStateRepository]:
    with RedisStateRepository.from_url(redis_url, prefix=prefix) as repo:
        repo.ping()  # the first call marks the prefix (format 2): raw writes after it stay
        yield repo
    leftovers = list(raw.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000))
    if leftovers:
        raw.unlink(*leftovers)


class TestRedisConformance(RepositoryContract):
    # repository: the module's fixture. secret_url: the default, a password the
    # server (which has none) refuses at the first call.
    cannot_break_keys = (
        "only an ACL makes Redis refuse one key (a value of another type is "
        "overwritten by design), and the shared server's ACLs are not the test's to "
        "change: test_conditional_batch_reports_failed_and_written_keys does it "
        "on a private server")

    @pytest.fixture
    def repository_url(self, redis_url: str, prefix: str) -> str:
        return redis_url + ("&" if "?" in redis_url else "?") + f"prefix={prefix}"

    def test_tombstone_vanishes_at_once(self, repository: RedisStateRepository) -> None:
        repository.store("t", *make("t", 2))
        repository.store_if_version("t", "", make_tombstone(9, now=time.time()), expected=2)
        assert repository.fetch_record("t") is None  # volatile: expired entries are gone


# ---------------------------------------------------------------- storage format
def under(raw: redis.Redis, prefix: str) -> set[bytes]:
    """Every key under ``prefix``, the store's own (``\\x1f...``) included."""
    return set(raw.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000))


def test_one_key_per_record_and_redis_cli_shows_the_json(
        repository: RedisStateRepository, raw: redis.Redis, prefix: str) -> None:
    payload, metadata = make({"qty": 1.5, "side": "buy"}, version=1806491410558419291)
    repository.store("position:BTC", payload, metadata)
    stored = raw.get(f"{prefix}position:BTC")
    assert stored is not None
    # The header, then the JSON byte for byte: GETRANGE from HEADER_SIZE is the value.
    assert stored[:3] == b"ts\x02" and len(stored) == HEADER_SIZE + len(payload)
    assert stored[HEADER_SIZE:] == b'{"qty":1.5,"side":"buy"}'
    assert raw.getrange(f"{prefix}position:BTC", HEADER_SIZE, -1) == b'{"qty":1.5,"side":"buy"}'
    assert unpack_record(stored) == (payload, metadata)
    # One key for the record; beside it only the format key.
    assert under(raw, prefix) == {f"{prefix}position:BTC".encode(),
                                  f"{prefix}{FORMAT_MARK}".encode()}
    assert raw.get(f"{prefix}{FORMAT_MARK}") == b"2"
    assert raw.pttl(f"{prefix}position:BTC") == -1  # no TTL


def test_the_header_byte_by_byte(repository: RedisStateRepository, raw: redis.Redis,
                                 prefix: str) -> None:
    """The layout docs/redis.rst documents, field by field."""
    payload, metadata = make([1, 2], version=2**63 - 1, ttl=60)
    copy = {**metadata, "hot_until": metadata["updated_at"] + 30}
    repository.store("k", payload, copy)  # type: ignore[arg-type]
    data = raw.get(f"{prefix}k")
    fields = struct.unpack(">3sBBQ32sQdddd", data[:HEADER_SIZE])
    assert fields == (b"ts\x02", 0x01 | 0x02, 1, 2**63 - 1,
                      bytes.fromhex(metadata["checksum"]), len(payload),
                      metadata["created_at"], metadata["updated_at"], metadata["expires_at"],
                      copy["hot_until"])
    assert data[HEADER_SIZE:] == b"[1,2]"
    entry = repository.fetch_record("k")
    assert entry is not None and entry.metadata == copy  # hot_until comes back too


@pytest.mark.parametrize("encoding", ["json", "typed-json", "json+zlib", "my-codec.v2",
                                      "x" * 64])
def test_every_encoding_round_trips(repository: RedisStateRepository, raw: redis.Redis,
                                    prefix: str, encoding: str) -> None:
    payload, metadata = make({"a": 1})
    metadata["encoding"] = encoding
    repository.store("k", payload, metadata)
    assert repository.store_many_if_newer({"m": (payload, metadata)}) == {"m"}
    for key in ("k", "m"):
        entry = repository.fetch_record(key)
        assert entry is not None and entry.metadata == metadata and entry.payload == payload
        assert repository.fetch_many([key])[key].metadata == metadata
    data = raw.get(f"{prefix}k")
    if encoding in ("json", "typed-json", "json+zlib"):
        assert data[HEADER_SIZE:] == payload.encode()
    else:  # a codec of its own: the name (length byte first) comes before the payload
        name = encoding.encode()
        assert data[4] == 0 and data[HEADER_SIZE:] == bytes([len(name)]) + name + payload.encode()


def test_a_checksum_that_is_no_digest_reads_back_as_empty(repository: RedisStateRepository) -> None:
    """Only a SHA-256 hex digest fits the header. Anything else matches no
    payload, and comes back as "", which matches none either."""
    for n, odd in enumerate(["", "abc", "A" * 64, "g" * 64, "é" * 32]):
        payload, metadata = make(n)
        metadata["checksum"] = odd
        repository.store(f"k{n}", payload, metadata)
        entry = repository.fetch_record(f"k{n}")
        assert entry is not None and entry.metadata["checksum"] == "" and not entry.valid()
        assert entry.version == metadata["version"]


def test_metadata_that_does_not_fit_raises_before_any_write(
        repository: RedisStateRepository) -> None:
    payload, good = make(1)
    for bad in ({**good, "version": -1}, {**good, "version": 2**64}, {**good, "size_bytes": -5},
                {**good, "created_at": "yesterday"}, {**good, "encoding": "e" * 300}):
        with pytest.raises(SerializationError):
            repository.store("k", payload, bad)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            repository.store_many({"a": (payload, good), "k": (payload, bad)})  # type: ignore[dict-item]
        with pytest.raises(SerializationError):
            repository.store_many_if_newer({"a": (payload, good), "k": (payload, bad)})  # type: ignore[dict-item]
    with pytest.raises(SerializationError):
        repository.store("k", "\ud800", good)  # a lone surrogate is no UTF-8 text
    assert repository.keys() == []


def test_ttl_is_native(repository: RedisStateRepository, raw: redis.Redis, prefix: str) -> None:
    repository.store("k", *make("v", ttl=60))
    assert 59_000 < raw.pttl(f"{prefix}k") <= 60_000
    # Overwriting without a TTL removes the old expiry.
    repository.store("k", *make("v2"))
    assert raw.pttl(f"{prefix}k") == -1
    repository.store_many({"a": make(1, ttl=30), "b": make(2)})
    assert 29_000 < raw.pttl(f"{prefix}a") <= 30_000
    assert raw.pttl(f"{prefix}b") == -1
    assert repository.store_if_newer("c", *make(3, ttl=20)) is True
    assert 19_000 < raw.pttl(f"{prefix}c") <= 20_000


def test_expired_record_replaces_older_copy_with_nothing(repository: RedisStateRepository,
                                                         raw: redis.Redis, prefix: str) -> None:
    repository.store_many({"a": make("live"), "b": make("live")})
    old = make("old", now=time.time() - 10, ttl=5)
    repository.store("a", *old)
    repository.store_many({"b": old})
    assert raw.exists(f"{prefix}a", f"{prefix}b") == 0
    assert repository.fetch_record("a") is None


def test_default_ttl_applies_only_to_records_without_expiry(redis_url: str, prefix: str,
                                                            raw: redis.Redis) -> None:
    with RedisStateRepository.from_url(f"{redis_url}?default_ttl=120", prefix=prefix) as repo:
        assert repo.default_ttl == 120
        repo.store("plain", *make(1))
        repo.store("own", *make(2, ttl=10))
        assert 119_000 < raw.pttl(f"{prefix}plain") <= 120_000
        assert raw.pttl(f"{prefix}own") <= 10_000
        entry = repo.fetch_record("plain")
        assert entry is not None and entry.expires_at is None  # a cache lifetime, not the record's
        repo.clear()


def _damaged() -> list[bytes]:
    """Values with no record of this format in them, as Python and the scripts agree."""
    good = pack_record(*make({"x": 1}, version=5))
    return [
        b'{"x":1}',  # another tool wrote plain JSON (or tiered-state 0.1 did)
        b"",  # an empty string (0.1\'s placeholder)
        b"not json",
        b"ts\x01" + good[3:],  # another format
        good[:HEADER_SIZE - 1],  # a truncated header
        good[:3] + bytes([0x80]) + good[4:],  # a flag nobody defined
        good[:4] + bytes([200]) + good[5:],  # an encoding code nobody defined
        good[:4] + bytes([0]) + good[5:HEADER_SIZE] + bytes([40]) + b"json",  # a name cut short
    ]


@pytest.mark.parametrize("index", range(len(_damaged())))
def test_a_value_that_is_no_record_reads_as_a_corrupt_one(
        repository: RedisStateRepository, raw: redis.Redis, prefix: str, index: int) -> None:
    """Not as absent: the manager must count it and use another copy, and any
    conditional write replaces it."""
    raw.set(f"{prefix}k", _damaged()[index])
    entry = repository.fetch_record("k")
    assert entry is not None and not entry.valid() and entry.version == 0
    assert entry.metadata["checksum"] == ""
    got = repository.fetch_many(["k"])["k"]
    assert not got.valid() and got.version == 0
    assert repository.fetch_many_in_epoch(["k"], "e") is None  # no epoch yet
    with pytest.raises(IntegrityError):
        repository.fetch("k")
    assert repository.keys() == ["k"]  # listed, as any key under the prefix
    assert repository.store_if_newer("k", *make(2, version=1)) is True
    assert repository.fetch("k") == 2
    raw.set(f"{prefix}k", _damaged()[index])
    assert repository.store_many_if_version({"k": make(3, version=2)}, {"k": 0}) == {"k"}
    raw.set(f"{prefix}k", _damaged()[index])
    assert repository.delete_if_version("k", 0) is False  # version 0 is nobody's
    assert repository.store_many_if_newer({"k": make(4, version=1)}) == {"k"}
    assert repository.fetch("k") == 4


def test_python_and_the_scripts_agree_on_every_bit_flip_of_a_header(
        repository: RedisStateRepository, raw: redis.Redis, prefix: str) -> None:
    """Flip each bit of the header (and the byte after it): the reader and
    the Lua scripts must agree on what is stored -- a record of version v, or
    no record (version 0) -- or a conditional write could be refused forever
    by a copy the manager reads as corrupt. Reads never raise."""
    payload, metadata = make({"qty": 1.5}, version=(1 << 60) + 12345, ttl=60)
    good = pack_record(payload, metadata)
    for bit in range((HEADER_SIZE + 1) * 8):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        raw.set(f"{prefix}k", bytes(flipped))
        entry = repository.fetch_record("k")
        assert entry is not None, bit
        assert repository.fetch_many(["k"])["k"] == entry, bit  # both read paths agree
        # Stored iff the scripts see exactly the version the reader saw.
        assert repository.store_if_version("k", *make(1, version=entry.version),
                                           expected=entry.version) is True, (bit, entry)


def test_corrupt_payload_fails_its_checksum(repository: RedisStateRepository, raw: redis.Redis,
                                            prefix: str) -> None:
    repository.store("k", *make({"a": 1}))
    raw.setrange(f"{prefix}k", HEADER_SIZE, b'{"a":2}')
    with pytest.raises(IntegrityError):
        repository.fetch("k")
    entry = repository.fetch_record("k")
    assert entry is not None and entry.version == 1  # the header is intact
    raw.setrange(f"{prefix}k", HEADER_SIZE, b"\xff\xfe")  # not even UTF-8
    entry = repository.fetch_record("k")
    assert entry is not None and not entry.valid()
    assert not repository.fetch_many(["k"])["k"].valid()


def test_a_key_of_another_type_reads_as_absent_and_is_replaced(
        repository: RedisStateRepository, raw: redis.Redis, prefix: str) -> None:
    """A key another tool turned into a hash is not a string to MGET: reads
    skip it, and a conditional write replaces it instead of failing on WRONGTYPE."""
    raw.hset(f"{prefix}wrongtype", "a", "b")
    assert repository.fetch_record("wrongtype") is None
    assert repository.fetch_many(["wrongtype"]) == {}
    assert repository.store_if_newer("wrongtype", *make(1, version=3)) is True
    assert repository.fetch("wrongtype") == 1
    raw.delete(f"{prefix}w2")
    raw.rpush(f"{prefix}w2", "a")
    assert repository.store_many_if_version({"w2": make(2, version=4)}, {"w2": 0}) == {"w2"}
    raw.delete(f"{prefix}w3")
    raw.sadd(f"{prefix}w3", "a")
    assert repository.delete_if_version("w3", 1) is False
    repository.store("w3", *make(3))  # a plain store replaces it too
    assert repository.fetch("w3") == 3


# ---------------------------------------------------------------- the format key (upgrades)
def write_format_1(raw: redis.Redis, prefix: str, key: str, value: Any, version: int,
                   ttl_ms: int | None = None) -> None:
    """A record as tiered-state 0.1 (and main before format 2) stored it: two keys."""
    payload, metadata = make(value, version=version)
    raw.set(f"{prefix}{key}", payload, px=ttl_ms)
    raw.set(f"{prefix}{META_MARK}{key}", codec.encode(dict(metadata)), px=ttl_ms)


def test_a_store_of_the_two_key_layout_is_flushed_on_open(
        redis_url: str, raw: redis.Redis, prefix: str) -> None:
    write_format_1(raw, prefix, "position:BTC", {"qty": 1}, version=2**62)
    write_format_1(raw, prefix, "timed", "old", version=7, ttl_ms=60_000)
    raw.set(f"{prefix}placeholder", b"")  # 0.1\'s placeholder: an empty value...
    raw.set(f"{prefix}{META_MARK}placeholder", b'{"version":9,"encoding":"stub"}')
    raw.set(f"{prefix}\x1fepoch", b"e-old")
    others = unique_name("other") + ":"
    write_format_1(raw, others, "position:BTC", {"qty": 1}, version=3)  # another prefix
    with RedisStateRepository(redis_url, prefix=prefix) as repo:
        # The first call checks the format: nothing old is ever read as a record.
        assert repo.fetch("position:BTC") is None
        assert repo.fetch_many(["position:BTC", "timed", "placeholder"]) == {}
        assert under(raw, prefix) == {f"{prefix}{FORMAT_MARK}".encode()}
        assert repo.epoch_state()[1] is None  # the epoch went first: every guard flushes again
        # A write of any version goes in: nothing old blocks it.
        assert repo.store_if_newer("position:BTC", *make({"qty": 2}, version=5)) is True
        assert repo.fetch("position:BTC") == {"qty": 2}
        assert repo.keys() == ["position:BTC"]
    assert raw.get(f"{others}position:BTC") == b'{"qty":1}'  # other prefixes untouched
    raw.delete(f"{others}position:BTC", f"{others}{META_MARK}position:BTC")
    with RedisStateRepository(redis_url, prefix=prefix) as again:  # marked: no second flush
        assert again.fetch("position:BTC") == {"qty": 2}


def test_a_store_of_the_two_key_layout_is_flushed_before_a_manager_serves(
        redis_url: str, raw: redis.Redis, prefix: str, tmp_path: Any) -> None:
    """Through the manager: Redis holds 0.1\'s copy of a key the catalog has
    since moved on from; the first read serves the catalog\'s value."""
    import tiered_state

    urls = {"hot": f"{redis_url}?prefix={prefix}", "warm": f"sqlite:///{tmp_path / 'w.db'}",
            "cold": "none"}
    with tiered_state.open(**urls) as state:
        state.set("k", "new")
        state.set("gone", "x")
        state.delete("gone")
    raw.unlink(*under(raw, prefix))
    write_format_1(raw, prefix, "k", "old", version=2**63 - 1)  # a version nothing beats
    write_format_1(raw, prefix, "gone", "stale", version=2**63 - 1)
    with tiered_state.open(**urls) as state:
        assert state.get("k") == "new" and state.get("gone") is None
        assert state.get_many(["k", "gone"]) == {"k": "new"}
        assert not any(META_MARK.encode() in name for name in under(raw, prefix))
        hot = state.repositories[Tier.HOT]
        hot = getattr(hot, "inner", hot)
        assert isinstance(hot, RedisStateRepository)
        assert hot.fetch("k") in (None, "new") and hot.fetch("gone") is None
        state.set("k", "newer")
        assert state.get("k") == "newer"


def test_a_newer_format_is_refused_and_left_alone(redis_url: str, raw: redis.Redis,
                                                  prefix: str) -> None:
    raw.set(f"{prefix}{FORMAT_MARK}", b"3")
    raw.set(f"{prefix}k", b"a format 3 record")
    with RedisStateRepository(redis_url, prefix=prefix) as repo:
        for call in (lambda: repo.fetch("k"), lambda: repo.store("k", *make(1)), repo.clear):
            with pytest.raises(BackendError, match=r"format 3.*upgrade tiered-state"):
                call()
    assert raw.get(f"{prefix}k") == b"a format 3 record"
    assert raw.get(f"{prefix}{FORMAT_MARK}") == b"3"


def test_clear_leaves_nothing_and_the_next_call_marks_again(
        repository: RedisStateRepository, raw: redis.Redis, prefix: str) -> None:
    repository.store_many({"a": make(1), "b": make(2)})
    repository.reset_epoch("e1")  # a clear() too; the epoch and the format key come back
    assert under(raw, prefix) == {f"{prefix}{EPOCH_MARK}".encode(),
                                  f"{prefix}{FORMAT_MARK}".encode()}
    repository.store("a", *make(1))
    assert repository.clear() == 1
    assert under(raw, prefix) == set()  # nothing left behind
    repository.store("b", *make(2))  # marks the prefix first, flushing nothing
    assert raw.get(f"{prefix}{FORMAT_MARK}") == b"2"
    assert repository.keys() == ["b"]


def test_a_lost_format_key_costs_one_flush(redis_url: str, raw: redis.Redis, prefix: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with RedisStateRepository(redis_url, prefix=prefix) as repo:
        repo.store("a", *make(1))
    raw.delete(f"{prefix}{FORMAT_MARK}")  # evicted, or deleted by hand
    with caplog.at_level(logging.WARNING), RedisStateRepository(redis_url, prefix=prefix) as repo:
        assert repo.fetch("a") is None
        assert "flushed 1 keys" in caplog.text
        assert raw.get(f"{prefix}{FORMAT_MARK}") == b"2"


def test_the_format_is_checked_once_by_concurrent_first_calls(
        redis_url: str, raw: redis.Redis, prefix: str) -> None:
    import threading

    write_format_1(raw, prefix, "old", 1, version=1)
    with RedisStateRepository(redis_url, prefix=prefix) as repo:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                repo.store(f"k{n}", *make(n))
                assert repo.fetch(f"k{n}") == n
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(repo.keys()) == sorted(f"k{n}" for n in range(8))


# ---------------------------------------------------------------- namespaces
def test_prefix_isolates_namespaces(redis_url: str, raw: redis.Redis) -> None:
    one, two = unique_name("a") + ":", unique_name("b") + ":"
    with RedisStateRepository.from_url(f"{redis_url}?prefix={one}") as a, \
            RedisStateRepository(redis_url, prefix=two) as b:
        a.store_many({"x": make(1), "y": make(2)})
        b.store("x", *make("other"))
        assert a.prefix == one
        assert a.fetch("x") == 1 and b.fetch("x") == "other"
        assert sorted(a.keys()) == ["x", "y"] and b.keys() == ["x"]
        assert a.stats()["key_count"] == 2 and b.stats()["key_count"] == 1
        assert a.clear() == 2
        assert b.fetch("x") == "other"
        assert b.clear() == 1
    assert list(raw.scan_iter(match=one + "*")) == [] and list(raw.scan_iter(match=two + "*")) == []


@pytest.mark.parametrize("special", ["a*", "b?", "c[x]", "d\\", "e^"])
def test_glob_characters_in_the_prefix_are_literal(redis_url: str, raw: redis.Redis,
                                                   special: str) -> None:
    base = unique_name("g")
    neighbour = RedisStateRepository(redis_url, prefix=f"{base}{special}X:")
    with RedisStateRepository(redis_url, prefix=f"{base}{special}:") as repo:
        neighbour.store("n", *make(0))  # would match an unescaped prefix glob
        repo.store_many({"k1": make(1), "k2": make(2)})
        assert sorted(repo.keys()) == ["k1", "k2"]
        assert sorted(repo.keys("k?")) == ["k1", "k2"]
        assert repo.stats()["key_count"] == 2
        assert repo.clear() == 2
        assert neighbour.fetch("n") == 0
    neighbour.clear()
    neighbour.close()


def test_non_ascii_single_character_wildcards(repository: RedisStateRepository) -> None:
    # Redis globs match bytes; "?" must still match one (multi-byte) character.
    keys = ["é", "a", "aé", "éé", "🔑x", "[é]"]
    repository.store_many({k: make(k) for k in keys})
    for pattern in ["?", "??", "a?", "?x", "[é]", "[!a]", "[!a]?", "\\[?]", "*"]:
        want = sorted(k for k in keys if matches(pattern, k))
        assert sorted(repository.keys(pattern)) == want, pattern


def test_keys_scans_in_batches(repository: RedisStateRepository, raw: redis.Redis) -> None:
    repository.store_many({f"s{i:05d}": make(i) for i in range(3000)})
    iterator = repository.iter_keys("s*")
    first = next(iterator)
    assert first.startswith("s")
    assert len(set(iterator)) + 1 == 3000
    commands = raw.info("commandstats")
    assert "cmdstat_keys" not in commands or commands["cmdstat_keys"]["calls"] == 0


# ---------------------------------------------------------------- options and URLs
def test_from_url_and_registry(redis_url: str, prefix: str) -> None:
    repo = open_repository(f"{redis_url}?prefix={prefix}&socket_timeout=2.5"
                           "&socket_connect_timeout=0.25&max_connections=7")
    assert isinstance(repo, RedisStateRepository)
    kwargs = repo.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2.5 and kwargs["socket_connect_timeout"] == 0.25
    assert repo.client.connection_pool.max_connections == 7
    assert repo.prefix == prefix
    repo.close()
    default = RedisStateRepository(redis_url)
    kwargs = default.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.0, 0.5)
    assert default.prefix == "tiered_state:"
    default.close()


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?default_ttl=-3",
    "redis://127.0.0.1:6379/0?default_ttl=soon",
    "redis://127.0.0.1:6379/0?socket_timeout=0",
    "redis://127.0.0.1:6379/0?prefix=bad%0Aprefix",
    "redis://127.0.0.1:6379/0?socket_timout=1",
    "redis://127.0.0.1:6379/0?foo=1",
])
def test_bad_options_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_repository(url)
    if "_timout" in url:  # a misspelt option is named, with the one it looks like
        assert "'socket_timout' (did you mean 'socket_timeout'?)" in str(info.value)


def test_unix_socket_url(tmp_path, prefix: str) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with open_repository(f"unix://{sock}?db=1&prefix={prefix}") as repo:
            assert "unix://" in repr(repo)
            repo.store("k", *make([1, 2]))
            assert repo.fetch("k") == [1, 2]
            assert repo.client.connection_pool.connection_kwargs["db"] == 1
    finally:
        proc.kill()
        proc.wait()


def test_accepts_a_ready_client(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with RedisStateRepository(client, prefix=prefix) as repo:
        repo.store_many({"a": make({"x": "ü"}), "b": make(2, ttl=60)})
        assert repo.fetch("a") == {"x": "ü"}
        assert sorted(repo.keys()) == ["a", "b"]
        assert set(repo.fetch_many(["a", "b"])) == {"a", "b"}
        assert repo.clear() == 2
    assert client.ping()  # not closed: the caller owns it
    client.close()
    with pytest.raises(ConfigurationError):
        RedisStateRepository(redis.Redis(), max_connections=3)


@pytest.mark.parametrize("base", [1, 1 << 60], ids=["small", "2**60"])
def test_conditional_writes_are_atomic_across_clients(redis_url: str, prefix: str,
                                                      base: int) -> None:
    import threading

    # At 2**60 a version and the next one are the same double: a comparison
    # that is not exact lets two clients both win the same swap.
    repos = [RedisStateRepository(redis_url, prefix=prefix) for _ in range(4)]
    repos[0].store("counter", *make(0, version=base))
    wins: list[int] = []

    def work(repo: RedisStateRepository) -> None:
        for _ in range(50):
            entry = repo.fetch_record("counter")
            assert entry is not None
            value = codec.decode(entry.payload)
            if repo.store_if_version("counter", *make(value + 1, entry.version + 1),
                                     expected=entry.version):
                wins.append(1)

    threads = [threading.Thread(target=work, args=(r,)) for r in repos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert repos[0].fetch("counter") == len(wins)  # no lost update
    repos[0].clear()
    for r in repos:
        r.close()


def test_store_many_groups_ttls_and_reports_all(repository: RedisStateRepository) -> None:
    now = time.time()
    items = {f"p{i}": make(i) for i in range(700)}
    items.update({f"t{i}": make(i, ttl=100 + i) for i in range(700)})
    items.update({f"e{i}": make(i, now=now - 10, ttl=1) for i in range(10)})
    assert repository.store_many(items) == set(items)
    got = repository.fetch_many(items)
    assert set(got) == {k for k in items if not k.startswith("e")}
    assert got["t5"].expires_at == items["t5"][1]["expires_at"]


# ---------------------------------------------------------------- errors and secrets
def test_unreachable_server_is_backend_unavailable() -> None:
    repo = RedisStateRepository(f"redis://127.0.0.1:{free_port()}/0")
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        repo.fetch("k")
    assert time.monotonic() - start < 1.5
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    for call in (lambda: repo.store("k", *make(1)), lambda: repo.keys(), repo.stats,
                 lambda: repo.store_many({"a": make(1)}), lambda: repo.delete_many(["a"]),
                 lambda: repo.fetch_many(["a"]), lambda: repo.delete_if_version("a", 1), repo.ping,
                 lambda: repo.store_if_newer("a", *make(1)),
                 lambda: repo.store_if_version("a", *make(1), expected=0),
                 lambda: repo.store_many_if_newer({"a": make(1)}),
                 lambda: repo.store_many_if_version({"a": make(1)}, {"a": 0}),
                 lambda: repo.delete_many_if_version({"a": 1})):
        with pytest.raises(BackendUnavailableError):
            call()


def test_other_driver_errors_are_backend_errors(private_redis: str) -> None:
    """Out of memory is not an outage: a BackendError, not BackendUnavailableError."""
    with RedisStateRepository(private_redis, prefix="oom:") as repo:
        repo.client.config_set("maxmemory", "1")
        repo.client.config_set("maxmemory-policy", "noeviction")
        try:
            for call in (lambda: repo.store("k", *make(1)),
                         lambda: repo.store_if_version("k", *make(1), expected=0)):
                with pytest.raises(BackendError) as info:
                    call()
                assert not isinstance(info.value, BackendUnavailableError)
                assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)
        finally:
            repo.client.config_set("maxmemory", "0")


@pytest.fixture
def password_server() -> Iterator[tuple[int, str]]:
    import shutil
    import subprocess

    from .support import wait_for_port

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port, secret = free_port(), "s3cr3t-" + unique_name("pw")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", secret],
                            stdout=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 10)
        yield port, secret
    finally:
        proc.kill()
        proc.wait()


def test_password_never_shown(password_server: tuple[int, str], caplog: pytest.LogCaptureFixture,
                              prefix: str) -> None:
    port, secret = password_server
    caplog.set_level(logging.DEBUG)
    with RedisStateRepository(f"redis://:{secret}@127.0.0.1:{port}/0", prefix=prefix) as repo:
        repo.store("k", *make(1))
        assert repo.fetch("k") == 1
        texts = [repr(repo), str(repo.stats())]
    with RedisStateRepository(f"redis://:wrong-{secret}@127.0.0.1:{port}/0") as bad:
        with pytest.raises(BackendError) as info:
            bad.fetch("k")
        texts += [repr(bad), str(info.value)]
    with RedisStateRepository(f"redis://:{secret}@127.0.0.1:{free_port()}/0") as down:
        with pytest.raises(BackendUnavailableError) as unavailable:
            down.fetch("k")
        texts += [repr(down), str(unavailable.value)]
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert secret not in text
    assert f"127.0.0.1:{port}" in texts[0]


def test_hot_until_drops_the_copy_but_keeps_expires_at(repository: RedisStateRepository,
                                                       raw: redis.Redis, prefix: str) -> None:
    payload, metadata = make("v", ttl=3600)
    copy = {**metadata, "hot_until": time.time() + 30}
    repository.store_many({"a": (payload, copy)})  # type: ignore[dict-item]
    repository.store("b", payload, copy)  # type: ignore[arg-type]
    for key in ("a", "b"):
        assert 29_000 < raw.pttl(f"{prefix}{key}") <= 30_000
        entry = repository.fetch_record(key)
        assert entry is not None and entry.expires_at == metadata["expires_at"]
    gone = {**metadata, "hot_until": time.time() - 1}
    assert repository.store_if_newer("a", payload, {**gone, "version": 9})  # type: ignore[arg-type]
    assert repository.fetch_record("a") is None


def test_delete_many_if_version(repository: RedisStateRepository) -> None:
    repository.store_many({f"k{i}": make(i, version=i + 1) for i in range(1200)})
    wanted = {f"k{i}": i + 1 for i in range(1200)}
    wanted["k3"] = 99  # changed meanwhile: must stay
    wanted["absent"] = 1
    deleted = repository.delete_many_if_version(wanted)
    assert deleted == {f"k{i}" for i in range(1200)} - {"k3"}
    assert repository.keys() == ["k3"]


# ---------------------------------------------------------------- exact versions
# Versions are microseconds << 10 | node (about 1.8e18). Doubles are exact only
# to 2**53, so each pair below is one number to a double: only an exact
# comparison tells them apart.
NEAR_2_60 = 1 << 60
CLOSE_PAIRS = [
    (NEAR_2_60, NEAR_2_60 + 1),
    (10**18 - 1, 10**18),  # 18 digits against 19
    (10**18 + 9999, 10**18 + 10000),  # differ before the last 4 digits, which order the other way
    (2**63 - 2, 2**63 - 1),
]


@pytest.mark.parametrize(("low", "high"), CLOSE_PAIRS,
                         ids=["2**60", "digits18-19", "carry", "2**63"])
def test_versions_one_apart_compare_exactly(repository: RedisStateRepository,
                                            low: int, high: int) -> None:
    assert float(low) == float(high)  # what the test is about
    # single-key forms
    assert repository.store_if_newer("k", *make("low", low)) is True
    assert repository.store_if_newer("k", *make("low again", low)) is False
    assert repository.store_if_newer("k", *make("high", high)) is True
    assert repository.store_if_newer("k", *make("low", low)) is False
    assert repository.store_if_version("k", *make("x", high), expected=low) is False
    assert repository.store_if_version("k", *make("x", low), expected=high) is False  # older
    assert repository.store_if_version("k", *make("same", high), expected=high) is True
    assert repository.delete_if_version("k", low) is False
    assert repository.fetch("k") == "same"
    assert repository.delete_if_version("k", high) is True
    # batch forms
    repository.store_many({"a": make("a", low), "b": make("b", high)})
    assert repository.store_many_if_newer({"a": make("a2", high), "b": make("b2", low)}) == {"a"}
    assert repository.store_many_if_version(
        {"a": make("a3", high), "b": make("b3", high), "c": make("c3", high)},
        {"a": low, "b": high, "c": 0},
    ) == {"b", "c"}
    assert repository.fetch("a") == "a2" and repository.fetch("b") == "b3"
    assert repository.delete_many_if_version({"a": low, "b": high, "c": low}) == {"b"}
    assert sorted(repository.keys()) == ["a", "c"]
    assert repository.fetch_record("a").version == high  # type: ignore[union-attr]


# ---------------------------------------------------------------- stubs (placeholders)
def test_placeholders_round_trip_as_empty_values(repository: RedisStateRepository,
                                                 raw: redis.Redis, prefix: str) -> None:
    _, metadata = make({"x": 1}, 7)
    locator, stub = make_stub(metadata)  # empty payload: "ask the catalog"
    assert locator == ""
    repository.store("single", locator, stub)
    repository.store_many({"many": (locator, stub)})
    assert repository.store_if_newer("newer", locator, stub) is True
    assert repository.store_many_if_newer({"batch": (locator, stub)}) == {"batch"}
    timed = {**stub, "hot_until": time.time() + 60}
    repository.store_many({"timed": (locator, timed)})  # type: ignore[dict-item]
    keys = ["single", "many", "newer", "batch", "timed"]
    for key in keys:
        stored = raw.get(f"{prefix}{key}")
        assert len(stored) == HEADER_SIZE and stored[4] == 3  # a header alone: encoding "stub"
        entry = repository.fetch_record(key)
        assert entry is not None and entry.payload == "" and entry.kind == "stub", key
        assert entry.live() and entry.version == 7
        assert repository.fetch(key) is None
    got = repository.fetch_many([*keys, "absent"])
    assert set(got) == set(keys) and all(e.payload == "" for e in got.values())
    assert sorted(repository.keys()) == sorted(keys) and repository.keys("single") == ["single"]
    assert repository.stats()["key_count"] == len(keys)
    # The placeholder blocks an older copy and gives way to its own write.
    assert repository.store_many_if_newer({"single": make("old", 6)}) == set()
    assert repository.store_if_newer("single", *make("old", 7)) is False
    assert repository.store_if_version("single", *make("new", 7), expected=7) is True
    assert repository.fetch("single") == "new"
    assert repository.delete_if_version("many", 7) is True
    assert repository.delete_many_if_version({"newer": 7, "batch": 6}) == {"newer"}
    assert repository.clear() == 3


def test_placeholders_with_a_decoding_client(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with RedisStateRepository(client, prefix=prefix) as repo:
        repo.store("p", *make_stub(make("v", 3)[1]))
        entry = repo.fetch_record("p")
        assert entry is not None and entry.payload == "" and entry.kind == "stub"
        assert set(repo.fetch_many(["p"])) == {"p"}
        assert repo.clear() == 1
    client.close()


# ---------------------------------------------------------------- batches
@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every request a redis-py connection sends (one per round trip)."""
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return sent


def test_batches_take_one_round_trip(repository: RedisStateRepository,
                                     round_trips: list[int]) -> None:
    n = 3 * CHUNK + 7  # several script calls, one pipeline
    repository.ping()  # connect first: the handshake is not the batch's
    calls = [
        lambda: repository.store_many({f"k{i}": make(i, 10, ttl=60) for i in range(n)}),
        lambda: repository.store_many_if_newer({f"k{i}": make(i, 11) for i in range(n)}),
        lambda: repository.store_many_if_version({f"k{i}": make(i, 12) for i in range(n)},
                                                 {f"k{i}": 11 for i in range(n)}),
        lambda: repository.fetch_many([f"k{i}" for i in range(n)]),
        lambda: repository.delete_many_if_version({f"k{i}": 12 for i in range(0, n, 2)}),
        lambda: repository.delete_many([f"k{i}" for i in range(n)]),
        lambda: repository.store_many_if_newer_in_epoch({f"k{i}": make(i, 13) for i in range(n)},
                                                        "e1"),
        lambda: repository.fetch_many_in_epoch([f"k{i}" for i in range(n)], "e1"),
    ]
    repository.reset_epoch("e1")
    for call in calls:  # once to load the scripts, should this server not have them yet
        call()
    for call in calls:
        before = round_trips[0]
        call()
        assert round_trips[0] - before == 1
    for single in (lambda: repository.store_if_newer("s", *make(1, 5)),
                   lambda: repository.store_if_version("s", *make(1, 6), expected=5),
                   lambda: repository.delete_if_version("s", 6),
                   lambda: repository.fetch_record("s")):
        before = round_trips[0]
        single()
        assert round_trips[0] - before == 1


def test_every_script_call_touches_one_record_key(repository: RedisStateRepository,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 prefix: str) -> None:
    """The shape Redis Cluster needs: a script call names one record key,
    and the epoch key when it is fenced -- in batches too."""
    sent: list[tuple[Any, ...]] = []
    for serializer in (redis.connection.HiredisRespSerializer,
                       redis.connection.PythonRespSerializer):
        original = serializer.pack

        def pack(self: Any, *args: Any, _original: Any = original) -> Any:
            sent.append(args)
            return _original(self, *args)

        monkeypatch.setattr(serializer, "pack", pack)
    repository.reset_epoch("e1")
    items = {f"k{i}": make(i, 5) for i in range(CHUNK + 3)}
    repository.store_many_if_newer(items)
    repository.store_many_if_version({k: make(1, 6) for k in items}, {k: 5 for k in items})
    repository.store_many_if_newer_in_epoch({k: make(1, 7) for k in items}, "e1")
    repository.store_if_newer_in_epoch("single", *make(1, 7), "e1")
    repository.store_if_newer("single", *make(1, 8))
    repository.store_if_version("single", *make(1, 9), expected=8)
    repository.delete_if_version("single", 9)
    repository.delete_many_if_version({k: 7 for k in items})
    scripts = [args for args in sent if args and args[0] in ("EVALSHA", b"EVALSHA", "EVAL")]
    assert len(scripts) >= 4 * len(items) + 4
    epoch_key = f"{prefix}{EPOCH_MARK}".encode()
    for args in scripts:
        numkeys, keys = int(args[2]), args[3:3 + int(args[2])]
        assert numkeys in (1, 2) and keys[0].startswith(prefix.encode()), args[:4]
        assert numkeys == 1 or keys[1] == epoch_key, args[:5]
    assert repository.keys() == []


def test_conditional_batch_reports_failed_and_written_keys(private_redis: str) -> None:
    """One script call of a batch refused by the server (an ACL that denies
    one key): that key is failed, the others written or refused. Every call
    is one record, so one refusal costs no other key."""
    prefix = "acl:"
    keys = [f"k{i:04d}" for i in range(2 * CHUNK)]
    bad = keys[CHUNK + 10]  # k0510
    admin = redis.Redis.from_url(private_redis)
    # Every key but k0510 (ACL patterns cannot deny, so they enumerate the rest),
    # and the format key.
    allowed = ["k0[0-4]*", "k050*", "k051[1-9]", "k05[2-9]*", "k0[6-9]*", FORMAT_MARK]
    admin.execute_command("ACL", "SETUSER", "limited", "on", "nopass", "+@all",
                          *[f"~{prefix}{pattern}" for pattern in allowed])
    url = private_redis.replace("redis://", "redis://limited:@")
    try:
        with RedisStateRepository(private_redis, prefix=prefix) as full:
            full.store_many({k: make(k, 5) for k in keys})
        with RedisStateRepository(url, prefix=prefix) as repository:
            items = {k: make(k, 6 if i % 2 == 0 else 4) for i, k in enumerate(keys)}
            with pytest.raises(BatchError) as info:
                repository.store_many_if_newer(items)
            assert set(info.value.failed) == {bad}
            assert isinstance(info.value.failed[bad], redis.exceptions.ResponseError)
            # written keys only: the refused ones (odd indexes) are in neither list
            assert set(info.value.succeeded) == {k for i, k in enumerate(keys) if i % 2 == 0} - {bad}
            entry = repository.fetch_record(keys[0])
            assert entry is not None and entry.version == 6 and repository.fetch(keys[0]) == keys[0]
            with pytest.raises(BatchError) as info:
                repository.delete_many_if_version({k: 6 for k in keys})
            assert set(info.value.failed) == {bad}
            assert set(info.value.succeeded) == {k for i, k in enumerate(keys) if i % 2 == 0} - {bad}
    finally:
        admin.execute_command("ACL", "DELUSER", "limited")
        admin.close()


# ---------------------------------------------------------------- the HOT epoch
def test_fenced_reads_and_fills_follow_the_epoch(repository: RedisStateRepository) -> None:
    repository.store("k", *make("v", version=5))
    assert repository.fetch_record_in_epoch("k", "e1") == (False, None)  # no epoch yet
    assert repository.fetch_many_in_epoch(["k"], "e1") is None
    assert repository.store_many_if_newer_in_epoch({"k": make("w", version=6)}, "e1") is None
    assert repository.reset_epoch("e1") == 1  # the flush took the record
    assert repository.epoch_state()[1] == "e1"
    assert repository.store_many_if_newer_in_epoch({"k": make("w", version=6)}, "e1") == {"k"}
    same, entry = repository.fetch_record_in_epoch("k", "e1")
    assert same and entry is not None and entry.version == 6
    assert set(repository.fetch_many_in_epoch(["k", "absent"], "e1") or {}) == {"k"}
    # Not newer: refused, epoch or not.
    assert repository.store_many_if_newer_in_epoch({"k": make("x", version=6)}, "e1") == set()
    # A fill under the old epoch after a flush is refused, and changes nothing.
    repository.reset_epoch("e2")
    assert repository.store_many_if_newer_in_epoch({"k": make("old", version=7)}, "e1") is None
    assert repository.fetch_record("k") is None
    assert repository.keys() == []  # the epoch key is not a record


def test_a_new_connection_to_another_server_drops_the_epoch(
        repository: RedisStateRepository) -> None:
    """What a restart or a failover looks like to the client: its next
    connection reaches a server with another run id. The epoch goes before
    that connection answers anything, so a restored snapshot's epoch key
    (the right token on old data) is never believed."""
    repository.reset_epoch("e1")
    server, epoch = repository.epoch_state()
    assert epoch == "e1" and server
    repository.trust_server(server)
    repository.client.connection_pool.disconnect()  # same server: the epoch stays
    assert repository.fetch_record_in_epoch("k", "e1") == (True, None)
    repository.trust_server("0" * 40)  # as if the server had restarted
    repository.client.connection_pool.disconnect()
    assert repository.fetch_record_in_epoch("k", "e1") == (False, None)
    assert repository.epoch_state()[1] is None


@pytest.fixture
def private_redis() -> Iterator[str]:
    """A redis-server of this test's own, for what must not touch the shared one."""
    import shutil
    import subprocess

    from .support import wait_for_port

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def test_batch_scripts_are_reloaded_after_the_server_lost_them(private_redis: str) -> None:
    with RedisStateRepository(private_redis, prefix="p:") as repo:
        repo.store_many({"a": make(1, 1, ttl=60), "b": make(2, 1)})
        repo.client.script_flush()  # as after a restart
        assert repo.store_many_if_newer({"a": make(3, 2), "b": make(4, 1)}) == {"a"}
        repo.client.script_flush()
        assert repo.store_many_if_version({"a": make(5, 3)}, {"a": 2}) == {"a"}
        repo.client.script_flush()
        assert repo.store_many({"c": make(6, 1, ttl=60)}) == {"c"}
        repo.client.script_flush()
        assert repo.delete_many_if_version({"a": 3, "b": 9}) == {"a"}
        repo.client.script_flush()
        assert repo.delete_many(["b", "c"]) == 2
        repo.client.script_flush()
        assert repo.store_if_newer("d", *make(7, 1)) is True
        assert repo.keys() == ["d"]


def test_without_a_prefix_nothing_is_flushed(private_redis: str) -> None:
    """An empty prefix shares the whole database: the upgrade only marks it,
    and the old layout's values still never pass for records."""
    raw = redis.Redis.from_url(private_redis)
    try:
        write_format_1(raw, "", "k", "old", version=2**63 - 1)
        raw.set("someone-else", b"theirs")
        with RedisStateRepository(private_redis, prefix="") as repo:
            entry = repo.fetch_record("k")
            assert entry is not None and not entry.valid() and entry.version == 0
            assert raw.get("someone-else") == b"theirs"
            assert raw.get(FORMAT_MARK) == b"2"
            assert repo.store_if_newer("k", *make("new", version=3)) is True
            assert repo.fetch("k") == "new"
    finally:
        raw.close()
