"""S3StateRepository vs raw boto3 doing the same work, in the same run.

Server: TIERED_STATE_TEST_S3_URL if set (e.g. SeaweedFS from .ci/run), else a
moto server started here on a free port. Run::

    python -m benchmarks.bench_s3

Targets: store_many / fetch_many of 500 objects >= 1.3x faster than a
sequential boto3 loop and >= 0.8x a raw boto3 thread pool of the same size;
keys over 5,000 objects page by page with bounded memory (tracemalloc).

In the catalog design S3 is the tier below the catalog (or the catalog
itself when it is the only durable tier): the sweep writes payloads with
``store_many`` in batches, reads of stubs fetch them, and the garbage
collector lists them -- exactly the calls compared here. The ``keys`` row
has no target: it shows the listing's cost next to a raw paginator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from benchmarks.harness import measure, print_table, write_json
from tests.conformance import make
from tests.support import free_port, wait_for_port
from tiered_state.repositories.s3_repository import S3StateRepository

N = 500
LIST_N = 5000
WORKERS = 16


@contextmanager
def server() -> Iterator[str]:
    url = os.environ.get("TIERED_STATE_TEST_S3_URL", "").strip()
    if url:
        yield url
        return
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield f"s3://tiered-state-bench?endpoint_url=http://127.0.0.1:{port}&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait()


def raw_meta(metadata: Any) -> dict[str, str]:
    return {
        "checksum": metadata["checksum"], "size-bytes": str(metadata["size_bytes"]),
        "version": str(metadata["version"]), "created-at": repr(metadata["created_at"]),
        "updated-at": repr(metadata["updated_at"]), "encoding": "json",
    }


def main() -> None:
    with server() as url:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        base, _, query = url.partition("?")
        repo = S3StateRepository.from_url(
            f"{base}/{prefix}?{query}&create_bucket=true", max_workers=WORKERS
        )
        repo.keys("none")  # the bucket check (and creation) stays outside the timing
        client, bucket = repo._client, repo.bucket  # same Config: pool of WORKERS, no CRC
        pool = ThreadPoolExecutor(WORKERS)
        items = {f"obj:{i:05d}": make({"i": i, "payload": "x" * 200}) for i in range(N)}
        raw_items = [
            (f"{prefix}/raw/{k}", p.encode(), raw_meta(m)) for k, (p, m) in items.items()
        ]

        def raw_put(item: tuple[str, bytes, dict[str, str]]) -> None:
            client.put_object(Bucket=bucket, Key=item[0], Body=item[1], Metadata=item[2],
                              StorageClass="STANDARD_IA", ContentType="application/json")

        def raw_get(item: tuple[str, bytes, dict[str, str]]) -> bytes:
            return client.get_object(Bucket=bucket, Key=item[0])["Body"].read()  # type: ignore[no-any-return]

        store = measure({
            "tiered-state store_many": lambda: repo.store_many(items),
            "boto3 sequential put": lambda: [raw_put(i) for i in raw_items],
            "boto3 thread pool put": lambda: list(pool.map(raw_put, raw_items)),
        }, ops=N, rounds=5)
        keys = list(items)
        fetch = measure({
            "tiered-state fetch_many": lambda: repo.fetch_many(keys),
            "boto3 sequential get": lambda: [raw_get(i) for i in raw_items],
            "boto3 thread pool get": lambda: list(pool.map(raw_get, raw_items)),
        }, ops=N, rounds=5)

        # keys over LIST_N objects
        more = {f"obj:{i:05d}": make(i) for i in range(N, LIST_N)}
        repo.store_many(more)

        def raw_list() -> int:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}/obj"
            )
            return sum(len(p.get("Contents", ())) for p in pages)

        listing = measure({
            "tiered-state keys": lambda: repo.keys("obj:*"),
            "boto3 paginator": raw_list,
        }, ops=LIST_N, rounds=3)
        assert len(repo.keys("obj:*")) == LIST_N and raw_list() == LIST_N

        def peak(pattern: str) -> tuple[int, int]:
            """(keys seen, tracemalloc peak bytes) streaming iter_keys(pattern)."""
            tracemalloc.start()
            count = sum(1 for _ in repo.iter_keys(pattern))
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return count, top

        # Bounded memory: the peak is one listing page, whatever the total.
        small_count, small_peak = peak("obj:00*")  # 1,000 objects, one page
        count, stream_peak = peak("obj:*")  # 5,000 objects, five pages
        assert (small_count, count) == (1000, LIST_N)

        rows = []
        for title, results, ours, seq, par in (
            ("store_many", store, "tiered-state store_many", "boto3 sequential put",
             "boto3 thread pool put"),
            ("fetch_many", fetch, "tiered-state fetch_many", "boto3 sequential get",
             "boto3 thread pool get"),
        ):
            speedup_seq = results[seq]["median_s"] / results[ours]["median_s"]
            vs_pool = results[par]["median_s"] / results[ours]["median_s"]
            rows.append({
                "operation": f"{title} x{N}",
                "ours_s": results[ours]["median_s"],
                "seq_s": results[seq]["median_s"],
                "pool_s": results[par]["median_s"],
                "x_vs_seq (>=1.3)": speedup_seq,
                "x_vs_pool (>=0.8)": vs_pool,
            })
        rows.append({
            "operation": f"keys x{LIST_N}",
            "ours_s": listing["tiered-state keys"]["median_s"],
            "seq_s": listing["boto3 paginator"]["median_s"],
            "pool_s": float("nan"),
            "x_vs_seq (>=1.3)": listing["boto3 paginator"]["median_s"]
            / listing["tiered-state keys"]["median_s"],
            "x_vs_pool (>=0.8)": float("nan"),
        })
        print_table(f"S3 ({url.split('endpoint_url=')[-1].split('&')[0] or 'AWS'}), "
                    f"{WORKERS} threads; x = raw time / ours (higher is better)", rows)
        print(f"\niter_keys tracemalloc peak: {stream_peak / 1024:.0f} KiB over {LIST_N} objects, "
              f"{small_peak / 1024:.0f} KiB over 1,000 (one page)")
        write_json("s3", {
            "rows": rows, "store_many": store, "fetch_many": fetch, "keys": listing,
            "iter_keys_peak_bytes": stream_peak, "iter_keys_one_page_peak_bytes": small_peak,
            "server": url.split("?")[1] if "?" in url else url,
        })
        start = time.perf_counter()
        repo.clear()
        client_objects = [f"{prefix}/raw/{k}" for k in items]
        for i in range(0, len(client_objects), 1000):
            client.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": k} for k in client_objects[i:i + 1000]], "Quiet": True})
        print(f"cleanup {time.perf_counter() - start:.1f}s")
        pool.shutdown()
        repo.close()


if __name__ == "__main__":
    main()
