"""S3: tiered-state against raw boto3 doing the same work, in the same run.

Run: ``python -m benchmarks.bench_s3`` (about two minutes). Server:
``TIERED_STATE_TEST_S3_URL`` if set (``.ci/run`` starts SeaweedFS), else a
moto server started here on a free loopback port. Every object is written
under a prefix of this run's own and deleted at the end.

**API** -- an S3-only store, ``tiered_state.open(hot="none", warm="none",
cold="s3://bucket/prefix?...")`` (S3 then holds the catalog too, so a write
is a conditional put), called with Python values, against a boto3 client
configured as the backend configures its own (connection pool of 16, no
per-request CRC, path-style addressing) with ``json.dumps`` / ``json.loads``
inside the timed loop: ``set`` / ``get`` vs sequential ``put_object`` /
``get_object``, and ``set_many`` / ``get_many`` of 300 vs a thread pool of 16
doing the same puts and gets. No target.

**repository** -- ``S3StateRepository`` opened with ``open_repository``
(16 worker threads) against the same boto3 calls given the same payload
bytes and metadata headers, encoded before the timing on both sides.
Targets, as time ratios (ours / raw): ``store_many`` / ``fetch_many`` of 300
objects <= 0.77 of a sequential boto3 loop (1.3x its throughput) and <= 1.25
of a boto3 thread pool of the same size (0.8x its throughput); ``iter_keys``
over 3,000 objects pages with bounded memory: its tracemalloc peak over three
pages at most twice the peak over one (a page is fetched while the previous
one is still being consumed, never more). ``keys`` next to boto3's paginator
listing the same objects has no target.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config

import tiered_state
from tiered_state import codec
from tiered_state.config import open_repository
from tiered_state.record import Metadata, make_metadata

from .harness import (
    S3_URL,
    compare,
    fact,
    measure,
    peer_rows,
    print_rows,
    scaled,
    throughput_at_least,
    unique,
    write_json,
)
from .peers import Values, dumps, loads, value, writer

N = scaled(300, 100)  # objects per batch
SINGLE = scaled(50, 20)  # single operations per timed call
LIST_N = scaled(3000, 2000)
PAGE = 1000  # objects per listing page (S3's maximum)
WORKERS = 16
ROUNDS = scaled(5, 3)

Rows = list[dict[str, Any]]
Results = dict[str, dict[str, float]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def server() -> Iterator[str]:
    """The S3 URL to use: the test server's, or a moto server of our own."""
    if S3_URL:
        yield S3_URL
        return
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        yield f"s3://tiered-state-bench?endpoint_url=http://127.0.0.1:{port}&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait()


