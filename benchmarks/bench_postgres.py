"""PostgreSQL: tiered-state against raw psycopg2, same server, same run.

Run: ``python -m benchmarks.bench_postgres`` (about a minute and a half)
with ``TIERED_STATE_TEST_POSTGRES_URL`` set (default
``postgresql://postgres@127.0.0.1:5432/test``). Every table is this run's own
and dropped at the end.

**API** -- a PostgreSQL-only store, ``tiered_state.open(hot="none",
warm="postgresql://...?table=...", cold="none")``, called with Python values,
against psycopg2 on a ``(key TEXT PRIMARY KEY, value JSONB)`` table with
``json.dumps`` inside the timed loop (psycopg2 decodes ``jsonb`` itself on
reads): ``set`` vs an autocommit ``INSERT ... ON CONFLICT DO UPDATE``, ``get``
vs a point ``SELECT``, ``set_many`` of 10k vs ``execute_values`` in one
transaction, ``get_many`` of 10k vs ``SELECT ... WHERE key = ANY(%s)``. Both
sides commit the same way on the same server (the server's
``synchronous_commit``). No target.

**repository** -- ``PostgresStateRepository`` opened with
``open_repository`` against psycopg2 writing the same rows (the backend's
columns, payloads and metadata encoded before the timing on both sides).
Targets, as time ratios (ours / raw): ``store_many`` of 10k records <= 1.25
(at least 0.8x the throughput of raw ``execute_values``); a single ``fetch``
<= 1.25 a raw point ``SELECT``; ``iter_keys`` over 100k rows in bounded
memory (tracemalloc peak for 100k keys under twice the 10k peak + 256 KiB).
The raw side is a plain cursor (no ``PREPARE``), as a user would write it;
the library prepares its point statements, which is why its ``fetch`` can
beat the raw ``SELECT``. Without a target: ``store_if_newer`` -- the
conditional entry write every ``set`` makes when PostgreSQL holds the
catalog -- next to the same upsert sent raw, and ``fetch_many`` of 10k next
to a raw ``ANY`` select.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extras import execute_values

import tiered_state
from tiered_state import codec
from tiered_state.config import open_repository
from tiered_state.record import make_metadata

from .harness import (
    compare,
    drop_postgres_table,
    fact,
    measure,
    peer_rows,
    print_rows,
    scaled,
    throughput_at_least,
    unique,
    with_option,
    write_json,
)
from .peers import Values, dumps, value, writer

URL = (os.environ.get("TIERED_STATE_TEST_POSTGRES_URL", "").strip()
       or "postgresql://postgres@127.0.0.1:5432/test")
BATCH = scaled(10_000, 2000)
N_KEYS = scaled(100_000, 20_000)
SINGLE = scaled(500, 100)
ROUNDS = scaled(7, 3)
TARGET = throughput_at_least(0.8)

Rows = list[dict[str, Any]]
Results = dict[str, dict[str, float]]

_RAW_UPSERT = (
    "INSERT INTO {t} (key, data, checksum, size_bytes, version, created_at, updated_at, "
    "expires_at, encoding) VALUES %s ON CONFLICT (key) DO UPDATE SET data = excluded.data, "
    "checksum = excluded.checksum, size_bytes = excluded.size_bytes, version = excluded.version, "
    "created_at = excluded.created_at, updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at, encoding = excluded.encoding"
)
_RAW_ROW = "(%s, %s::jsonb, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), to_timestamp(%s), %s)"


def keys_of(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


# ---------------------------------------------------------------- API level
def run_api(folder: Path) -> tuple[Rows, Results]:
    table, raw_table = unique("bench_pg_api"), unique("bench_pg_kv")
    state = tiered_state.open(folder, hot="none", warm=with_option(URL, f"table={table}"),
                              cold="none")
    conn = psycopg2.connect(URL)
    conn.autocommit = True
    cur = conn.cursor()
    try:
        cur.execute(f'CREATE TABLE "{raw_table}" (key TEXT PRIMARY KEY, value JSONB NOT NULL)')
        upsert = (f'INSERT INTO "{raw_table}" (key, value) VALUES (%s, %s) '
                  "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        upsert_many = (f'INSERT INTO "{raw_table}" (key, value) VALUES %s '
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        select = f'SELECT value FROM "{raw_table}" WHERE key = %s'
        select_many = f'SELECT key, value FROM "{raw_table}" WHERE key = ANY(%s)'
        keys = keys_of(BATCH)
        few = keys[:SINGLE]
        values, few_values = Values(BATCH), Values(SINGLE)
        state.set_many(dict(zip(keys, values.pools[0])))
        execute_values(cur, upsert_many, [(k, dumps(v)) for k, v in zip(keys, values.pools[0])],
                       page_size=1000)
        get = state.get

        def raw_get() -> None:
            for k in few:
                cur.execute(select, (k,))
                cur.fetchone()

        def ours_set_many() -> None:
            state.set_many(dict(zip(keys, values.next("ours"))))

        def raw_set_many() -> None:
            conn.autocommit = False  # one transaction, as set_many's
            execute_values(cur, upsert_many, [(k, dumps(v)) for k, v in zip(keys, values.next("raw"))],
                           page_size=1000)
            conn.commit()
            conn.autocommit = True

        def ours_get_many() -> None:
            assert len(state.get_many(keys)) == BATCH

        def raw_get_many() -> None:
            cur.execute(select_many, (keys,))
            assert len(dict(cur.fetchall())) == BATCH

        single = measure({"set": writer(state.set, few, few_values, "ours"),
                          "upsert + json.dumps": writer(lambda k, v: cur.execute(upsert, (k, dumps(v))),
                                                        few, few_values, "raw"),
                          "get": lambda: [get(k) for k in few], "point SELECT": raw_get},
                         ops=SINGLE, rounds=ROUNDS)
        batch = measure({"set_many": ours_set_many, "execute_values + json.dumps": raw_set_many,
                         "get_many": ours_get_many, "SELECT ANY": raw_get_many},
                        ops=BATCH, rounds=scaled(5, 3))
        cur.execute(select, (keys[9],))
        row = cur.fetchone()
        assert row is not None and state.get(keys[9]) == row[0]
    finally:
        state.close()
        cur.execute(f'DROP TABLE IF EXISTS "{raw_table}"')
        conn.close()
        drop_postgres_table(URL, table)
    results = {**single, **batch}
    return peer_rows(results, "PostgreSQL-only store", [
        ("set", "upsert + json.dumps", "psycopg2 upsert of ``json.dumps`` (jsonb)"),
        ("get", "point SELECT", "psycopg2 point ``SELECT`` (jsonb decoded)"),
        ("set_many", "execute_values + json.dumps",
         f"psycopg2 ``execute_values`` of {BATCH:,} ``json.dumps``"),
        ("get_many", "SELECT ANY", "psycopg2 ``SELECT ... = ANY(%s)``"),
    ], BATCH), results


# ---------------------------------------------------------------- repository level
def items(n: int, prefix: str = "k") -> dict[str, tuple[str, Any]]:
    now = time.time()
    out = {}
    for i, key in enumerate(keys_of(n, prefix)):
        payload = codec.encode(value(i))
        out[key] = (payload, make_metadata(payload, i + 1, now=now))
    return out


def raw_rows(batch: dict[str, tuple[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (k, p, m["checksum"], m["size_bytes"], m["version"], m["created_at"], m["updated_at"],
         m["expires_at"], m["encoding"])
        for k, (p, m) in batch.items()
    ]


def run_repository() -> tuple[Rows, dict[str, Any]]:
    table = unique("bench_pg")
    repo = open_repository(with_option(URL, f"table={table}"))
    raw = psycopg2.connect(URL)
    raw.autocommit = True
    cur = raw.cursor()
    try:
        batch = items(BATCH)
        repo.store_many(batch)  # creates the table; every timed round is an update

        def raw_values() -> None:
            raw.autocommit = False  # one transaction, like the library's
            execute_values(cur, _RAW_UPSERT.format(t=table), raw_rows(batch),
                           template=_RAW_ROW, page_size=1000)
            raw.commit()
            raw.autocommit = True

        store = measure({"store_many": lambda: repo.store_many(batch),
                         "raw execute_values": raw_values}, ops=BATCH, rounds=scaled(5, 3))

        keys = list(batch)[:SINGLE]

        def raw_fetch() -> None:
            for key in keys:
                cur.execute(f"SELECT data FROM {table} WHERE key = %s", (key,))
                cur.fetchone()

        single = list(batch.items())[:SINGLE]
        versions = iter(range(10**6, 10**12))
        cas_sql = (_RAW_UPSERT.format(t=table).replace("VALUES %s", f"VALUES {_RAW_ROW}")
                   + f" WHERE {table}.version < excluded.version")

        def ours_cas() -> None:
            for key, (payload, md) in single:
                assert repo.store_if_newer(key, payload, {**md, "version": next(versions)})

        def raw_cas() -> None:
            for key, (payload, md) in single:
                cur.execute(cas_sql, (key, payload, md["checksum"], md["size_bytes"], next(versions),
                                      md["created_at"], md["updated_at"], md["expires_at"],
                                      md["encoding"]))
                assert cur.rowcount == 1

        fetch = measure({"fetch": lambda: [repo.fetch(k) for k in keys],
                         "raw point SELECT": raw_fetch,
                         "store_if_newer": ours_cas, "raw conditional upsert": raw_cas},
                        ops=SINGLE, rounds=scaled(15, 3))

        all_keys = list(batch)

        def raw_fetch_many() -> None:
            cur.execute(f"SELECT key, data FROM {table} WHERE key = ANY(%s)", (all_keys,))
            cur.fetchall()

        many = measure({"fetch_many": lambda: repo.fetch_many(all_keys),
                        "raw ANY select": raw_fetch_many}, ops=BATCH, rounds=scaled(5, 3))

        # keys over N_KEYS rows: streaming and memory
        more = items(N_KEYS - BATCH, prefix="z")
        for start in range(0, len(more), BATCH):
            repo.store_many(dict(list(more.items())[start:start + BATCH]))

        def ours_keys() -> None:
            for _ in repo.iter_keys("*"):
                pass

        def raw_keys() -> None:
            with raw.cursor(name="bench_keys") as named:  # a server-side cursor
                raw.autocommit = False
                named.itersize = 1000
                named.execute(f"SELECT key FROM {table}")
                for _ in named:
                    pass
            raw.rollback()
            raw.autocommit = True

        listing = measure({"iter_keys": ours_keys, "raw server-side cursor": raw_keys},
                          ops=N_KEYS, rounds=3)
        peaks = {}
        for label, pattern, expect in (("small", "k*", BATCH), ("large", "*", N_KEYS)):
            tracemalloc.start()
            count = sum(1 for _ in repo.iter_keys(pattern))
            peaks[label] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert count == expect, (label, count)
        tracemalloc.start()
        listed = len(repo.keys("*"))
        list_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert listed == N_KEYS
    finally:
        repo.close()
        cur.execute(f'DROP TABLE IF EXISTS "{table}"')
        raw.close()
    n, big = f"{BATCH:,}", f"{N_KEYS:,}"
    rows = [
        compare(store, "store_many", "raw execute_values", level="repository",
                measurement=f"PostgreSQL ``store_many`` ({n})",
                vs="psycopg2 ``execute_values``, the same rows", target=TARGET),
        compare(fetch, "fetch", "raw point SELECT", level="repository",
                measurement="PostgreSQL ``fetch``", vs="psycopg2 point ``SELECT``", target=TARGET),
        compare(fetch, "store_if_newer", "raw conditional upsert", level="repository",
                measurement="PostgreSQL ``store_if_newer``",
                vs="psycopg2 upsert ``WHERE version <``", readme=False),
        compare(many, "fetch_many", "raw ANY select", level="repository",
                measurement=f"PostgreSQL ``fetch_many`` ({n})", vs="psycopg2 ``SELECT ... ANY``",
                readme=False),
        compare(listing, "iter_keys", "raw server-side cursor", level="repository",
                measurement=f"PostgreSQL ``iter_keys`` over {big} keys",
                vs="psycopg2 server-side cursor", readme=False),
        fact(f"PostgreSQL ``iter_keys`` peak memory (tracemalloc), {big} keys",
             f"the same, {n} keys", ours=peaks["large"] / 1024, other=peaks["small"] / 1024,
             unit="KiB", level="repository", target="< 2 x + 256 KiB (bounded)",
             met=peaks["large"] < 2 * peaks["small"] + 256 * 1024),
    ]
    return rows, {"store_many": store, "single": fetch, "fetch_many": many, "keys": listing,
                  "tracemalloc_peak_bytes": {**peaks, "keys_list": list_peak}}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-postgres-", dir=os.environ.get("BENCH_DIR")) as tmp:
        api_rows, api = run_api(Path(tmp))
    repo_rows, repo = run_repository()
    rows = api_rows + repo_rows
    print_rows("PostgreSQL: tiered-state vs raw psycopg2 (ratio = our median time / the other "
               "side's; lower is better)", rows)
    write_json("postgres", rows, {"results": {"api": api, "repository": repo}},
               used_servers=("postgres",))


if __name__ == "__main__":
    main()
