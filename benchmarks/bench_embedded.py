"""Embedded backends (memory, sqlite, filesystem) against the raw thing and diskcache.

Run: ``python -m benchmarks.bench_embedded`` (about two minutes). Each
backend is timed next to the stdlib doing the same work in the same run
(dict + json, raw sqlite3 with the same schema and pragmas, plain files with
write + fsync + rename) and, for SQLite, next to ``diskcache.Cache`` -- the
embedded store users would otherwise pick. Rounds alternate the cases; every
write stores a value different from the key's previous one (an identical
rewrite would let SQLite skip work).

Targets: sqlite store >= 2x faster than ``Cache.set``, sqlite fetch
>= 1x ``Cache.get``; a 10,000-record ``store_many`` >= 20x faster than 10,000
single stores; memory fetch <= 1.5x ``json.loads`` + a dict lookup.

For the catalog design, rows without a target for the writes the manager
actually makes: every ``set`` is a ``store_if_newer`` in the catalog (SQLite:
the upsert with ``WHERE version < new``, next to the same statement through
raw sqlite3), every ``set_many`` a ``store_many_if_newer`` (one statement per
row inside one transaction, so each row's outcome is known) next to the
plain ``store_many`` (one ``executemany``). Conditional cases get a new
version on every write, or the condition would refuse them.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tiered_state import codec
from tiered_state.record import Metadata, make_metadata
from tiered_state.repositories.filesystem_repository import FileSystemStateRepository
from tiered_state.repositories.memory_repository import MemoryStateRepository
from tiered_state.repositories.sqlite_repository import _SCHEMA, SQLiteStateRepository

from .harness import measure, print_table, ratio, write_json

SINGLE = 2000  # keys per timed call of the single-operation cases
FILES = 100  # the filesystem fsyncs twice per write: fewer keys
BATCH = 10_000


def close_all(*things: Any) -> None:
    for thing in things:
        thing.close()


def make_items(n: int, salt: int) -> list[tuple[str, str, Metadata]]:
    """n (key, payload, metadata); a different salt gives different payloads."""
    out = []
    now = time.time()
    for i in range(n):
        value = {"i": i, "salt": salt, "qty": 1.5 * i, "side": "buy", "note": "x" * 64}
        payload = codec.encode(value)
        out.append((f"k{i}", payload, make_metadata(payload, salt * 1_000_000 + i, now=now)))
    return out


def rotating(n: int, variants: int = 4) -> Callable[[], list[tuple[str, str, Metadata]]]:
    """Each call returns the next of ``variants`` item lists, so values change between writes."""
    pools = [make_items(n, salt) for salt in range(variants)]
    cycle = itertools.cycle(pools)
    return lambda: next(cycle)


def row(name: str, results: dict[str, dict[str, float]], ops: int, raw: str | None,
        target: str = "") -> dict[str, Any]:
    return {
        "case": name,
        "us_per_op": results[name]["per_op_us"],
        "ops_per_s": results[name]["ops_per_s"],
        "vs": raw or "",
        "ratio": ratio(results, name, raw) if raw else 1.0,
        "target": target,
    }


def bench_memory() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    repo = MemoryStateRepository()
    raw: dict[str, str] = {}
    items = make_items(SINGLE, 0)
    for key, payload, md in items:
        repo.store(key, payload, md)
        raw[key] = payload
    keys = [k for k, _, _ in items]
    fetch = repo.fetch
    loads = json.loads
    nxt = rotating(SINGLE)

    def store_repo() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def store_raw() -> None:
        for key, payload, md in nxt():
            raw[key] = payload
            dict(md)  # the copy the repository keeps so callers cannot mutate it

    results = measure(
        {
            "memory fetch": lambda: [fetch(k) for k in keys],
            "dict + json.loads": lambda: [loads(raw[k]) for k in keys],
            "memory store": store_repo,
            "dict store": store_raw,
        },
        ops=SINGLE, rounds=9,
    )
    rows = [
        row("memory fetch", results, SINGLE, "dict + json.loads", "<= 1.5"),
        row("dict + json.loads", results, SINGLE, None),
        row("memory store", results, SINGLE, "dict store"),
        row("dict store", results, SINGLE, None),
    ]
    return rows, results


def raw_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(_SCHEMA.format(t="raw", i="raw"))
    return conn


_RAW_UPSERT = (
    "INSERT INTO raw (key, payload, checksum, size_bytes, version, created_at, updated_at,"
    " last_accessed, expires_at, encoding) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET"
    " payload=excluded.payload, checksum=excluded.checksum, size_bytes=excluded.size_bytes,"
    " version=excluded.version, created_at=excluded.created_at, updated_at=excluded.updated_at,"
    " last_accessed=excluded.last_accessed, expires_at=excluded.expires_at, encoding=excluded.encoding"
)


def _raw_params(key: str, payload: str, md: Metadata) -> tuple[Any, ...]:
    return (key, payload, md["checksum"], md["size_bytes"], md["version"], md["created_at"],
            md["updated_at"], md["updated_at"], md["expires_at"], md["encoding"])


def bench_sqlite(folder: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import diskcache

    repo = SQLiteStateRepository(os.path.join(folder, "warm.db"))
    raw = raw_sqlite(os.path.join(folder, "raw.db"))
    cache = diskcache.Cache(os.path.join(folder, "diskcache"))
    items = make_items(SINGLE, 0)
    keys = [k for k, _, _ in items]
    values = {k: json.loads(p) for k, p, _ in items}
    for key, payload, md in items:
        repo.store(key, payload, md)
        raw.execute(_RAW_UPSERT, _raw_params(key, payload, md))
        cache.set(key, values[key])
    nxt = rotating(SINGLE)
    decoded = [{k: json.loads(p) for k, p, _ in nxt()} for _ in range(4)]
    dc_cycle = itertools.cycle(decoded)

    def store_repo() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def store_raw() -> None:
        for key, payload, md in nxt():
            raw.execute(_RAW_UPSERT, _raw_params(key, payload, md))

    def set_diskcache() -> None:
        for key, value in next(dc_cycle).items():
            cache.set(key, value)

    versions = itertools.count(10**7)  # above make_items' versions: the condition must pass
    raw_cas = _RAW_UPSERT + " WHERE raw.version < excluded.version"

    def cas_repo() -> None:
        for key, payload, md in nxt():
            repo.store_if_newer(key, payload, {**md, "version": next(versions)})

    def cas_raw() -> None:
        for key, payload, md in nxt():
            raw.execute(raw_cas, _raw_params(key, payload, {**md, "version": next(versions)}))

    select = "SELECT payload, checksum, expires_at FROM raw WHERE key = ?"

    def fetch_raw() -> None:
        for key in keys:
            json.loads(raw.execute(select, (key,)).fetchone()[0])

    fetch = repo.fetch
    get = cache.get
    results = measure(
        {
            "sqlite store": store_repo,
            "raw sqlite3 upsert": store_raw,
            "sqlite store_if_newer": cas_repo,
            "raw sqlite3 upsert WHERE version <": cas_raw,
            "diskcache set": set_diskcache,
            "sqlite fetch": lambda: [fetch(k) for k in keys],
            "raw sqlite3 select": fetch_raw,
            "diskcache get": lambda: [get(k) for k in keys],
            "sqlite changed_by_others": lambda: [repo.changed_by_others() for _ in keys],
            "raw PRAGMA data_version": lambda: [
                raw.execute("PRAGMA data_version").fetchone() for _ in keys
            ],
        },
        ops=SINGLE, rounds=7,
    )
    rows = [
        row("sqlite store", results, SINGLE, "raw sqlite3 upsert"),
        row("sqlite store", results, SINGLE, "diskcache set", "<= 0.5"),
        row("sqlite store_if_newer", results, SINGLE, "raw sqlite3 upsert WHERE version <"),
        row("sqlite fetch", results, SINGLE, "raw sqlite3 select"),
        row("sqlite fetch", results, SINGLE, "diskcache get", "<= 1.0"),
        row("raw sqlite3 upsert", results, SINGLE, None),
        row("diskcache set", results, SINGLE, None),
        row("diskcache get", results, SINGLE, None),
        row("sqlite changed_by_others", results, SINGLE, "raw PRAGMA data_version"),
    ]
    close_all(cache, raw, repo)
    return rows, results


def bench_batches(folder: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    repo = SQLiteStateRepository(os.path.join(folder, "batch.db"))
    raw = raw_sqlite(os.path.join(folder, "batch-raw.db"))
    memory = MemoryStateRepository()
    files = FileSystemStateRepository(os.path.join(folder, "batch-files"))
    nxt = rotating(BATCH)
    nxt_files = rotating(FILES * 5)

    def sqlite_single() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def sqlite_many() -> None:
        repo.store_many({k: (p, md) for k, p, md in nxt()})

    versions = itertools.count(10**7)

    def sqlite_many_if_newer() -> None:
        repo.store_many_if_newer({k: (p, {**md, "version": next(versions)}) for k, p, md in nxt()})

    def raw_many() -> None:
        raw.execute("BEGIN IMMEDIATE")
        raw.executemany(_RAW_UPSERT, [_raw_params(k, p, md) for k, p, md in nxt()])
        raw.execute("COMMIT")

    def memory_single() -> None:
        for key, payload, md in nxt():
            memory.store(key, payload, md)

    def memory_many() -> None:
        memory.store_many({k: (p, md) for k, p, md in nxt()})

    def files_single() -> None:
        for key, payload, md in nxt_files():
            files.store(key, payload, md)

    def files_many() -> None:
        files.store_many({k: (p, md) for k, p, md in nxt_files()})

    results = measure(
        {
            "sqlite 10k single stores": sqlite_single,
            "sqlite store_many(10k)": sqlite_many,
            "sqlite store_many_if_newer(10k)": sqlite_many_if_newer,
            "raw sqlite3 executemany(10k)": raw_many,
            "memory 10k single stores": memory_single,
            "memory store_many(10k)": memory_many,
        },
        ops=BATCH, rounds=5,
    )
    file_results = measure(
        {"filesystem 500 single stores": files_single, "filesystem store_many(500)": files_many},
        ops=FILES * 5, rounds=3,
    )
    results.update(file_results)
    # With synchronous=FULL every single store fsyncs; time 200 of them and
    # compare per operation (10,000 would take minutes on a slow disk).
    full = SQLiteStateRepository(os.path.join(folder, "full.db"), synchronous="FULL")
    nxt_full = rotating(200)
    full_results = measure(
        {
            "sqlite FULL single store (per op)": lambda: [full.store(k, p, md) for k, p, md in nxt_full()],
        },
        ops=200, rounds=3,
    )
    full_many = measure(
        {"sqlite FULL store_many(10k) (per op)": lambda: full.store_many({k: (p, md) for k, p, md in nxt()})},
        ops=BATCH, rounds=3,
    )
    full.close()
    results.update(full_results)
    results.update(full_many)
    many_full, single_full = "sqlite FULL store_many(10k) (per op)", "sqlite FULL single store (per op)"
    per_op = {name: {"median_s": results[name]["per_op_us"]} for name in (many_full, single_full)}
    rows = [
        row("sqlite store_many(10k)", results, BATCH, "sqlite 10k single stores", "<= 0.05"),
        {
            "case": many_full,
            "us_per_op": results[many_full]["per_op_us"],
            "ops_per_s": results[many_full]["ops_per_s"],
            "vs": single_full,
            "ratio": ratio(per_op, many_full, single_full),
            "target": "<= 0.05",
        },
        row("sqlite store_many(10k)", results, BATCH, "raw sqlite3 executemany(10k)"),
        row("sqlite store_many_if_newer(10k)", results, BATCH, "sqlite store_many(10k)"),
        row("memory store_many(10k)", results, BATCH, "memory 10k single stores"),
        row("filesystem store_many(500)", results, FILES * 5, "filesystem 500 single stores"),
    ]
    close_all(raw, repo, files)
    return rows, results


def bench_files(folder: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    repo = FileSystemStateRepository(os.path.join(folder, "cold"))
    raw_dir = os.path.join(folder, "raw-files")
    os.makedirs(raw_dir, mode=0o700)
    raw_fd = os.open(raw_dir, os.O_RDONLY | os.O_DIRECTORY)
    items = make_items(FILES, 0)
    keys = [k for k, _, _ in items]
    nxt = rotating(FILES)

    def raw_write(key: str, payload: str) -> None:
        tmp = os.path.join(raw_dir, ".tmp-" + key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, payload.encode())
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, os.path.join(raw_dir, key))
        os.fsync(raw_fd)

    for key, payload, md in items:
        repo.store(key, payload, md)
        raw_write(key, payload)

    def store_repo() -> None:
        for key, payload, md in nxt():
            repo.store(key, payload, md)

    def store_raw() -> None:
        for key, payload, _ in nxt():
            raw_write(key, payload)

    def fetch_raw() -> None:
        for key in keys:
            with open(os.path.join(raw_dir, key), "rb") as handle:
                json.loads(handle.read())

    fetch = repo.fetch
    results = measure(
        {
            "filesystem store": store_repo,
            "raw write+fsync+rename": store_raw,
            "filesystem fetch": lambda: [fetch(k) for k in keys],
            "raw open+read+loads": fetch_raw,
        },
        ops=FILES, rounds=5,
    )
    rows = [
        row("filesystem store", results, FILES, "raw write+fsync+rename"),
        row("filesystem fetch", results, FILES, "raw open+read+loads"),
    ]
    os.close(raw_fd)
    repo.close()
    return rows, results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-embedded-", dir=os.environ.get("BENCH_DIR")) as folder:
        sections = {
            "memory (single operations)": bench_memory(),
            "sqlite vs raw sqlite3 and diskcache (single operations)": bench_sqlite(folder),
            "filesystem (single operations, fsync on)": bench_files(folder),
            "batches": bench_batches(folder),
        }
    for title, (rows, _) in sections.items():
        print_table(title, rows)
    print("\nratio = our median time / the 'vs' case's (lower is better); target is the ratio to reach")
    write_json("bench_embedded", {t: {"rows": rows, "raw": raw} for t, (rows, raw) in sections.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