class Raw:
    """boto3 as a user would call it, configured as the backend configures its client."""

    def __init__(self, url: str, prefix: str) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = query.get("endpoint_url")
        self.bucket = parts.netloc
        self.prefix = prefix
        self.client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=query.get("region", "us-east-1"),
            config=Config(max_pool_connections=WORKERS,
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          s3={"addressing_style": "path"} if endpoint else {}))
        self.pool = ThreadPoolExecutor(WORKERS)

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=body,
                               Metadata=metadata or {}, StorageClass="STANDARD",
                               ContentType="application/json")

    def get(self, key: str) -> bytes:
        reply = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")
        return reply["Body"].read()  # type: ignore[no-any-return]

    def map(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        return list(self.pool.map(fn, *args))

    def count(self, prefix: str) -> int:
        """Objects under ``prefix``, listed with boto3's paginator."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return sum(len(p.get("Contents", ())) for p in pages)

    def close(self) -> None:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/"):
            keys += [o["Key"] for o in page.get("Contents", ())]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        self.pool.shutdown()
        self.client.close()


def s3_url(url: str, prefix: str) -> str:
    """``url`` pointing at ``prefix`` in its bucket, creating the bucket if needed."""
    base, _, query = url.partition("?")
    return f"{base.rstrip('/')}/{prefix}?{query}&create_bucket=true"


# ---------------------------------------------------------------- API level
def run_api(url: str, folder: Path) -> tuple[Rows, Results]:
    prefix = unique("bench-s3-api").replace("_", "-")
    state = tiered_state.open(folder, hot="none", warm="none", cold=s3_url(url, prefix))
    raw = Raw(url, prefix + "-raw")
    try:
        keys = [f"obj:{i:05d}" for i in range(N)]
        few = keys[:SINGLE]
        values, few_values = Values(N), Values(SINGLE)
        state.set_many(dict(zip(keys, values.pools[0])))
        raw.map(lambda k, v: raw.put(k, dumps(v).encode()), keys, values.pools[0])
        get = state.get

        def raw_set_many() -> None:
            raw.map(lambda k, v: raw.put(k, dumps(v).encode()), keys, values.next("raw"))

        def raw_get_many() -> None:
            assert len(raw.map(lambda k: loads(raw.get(k)), keys)) == N

        single = measure({"set": writer(state.set, few, few_values, "ours"),
                          "put_object + json.dumps": writer(lambda k, v: raw.put(k, dumps(v).encode()),
                                                            few, few_values, "raw"),
                          "get": lambda: [get(k) for k in few],
                          "get_object + json.loads": lambda: [loads(raw.get(k)) for k in few]},
                         ops=SINGLE, rounds=ROUNDS)
        batch = measure({"set_many": lambda: state.set_many(dict(zip(keys, values.next("ours")))),
                         "pool put + json.dumps": raw_set_many,
                         "get_many": lambda: state.get_many(keys),
                         "pool get + json.loads": raw_get_many}, ops=N, rounds=ROUNDS)
        assert state.get(keys[3]) == loads(raw.get(keys[3]))
    finally:
        state.repositories[state.catalog_tier].clear()  # our prefix only
        state.close()
        raw.close()
    results = {**single, **batch}
    return peer_rows(results, "S3-only store", [
        ("set", "put_object + json.dumps", "boto3 ``put_object`` of ``json.dumps``"),
        ("get", "get_object + json.loads", "boto3 ``get_object`` + ``json.loads``"),
        ("set_many", "pool put + json.dumps", f"boto3 puts of ``json.dumps`` on {WORKERS} threads"),
        ("get_many", "pool get + json.loads", f"boto3 gets + ``json.loads`` on {WORKERS} threads"),
    ], N), results


# ---------------------------------------------------------------- repository level
def headers(metadata: Metadata) -> dict[str, str]:
    """The metadata headers the raw side sends, as many as the backend's."""
    return {
        "checksum": metadata["checksum"], "size-bytes": str(metadata["size_bytes"]),
        "version": str(metadata["version"]), "created-at": repr(metadata["created_at"]),
        "updated-at": repr(metadata["updated_at"]), "encoding": "json",
        "metadata-checksum": metadata["checksum"],
    }


def encoded(i: int) -> tuple[str, Metadata]:
    payload = codec.encode({**value(i), "payload": "x" * 200})
    return payload, make_metadata(payload, i + 1, now=time.time())


def run_repository(url: str) -> tuple[Rows, dict[str, Any]]:
    prefix = unique("bench-s3").replace("_", "-")
    repo = open_repository(s3_url(url, prefix), max_workers=WORKERS)
    raw = Raw(url, prefix + "-raw")
    try:
        repo.keys("none")  # the bucket check (and creation) stays outside the timing
        items = {f"obj:{i:05d}": encoded(i) for i in range(N)}
        raw_items = [(k, p.encode(), headers(m)) for k, (p, m) in items.items()]

        def raw_put(item: tuple[str, bytes, dict[str, str]]) -> None:
            raw.put(*item)

        def raw_get(item: tuple[str, bytes, dict[str, str]]) -> bytes:
            return raw.get(item[0])

        store = measure({
            "store_many": lambda: repo.store_many(items),
            "boto3 sequential put": lambda: [raw_put(i) for i in raw_items],
            "boto3 thread pool put": lambda: raw.map(raw_put, raw_items),
        }, ops=N, rounds=ROUNDS)
        keys = list(items)
        fetch = measure({
            "fetch_many": lambda: repo.fetch_many(keys),
            "boto3 sequential get": lambda: [raw_get(i) for i in raw_items],
            "boto3 thread pool get": lambda: raw.map(raw_get, raw_items),
        }, ops=N, rounds=ROUNDS)

        repo.store_many({f"obj:{i:05d}": encoded(i) for i in range(N, LIST_N)})
        # The paginator lists the repository's own objects: the same listing.
        listing = measure({"keys": lambda: repo.keys("obj:*"),
                           "boto3 paginator": lambda: raw.count(prefix + "/")},
                          ops=LIST_N, rounds=2)
        assert len(repo.keys("obj:*")) == LIST_N == raw.count(prefix + "/")

        def peak(pattern: str) -> tuple[int, int]:
            """(keys seen, tracemalloc peak bytes) streaming iter_keys(pattern)."""
            tracemalloc.start()
            count = sum(1 for _ in repo.iter_keys(pattern))
            top = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return count, top

        # Bounded memory: the peak is one listing page, whatever the total.
        one_count, one_page = peak("obj:00*")  # 1,000 objects, one page
        count, all_pages = peak("obj:*")
        assert (one_count, count) == (PAGE, LIST_N), (one_count, count)
    finally:
        repo.clear()
        repo.close()
        raw.close()
    n = f"{N:,}"
    rows = []
    for name, results, seq, pool in (("store_many", store, "boto3 sequential put",
                                      "boto3 thread pool put"),
                                     ("fetch_many", fetch, "boto3 sequential get",
                                      "boto3 thread pool get")):
        call = "put" if name == "store_many" else "get"
        rows += [
            compare(results, name, seq, level="repository", measurement=f"S3 ``{name}`` ({n})",
                    vs=f"boto3 {call}s, one after another", target=throughput_at_least(1.3)),
            compare(results, name, pool, level="repository", measurement=f"S3 ``{name}`` ({n})",
                    vs=f"boto3 {call}s on {WORKERS} threads", target=throughput_at_least(0.8)),
        ]
    rows += [
        compare(listing, "keys", "boto3 paginator", level="repository",
                measurement=f"S3 ``keys`` over {LIST_N:,} objects", vs="boto3 paginator",
                readme=False),
        fact(f"S3 ``iter_keys`` peak memory (tracemalloc), {LIST_N:,} objects",
             f"the same, {PAGE:,} objects (one page)", ours=all_pages / 1024,
             other=one_page / 1024, unit="KiB", level="repository", target="<= 2 (bounded)",
             met=all_pages <= 2 * one_page),
    ]
    return rows, {"store_many": store, "fetch_many": fetch, "keys": listing,
                  "iter_keys_peak_bytes": {"all": all_pages, "one_page": one_page}}


def main() -> None:
    with server() as url, tempfile.TemporaryDirectory(
            prefix="bench-s3-", dir=os.environ.get("BENCH_DIR")) as tmp:
        api_rows, api = run_api(url, Path(tmp))
        repo_rows, repo = run_repository(url)
    rows = api_rows + repo_rows
    endpoint = parse_qs(urlsplit(url).query).get("endpoint_url", ["AWS"])[-1]
    print_rows(f"S3 at {endpoint}, boto3 {boto3.__version__} (ratio = our median time / the "
               "other side's; lower is better)", rows)
    write_json("s3", rows, {"server": "test server" if S3_URL else "moto, started by the run",
                            "results": {"api": api, "repository": repo}},
               used_servers=("s3",))


if __name__ == "__main__":
    main()
