"""RedisStateRepository vs raw redis-py doing the same work, in the same run.

Run: ``python -m benchmarks.bench_redis`` (Redis from TIERED_STATE_TEST_REDIS_URL,
default ``redis://127.0.0.1:6379/0``; everything is written under a unique
prefix and deleted afterwards).

Each case runs twice: with redis-py's hiredis parser and with its pure-Python
RESP2 parser (``parser_class``), which gives the hiredis speed-up. Targets:
single store/fetch <= 1.25x raw SET/GET; store_many (10k) and fetch_many
(10k) >= 0.8x the throughput of a raw pipeline / MGET; keys over 100k keys in
bounded memory, in SCAN batches.

For the catalog design, one more row without a target: ``store_if_newer``
(one EVALSHA of the Lua script that compares versions and writes the value
and metadata keys together) next to a raw ``SET`` -- the write every
``set`` makes in a Redis HOT tier, twice (placeholder, then copy).

Metadata is parsed with ``orjson`` when it is installed, else ``json``, as
the library does (``orjson`` is optional and in no extra).
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
import uuid
from typing import Any

import redis
from redis.connection import _HiredisParser, _RESP2Parser
from redis.utils import HIREDIS_AVAILABLE

from tiered_state import codec
from tiered_state.record import make_metadata
from tiered_state.repositories.redis_repository import RedisStateRepository

from .harness import measure, print_table, ratio, write_json

try:  # optional, as in the library
    from orjson import loads as _loads
except ImportError:
    from json import loads as _loads

URL = os.environ.get("TIERED_STATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SINGLE_OPS = 2000
BATCH = 10_000
KEYS_TOTAL = 100_000
VALUE = {"qty": 1.5, "side": "buy", "price": 64123.5, "fills": [1, 2, 3], "venue": "x" * 40}


def _item(i: int) -> tuple[str, Any]:
    payload = codec.encode({**VALUE, "i": i})
    return payload, make_metadata(payload, i + 1, now=time.time())


def run_parser(name: str, parser: type) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    prefix = f"bench_{uuid.uuid4().hex[:8]}:"
    repo = RedisStateRepository(URL, prefix=prefix, parser_class=parser)
    raw = redis.Redis.from_url(URL, parser_class=parser)
    raw_prefix = prefix + "raw:"
    payload, metadata = _item(0)
    ttl_payload, ttl_meta = payload, {**metadata, "expires_at": time.time() + 3600}
    batch = {f"b{i:05d}": _item(i) for i in range(BATCH)}
    raw_batch = {f"{raw_prefix}b{i:05d}": p for i, (k, (p, _)) in enumerate(batch.items())}
    keys = list(batch)
    raw_keys = list(raw_batch)

    def store() -> None:
        for _ in range(SINGLE_OPS):
            repo.store("single", payload, metadata)

    def store_ttl() -> None:
        for _ in range(SINGLE_OPS):
            repo.store("single-ttl", ttl_payload, ttl_meta)  # type: ignore[arg-type]

    def raw_set() -> None:
        for _ in range(SINGLE_OPS):
            raw.set(raw_prefix + "single", payload)

    versions = iter(range(10, 10**9))

    def store_if_newer() -> None:
        for _ in range(SINGLE_OPS):
            repo.store_if_newer("single-cas", payload, {**metadata, "version": next(versions)})

    def raw_set_px() -> None:
        for _ in range(SINGLE_OPS):
            raw.set(raw_prefix + "single-ttl", payload, px=3_600_000)

    def fetch() -> None:
        for _ in range(SINGLE_OPS):
            repo.fetch_record("single")

    def raw_get() -> None:
        for _ in range(SINGLE_OPS):
            raw.get(raw_prefix + "single")

    def store_many() -> None:
        repo.store_many(batch)

    def raw_pipeline() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, value in raw_batch.items():
            pipe.set(key, value)
        pipe.execute()

    def fetch_many() -> None:
        got = repo.fetch_many(keys)
        assert len(got) == BATCH

    def raw_mget() -> None:
        got = raw.mget(raw_keys)
        assert len(got) == BATCH

    # The same work done by hand: both keys of every record, metadata parsed.
    both = [repo._value_prefix + k.encode() for k in keys] + [
        repo._meta_prefix + k.encode() for k in keys]

    def raw_mget_meta() -> None:
        got = raw.mget(both)
        metas = [_loads(m) for m in got[BATCH:]]
        assert len(metas) == BATCH

    store()
    raw_set()
    store_many()
    raw_pipeline()
    results: dict[str, dict[str, float]] = {}
    results.update(measure({"store": store, "raw SET": raw_set}, ops=SINGLE_OPS))
    results.update(measure({"store (ttl)": store_ttl, "raw SET PX": raw_set_px}, ops=SINGLE_OPS))
    results.update(measure({"fetch_record": fetch, "raw GET": raw_get}, ops=SINGLE_OPS))
    results.update(measure({"store_if_newer": store_if_newer, "raw SET (paired)": raw_set}, ops=SINGLE_OPS))
    results.update(measure({"store_many 10k": store_many, "raw pipeline SET 10k": raw_pipeline},
                           ops=BATCH))
    results.update(measure({"fetch_many 10k": fetch_many, "raw MGET 10k": raw_mget,
                            "raw MGET 2x10k + parse metadata": raw_mget_meta}, ops=BATCH))
    rows = []
    for ours, theirs, target in [
        ("store", "raw SET", "<= 1.25"),
        ("store (ttl)", "raw SET PX", "<= 1.25"),
        ("fetch_record", "raw GET", "<= 1.25"),
        ("store_if_newer", "raw SET (paired)", "(info: set() writes)"),
        ("store_many 10k", "raw pipeline SET 10k", "<= 1.25 (>= 0.8x throughput)"),
        ("fetch_many 10k", "raw MGET 10k", "<= 1.25 (>= 0.8x throughput)"),
        ("fetch_many 10k", "raw MGET 2x10k + parse metadata", "(same work by hand)"),
    ]:
        rows.append({
            "parser": name,
            "case": ours,
            "ours us/op": results[ours]["per_op_us"],
            "raw": theirs,
            "raw us/op": results[theirs]["per_op_us"],
            "time ratio": ratio(results, ours, theirs),
            "best ratio": results[ours]["best_s"] / results[theirs]["best_s"],
            "throughput x": 1 / ratio(results, ours, theirs),
            "target (time)": target,
        })
    repo.clear()
    leftovers = list(raw.scan_iter(match=prefix + "*", count=1000))
    if leftovers:
        raw.unlink(*leftovers)
    repo.close()
    raw.close()
    return rows, results


def run_keys() -> dict[str, Any]:
    """keys over 100k records: time, SCAN calls and peak Python memory."""
    prefix = f"bench_keys_{uuid.uuid4().hex[:8]}:"
    repo = RedisStateRepository(URL, prefix=prefix)
    raw = redis.Redis.from_url(URL)
    payload, metadata = _item(0)
    for first in range(0, KEYS_TOTAL, BATCH):
        repo.store_many({f"k{i:06d}": (payload, metadata) for i in range(first, first + BATCH)})
    out: dict[str, Any] = {}

    def scans() -> int:
        return int(raw.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    def ours() -> None:
        assert sum(1 for _ in repo.iter_keys("k*")) == KEYS_TOTAL

    def theirs() -> None:
        assert sum(1 for _ in raw.scan_iter(match=prefix + "k*", count=1000)) == KEYS_TOTAL

    timing = measure({"iter_keys": ours, "raw scan_iter": theirs}, ops=KEYS_TOTAL, rounds=3)
    out["iter_keys s"] = timing["iter_keys"]["median_s"]
    out["raw scan_iter s"] = timing["raw scan_iter"]["median_s"]
    out["iter_keys / raw scan_iter"] = ratio(timing, "iter_keys", "raw scan_iter")

    gc.collect()
    before = scans()
    tracemalloc.start()
    ours()
    out["iter_keys peak KiB"] = tracemalloc.get_traced_memory()[1] / 1024
    tracemalloc.stop()
    out["iter_keys SCAN calls"] = scans() - before
    tracemalloc.start()
    theirs()
    out["raw scan_iter peak KiB"] = tracemalloc.get_traced_memory()[1] / 1024
    tracemalloc.stop()

    tracemalloc.start()
    start = time.perf_counter()
    listed = repo.keys("*")
    out["keys() s"] = time.perf_counter() - start
    out["keys() peak KiB (the 100k-key list itself)"] = tracemalloc.get_traced_memory()[1] / 1024
    tracemalloc.stop()
    assert len(listed) == KEYS_TOTAL
    del listed

    start = time.perf_counter()
    out["clear() deleted"] = repo.clear()
    out["clear() s"] = time.perf_counter() - start
    repo.close()
    raw.close()
    return out


def main() -> None:
    parsers: list[tuple[str, type]] = [("resp2 (pure python)", _RESP2Parser)]
    if HIREDIS_AVAILABLE:
        parsers.insert(0, ("hiredis", _HiredisParser))
    rows: list[dict[str, Any]] = []
    raw_results: dict[str, Any] = {}
    for name, parser in parsers:
        got, results = run_parser(name, parser)
        rows += got
        raw_results[name] = results
    print_table(f"RedisStateRepository vs raw redis-py ({redis.__version__}) at {URL}", rows)
    speedup = []
    if len(parsers) == 2:
        for case in raw_results["hiredis"]:
            speedup.append({
                "case": case,
                "resp2 us/op": raw_results["resp2 (pure python)"][case]["per_op_us"],
                "hiredis us/op": raw_results["hiredis"][case]["per_op_us"],
                "hiredis speed-up": raw_results["resp2 (pure python)"][case]["median_s"]
                / raw_results["hiredis"][case]["median_s"],
            })
        print_table("hiredis speed-up (pure-Python parser time / hiredis time)", speedup)
    keys = run_keys()
    print_table(f"keys over {KEYS_TOTAL:,} records (SCAN COUNT 1000)",
                [{"measure": k, "value": v} for k, v in keys.items()])
    write_json("redis", {"url": URL, "rows": rows, "hiredis": speedup, "keys": keys,
                         "raw": raw_results})


if __name__ == "__main__":
    main()
