"""Redis: tiered-state against raw redis-py doing the same work, in the same run.

Run: ``python -m benchmarks.bench_redis`` (about two minutes; Redis from
``TIERED_STATE_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``;
everything is written under a unique prefix and deleted afterwards; the
Redis Cluster rows start a 3 + 3 cluster from the ``redis-server`` binary).

**API** -- a Redis-only store, ``tiered_state.open(hot="redis://...?prefix=...",
warm="none", cold="none")``, called with Python values, against redis-py's
client (its defaults: hiredis when installed, as the library's client) with
``json.dumps`` / ``json.loads`` inside the timed loop: ``set`` vs ``SET``,
``get`` vs ``GET``, ``set_many`` of 10k vs a pipeline of 10k ``SET``
(``transaction=False``), ``get_many`` of 10k vs ``MGET``. Both sides write to
the same server, so they get the same durability (the server's own). No
target: these rows say what a user's call costs next to redis-py.

**repository** -- ``RedisStateRepository`` opened with ``open_repository``
against redis-py, both given the same payload bytes encoded before the
timing (the repository also gets their metadata). Each case runs twice:
with redis-py's hiredis parser and with its pure-Python RESP2 parser
(``parser_class``), which gives the hiredis speed-up. Targets, as time
ratios (ours / raw):

* ``fetch_many`` of 10k records vs one raw ``MGET`` of 10k keys holding the
  same JSON payloads followed by ``json.loads`` of each value: <= 1.25 (at
  least 0.8x the throughput). The same case against ``orjson.loads`` is
  printed too, as a stricter reference without a target (``fetch_many``
  returns entries whose payload is still text: decoding is the codec's job).
* ``store_many`` of 10k records vs a raw pipeline of 10k ``SET``: <= 1.25.
* single ``store`` / ``store`` with a TTL / ``fetch_record`` vs ``SET`` /
  ``SET PX`` / ``GET``: <= 1.25.

Rows without a target: the fenced ``fetch_many_in_epoch`` (how the manager
reads HOT) next to ``MGET`` + ``json.loads``; the fenced fill
``store_many_if_newer_in_epoch`` (one Lua call per record) and
``store_many`` of records with a TTL next to a pipeline of ``SET ... PX``;
``store_if_newer`` next to ``SET``; ``iter_keys`` over 100k keys next to
``scan_iter`` (time, and tracemalloc peak: it streams).

Redis Cluster: the batch cases on a 3 + 3 cluster on this machine, started
for the run, against the same cases on the single Redis, both through the
repository; target >= 0.5x the single node's throughput (time ratio <= 2).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.connection import _HiredisParser, _RESP2Parser
from redis.utils import HIREDIS_AVAILABLE

import tiered_state
from tiered_state import codec
from tiered_state.config import open_repository, redact
from tiered_state.record import Metadata, make_metadata

from .harness import (
    compare,
    drop_redis_prefix,
    fact,
    measure,
    peer_rows,
    print_rows,
    print_table,
    ratio,
    scaled,
    throughput_at_least,
    unique,
    with_option,
    write_json,
)
from .peers import Values, dumps, loads, writer

_orjson_loads: Callable[[bytes], Any] | None
try:  # optional: the library decodes with it when it is installed
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover
    _orjson_loads = None

URL = os.environ.get("TIERED_STATE_TEST_REDIS_URL", "").strip() or "redis://127.0.0.1:6379/0"
SINGLE = scaled(1000, 200)  # operations per timed call of the single-operation cases
BATCH = scaled(10_000, 2000)
KEYS_TOTAL = scaled(100_000, 20_000)
ROUNDS = scaled(7, 3)
VALUE = {"qty": 1.5, "side": "buy", "price": 64123.5, "fills": [1, 2, 3], "venue": "x" * 40}
EPOCH = "bench-epoch"
#: Repository targets: our time at most this multiple of raw redis-py's.
REPO_TARGET = throughput_at_least(0.8)

Rows = list[dict[str, Any]]
Results = dict[str, dict[str, float]]


def open_redis(prefix: str, **options: Any) -> Any:
    """A RedisStateRepository under ``prefix``, as ``open_repository`` opens one."""
    return open_repository(with_option(URL, f"prefix={prefix}"), **options)


def _item(i: int, ttl: float | None = None) -> tuple[str, Metadata]:
    payload = codec.encode({**VALUE, "i": i})
    return payload, make_metadata(payload, i + 1, now=time.time(), ttl=ttl)


# ---------------------------------------------------------------- API level
def run_api(folder: Path) -> tuple[Rows, Results]:
    prefix, raw_prefix = unique("bench_redis_api") + ":", unique("bench_redis_raw") + ":"
    state = tiered_state.open(folder, hot=with_option(URL, f"prefix={prefix}"), warm="none",
                              cold="none")
    raw = redis.Redis.from_url(URL)
    try:
        keys = [f"k{i:05d}" for i in range(BATCH)]
        raw_keys = [raw_prefix + k for k in keys]
        few, raw_few = keys[:SINGLE], raw_keys[:SINGLE]
        values, few_values = Values(BATCH), Values(SINGLE)
        state.set_many(dict(zip(keys, values.pools[0])))
        raw.mset({k: dumps(v) for k, v in zip(raw_keys, values.pools[0])})
        get, pipeline = state.get, raw.pipeline

        def raw_get() -> None:
            for k in raw_few:
                loads(raw.get(k))  # type: ignore[arg-type]

        def ours_set_many() -> None:
            state.set_many(dict(zip(keys, values.next("ours"))))

        def raw_set_many() -> None:
            pipe = pipeline(transaction=False)
            for k, v in zip(raw_keys, values.next("raw")):
                pipe.set(k, dumps(v))
            pipe.execute()

        def ours_get_many() -> None:
            assert len(state.get_many(keys)) == BATCH

        def raw_get_many() -> None:
            assert len([loads(v) for v in raw.mget(raw_keys)]) == BATCH  # type: ignore[union-attr]

        single = measure({"set": writer(state.set, few, few_values, "ours"),
                          "SET + json.dumps": writer(lambda k, v: raw.set(k, dumps(v)), raw_few,
                                                     few_values, "raw"),
                          "get": lambda: [get(k) for k in few], "GET + json.loads": raw_get},
                         ops=SINGLE, rounds=ROUNDS)
        batch = measure({"set_many": ours_set_many, "pipeline SET + json.dumps": raw_set_many,
                         "get_many": ours_get_many, "MGET + json.loads": raw_get_many},
                        ops=BATCH, rounds=ROUNDS)
        assert state.get(keys[5]) == loads(raw.get(raw_keys[5]))  # type: ignore[arg-type]
    finally:
        state.close()
        raw.close()
        drop_redis_prefix(URL, prefix)
        drop_redis_prefix(URL, raw_prefix)
    results = {**single, **batch}
    return peer_rows(results, "Redis-only store", [
        ("set", "SET + json.dumps", "redis-py ``SET`` of ``json.dumps``"),
        ("get", "GET + json.loads", "redis-py ``GET`` + ``json.loads``"),
        ("set_many", "pipeline SET + json.dumps",
         f"redis-py pipeline of {BATCH:,} ``SET`` of ``json.dumps``"),
        ("get_many", "MGET + json.loads", "redis-py ``MGET`` + ``json.loads``"),
    ], BATCH), results


# ---------------------------------------------------------------- repository level
def run_parser(name: str, parser: type, readme: bool) -> tuple[Rows, Results]:
    prefix, raw_prefix = unique("bench_redis") + ":", unique("bench_redis_raw") + ":"
    repo = open_redis(prefix, parser_class=parser)
    raw = redis.Redis.from_url(URL, parser_class=parser)
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
        for _ in range(SINGLE):
            repo.store("single", payload, metadata)

    def store_ttl() -> None:
        for _ in range(SINGLE):
            repo.store("single-ttl", ttl_payload, ttl_meta)

    def raw_set() -> None:
        for _ in range(SINGLE):
            raw.set(raw_prefix + "single", payload)

    def raw_set_px() -> None:
        for _ in range(SINGLE):
            raw.set(raw_prefix + "single-ttl", payload, px=3_600_000)

    def store_if_newer() -> None:
        for _ in range(SINGLE):
            repo.store_if_newer("single-cas", payload, {**metadata, "version": next(versions)})

    def fetch() -> None:
        for _ in range(SINGLE):
            repo.fetch_record("single")

    def raw_get() -> None:
        for _ in range(SINGLE):
            raw.get(raw_prefix + "single")

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
        assert len([loads(v) for v in raw.mget(raw_keys)]) == BATCH

    def raw_mget_orjson() -> None:
        assert _orjson_loads is not None
        assert len([_orjson_loads(v) for v in raw.mget(raw_keys)]) == BATCH

    # Warm up both sides (and load the scripts).
    for warm in (store, raw_set, raw_pipeline, raw_pipeline_px, fill):
        warm()
    repo.store_many(batch)
    repo.store_many(timed)
    results: Results = {}
    results.update(measure({"store": store, "raw SET": raw_set}, ops=SINGLE, rounds=ROUNDS))
    results.update(measure({"store (ttl)": store_ttl, "raw SET PX": raw_set_px}, ops=SINGLE,
                           rounds=ROUNDS))
    results.update(measure({"fetch_record": fetch, "raw GET": raw_get}, ops=SINGLE, rounds=ROUNDS))
    results.update(measure({"store_if_newer": store_if_newer, "raw SET (paired)": raw_set},
                           ops=SINGLE, rounds=ROUNDS))
    results.update(measure({"store_many": lambda: repo.store_many(batch),
                            "raw pipeline SET": raw_pipeline,
                            "store_many (ttl)": lambda: repo.store_many(timed),
                            "raw pipeline SET PX": raw_pipeline_px,
                            "store_many_if_newer_in_epoch": fill}, ops=BATCH, rounds=ROUNDS))
    reads: dict[str, Callable[[], None]] = {
        "fetch_many": fetch_many, "fetch_many_in_epoch": fetch_many_in_epoch,
        "raw MGET + json.loads": raw_mget_json}
    if _orjson_loads is not None:
        reads["raw MGET + orjson.loads"] = raw_mget_orjson
    results.update(measure(reads, ops=BATCH, rounds=scaled(9, 3)))
    repo.clear()
    repo.close()
    raw.close()
    drop_redis_prefix(URL, raw_prefix)

    n = f"{BATCH:,}"
    where = f", {name}"
    mget = "``MGET`` + ``json.loads``"

    def row(ours: str, theirs: str, what: str, vs: str, target: bool, shown: bool = True
            ) -> dict[str, Any]:
        return compare(results, ours, theirs, level="repository", measurement=what + where, vs=vs,
                       target=REPO_TARGET if target else None, readme=readme and shown)

    rows = [
        row("fetch_many", "raw MGET + json.loads", f"Redis ``fetch_many`` ({n})", mget, True),
        row("store_many", "raw pipeline SET", f"Redis ``store_many`` ({n})",
            f"pipeline of {n} ``SET``", True),
        row("store", "raw SET", "Redis ``store``", "``SET``", True),
        row("store (ttl)", "raw SET PX", "Redis ``store`` with a TTL", "``SET ... PX``", True),
        row("fetch_record", "raw GET", "Redis ``fetch_record``", "``GET``", True),
        row("fetch_many_in_epoch", "raw MGET + json.loads",
            f"Redis ``fetch_many_in_epoch`` ({n}), the manager's HOT read", mget, False),
        row("store_many (ttl)", "raw pipeline SET PX", f"Redis ``store_many`` ({n}) with a TTL",
            f"pipeline of {n} ``SET ... PX``", False, shown=False),
        row("store_many_if_newer_in_epoch", "raw pipeline SET PX",
            f"Redis ``store_many_if_newer_in_epoch`` ({n}), the manager's HOT fill",
            f"pipeline of {n} ``SET ... PX``", False),
        row("store_if_newer", "raw SET (paired)", "Redis ``store_if_newer``", "``SET``", False,
            shown=False),
    ]
    if _orjson_loads is not None:
        rows.insert(1, row("fetch_many", "raw MGET + orjson.loads", f"Redis ``fetch_many`` ({n})",
                           "``MGET`` + ``orjson.loads``", False, shown=False))
    return rows, results


def run_keys() -> tuple[Rows, dict[str, Any]]:
    """iter_keys over KEYS_TOTAL records: time, SCAN calls and peak Python memory."""
    prefix = unique("bench_redis_keys") + ":"
    repo = open_redis(prefix)
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
    out["timing"] = timing
    gc.collect()
    before = scans()
    tracemalloc.start()
    ours()
    ours_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out["iter_keys SCAN calls"] = scans() - before
    tracemalloc.start()
    theirs()
    raw_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out["peak_bytes"] = {"iter_keys": ours_peak, "raw scan_iter": raw_peak}
    out["bytes in Redis per record (MEMORY USAGE)"] = raw.memory_usage(f"{prefix}k000000")
    start = time.perf_counter()
    out["clear() deleted"] = repo.clear()
    out["clear() s"] = time.perf_counter() - start
    repo.close()
    raw.close()
    n = f"{KEYS_TOTAL:,}"
    rows = [
        compare(timing, "iter_keys", "raw scan_iter", level="repository",
                measurement=f"Redis ``iter_keys`` over {n} keys", vs="redis-py ``scan_iter``",
                readme=False),
        fact(f"Redis ``iter_keys`` peak memory (tracemalloc), {n} keys", "redis-py ``scan_iter``",
             ours=ours_peak / 1024, other=raw_peak / 1024, unit="KiB", level="repository"),
    ]
    return rows, out


def run_cluster() -> tuple[Rows, Results]:
    """Batches on a Redis Cluster (3 primaries + 3 replicas on this machine,
    started for the run) against the same batches on the single Redis, both
    through the repository, alternating in the same rounds."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from tests.servers import PrivateRedisCluster
    except ImportError as exc:
        print(f"Redis Cluster rows left out: {exc}")
        return [], {}

    batch = {f"c{i:05d}": _item(i) for i in range(BATCH)}
    keys = list(batch)
    versions = iter(range(10, 10**12))
    names = ("store_many", "fetch_many", "fetch_many_in_epoch", "store_many_if_newer_in_epoch")
    with PrivateRedisCluster() as cluster:
        repos = {"single": open_redis(unique("bench_redis_single") + ":"),
                 "cluster": open_repository(f"{cluster.url}?prefix={unique('bench_redis')}:")}
        cases: dict[str, Callable[[], None]] = {}
        for where, repo in repos.items():
            repo.reset_epoch(EPOCH)

            def store_many(repo: Any = repo) -> None:
                repo.store_many(batch)

            def fetch_many(repo: Any = repo) -> None:
                assert len(repo.fetch_many(keys)) == BATCH

            def fetch_many_in_epoch(repo: Any = repo) -> None:
                got = repo.fetch_many_in_epoch(keys, EPOCH)
                assert got is not None and len(got) == BATCH

            def fill(repo: Any = repo) -> None:
                version = next(versions) << 20
                items = {k: (p, {**md, "version": version + i})
                         for i, (k, (p, md)) in enumerate(batch.items())}
                assert repo.store_many_if_newer_in_epoch(items, EPOCH) == set(items)

            for name, fn in zip(names, (store_many, fetch_many, fetch_many_in_epoch, fill)):
                fn()  # warm up (and load the scripts)
                cases[f"{name} ({where})"] = fn
        results = measure(cases, ops=BATCH, rounds=scaled(5, 3))
        for repo in repos.values():
            repo.clear()
            repo.close()
    rows = [compare(results, f"{name} (cluster)", f"{name} (single)", level="repository",
                    measurement=f"Redis Cluster (3 + 3) ``{name}`` ({BATCH:,})",
                    vs="the same on one Redis", target=throughput_at_least(0.5))
            for name in names]
    return rows, results


