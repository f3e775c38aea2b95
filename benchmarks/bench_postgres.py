"""PostgresStateRepository vs raw psycopg2, same server, same run.

Run: ``python -m benchmarks.bench_postgres`` with ``TIERED_STATE_TEST_POSTGRES_URL``
set (default ``postgresql://postgres@127.0.0.1:5432/test``).

Targets: ``store_many`` of 10k records at >= 0.8x the throughput of
raw ``execute_values``; a single ``fetch`` <= 1.25x a raw point SELECT;
``iter_keys`` over 100k rows in bounded memory (tracemalloc peak for 10k keys
vs 100k keys).

For the catalog design, one row without a target: ``store_if_newer`` -- the
conditional entry write every ``set`` makes when PostgreSQL is the catalog
(a prepared upsert ``... WHERE version < new``) -- next to the same upsert
sent raw through a psycopg2 cursor, one row per call, new versions each time.
The raw side is a plain cursor (no PREPARE), as a user would write it; the
library PREPAREs its point statements, which is why its fetch can beat the
raw SELECT.
"""

from __future__ import annotations

import os
import time
import tracemalloc
import uuid
from typing import Any

import psycopg2
from psycopg2.extras import execute_values

from tiered_state import codec
from tiered_state.record import make_metadata
from tiered_state.repositories import postgres_repository as pgmod
from tiered_state.repositories.postgres_repository import PostgresStateRepository, _canonical

from .harness import measure, print_table, ratio, write_json

