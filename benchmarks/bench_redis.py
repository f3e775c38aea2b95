"""RedisStateRepository vs raw redis-py doing the same work, in the same run.

Run: ``python -m benchmarks.bench_redis`` (Redis from TIERED_STATE_TEST_REDIS_URL,
default ``redis://127.0.0.1:6379/0``; everything is written under a unique
prefix and deleted afterwards). Both sides go through public APIs only:
redis-py's commands on one side, RedisStateRepository's methods on the other.

Each case runs twice: with redis-py's hiredis parser and with its pure-Python
RESP2 parser (``parser_class``), which gives the hiredis speed-up.

Targets, as throughput ratios, ours / raw (>= 0.8 passes):

* ``fetch_many`` of 10k records against one raw ``MGET`` of 10k keys holding
  the same JSON payloads followed by ``json.loads`` of each value (the
  standard library's, as the target says). The same case against
  ``orjson.loads`` is printed too, as a stricter reference without a target
  (``fetch_many`` returns entries whose payload is still text: decoding the
  value is the codec's job, later).
* ``store_many`` of 10k records against a raw pipeline of 10k ``SET``\\ s of
  the same payload bytes.

Redis Cluster: the batch cases on a 3 + 3 cluster started for the run (from
``tests/servers.py``), against the same cases on the single Redis, both
through RedisStateRepository; target >= 0.5 of the single node's throughput.

Rows without a target: the fenced ``fetch_many_in_epoch`` (a HOT read through
the manager) next to the same raw MGET + ``json.loads``; the fenced fill
``store_many_if_newer_in_epoch`` (one Lua call per record) and ``store_many``
of records with a TTL next to a raw pipeline of ``SET ... PX``; and the
single operations (``store``, ``fetch_record``, ``store_if_newer``) next to a
raw ``SET`` / ``GET``: targets <= 1.25x time for the plain ones.
"""

from __future__ import annotations

import gc
import json
import os
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.connection import _HiredisParser, _RESP2Parser
from redis.utils import HIREDIS_AVAILABLE

from tiered_state import codec
from tiered_state.record import make_metadata
from tiered_state.repositories.redis_repository import RedisStateRepository

from .harness import measure, print_table, ratio, write_json

_orjson_loads: Callable[[bytes], Any] | None
try:  # optional: the library decodes with it when it is installed
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover
    _orjson_loads = None

