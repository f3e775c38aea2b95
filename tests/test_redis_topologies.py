"""Redis Cluster and Sentinel as the HOT tier, against real servers started here.

* The repository conformance suite on a 3-primary + 3-replica cluster
  (``redis+cluster://``) and on a Sentinel-managed primary
  (``redis+sentinel://``); the manager's own tests run on both through
  ``tests/test_api.py``'s layouts, and the history checker below.
* What only a cluster has: records spread over every primary, each fenced
  by the epoch key of its own slot, resharding (``ASK`` then ``MOVED``)
  followed by the client, ``doctor`` naming the primaries.
* Failover: a primary is SIGKILLed while a manager writes and reads; its
  replica takes over. No acknowledged write is lost, no read returns an
  older value than one already acknowledged, and HOT is used again on the
  new primary. The tests print how long each step took.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import Tier
from tiered_state.errors import ConfigurationError
from tiered_state.testing import RepositoryContract, make

from .servers import PrivateRedisCluster, PrivateSentinel
from .support import require_module, unique_name

redis = require_module("redis")

from tiered_state.repositories.redis_repository import (  # noqa: E402
    EPOCH_MARK,
    RedisStateRepository,
    key_slot,
)


def _with(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


@pytest.fixture
def prefix() -> str:
    return unique_name("ts") + ":"


def _repository(url: str, prefix: str) -> Iterator[RedisStateRepository]:
    url = _with(url, f"prefix={prefix}")
    with RedisStateRepository.from_url(url) as repo:
        yield repo
    with RedisStateRepository.from_url(url) as repo:  # the test may have closed its own
        repo.clear()


class _TopologyContract(RepositoryContract):
    # secret_url: the default, a password the servers (which have none) refuse.
    cannot_break_keys = (
        "only an ACL makes Redis refuse one key; every topology runs a batch as one "
        "script call per key, and test_redis_repository's "
        "test_conditional_batch_reports_failed_and_written_keys refuses one on a server")


class TestClusterConformance(_TopologyContract):
    @pytest.fixture
    def repository(self, redis_cluster: PrivateRedisCluster,
                   prefix: str) -> Iterator[RedisStateRepository]:
        yield from _repository(redis_cluster.url, prefix)

    @pytest.fixture
    def repository_url(self, redis_cluster: PrivateRedisCluster, prefix: str) -> str:
        return _with(redis_cluster.url, f"prefix={prefix}")


class TestSentinelConformance(_TopologyContract):
    @pytest.fixture
    def repository(self, redis_sentinel: PrivateSentinel,
                   prefix: str) -> Iterator[RedisStateRepository]:
        yield from _repository(redis_sentinel.url, prefix)

    @pytest.fixture
    def repository_url(self, redis_sentinel: PrivateSentinel, prefix: str) -> str:
        return _with(redis_sentinel.url, f"prefix={prefix}")


# ---------------------------------------------------------------- cluster only
def test_records_spread_over_every_primary_one_slot_per_command(
        redis_cluster: PrivateRedisCluster, prefix: str) -> None:
    url = _with(redis_cluster.url, f"prefix={prefix}")
    with RedisStateRepository.from_url(url) as repo:
        items = {f"k{i}": make(f"k{i}", i + 1) for i in range(600)}
        repo.store_many(items)
        assert set(repo.fetch_many(list(items))) == set(items)
        held = {}
        for node in redis_cluster.primaries():
            with node.client() as c:
                held[node.port] = sum(1 for _ in c.scan_iter(match=prefix + "k*", count=1000))
        assert sum(held.values()) == 600 and all(held.values()), held
        assert sorted(repo.keys()) == sorted(items)
        assert repo.stats()["key_count"] == 600
        assert repo.delete_many(list(items)[:250]) == 250
        assert repo.clear() == 350 and repo.keys() == []


def test_each_record_is_fenced_by_the_epoch_key_of_its_slot(
        redis_cluster: PrivateRedisCluster, prefix: str) -> None:
    url = _with(redis_cluster.url, f"prefix={prefix}")
    with RedisStateRepository.from_url(url) as repo, redis_cluster.client() as raw:
        server, epoch = repo.epoch_state()
        assert epoch is None and len(server.split(",")) == 3
        repo.reset_epoch("e1")
        assert repo.epoch_state() == (server, "e1")
        items = {f"k{i}": make(f"k{i}", i + 1) for i in range(200)}
        assert repo.store_many_if_newer_in_epoch(items, "e1") == set(items)
        for key in list(items)[:20]:
            name = (prefix + key).encode()
            fence = repo._fence(name)
            assert fence.startswith((prefix + EPOCH_MARK).encode())
            # The server's own slot computation agrees with ours.
            assert raw.cluster_keyslot(fence) == raw.cluster_keyslot(name) == key_slot(name)
        assert repo.fetch_many_in_epoch(list(items), "e2") is None
        # One slot's epoch gone (its node flushed or replaced): reads of that
        # slot are refused, and so is the whole epoch.
        victim = (prefix + "k7").encode()
        raw.delete(repo._fence(victim))
        assert repo.fetch_record_in_epoch("k7", "e1") == (False, None)
        assert repo.store_if_newer_in_epoch("k7", *items["k7"], epoch="e1") is None
        assert repo.epoch_state() == (server, None)
        repo.clear()


def test_a_prefix_with_a_hash_tag_keeps_every_key_in_one_slot(
        redis_cluster: PrivateRedisCluster) -> None:
    tag = unique_name("t")
    url = _with(redis_cluster.url, f"prefix={{{tag}}}:")
    with RedisStateRepository.from_url(url) as repo, redis_cluster.client() as raw:
        repo.store_many({f"k{i}": make(f"k{i}", i + 1) for i in range(50)})
        slots = {raw.cluster_keyslot(f"{{{tag}}}:k{i}") for i in range(50)}
        assert len(slots) == 1
        repo.reset_epoch("e1")
        assert repo.epoch_state()[1] == "e1"
        assert len(repo.fetch_many_in_epoch([f"k{i}" for i in range(50)], "e1") or {}) == 0
        repo.clear()
    with pytest.raises(ConfigurationError, match="hash tag"):
        RedisStateRepository.from_url(_with(redis_cluster.url, "prefix=app{x:"))


@pytest.mark.parametrize("url", [
    "redis+cluster://127.0.0.1:1/1",
    "redis+cluster://127.0.0.1/0",
    "redis+cluster://127.0.0.1:1,nohost/0",
    "redis+sentinel://127.0.0.1:1",
    "redis+sentinel://127.0.0.1:1/svc/x",
    "redis+sentinel://127.0.0.1:1/svc/0/extra",
])
def test_malformed_topology_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisStateRepository.from_url(url)


@pytest.mark.parametrize("query, message", [
    ("socket_timout=1", "did you mean 'socket_timeout'"),
    ("read_from_replicas=true", "replica may lag"),
])
def test_bad_topology_options_are_refused_before_connecting(query: str, message: str) -> None:
    for url in ("redis+cluster://127.0.0.1:1/0", "redis+sentinel://127.0.0.1:1/svc"):
        with pytest.raises(ConfigurationError, match=message):
            RedisStateRepository.from_url(f"{url}?{query}")


def test_resharding_ask_and_moved_are_followed(redis_cluster: PrivateRedisCluster,
                                               prefix: str) -> None:
    """One slot migrates to another primary while its record is read and
    written: the client follows ASK during the move and MOVED after it."""
    url = _with(redis_cluster.url, f"prefix={prefix}")
    with RedisStateRepository.from_url(url) as repo, redis_cluster.client() as raw:
        repo.store("moving", *make("moving", 1))
        name = (prefix + "moving").encode()
        slot = key_slot(name)
        source = redis_cluster.primary_for(name.decode())
        target = next(n for n in redis_cluster.primaries() if n.port != source.port)
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                "KEYS", *keys)
            # Migrating: the source answers ASK for keys it no longer holds --
            # to single commands, and to a batch (whose one-script-per-node
            # form the source refuses: it goes key by key and follows ASK).
            entry = repo.fetch_record("moving")
            assert entry is not None and entry.version == 1
            others = {f"o{i}": make(f"o{i}", 5) for i in range(40)}
            repo.store_many(others)
            got = repo.fetch_many(["moving", *others])
            assert got["moving"].version == 1 and len(got) == 41
            assert repo.store_if_newer("moving", *make("moving", 2))
            for node in redis_cluster.primaries():
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        deadline = time.monotonic() + 10
        while raw.cluster_keyslot(name) != slot or \
                redis_cluster.primary_for(name.decode()).port != target.port:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        entry = repo.fetch_record("moving")  # MOVED: the client learns the new owner
        assert entry is not None and entry.version == 2
        assert repo.fetch_many(["moving"])["moving"].version == 2
        repo.clear()


def test_doctor_names_the_primaries(redis_cluster: PrivateRedisCluster,
                                    redis_sentinel: PrivateSentinel, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from tiered_state.cli import main

    for server, expected in ((redis_cluster, {f"127.0.0.1:{n.port}"
                                              for n in redis_cluster.primaries()}),
                             (redis_sentinel, {"{}:{}".format(*redis_sentinel.primary())})):
        hot = _with(server.url, f"prefix={unique_name('doc')}:")
        assert main(["--path", str(tmp_path), "--hot", hot, "doctor", "--json"]) == 0
        document = json.loads(capsys.readouterr().out)
        health = document["store"]["health"]["hot"]
        assert set(health["primaries"]) == expected
        assert health["topology"] == ("cluster" if server is redis_cluster else "sentinel")
        assert main(["--path", str(tmp_path), "--hot", hot, "doctor"]) == 0
        text = capsys.readouterr().out
        assert "primaries " + ", ".join(sorted(expected)) in text


# ---------------------------------------------------------------- failover
class _Traffic:
    """A manager writing and reading a few keys in a loop, checking as it goes.

    Each key's value is a counter only this writer increases, so "stale" is
    exact: a read returning less than the last acknowledged write of that key
    (made before the read started) is an older value.
    """

    def __init__(self, state: tiered_state.StateManager, keys: list[str]) -> None:
        self.state = state
        self.keys = keys
        self.acked = dict.fromkeys(keys, 0)
        self.stale: list[str] = []
        self.errors: list[str] = []
        self.reads = 0
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            key = self.keys[n % len(self.keys)]
            try:
                self.state.set(key, n)
                self.acked[key] = n
                self.writes += 1
                for other in (key, self.keys[(n * 7) % len(self.keys)]):
                    floor = self.acked[other]
                    got = self.state.get(other)
                    self.reads += 1
                    if (got or 0) < floor:
                        self.stale.append(f"{other}: read {got} after {floor} was acknowledged")
            except tiered_state.TieredStateError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.002)

    def __enter__(self) -> _Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _hot_serves(state: tiered_state.StateManager, keys: list[str], timeout: float) -> float:
    """Seconds until a read of every key in ``keys`` is served from HOT."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        records = [state.get_record(k) for k in keys]
        if all(r is not None and r.tier == Tier.HOT for r in records):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"HOT did not serve {keys} within {timeout}s")


