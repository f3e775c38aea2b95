"""What a user notices when the Redis HOT tier misbehaves, one fault at a time.

Each test runs a private redis-server (:mod:`tests.servers`) in front of a
SQLite WARM tier and drives the store through its public API only:
``tiered_state.open``, ``set`` / ``get`` / ``get_many`` / ``keys`` /
``delete``, ``stats``. The faults:

* a cut proxy under steady writes: HOT must be used again soon after the repair;
* kill -9 and a restart from an older snapshot: the snapshot's copies are stale;
* FLUSHALL, including one in the middle of a read that is about to fill HOT;
* a partial partition: one process cannot reach Redis, another can;
* errors other than connection loss: out of memory, read-only replica,
  MISCONF, lost scripts, corrupt metadata.

In every case a ``set`` that returns is durable and every read returns the
latest acknowledged value -- never a copy HOT kept from before.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state.record import Tier

from .servers import PrivateRedis
from .support import TCPProxy, require_module

redis = require_module("redis")

from tiered_state.repositories.redis_repository import unpack_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Short client timeouts, so an unreachable Redis costs a call well under a second.
TIMEOUTS = "socket_timeout=0.5&socket_connect_timeout=0.25"
PREFIX = "hf:"
#: After a cut is repaired, steady writes must reach Redis again within this...
RECOVERY = 1.5
#: ...plus this much for a loaded CI machine.
SLACK = 0.5


def hot_url(address: str) -> str:
    return f"redis://{address}/0?{TIMEOUTS}&prefix={PREFIX}"


def value_key(key: str) -> bytes:
    """The Redis key of a record (see redis_repository's storage format)."""
    return (PREFIX + key).encode("utf-8")


def raw_payload(server: PrivateRedis, key: str) -> bytes | None:
    """The payload Redis holds for ``key`` (a raw GET around any proxy, the
    record's header taken off); a value that is no record, as it is."""
    data = server.raw_get(value_key(key))
    found = None if data is None else unpack_record(data)
    return data if found is None else found[0].encode("utf-8")


def counters(state: tiered_state.StateManager) -> dict[str, Any]:
    return dict(state.stats()["manager"])


def reads_for(read: Callable[[], Any], seconds: float) -> list[Any]:
    """Every answer of ``read`` over ``seconds`` (every 50 ms; bounded)."""
    seen = []
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):
        seen.append(read())
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return seen


def read_both(state: tiered_state.StateManager, keys: list[str]) -> list[Any]:
    """``get`` of the first key and ``get_many`` of all."""
    return [state.get(keys[0]), state.get_many(keys)]


def distinct(values: list[Any]) -> list[str]:
    return sorted({json.dumps(v, sort_keys=True) for v in values})


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    srv = PrivateRedis(persistence=True)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def proxy(server: PrivateRedis) -> Iterator[TCPProxy]:
    prx = TCPProxy("127.0.0.1", server.port)
    try:
        yield prx
    finally:
        prx.close()


@pytest.fixture
def warm(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'warm.db'}"


def open_store(hot: str, warm: str) -> tiered_state.StateManager:
    return tiered_state.open(hot=hot, warm=warm, cold="none")