def main() -> None:
    parsers: list[tuple[str, type]] = [("pure-Python parser", _RESP2Parser)]
    if HIREDIS_AVAILABLE:
        parsers.insert(0, ("hiredis", _HiredisParser))
    rows: Rows = []
    raw_results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-redis-", dir=os.environ.get("BENCH_DIR")) as tmp:
        got, raw_results["api"] = run_api(Path(tmp))
    rows += got
    for index, (name, parser) in enumerate(parsers):
        # The README shows the default parser's rows (hiredis when installed).
        got, raw_results[name] = run_parser(name, parser, readme=index == 0)
        rows += got
    speedup = []
    if len(parsers) == 2:
        slow, fast = raw_results["pure-Python parser"], raw_results["hiredis"]
        speedup = [{"case": case, "pure-Python us/op": slow[case]["per_op_us"],
                    "hiredis us/op": fast[case]["per_op_us"],
                    "hiredis speed-up": ratio({"a": slow[case], "b": fast[case]}, "a", "b")}
                   for case in fast]
    got, raw_results["keys"] = run_keys()
    rows += got
    got, raw_results["cluster"] = run_cluster()
    rows += got
    print_table("hiredis speed-up (pure-Python parser time / hiredis time)", speedup)
    print_rows(f"Redis at {redact(URL)}, redis-py {redis.__version__} (ratio = our median time / the "
               "other side's; lower is better)", rows)
    write_json("redis", rows, {"url": redact(URL), "hiredis_speedup": speedup, "results": raw_results},
               used_servers=("redis",))


if __name__ == "__main__":
    main()