def _failover(kind: str, tmp_path: Path, postgres_url: str) -> None:
    table = unique_name("fo").replace("-", "_")
    warm = _with(postgres_url, f"table={table}")
    server: Any = PrivateRedisCluster() if kind == "cluster" else PrivateSentinel()
    try:
        hot = _with(server.url, f"prefix={unique_name('fo')}:")
        keys = [f"key{i}" for i in range(24)]
        with tiered_state.open(tmp_path / "store", hot=hot, warm=warm, cold="none") as state, \
                tiered_state.open(tmp_path / "store", hot=hot, warm=warm, cold="none") as reader:
            state.set_many(dict.fromkeys(keys, 0))
            _hot_serves(state, keys, 10)
            if kind == "cluster":
                victim = server.primary_for(state.repositories[Tier.HOT].prefix + keys[0])
                lost = [k for k in keys
                        if server.primary_for(state.repositories[Tier.HOT].prefix + k).port
                        == victim.port]
            with _Traffic(state, keys) as traffic:
                time.sleep(1.0)
                killed_at = time.monotonic()
                if kind == "cluster":
                    server.kill(victim)
                    failover = server.wait_failover(victim, timeout=30)
                else:
                    lost = keys
                    old = server.kill_primary()
                    failover = server.wait_failover(old, timeout=30)
                writes_before = traffic.writes
                time.sleep(1.0)
            assert traffic.stale == [], traffic.stale[:5]
            assert traffic.errors == [], traffic.errors[:5]
            # Nothing acknowledged is lost: another manager reads every last value.
            assert reader.get_many(keys) == traffic.acked
            assert state.get_many(keys) == traffic.acked
            # HOT is used again, on the new primary, for the failed keys too.
            back = _hot_serves(state, lost, 30)
            recovered = time.monotonic() - killed_at
            assert traffic.writes > writes_before  # writes went on through the failover
            stats = state.stats()["manager"]
            print(f"\n{kind} failover: replica promoted {failover:.2f}s after the kill; "
                  f"HOT served the failed primary's keys again {recovered:.2f}s after the kill "
                  f"({back:.2f}s after the traffic stopped); {traffic.writes} writes and "
                  f"{traffic.reads} reads meanwhile, none failed, none stale; "
                  f"hot_flushes={stats['hot_flushes']} hot_write_arounds="
                  f"{stats['hot_write_arounds']} tier_errors={stats['tier_errors']}")
            assert recovered < failover + 15.0
    finally:
        server.close()
        import psycopg2

        with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{table}"')


