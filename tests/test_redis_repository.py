"""RedisStateRepository against the real Redis (TIERED_STATE_TEST_REDIS_URL).

Each test gets its own prefix and the fixture deletes everything under it
afterwards, so runs never see each other's keys.
"""

from __future__ import annotations

import logging
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
)
from tiered_state.keys import matches
from tiered_state.record import make_stub, make_tombstone

from .conformance import RepositoryConformance, make
from .support import free_port, unique_name

redis = pytest.importorskip("redis")

from tiered_state.repositories.redis_repository import (  # noqa: E402
    CHUNK,
    META_MARK,
    RedisStateRepository,
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
        yield repo
    leftovers = list(raw.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000))
    if leftovers:
        raw.unlink(*leftovers)


class TestRedisConformance(RepositoryConformance):
    def test_tombstone_vanishes_at_once(self, repository: RedisStateRepository) -> None:
        repository.store("t", *make("t", 2))
        repository.store_if_version("t", "", make_tombstone(9, now=time.time()), expected=2)
        assert repository.fetch_record("t") is None  # volatile: expired entries are gone


# ---------------------------------------------------------------- storage format
def test_redis_cli_get_shows_the_json_value(repository: RedisStateRepository, raw: redis.Redis,
                                            prefix: str) -> None:
    payload, metadata = make({"qty": 1.5, "side": "buy"}, version=42)
    repository.store("position:BTC", payload, metadata)
    assert raw.get(f"{prefix}position:BTC") == b'{"qty":1.5,"side":"buy"}'
    meta = codec.decode(raw.get(f"{prefix}{META_MARK}position:BTC").decode())
    assert meta["version"] == 42 and meta["checksum"] == metadata["checksum"]
    assert set(meta) == set(metadata)
    # No TTL: both keys persist.
    assert raw.pttl(f"{prefix}position:BTC") == -1
    assert raw.pttl(f"{prefix}{META_MARK}position:BTC") == -1


def test_ttl_is_native_on_both_keys(repository: RedisStateRepository, raw: redis.Redis,
                                    prefix: str) -> None:
    repository.store("k", *make("v", ttl=60))
    for name in (f"{prefix}k", f"{prefix}{META_MARK}k"):
        assert 59_000 < raw.pttl(name) <= 60_000
    # Overwriting without a TTL removes the old expiry from both keys.
    repository.store("k", *make("v2"))
    assert raw.pttl(f"{prefix}k") == -1 and raw.pttl(f"{prefix}{META_MARK}k") == -1
    repository.store_many({"a": make(1, ttl=30), "b": make(2)})
    assert 29_000 < raw.pttl(f"{prefix}{META_MARK}a") <= 30_000
    assert raw.pttl(f"{prefix}b") == -1


def test_expired_record_replaces_older_copy_with_nothing(repository: RedisStateRepository,
                                                         raw: redis.Redis, prefix: str) -> None:
    repository.store_many({"a": make("live"), "b": make("live")})
    old = make("old", now=time.time() - 10, ttl=5)
    repository.store("a", *old)
    repository.store_many({"b": old})
    assert raw.exists(f"{prefix}a", f"{prefix}{META_MARK}a", f"{prefix}b") == 0
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


def test_half_written_record_reads_as_absent(repository: RedisStateRepository, raw: redis.Redis,
                                             prefix: str) -> None:
    raw.set(f"{prefix}by-hand", b'{"x":1}')  # another tool wrote a value, no metadata
    assert repository.fetch_record("by-hand") is None
    assert repository.fetch_many(["by-hand"]) == {}



def test_unreadable_metadata_reads_as_a_corrupt_record(repository: RedisStateRepository,
                                                       raw: redis.Redis, prefix: str) -> None:
    """Not as absent: the manager must count it and use another copy, and any
    write replaces it."""
    for n, meta in enumerate((b"not json", b'{"version": 5}', b'{"version": "5", "checksum": 1}',
                              b"[1, 2]")):
        key = f"garbled{n}"
        raw.set(f"{prefix}{META_MARK}{key}", meta)
        raw.set(f"{prefix}{key}", b"1")
        entry = repository.fetch_record(key)
        assert entry is not None and not entry.valid() and entry.version == 0
        assert not repository.fetch_many([key])[key].valid()
        with pytest.raises(IntegrityError):
            repository.fetch(key)
        assert repository.store_if_newer(key, *make(2, version=1)) is True
        assert repository.fetch(key) == 2