URL = os.environ.get(
    "TIERED_STATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
N_BATCH = 10_000
N_KEYS = 100_000
N_FETCH = 500

_RAW_UPSERT = (
    "INSERT INTO {t} (key, data, checksum, size_bytes, version, created_at, updated_at, "
    "expires_at, encoding) VALUES %s ON CONFLICT (key) DO UPDATE SET data = excluded.data, "
    "checksum = excluded.checksum, size_bytes = excluded.size_bytes, version = excluded.version, "
    "created_at = excluded.created_at, updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at, encoding = excluded.encoding"
)
_RAW_ROW = "(%s, %s::jsonb, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), to_timestamp(%s), %s)"


def items(n: int, prefix: str = "k") -> dict[str, tuple[str, Any]]:
    now = time.time()
    out = {}
    for i in range(n):
        payload = codec.encode(
            {"i": i, "name": f"item-{i}", "qty": i * 1.5, "tags": ["a", "b"], "ok": True}
        )
        out[f"{prefix}{i:06d}"] = (payload, make_metadata(payload, i + 1, now=now))
    return out


def raw_rows(batch: dict[str, tuple[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (k, p, m["checksum"], m["size_bytes"], m["version"], m["created_at"], m["updated_at"],
         m["expires_at"], m["encoding"])
        for k, (p, m) in batch.items()
    ]


def main() -> None:
    table = f"bench_{uuid.uuid4().hex[:8]}"
    repo = PostgresStateRepository(URL, table=table)
    raw = psycopg2.connect(URL)
    raw.autocommit = True
    cur = raw.cursor()
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    try:
        batch = items(N_BATCH)
        repo.store_many(batch)  # creates the table; every timed round is an update

        # ---- store_many of 10k: COPY (kept), execute_values inside the library, raw
        def ours_copy() -> None:
            repo.store_many(batch)

        def ours_values() -> None:
            saved, pgmod._COPY_MIN = pgmod._COPY_MIN, 10**9
            try:
                repo.store_many(batch)
            finally:
                pgmod._COPY_MIN = saved

        def raw_values() -> None:
            raw.autocommit = False  # one transaction, like the library's
            execute_values(cur, _RAW_UPSERT.format(t=table), raw_rows(batch),
                           template=_RAW_ROW, page_size=1000)
            raw.commit()
            raw.autocommit = True

        store = measure(
            {"ours store_many (COPY)": ours_copy,
             "ours store_many (execute_values)": ours_values,
             "raw execute_values": raw_values},
            ops=N_BATCH, rounds=5,
        )
        store_ratio = ratio(store, "ours store_many (COPY)", "raw execute_values")
        values_ratio = ratio(store, "ours store_many (execute_values)", "raw execute_values")

        # ---- single fetch vs a raw point SELECT (psycopg2 decodes the jsonb)
        keys = list(batch)[:N_FETCH]

        def ours_fetch() -> None:
            for key in keys:
                repo.fetch(key)

        def raw_fetch() -> None:
            for key in keys:
                cur.execute(f"SELECT data FROM {table} WHERE key = %s", (key,))
                cur.fetchone()

        fetch = measure({"ours fetch": ours_fetch, "raw point SELECT": raw_fetch},
                        ops=N_FETCH, rounds=25)
        fetch_ratio = ratio(fetch, "ours fetch", "raw point SELECT")

        # ---- the catalog's conditional write (every set) vs the same upsert raw
        single = list(batch.items())[:N_FETCH]
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

        cas = measure({"ours store_if_newer": ours_cas, "raw conditional upsert": raw_cas},
                      ops=N_FETCH, rounds=15)
        fetch.update(cas)

        # ---- fetch_many of 10k: the cost of re-encoding JSONB to canonical text
        all_keys = list(batch)

        def ours_fetch_many() -> None:
            repo.fetch_many(all_keys)

        def raw_fetch_many() -> None:
            cur.execute(f"SELECT key, data FROM {table} WHERE key = ANY(%s)", (all_keys,))
            cur.fetchall()

        many = measure({"ours fetch_many": ours_fetch_many, "raw ANY select": raw_fetch_many},
                       ops=N_BATCH, rounds=5)
        texts = [p for p, _ in batch.values()]
        start = time.perf_counter()
        for text in texts:
            _canonical(codec.decode(text))
        reencode_us = (time.perf_counter() - start) / len(texts) * 1e6

        # ---- keys over 100k rows: streaming and memory
        repo.store_many(items(N_KEYS - N_BATCH, prefix="z"))

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

        listing = measure({"ours iter_keys (100k)": ours_keys,
                           "raw server-side cursor (100k)": raw_keys},
                          ops=N_KEYS, rounds=3)
        peaks = {}
        for label, pattern, expect in (("10k", "k*", N_BATCH), ("100k", "*", N_KEYS)):
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

        for name, res in {**store, **fetch, **many, **listing}.items():
            rows.append({"case": name, "median_ms": res["median_s"] * 1000,
                         "per_op_us": res["per_op_us"], "ops_per_s": res["ops_per_s"]})
        print_table("PostgreSQL: tiered-state vs raw psycopg2", rows)
        summary = [
            {"check": "store_many 10k throughput vs raw execute_values",
             "value": 1 / store_ratio, "target": ">= 0.8x",
             "ok": 1 / store_ratio >= 0.8},
            {"check": "store_many 10k via execute_values in the library (not kept)",
             "value": 1 / values_ratio, "target": "(for comparison)", "ok": "-"},
            {"check": "fetch time vs raw point SELECT",
             "value": fetch_ratio, "target": "<= 1.25x", "ok": fetch_ratio <= 1.25},
            {"check": "store_if_newer time vs raw conditional upsert",
             "value": ratio(cas, "ours store_if_newer", "raw conditional upsert"),
             "target": "(info)", "ok": "-"},
            {"check": "fetch_many 10k time vs raw ANY select",
             "value": ratio(many, "ours fetch_many", "raw ANY select"), "target": "-",
             "ok": "-"},
            {"check": "re-encode JSONB text to canonical, us/record",
             "value": reencode_us, "target": "-", "ok": "-"},
            {"check": "iter_keys tracemalloc peak KiB, 10k keys",
             "value": peaks["10k"] / 1024, "target": "~ same as 100k", "ok": "-"},
            {"check": "iter_keys tracemalloc peak KiB, 100k keys",
             "value": peaks["100k"] / 1024, "target": "bounded",
             "ok": peaks["100k"] < 2 * peaks["10k"] + 256 * 1024},
            {"check": "keys() (a list) tracemalloc peak KiB, 100k keys",
             "value": list_peak / 1024, "target": "(grows, for contrast)", "ok": "-"},
        ]
        print_table("Targets", summary)
        results = {"cases": {**store, **fetch, **many, **listing}, "summary": summary,
                   "tracemalloc_peak_bytes": {**peaks, "keys_list_100k": list_peak}}
        write_json("postgres", results)
    finally:
        repo.close()
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        raw.close()


if __name__ == "__main__":
    main()