def test_cluster_failover_loses_nothing_and_serves_nothing_stale(
        tmp_path: Path, postgres_url: str) -> None:
    _failover("cluster", tmp_path, postgres_url)


def test_sentinel_failover_loses_nothing_and_serves_nothing_stale(
        tmp_path: Path, postgres_url: str) -> None:
    _failover("sentinel", tmp_path, postgres_url)


# ---------------------------------------------------------------- histories
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_history_is_linearizable_with_a_cluster_or_sentinel_hot(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str,
        s3_url: str) -> None:
    from .test_history import KEYS, check, run

    server = request.getfixturevalue("redis_cluster" if kind == "cluster" else "redis_sentinel")
    table = unique_name("hist").replace("-", "_")
    hot = _with(server.url, f"prefix={unique_name('hist')}:")
    logs = tmp_path / "logs"
    logs.mkdir()
    config = {"path": str(tmp_path / "store"), "hot": hot,
              "warm": _with(postgres_url, f"table={table}"), "cold": s3_url, "keys": KEYS}
    try:
        kills = run(config, logs, seed=3 if kind == "cluster" else 4)
        check(logs, kills, f"{kind} hot (+ postgres + s3)")
    finally:
        with RedisStateRepository.from_url(hot) as repo:
            repo.clear()
        import psycopg2

        with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{table}"')