def new_process_reads(hot: str, warm: str, keys: list[str]) -> Any:
    """What a freshly started process reads: get, get_many and get_record of ``keys``."""
    script = (
        "import json, sys, tiered_state\n"
        "keys = json.loads(sys.argv[3])\n"
        "with tiered_state.open(hot=sys.argv[1], warm=sys.argv[2], cold='none') as s:\n"
        "    records = [s.get_record(k) for k in keys]\n"
        "    print(json.dumps({'get': [s.get(k) for k in keys], 'get_many': s.get_many(keys),\n"
        "                      'get_record': [None if r is None else r.value for r in records]}))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script, hot, warm, json.dumps(keys)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a. cut, steady writes
def test_steady_writes_reach_redis_again_soon_after_a_cut(
    server: PrivateRedis, proxy: TCPProxy, warm: str
) -> None:
    with open_store(hot_url(proxy.address), warm) as state:
        state.set("k", 0)
        assert raw_payload(server, "k") == b"0", "HOT is not in use before the fault"
        proxy.cut()
        n = 0
        cut_until = time.monotonic() + 2.0
        for _ in range(200):  # a write every 50 ms for 2 s (more than one a second)
            if time.monotonic() >= cut_until:
                break
            n += 1
            state.set("k", n)  # succeeds on WARM while HOT is cut
            time.sleep(0.05)
        assert state.get("k") == n
        assert raw_payload(server, "k") == b"0"  # nothing reached Redis meanwhile
        proxy.restore()
        restored = time.monotonic()
        reached_after = None
        for _ in range(200):  # the same steady writes, for at most 5 s
            if time.monotonic() - restored > 5.0:
                break
            n += 1
            state.set("k", n)
            if raw_payload(server, "k") == str(n).encode():
                reached_after = time.monotonic() - restored
                break
            time.sleep(0.05)
        assert reached_after is not None, (
            f"5 s after the cut was repaired, none of the steady writes (up to {n}) reached "
            f"Redis; raw GET shows {raw_payload(server, 'k')!r}, "
            f"manager counters: {counters(state)}")
        assert reached_after <= RECOVERY + SLACK, (
            f"writes reached Redis again only {reached_after:.2f}s after the repair")
        assert state.get("k") == n
        assert counters(state)["down"] == []


# ---------------------------------------------------------------- b. restart from a snapshot
def test_restart_from_an_older_snapshot_never_serves_it(server: PrivateRedis, warm: str) -> None:
    hot = hot_url(f"127.0.0.1:{server.port}")
    keys = ["k", "gone"]
    with open_store(hot, warm) as state:
        # Round 1: a new process is the first to reach the restarted Redis.
        state.set("k", 100)
        state.set("gone", "old")
        assert raw_payload(server, "k") == b"100", "HOT is not in use before the fault"
        server.save()  # the snapshot holds k=100 and gone="old"...
        state.set("k", 200)  # ...which these acknowledged writes supersede
        assert state.delete("gone") is True
        assert raw_payload(server, "k") == b"200"
        server.kill()
        server.start()  # from the snapshot
        assert raw_payload(server, "k") == b"100", "the restart did not load the snapshot"
        seen = new_process_reads(hot, warm, keys)
        assert seen == {"get": [200, None], "get_many": {"k": 200}, "get_record": [200, None]}, (
            f"a new process read the stale snapshot: {seen}")
        reads = reads_for(lambda: [state.get("k"), state.get_many(keys), state.get("gone")], 1.5)
        assert distinct(reads) == distinct([[200, {"k": 200}, None]]), (
            f"the manager that wrote 200 read from the restarted Redis: {distinct(reads)}")

        # Round 2: the writer's own manager is the first to reach the restarted Redis.
        state.set("k", 300)
        state.set("gone", "again")
        server.save()
        state.set("k", 400)
        assert state.delete("gone") is True
        server.kill()
        server.start()
        assert raw_payload(server, "k") == b"300", "the restart did not load the snapshot"
        reads = reads_for(lambda: [state.get("k"), state.get_many(keys), state.get("gone")], 1.5)
        assert distinct(reads) == distinct([[400, {"k": 400}, None]]), (
            f"the manager that wrote 400 read the stale snapshot: {distinct(reads)}")
        record = state.get_record("k")
        assert record is not None and record.value == 400
    seen = new_process_reads(hot, warm, keys)
    assert seen == {"get": [400, None], "get_many": {"k": 400}, "get_record": [400, None]}, seen


# ---------------------------------------------------------------- c. FLUSHALL
@pytest.mark.parametrize("when", ["before", "after"])
def test_flushall_with_copies_held_never_serves_stale(
    server: PrivateRedis, proxy: TCPProxy, warm: str, when: str
) -> None:
    hot = hot_url(proxy.address)
    with open_store(hot, warm) as a, open_store(hot, warm) as b:
        a.set("k", 1)
        a.set("kept", "x")
        assert a.get("k") == 1 and b.get("k") == 1 and b.get("kept") == "x"
        assert raw_payload(server, "k") == b"1", "HOT is not in use before the fault"
        if when == "before":  # another manager writes, then Redis is flushed
            b.set("k", 2)
            server.command("FLUSHALL")
        else:  # Redis is flushed, then another manager writes
            server.command("FLUSHALL")
            b.set("k", 2)
        for manager in (a, b):
            reads = reads_for(functools.partial(read_both, manager, ["k", "kept"]), 1.2)
            assert distinct(reads) == distinct([[2, {"k": 2, "kept": "x"}]]), distinct(reads)
        a.set("k", 3)
        assert b.get("k") == 3 and a.get("k") == 3


def test_flushall_during_a_read_never_lets_its_old_copy_in(
    server: PrivateRedis, proxy: TCPProxy, warm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that is between its catalog read and its HOT fill while another
    process writes and Redis is flushed: the flush took the writer's
    placeholder with it, so only a HOT that knows it was flushed can refuse
    the reader's older copy."""
    hot = hot_url(proxy.address)
    with open_store(hot, warm) as a, open_store(hot, warm) as b:
        a.set("k", 1, tier="warm")  # in the catalog only: a's next read fills HOT
        catalog = a.repositories[Tier.WARM]
        fired: list[str] = []

        def during_the_read() -> None:
            if not fired:
                fired.append("yes")
                b.set("k", 2)  # another process writes k=2 (placeholder, commit, copy)...
                server.command("FLUSHALL")  # ...and Redis is flushed

        real_one, real_many = catalog.fetch_record, catalog.fetch_many

        def fetch_record(key: str) -> Any:
            entry = real_one(key)
            if key == "k":
                during_the_read()
            return entry

        def fetch_many(keys: Any) -> Any:
            keys = list(keys)
            entries = real_many(keys)
            if "k" in keys:
                during_the_read()
            return entries

        monkeypatch.setattr(catalog, "fetch_record", fetch_record)
        monkeypatch.setattr(catalog, "fetch_many", fetch_many)
        first = a.get("k")
        monkeypatch.undo()
        assert fired, "the read never reached the catalog (the test no longer pauses it)"
        assert first in (1, 2)  # it overlapped the write: either answer is right
        for manager in (a, b):
            reads = reads_for(functools.partial(read_both, manager, ["k"]), 1.2)
            assert distinct(reads) == distinct([[2, {"k": 2}]]), (
                f"the reader's old copy went into the flushed Redis: {distinct(reads)}; "
                f"raw GET {raw_payload(server, 'k')!r}")
        with open_store(hot, warm) as c:
            assert c.get("k") == 2


def test_flushall_during_a_write_below_hot_never_leaves_an_older_copy(
    server: PrivateRedis, proxy: TCPProxy, warm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write aimed below HOT (no copy of its own goes into HOT) whose
    placeholder a flush took away before its commit, while another process
    read the old value and filled it in: once the write returns, nobody
    reads the old value."""
    hot = hot_url(proxy.address)
    with open_store(hot, warm) as a, open_store(hot, warm) as b:
        a.set("k", 1)
        assert b.get("k") == 1
        catalog = a.repositories[Tier.WARM]
        fired: list[Any] = []
        real = catalog.store_if_newer

        def store_if_newer(key: str, *args: Any) -> Any:
            if key == "k" and not fired:
                server.command("FLUSHALL")  # the writer's placeholder goes
                fired.append([b.get("k") for _ in range(3)])
                fired.append(raw_payload(server, "k"))  # b filled the old value in
            return real(key, *args)

        monkeypatch.setattr(catalog, "store_if_newer", store_if_newer)
        a.set("k", 2, tier="warm")
        monkeypatch.undo()
        assert fired == [[1, 1, 1], b"1"], fired  # else the test no longer sets the trap
        for manager in (a, b):
            reads = reads_for(functools.partial(read_both, manager, ["k"]), 0.5)
            assert distinct(reads) == distinct([[2, {"k": 2}]]), distinct(reads)


# ---------------------------------------------------------------- d. partial partition
def test_partial_partition_the_others_see_a_cut_off_writer_at_once(
    server: PrivateRedis, proxy: TCPProxy, warm: str
) -> None:
    """Process A cannot reach Redis (its own proxy is cut), C can: every write
    and delete A acknowledges is what C reads right after, by every read path."""
    direct = hot_url(f"127.0.0.1:{server.port}")
    with open_store(hot_url(proxy.address), warm) as a, open_store(direct, warm) as c:
        for key in ("k", "d", "m"):
            a.set(key, "old")
        assert c.get("k") == "old" and c.get_many(["d", "m"]) == {"d": "old", "m": "old"}
        assert raw_payload(server, "k") == b'"old"', "HOT is not in use before the fault"
        proxy.cut()
        stale: list[str] = []
        for i in range(3):
            value = f"new{i}"
            a.set("k", value)
            if i == 0:  # the partition is real: A's write did not reach Redis
                assert raw_payload(server, "k") == b'"old"'
            if c.get("k") != value:
                stale.append(f"get after set {value!r}: {c.get('k')!r}")
            many = c.get_many(["k", "m"])
            if many != {"k": value, "m": "old"}:
                stale.append(f"get_many after set {value!r}: {many!r}")
            if "k" not in c.keys():
                stale.append("keys() lost k")
        assert a.delete("d") is True
        got, many, listed = c.get("d"), c.get_many(["d", "m"]), c.keys()
        if got is not None:
            stale.append(f"get after delete: {got!r}")
        if "d" in many:
            stale.append(f"get_many after delete: {many!r}")
        if "d" in listed:
            stale.append(f"keys() after delete: {listed!r}")
        a.set_many({"m": "batch", "n": "batch"})
        many = c.get_many(["m", "n"])
        if many != {"m": "batch", "n": "batch"}:
            stale.append(f"get_many after set_many: {many!r}")
        if c.get("m") != "batch":
            stale.append(f"get after set_many: {c.get('m')!r}")
        assert not stale, "C read what A had already overwritten or deleted:\n" + "\n".join(stale)
        proxy.restore()
        reads = reads_for(lambda: [a.get("k"), c.get("k"), c.get("d"), a.get("d")], 1.5)
        assert distinct(reads) == distinct([["new2", "new2", None, None]]), distinct(reads)


# ---------------------------------------------------------------- e. other Redis errors
ERRORS = ["oom", "readonly", "misconf", "noscript", "corrupt_metadata", "wrongtype_metadata"]


def inject(kind: str, server: PrivateRedis, stack: list[Callable[[], None]]) -> None:
    """Make ``server`` fail the ``kind`` way; push what repairs it onto ``stack``."""
    if kind == "oom":
        server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        server.command("CONFIG", "SET", "maxmemory", "1")
        stack.append(lambda: server.command("CONFIG", "SET", "maxmemory", "0"))
    elif kind == "readonly":
        master = PrivateRedis()
        stack.append(master.close)
        master.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # sync now, not in 5 s
        # The master gets this server's records, so the replica keeps them
        # after the sync: stale copies a replica may serve but not replace.
        with server.client() as src, master.client() as dst:
            for name in src.scan_iter(match=PREFIX + "*"):
                dst.restore(name, 0, src.dump(name), replace=True)
        server.command("REPLICAOF", "127.0.0.1", str(master.port))
        stack.append(lambda: server.command("REPLICAOF", "NO", "ONE"))
        with server.client() as c:
            for _ in range(200):  # bounded: 10 s
                if c.info("replication").get("master_link_status") == "up":
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the replica did not sync with its master in 10 s")
    elif kind == "misconf":
        # A snapshot that fails (its directory is gone) stops writes when
        # save points are configured.
        server.command("CONFIG", "SET", "save", "3600 1")
        server.command("CONFIG", "SET", "stop-writes-on-bgsave-error", "yes")
        stack.append(lambda: server.command("CONFIG", "SET", "stop-writes-on-bgsave-error", "no"))
        shutil.rmtree(server.dir)
        assert server.bgsave() is False
        with server.client() as c, pytest.raises(redis.exceptions.ResponseError, match="MISCONF"):
            c.set("probe", 1)
    elif kind == "noscript":
        server.command("SCRIPT", "FLUSH")
    elif kind in ("corrupt_metadata", "wrongtype_metadata"):
        with server.client() as c:
            for key in ("hot", "batch"):  # the records' headers: not ours any more
                c.delete(value_key(key))
                if kind == "corrupt_metadata":
                    c.set(value_key(key), b"\x00not json{")
                else:
                    c.rpush(value_key(key), b"a list, not a record")
    else:  # pragma: no cover
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ERRORS)
def test_redis_errors_other_than_connection_loss(server: PrivateRedis, warm: str,
                                                 kind: str) -> None:
    hot = hot_url(f"127.0.0.1:{server.port}")
    repairs: list[Callable[[], None]] = []
    with open_store(hot, warm) as state:
        state.set("hot", "v1")
        state.set("batch", "b1")
        state.set("warm_only", "w1", tier="warm")
        assert raw_payload(server, "hot") == b'"v1"', "HOT is not in use before the fault"
        before = counters(state)
        try:
            inject(kind, server, repairs)
            if kind.endswith("_metadata"):
                # A read meets the corrupt copies first: WARM answers, the
                # copies are discarded and counted.
                assert state.get("hot") == "v1"
                assert state.get_many(["batch", "warm_only"]) == {"batch": "b1", "warm_only": "w1"}
                with server.client() as c:
                    for key in ("hot", "batch"):
                        kind_of = c.type(value_key(key))
                        kept = c.get(value_key(key)) if kind_of == b"string" else None
                        assert kind_of != b"list" and kept != b"\x00not json{", (
                            f"the corrupt HOT copy of {key!r} is still there: {kind_of!r} {kept!r}")
                after = counters(state)
                # Unreadable bytes are a corrupt copy (counted); a key of
                # another type is no copy at all to MGET (absent, replaced).
                assert (kind != "corrupt_metadata" or after["integrity_errors"]
                        > before["integrity_errors"]), f"the corrupt copies were not counted: {after}"
            version = state.set("hot", "v2")  # acknowledged...
            assert isinstance(version, int)
            assert state.get("hot") == "v2"  # ...and never the copy HOT had
            record = state.get_record("hot")
            assert record is not None and (record.value, record.version) == ("v2", version)
            assert state.get("warm_only") == "w1"  # falls through to WARM
            assert state.get_many(["hot", "warm_only", "batch"]) == {
                "hot": "v2", "warm_only": "w1", "batch": "b1"}
            state.set("fresh", 1)
            assert state.get("fresh") == 1
            assert state.delete("batch") is True
            assert state.get("batch") is None and state.get_many(["batch"]) == {}
            assert state.keys() == ["fresh", "hot", "warm_only"]
            stats = state.stats()
            after = stats["manager"]
            if kind in ("oom", "readonly", "misconf"):
                assert after["tier_errors"] > before["tier_errors"], (
                    f"{kind}: HOT errors were not counted: {after}")
            if kind == "noscript":  # lost scripts are loaded again: HOT keeps working
                assert raw_payload(server, "hot") == b'"v2"'
        finally:
            for repair in reversed(repairs):
                repair()
        # Repaired: HOT may be used again, but nothing it kept from the fault is served.
        reads = reads_for(lambda: [state.get("hot"), state.get_many(["hot", "batch"])], 1.5)
        assert distinct(reads) == distinct([["v2", {"hot": "v2"}]]), distinct(reads)
    # Durable in WARM: a store without HOT reads the same.
    with open_store("none", warm) as plain:
        assert plain.get_many(["hot", "warm_only", "batch", "fresh"]) == {
            "hot": "v2", "warm_only": "w1", "fresh": 1}
