"""The embedded backends (memory, SQLite, files) against the stdlib and diskcache.

Run: ``python -m benchmarks.bench_embedded`` (about a minute; no servers).

Two levels, labelled in every row:

**API** -- a store opened with ``tiered_state.open`` on one backend only
(``hot="memory://"``, or SQLite with ``hot="none", cold="none"``, or files
with ``hot="none", warm="none"``), called through ``set`` / ``get`` /
``set_many`` with Python values, against a peer doing the same work through
its own public API, serialisation inside the timed loop on both sides:

* memory: a dict holding ``json.dumps(value)`` (a copy, as the memory
  backend keeps), read back with ``json.loads``;
* SQLite: ``sqlite3`` on a ``(key, value)`` table, the value
  ``json.dumps``-ed, same pragmas as the backend (WAL,
  ``synchronous=NORMAL``, one transaction per write; ``set_many`` against
  ``executemany`` in one transaction);
* SQLite: ``diskcache.Cache`` with its defaults (WAL, ``synchronous=NORMAL``
  too, so both sides promise the same durability; diskcache pickles the
  value, tiered-state JSON-encodes it and adds a SHA-256 and metadata);
  ``set_many`` against ``Cache.set`` in a loop inside ``Cache.transact()``;
* files: a file per key written with ``json.dumps``, fsync, rename and fsync
  of the folder, read with ``open`` + ``json.loads`` (the file backend
  fsyncs the same way by default).

Targets at this level: SQLite-only ``set`` at most half the time of
``diskcache``'s ``Cache.set`` (twice its throughput) and ``get`` at most the
time of ``Cache.get``.

**repository** -- one backend opened with ``open_repository(url)`` and
called with payloads and metadata encoded *before* the timed loop, against
the stdlib writing the same payload bytes (a dict; ``sqlite3`` with the
backend's ten-column row and an ``ON CONFLICT`` upsert, plus ``WHERE
version <`` for ``store_if_newer``; plain files). Neither side encodes inside
the loop: these rows show what each backend adds to the driver, not what a
user's call costs. Targets: memory ``fetch`` <= 1.5x ``json.loads`` + a dict
lookup; a 10,000-record SQLite ``store_many`` <= 0.05x the time of 10,000
single stores (with ``synchronous=NORMAL`` and ``FULL``).
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tiered_state
from tiered_state import codec
from tiered_state.config import open_repository
from tiered_state.record import Metadata, make_metadata

from .harness import (
    at_most,
    compare,
    measure,
    print_rows,
    scaled,
    throughput_at_least,
    write_json,
)
from .peers import (
    KV_SCHEMA,
    KV_SELECT,
    KV_UPSERT,
    RECORD_SCHEMA,
    RECORD_SELECT,
    RECORD_UPSERT,
    Files,
    Values,
    dumps,
    loads,
    record_params,
    sqlite_connect,
    value,
    writer,
)

SINGLE = scaled(2000, 300)  # keys per timed call of the single-operation cases
FILES = scaled(100, 30)  # a durable file write fsyncs twice: fewer keys
BATCH = scaled(10_000, 1000)
ROUNDS = scaled(7, 3)
BATCH_ROUNDS = scaled(5, 3)

Rows = list[dict[str, Any]]
Results = dict[str, dict[str, float]]


def keys_of(n: int) -> list[str]:
    return [f"k{i:05d}" for i in range(n)]


# ---------------------------------------------------------------- API level
def api_memory(folder: Path) -> tuple[Rows, Results]:
    state = tiered_state.open(folder / "memory", hot="memory://", warm="none", cold="none")
    peer: dict[str, str] = {}
    keys = keys_of(SINGLE)
    for i, k in enumerate(keys):
        state.set(k, value(i))
        peer[k] = dumps(value(i))
    values = Values(SINGLE)
    put, get = state.set, state.get

    def ours_set() -> None:
        for k, v in zip(keys, values.next("ours")):
            put(k, v)

    def peer_set() -> None:
        for k, v in zip(keys, values.next("peer")):
            peer[k] = dumps(v)

    results = measure({
        "memory set": ours_set, "dict + json.dumps": peer_set,
        "memory get": lambda: [get(k) for k in keys],
        "dict + json.loads": lambda: [loads(peer[k]) for k in keys],
    }, ops=SINGLE, rounds=ROUNDS)
    assert state.get(keys[7]) == loads(peer[keys[7]])
    state.close()
    return [
        compare(results, "memory set", "dict + json.dumps",
                measurement="memory-only store ``set``", vs="``json.dumps`` into a dict"),
        compare(results, "memory get", "dict + json.loads",
                measurement="memory-only store ``get``", vs="``json.loads`` from a dict"),
    ], results


def api_sqlite(folder: Path) -> tuple[Rows, Results]:
    import diskcache  # type: ignore[import-untyped]

    state = tiered_state.open(folder / "sqlite", hot="none", cold="none")
    conn = sqlite_connect(folder / "kv.db")
    conn.execute(KV_SCHEMA)
    cache = diskcache.Cache(str(folder / "diskcache"))
    keys = keys_of(SINGLE)
    state.set_many({k: value(i) for i, k in enumerate(keys)})
    for i, k in enumerate(keys):
        conn.execute(KV_UPSERT, (k, dumps(value(i))))
        cache.set(k, value(i))
    values = Values(SINGLE)
    get = state.get
    execute = conn.execute
    dc_set, dc_get = cache.set, cache.get

    def sqlite_get() -> None:
        for k in keys:
            loads(execute(KV_SELECT, (k,)).fetchone()[0])

    results = measure({
        "sqlite set": writer(state.set, keys, values, "ours"),
        "sqlite3 upsert + json.dumps": writer(lambda k, v: execute(KV_UPSERT, (k, dumps(v))), keys,
                                              values, "sqlite3"),
        "diskcache set": writer(dc_set, keys, values, "diskcache"),
        "sqlite get": lambda: [get(k) for k in keys],
        "sqlite3 select + json.loads": sqlite_get,
        "diskcache get": lambda: [dc_get(k) for k in keys],
    }, ops=SINGLE, rounds=ROUNDS)
    assert state.get(keys[3]) == cache.get(keys[3]) == loads(execute(KV_SELECT, (keys[3],)).fetchone()[0])

    many_keys = keys_of(BATCH)
    batch_values = Values(BATCH)

    def ours_many() -> None:
        state.set_many(dict(zip(many_keys, batch_values.next("ours"))))

    def sqlite_many() -> None:
        execute("BEGIN IMMEDIATE")
        conn.executemany(KV_UPSERT, [(k, dumps(v))
                                     for k, v in zip(many_keys, batch_values.next("sqlite3"))])
        execute("COMMIT")

    def diskcache_many() -> None:
        with cache.transact():
            for k, v in zip(many_keys, batch_values.next("diskcache")):
                dc_set(k, v)

    batches = measure({"sqlite set_many": ours_many, "sqlite3 executemany + json.dumps": sqlite_many,
                       "diskcache set in transact()": diskcache_many},
                      ops=BATCH, rounds=BATCH_ROUNDS)
    results.update(batches)
    cache.close()
    conn.close()
    state.close()
    n = f"{BATCH:,}"
    return [
        compare(results, "sqlite set", "diskcache set", measurement="SQLite-only store ``set``",
                vs="diskcache ``Cache.set``", target=throughput_at_least(2)),
        compare(results, "sqlite get", "diskcache get", measurement="SQLite-only store ``get``",
                vs="diskcache ``Cache.get``", target=throughput_at_least(1)),
        compare(results, "sqlite set", "sqlite3 upsert + json.dumps",
                measurement="SQLite-only store ``set``", vs="sqlite3 upsert of ``json.dumps``"),
        compare(results, "sqlite get", "sqlite3 select + json.loads",
                measurement="SQLite-only store ``get``", vs="sqlite3 ``SELECT`` + ``json.loads``"),
        compare(results, "sqlite set_many", "sqlite3 executemany + json.dumps",
                measurement=f"SQLite-only store ``set_many`` ({n})",
                vs=f"sqlite3 ``executemany`` ({n}, one transaction)"),
        compare(results, "sqlite set_many", "diskcache set in transact()",
                measurement=f"SQLite-only store ``set_many`` ({n})",
                vs=f"diskcache {n} ``set`` in ``transact()``"),
    ], results


def api_files(folder: Path) -> tuple[Rows, Results]:
    state = tiered_state.open(folder / "files", hot="none", warm="none")
    peer = Files(folder / "plain-files")
    keys = keys_of(FILES)
    state.set_many({k: value(i) for i, k in enumerate(keys)})
    for i, k in enumerate(keys):
        peer.write(k, dumps(value(i)))
    values = Values(FILES)
    get = state.get
    results = measure({
        "files set": writer(state.set, keys, values, "ours"),
        "json.dumps + durable write": writer(lambda k, v: peer.write(k, dumps(v)), keys, values,
                                             "peer"),
        "files get": lambda: [get(k) for k in keys],
        "open + read + json.loads": lambda: [loads(peer.read(k)) for k in keys],
    }, ops=FILES, rounds=scaled(5, 3))
    assert state.get(keys[1]) == loads(peer.read(keys[1]))
    peer.close()
    state.close()
    return [
        compare(results, "files set", "json.dumps + durable write",
                measurement="file-only store ``set`` (fsync on)",
                vs="``json.dumps``, write, fsync, rename, fsync folder"),
        compare(results, "files get", "open + read + json.loads",
                measurement="file-only store ``get``", vs="``open`` + ``read`` + ``json.loads``"),
    ], results


# ---------------------------------------------------------------- repository level
Item = tuple[str, str, Metadata]


def make_items(n: int, salt: int) -> list[Item]:
    """n (key, payload, metadata), encoded once, before any timing."""
    now = time.time()
    out = []
    for i, key in enumerate(keys_of(n)):
        payload = codec.encode(value(i, salt))
        out.append((key, payload, make_metadata(payload, salt * 1_000_000 + i + 1, now=now)))
    return out


def rotating(n: int, variants: int = 4) -> Callable[[], list[Item]]:
    """Each call returns the next of ``variants`` item lists, so values change between writes."""
    cycle = itertools.cycle([make_items(n, salt) for salt in range(1, variants + 1)])
    return lambda: next(cycle)


def repo_memory() -> tuple[Rows, Results]:
    repo = open_repository("memory://")
    peer: dict[str, str] = {}
    items = make_items(SINGLE, 0)
    for key, payload, md in items:
        repo.store(key, payload, md)
        peer[key] = payload
    keys = [k for k, _, _ in items]
    fetch = repo.fetch
    nxt = rotating(SINGLE)

    def store_repo() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def store_peer() -> None:
        for key, payload, md in nxt():
            peer[key] = payload
            dict(md)  # the copy the repository keeps so callers cannot mutate it

    results = measure({
        "memory fetch": lambda: [fetch(k) for k in keys],
        "dict + json.loads": lambda: [loads(peer[k]) for k in keys],
        "memory store": store_repo, "dict store": store_peer,
    }, ops=SINGLE, rounds=scaled(9, 3))
    repo.close()
    return [
        compare(results, "memory fetch", "dict + json.loads", level="repository",
                measurement="memory ``fetch`` (checksum checked, decoded)",
                vs="``json.loads`` from a dict", target=at_most(1.5)),
        compare(results, "memory store", "dict store", level="repository",
                measurement="memory ``store``", vs="dict assignment + metadata copy",
                readme=False),
    ], results


def repo_sqlite(folder: Path) -> tuple[Rows, Results]:
    repo = open_repository(f"sqlite:///{folder / 'warm.db'}")
    raw = sqlite_connect(folder / "raw.db")
    raw.executescript(RECORD_SCHEMA)
    items = make_items(SINGLE, 0)
    keys = [k for k, _, _ in items]
    for key, payload, md in items:
        repo.store(key, payload, md)
        raw.execute(RECORD_UPSERT, record_params(key, payload, md))
    nxt = rotating(SINGLE)
    versions = itertools.count(10**9)  # above make_items' versions: the condition must pass
    raw_cas = RECORD_UPSERT + " WHERE raw.version < excluded.version"

    def store_repo() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def store_raw() -> None:
        for key, payload, md in nxt():
            raw.execute(RECORD_UPSERT, record_params(key, payload, md))

    def cas_repo() -> None:
        for key, payload, md in nxt():
            repo.store_if_newer(key, payload, {**md, "version": next(versions)})

    def cas_raw() -> None:
        for key, payload, md in nxt():
            raw.execute(raw_cas, record_params(key, payload, {**md, "version": next(versions)}))

    def fetch_raw() -> None:
        for key in keys:
            loads(raw.execute(RECORD_SELECT, (key,)).fetchone()[0])

    fetch = repo.fetch
    results = measure({
        "sqlite store": store_repo, "raw sqlite3 upsert": store_raw,
        "sqlite store_if_newer": cas_repo, "raw sqlite3 upsert WHERE version <": cas_raw,
        "sqlite fetch": lambda: [fetch(k) for k in keys], "raw sqlite3 select": fetch_raw,
        "sqlite changed_by_others": lambda: [repo.changed_by_others() for _ in keys],
        "raw PRAGMA data_version": lambda: [raw.execute("PRAGMA data_version").fetchone()
                                            for _ in keys],
    }, ops=SINGLE, rounds=ROUNDS)
    raw.close()
    repo.close()
    same_row = "sqlite3, the same row"
    return [
        compare(results, "sqlite store", "raw sqlite3 upsert", level="repository",
                measurement="SQLite ``store``", vs=f"{same_row}: upsert"),
        compare(results, "sqlite store_if_newer", "raw sqlite3 upsert WHERE version <",
                level="repository", measurement="SQLite ``store_if_newer``",
                vs=f"{same_row}: upsert ``WHERE version <``"),
        compare(results, "sqlite fetch", "raw sqlite3 select", level="repository",
                measurement="SQLite ``fetch`` (checksum checked, decoded)",
                vs=f"{same_row}: ``SELECT`` + ``json.loads``"),
        compare(results, "sqlite changed_by_others", "raw PRAGMA data_version", level="repository",
                measurement="SQLite ``changed_by_others``", vs="``PRAGMA data_version``",
                readme=False),
    ], results


def repo_files(folder: Path) -> tuple[Rows, Results]:
    repo = open_repository((folder / "cold").as_uri())
    peer = Files(folder / "raw-files")
    items = make_items(FILES, 0)
    keys = [k for k, _, _ in items]
    for key, payload, md in items:
        repo.store(key, payload, md)
        peer.write(key, payload)
    nxt = rotating(FILES)

    def store_repo() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def store_raw() -> None:
        for key, payload, _ in nxt():
            peer.write(key, payload)

    fetch = repo.fetch
    results = measure({
        "filesystem store": store_repo, "raw write+fsync+rename": store_raw,
        "filesystem fetch": lambda: [fetch(k) for k in keys],
        "raw open+read+loads": lambda: [loads(peer.read(k)) for k in keys],
    }, ops=FILES, rounds=scaled(5, 3))
    peer.close()
    repo.close()
    return [
        compare(results, "filesystem store", "raw write+fsync+rename", level="repository",
                measurement="file ``store`` (fsync on)",
                vs="write, fsync, rename, fsync folder"),
        compare(results, "filesystem fetch", "raw open+read+loads", level="repository",
                measurement="file ``fetch`` (checksum checked, decoded)",
                vs="``open`` + ``read`` + ``json.loads``"),
    ], results


def repo_batches(folder: Path) -> tuple[Rows, Results]:
    repo = open_repository(f"sqlite:///{folder / 'batch.db'}")
    raw = sqlite_connect(folder / "batch-raw.db")
    raw.executescript(RECORD_SCHEMA)
    memory = open_repository("memory://")
    nxt = rotating(BATCH)
    versions = itertools.count(10**9)

    def raw_many() -> None:
        raw.execute("BEGIN IMMEDIATE")
        raw.executemany(RECORD_UPSERT, [record_params(k, p, md) for k, p, md in nxt()])
        raw.execute("COMMIT")

    n = f"{BATCH:,}"
    results = measure({
        f"sqlite {n} single stores": lambda: [repo.store(k, p, md) for k, p, md in nxt()],
        f"sqlite store_many({n})": lambda: repo.store_many({k: (p, md) for k, p, md in nxt()}),
        f"sqlite store_many_if_newer({n})": lambda: repo.store_many_if_newer(
            {k: (p, {**md, "version": next(versions)}) for k, p, md in nxt()}),
        f"raw sqlite3 executemany({n})": raw_many,
        f"memory {n} single stores": lambda: [memory.store(k, p, md) for k, p, md in nxt()],
        f"memory store_many({n})": lambda: memory.store_many({k: (p, md) for k, p, md in nxt()}),
    }, ops=BATCH, rounds=BATCH_ROUNDS)
    # With synchronous=FULL every single store fsyncs: 200 of them are timed and
    # compared per operation with a store_many of BATCH records.
    full = open_repository(f"sqlite:///{folder / 'full.db'}?synchronous=FULL")
    few = scaled(200, 50)
    nxt_few = rotating(few)
    full_single, full_many = "sqlite FULL single stores", f"sqlite FULL store_many({n})"
    results.update(measure({full_single: lambda: [full.store(k, p, md) for k, p, md in nxt_few()]},
                           ops=few, rounds=3))
    results.update(measure({full_many: lambda: full.store_many({k: (p, md) for k, p, md in nxt()})},
                           ops=BATCH, rounds=3))
    # The two FULL cases ran different numbers of operations: compare per operation.
    for name in (full_single, full_many):
        results[name] = {**results[name], "median_s": results[name]["per_op_us"] / 1e6}
    full.close()
    raw.close()
    memory.close()
    repo.close()
    per_record = throughput_at_least(20)
    return [
        compare(results, f"sqlite store_many({n})", f"sqlite {n} single stores", level="repository",
                measurement=f"SQLite ``store_many`` ({n}), per record",
                vs="single ``store`` calls", target=per_record),
        compare(results, full_many, full_single, level="repository",
                measurement=f"SQLite ``synchronous=FULL`` ``store_many`` ({n}), per record",
                vs="single ``store`` calls, FULL", target=per_record),
        compare(results, f"sqlite store_many({n})", f"raw sqlite3 executemany({n})",
                level="repository", measurement=f"SQLite ``store_many`` ({n})",
                vs="sqlite3 ``executemany``, the same rows"),
        compare(results, f"sqlite store_many_if_newer({n})", f"sqlite store_many({n})",
                level="repository", measurement=f"SQLite ``store_many_if_newer`` ({n})",
                vs="SQLite ``store_many``", readme=False),
        compare(results, f"memory store_many({n})", f"memory {n} single stores", level="repository",
                measurement=f"memory ``store_many`` ({n})", vs="single ``store`` calls",
                readme=False),
    ], results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-embedded-", dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        sections = {
            "memory, API": api_memory(folder),
            "SQLite, API": api_sqlite(folder),
            "files, API": api_files(folder),
            "memory, repository": repo_memory(),
            "SQLite, repository": repo_sqlite(folder),
            "files, repository": repo_files(folder),
            "batches, repository": repo_batches(folder),
        }
    rows = [row for got, _ in sections.values() for row in got]
    print_rows("embedded backends (ratio = our median time / the other side's; lower is better)",
               rows)
    write_json("embedded", rows, {"results": {t: r for t, (_, r) in sections.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