def test_a_down_primary_degrades_only_its_own_keys(tmp_path: Path) -> None:
    """Between a primary's death and its replacement (a long node timeout
    here), reads of keys on the other primaries are still served from HOT;
    the dead primary's keys are read from the catalog, at once (the node is
    not tried again for a second), and every value is right."""
    with PrivateRedisCluster(node_timeout_ms=8000) as cluster:
        hot = _with(cluster.url, f"prefix={unique_name('po')}:")
        keys = [f"key{i}" for i in range(30)]
        with tiered_state.open(tmp_path / "store", hot=hot, cold="none") as state:
            state.set_many({k: i for i, k in enumerate(keys)})
            _hot_serves(state, keys, 10)
            prefix = state.repositories[Tier.HOT].prefix
            victim = cluster.primary_for(prefix + keys[0])
            dead = [k for k in keys if cluster.primary_for(prefix + k).port == victim.port]
            alive = [k for k in keys if k not in dead]
            assert dead and alive
            cluster.kill(victim)
            started = time.monotonic()
            rounds = 0
            while time.monotonic() - started < 3.0:  # well inside the node timeout
                assert state.get_many(keys) == {k: i for i, k in enumerate(keys)}
                tiers = {k: state.get_record(k).tier for k in keys}  # type: ignore[union-attr]
                assert all(tiers[k] == Tier.HOT for k in alive), tiers
                assert all(tiers[k] == Tier.WARM for k in dead), tiers
                rounds += 1
            assert state.stats()["manager"]["down"] == []  # HOT as a whole was never skipped
            assert rounds >= 5  # dead keys fail at once, not after a timeout each