def test_corrupt_payload_fails_its_checksum(repository: RedisStateRepository, raw: redis.Redis,
                                            prefix: str) -> None:
    repository.store("k", *make({"a": 1}))
    raw.set(f"{prefix}k", b'{"a":2}')
    with pytest.raises(IntegrityError):
        repository.fetch("k")
    raw.set(f"{prefix}k", b"\xff\xfe")  # not even UTF-8
    entry = repository.fetch_record("k")
    assert entry is not None and not entry.valid()


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
])
def test_bad_options_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_repository(url)


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


def test_metadata_of_another_type_reads_as_absent_and_is_replaced(
        repository: RedisStateRepository, raw: redis.Redis, prefix: str) -> None:
    """A key another tool turned into a hash is not a record: reads skip it,
    and a conditional write replaces it instead of failing on WRONGTYPE."""
    raw.hset(f"{prefix}{META_MARK}wrongtype", "a", "b")
    raw.set(f"{prefix}wrongtype", b"1")
    assert repository.fetch_record("wrongtype") is None
    assert repository.fetch_many(["wrongtype"]) == {}
    assert repository.store_if_newer("wrongtype", *make(1, version=3)) is True
    assert repository.fetch("wrongtype") == 1
    raw.hset(f"{prefix}{META_MARK}w2", "a", "b")
    raw.set(f"{prefix}w2", b"1")
    assert repository.store_many_if_version({"w2": make(2, version=4)}, {"w2": 0}) == {"w2"}


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
        assert raw.get(f"{prefix}{key}") == b""
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
    ]
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


def test_conditional_batch_reports_failed_and_written_keys(private_redis: str) -> None:
    """One script call of a batch refused by the server (an ACL that denies
    one key): the keys of that call are failed, the others written."""
    prefix = "acl:"
    keys = [f"k{i:04d}" for i in range(2 * CHUNK)]
    bad = keys[CHUNK + 10]  # k0510, in the second script call
    admin = redis.Redis.from_url(private_redis)
    # Every key but k0510 (ACL patterns cannot deny, so they enumerate the rest).
    allowed = ["k0[0-4]*", "k050*", "k051[1-9]", "k05[2-9]*", "k0[6-9]*"]
    admin.execute_command("ACL", "SETUSER", "limited", "on", "nopass", "+@all",
                          *[f"~{p}{mark}{pattern}" for pattern in allowed for p, mark in
                            ((prefix, ""), (prefix, META_MARK))])
    url = private_redis.replace("redis://", "redis://limited:@")
    try:
        with RedisStateRepository(private_redis, prefix=prefix) as full:
            full.store_many({k: make(k, 5) for k in keys})
        with RedisStateRepository(url, prefix=prefix) as repository:
            items = {k: make(k, 6 if i % 2 else 4) for i, k in enumerate(keys)}
            with pytest.raises(BatchError) as info:
                repository.store_many_if_newer(items)
            second = set(keys[CHUNK:])
            assert set(info.value.failed) == second
            assert isinstance(info.value.failed[bad], redis.exceptions.ResponseError)
            # written keys only: the refused ones (even indexes) are in neither list
            assert set(info.value.succeeded) == {k for i, k in enumerate(keys[:CHUNK]) if i % 2}
            entry = repository.fetch_record(keys[1])
            assert entry is not None and entry.version == 6 and repository.fetch(keys[1]) == keys[1]
            with pytest.raises(BatchError) as info:
                repository.delete_many_if_version({k: 6 for k in keys})
            assert set(info.value.failed) == second
            assert set(info.value.succeeded) == {k for i, k in enumerate(keys[:CHUNK]) if i % 2}
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