URL = os.environ.get("TIERED_STATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SINGLE_OPS = 2000
BATCH = 10_000
KEYS_TOTAL = 100_000
VALUE = {"qty": 1.5, "side": "buy", "price": 64123.5, "fills": [1, 2, 3], "venue": "x" * 40}
EPOCH = "bench-epoch"
#: Throughput ratio (ours / raw) the targeted batch cases must reach.
TARGET = 0.8


def _item(i: int, ttl: float | None = None) -> tuple[str, Any]:
    payload = codec.encode({**VALUE, "i": i})
    return payload, make_metadata(payload, i + 1, now=time.time(), ttl=ttl)


def run_parser(name: str, parser: type) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    prefix = f"bench_{uuid.uuid4().hex[:8]}:"
    repo = RedisStateRepository(URL, prefix=prefix, parser_class=parser)
    raw = redis.Redis.from_url(URL, parser_class=parser)
    raw_prefix = f"bench_raw_{uuid.uuid4().hex[:8]}:"
    repo.reset_epoch(EPOCH)  # as a HOT guard does on its first run: fenced reads work
    payload, metadata = _item(0)
    ttl_payload, ttl_meta = payload, {**metadata, "expires_at": time.time() + 3600}
    batch = {f"b{i:05d}": _item(i) for i in range(BATCH)}
    timed = {f"t{i:05d}": _item(i, ttl=3600) for i in range(BATCH)}
    keys = list(batch)
    # The raw side: the same key names and the same payload bytes.
    raw_batch = {raw_prefix + k: p.encode() for k, (p, _) in batch.items()}
    raw_keys = list(raw_batch)
    raw_timed = {raw_prefix + k: p.encode() for k, (p, _) in timed.items()}
    versions = iter(range(10, 10**12))

    def store() -> None:
        for _ in range(SINGLE_OPS):
            repo.store("single", payload, metadata)

    def store_ttl() -> None:
        for _ in range(SINGLE_OPS):
            repo.store("single-ttl", ttl_payload, ttl_meta)  # type: ignore[arg-type]

    def raw_set() -> None:
        for _ in range(SINGLE_OPS):
            raw.set(raw_prefix + "single", payload)

    def raw_set_px() -> None:
        for _ in range(SINGLE_OPS):
            raw.set(raw_prefix + "single-ttl", payload, px=3_600_000)

    def store_if_newer() -> None:
        for _ in range(SINGLE_OPS):
            repo.store_if_newer("single-cas", payload, {**metadata, "version": next(versions)})

    def fetch() -> None:
        for _ in range(SINGLE_OPS):
            repo.fetch_record("single")

    def raw_get() -> None:
        for _ in range(SINGLE_OPS):
            raw.get(raw_prefix + "single")

    def store_many() -> None:
        repo.store_many(batch)

    def store_many_ttl() -> None:
        repo.store_many(timed)

    def raw_pipeline() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, value in raw_batch.items():
            pipe.set(key, value)
        pipe.execute()

    def raw_pipeline_px() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, value in raw_timed.items():
            pipe.set(key, value, px=3_600_000)
        pipe.execute()

    def fill() -> None:
        version = next(versions) << 20  # newer than every copy: each one is written
        items = {k: (p, {**md, "version": version + i})
                 for i, (k, (p, md)) in enumerate(batch.items())}
        assert repo.store_many_if_newer_in_epoch(items, EPOCH) == set(items)

    def fetch_many() -> None:
        assert len(repo.fetch_many(keys)) == BATCH

    def fetch_many_in_epoch() -> None:
        got = repo.fetch_many_in_epoch(keys, EPOCH)
        assert got is not None and len(got) == BATCH

    def raw_mget_json() -> None:
        values = [json.loads(v) for v in raw.mget(raw_keys)]
        assert len(values) == BATCH

    def raw_mget_orjson() -> None:
        assert _orjson_loads is not None
        values = [_orjson_loads(v) for v in raw.mget(raw_keys)]
        assert len(values) == BATCH

    def raw_mget() -> None:
        assert len(raw.mget(raw_keys)) == BATCH

    # Warm up both sides (and load the scripts).
    store()
    raw_set()
    store_many()
    store_many_ttl()
    raw_pipeline()
    raw_pipeline_px()
    fill()
    results: dict[str, dict[str, float]] = {}
    results.update(measure({"store": store, "raw SET": raw_set}, ops=SINGLE_OPS))
    results.update(measure({"store (ttl)": store_ttl, "raw SET PX": raw_set_px}, ops=SINGLE_OPS))
    results.update(measure({"fetch_record": fetch, "raw GET": raw_get}, ops=SINGLE_OPS))
    results.update(measure({"store_if_newer": store_if_newer, "raw SET (paired)": raw_set},
                           ops=SINGLE_OPS))
    results.update(measure({"store_many 10k": store_many, "raw pipeline SET 10k": raw_pipeline,
                            "store_many 10k (ttl)": store_many_ttl,
                            "raw pipeline SET PX 10k": raw_pipeline_px,
                            "store_many_if_newer_in_epoch 10k": fill}, ops=BATCH))
    reads: dict[str, Callable[[], None]] = {
        "fetch_many 10k": fetch_many, "fetch_many_in_epoch 10k": fetch_many_in_epoch,
        "raw MGET 10k + json.loads": raw_mget_json, "raw MGET 10k": raw_mget}
    if _orjson_loads is not None:
        reads["raw MGET 10k + orjson.loads"] = raw_mget_orjson
    results.update(measure(reads, ops=BATCH, rounds=9))
    cases = [
        ("fetch_many 10k", "raw MGET 10k + json.loads", f">= {TARGET}"),
        ("store_many 10k", "raw pipeline SET 10k", f">= {TARGET}"),
        ("fetch_many_in_epoch 10k", "raw MGET 10k + json.loads", "(info: the HOT read path)"),
        ("store_many 10k (ttl)", "raw pipeline SET PX 10k", "(info)"),
        ("store_many_if_newer_in_epoch 10k", "raw pipeline SET PX 10k",
         "(info: the HOT fill path)"),
        ("fetch_many 10k", "raw MGET 10k", "(info: MGET alone)"),
        ("store", "raw SET", "<= 1.25 time"),
        ("store (ttl)", "raw SET PX", "<= 1.25 time"),
        ("fetch_record", "raw GET", "<= 1.25 time"),
        ("store_if_newer", "raw SET (paired)", "(info: set() writes)"),
    ]
    if _orjson_loads is not None:
        cases.insert(2, ("fetch_many 10k", "raw MGET 10k + orjson.loads", "(info: stricter)"))
    rows = []
    for ours, theirs, target in cases:
        throughput = 1 / ratio(results, ours, theirs)
        rows.append({
            "parser": name,
            "case": ours,
            "ours us/op": results[ours]["per_op_us"],
            "raw": theirs,
            "raw us/op": results[theirs]["per_op_us"],
            "throughput x": throughput,
            "best x": results[theirs]["best_s"] / results[ours]["best_s"],
            "target": target,
            "met": _met(target, throughput),
        })
    repo.clear()
    leftovers = list(raw.scan_iter(match=raw_prefix + "*", count=1000))
    for start in range(0, len(leftovers), 1000):
        raw.unlink(*leftovers[start:start + 1000])
    repo.close()
    raw.close()
    return rows, results


def run_cluster() -> list[dict[str, Any]]:
    """Batches on a Redis Cluster (3 primaries + 3 replicas on this machine,
    started for the run) against the same batches on the single Redis, both
    through RedisStateRepository, alternating in the same rounds. Target:
    the cluster at >= 0.5 the single node's throughput."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.servers import PrivateRedisCluster

    batch = {f"c{i:05d}": _item(i) for i in range(BATCH)}
    keys = list(batch)
    versions = iter(range(10, 10**12))
    with PrivateRedisCluster() as cluster:
        repos = {"single": RedisStateRepository(URL, prefix=f"bench_{uuid.uuid4().hex[:8]}:"),
                 "cluster": RedisStateRepository.from_url(
                     f"{cluster.url}?prefix=bench_{uuid.uuid4().hex[:8]}:")}
        cases: dict[str, Callable[[], None]] = {}
        for where, repo in repos.items():
            repo.reset_epoch(EPOCH)

            def store_many(repo: RedisStateRepository = repo) -> None:
                repo.store_many(batch)

            def fetch_many(repo: RedisStateRepository = repo) -> None:
                assert len(repo.fetch_many(keys)) == BATCH

            def fetch_many_in_epoch(repo: RedisStateRepository = repo) -> None:
                got = repo.fetch_many_in_epoch(keys, EPOCH)
                assert got is not None and len(got) == BATCH

            def fill(repo: RedisStateRepository = repo) -> None:
                version = next(versions) << 20
                items = {k: (p, {**md, "version": version + i})
                         for i, (k, (p, md)) in enumerate(batch.items())}
                assert repo.store_many_if_newer_in_epoch(items, EPOCH) == set(items)

            for name, fn in (("store_many", store_many), ("fetch_many", fetch_many),
                             ("fetch_many_in_epoch", fetch_many_in_epoch),
                             ("store_many_if_newer_in_epoch", fill)):
                fn()  # warm up (and load the scripts)
                cases[f"{name} 10k ({where})"] = fn
        results = measure(cases, ops=BATCH, rounds=5)
        for repo in repos.values():
            repo.clear()
            repo.close()
    rows = []
    for name in ("store_many", "fetch_many", "fetch_many_in_epoch",
                 "store_many_if_newer_in_epoch"):
        ours, theirs = f"{name} 10k (cluster)", f"{name} 10k (single)"
        throughput = 1 / ratio(results, ours, theirs)
        rows.append({"case": f"{name} 10k", "cluster us/op": results[ours]["per_op_us"],
                     "single us/op": results[theirs]["per_op_us"],
                     "cluster / single throughput": throughput, "target": ">= 0.5",
                     "met": _met(">= 0.5", throughput)})
    return rows


def _met(target: str, throughput: float) -> str:
    if target.startswith(">="):
        return "yes" if throughput >= float(target.split()[1]) else "NO"
    if target.startswith("<="):
        return "yes" if 1 / throughput <= float(target.split()[1]) else "NO"
    return ""


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

    memory = raw.memory_usage(f"{prefix}k000000")
    out["bytes in Redis per record (MEMORY USAGE)"] = memory
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
    print_table(f"RedisStateRepository vs raw redis-py ({redis.__version__}) at {URL} "
                "(throughput x = raw time / our time; higher is better)", rows)
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
    cluster = run_cluster()
    print_table("Redis Cluster (3 primaries + 3 replicas, this machine) vs the single Redis, "
                "both through RedisStateRepository (throughput ratio; higher is better)",
                cluster)
    write_json("redis", {"url": URL, "rows": rows, "hiredis": speedup, "keys": keys,
                         "cluster": cluster, "raw": raw_results, "target": TARGET})


if __name__ == "__main__":
    main()
