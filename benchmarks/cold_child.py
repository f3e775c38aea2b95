"""One side of ``bench_cold``: fill WARM, sweep it all to COLD, read some back.

A script, not a module of the ``benchmarks`` package: ``bench_cold`` runs it
with ``PYTHONPATH`` set to the tree whose ``tiered_state`` it measures (this
one, or a worktree of the baseline commit), and a script's own folder holds
no ``tiered_state`` that could stand in for it. Prints one JSON line.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VALUE_PAD = "BTC-USD long 0.25 @ 61234.5, stop 59000, take-profit 65000; " * 7  # ~450 bytes


def _values(count: int) -> dict[str, Any]:
    return {f"position:{i:07d}": {"i": i, "note": VALUE_PAD} for i in range(count)}


def _allocated(folder: Path) -> tuple[int, int]:
    """(bytes allocated on disk, files) under ``folder``."""
    total = files = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            total += path.stat().st_blocks * 512
            files += 1
    return total, files


def _s3_usage(url: str) -> tuple[int, int]:
    """(objects, bytes) under the S3 URL's prefix."""
    from tiered_state.config import open_repository

    with open_repository(url) as repo:
        client, bucket, prefix = repo._client, repo.bucket, repo._base  # type: ignore[attr-defined]
        objects = size = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                objects += 1
                size += int(obj["Size"])
        return objects, size


def _drop_s3(url: str) -> None:
    from tiered_state.config import open_repository

    with open_repository(url) as repo:
        client, bucket, prefix = repo._client, repo.bucket, repo._base  # type: ignore[attr-defined]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def child(target: str, count: int, gets: int, s3_url: str | None) -> dict[str, Any]:
    """One side's run: fill WARM, sweep it all to COLD, read some back from COLD."""
    import tiered_state
    from tiered_state import codec

    folder = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    cold = s3_url if target == "s3" else None
    try:
        policy = tiered_state.TieringPolicy(cold_after=0, promote_to=None)
        with tiered_state.open(folder, cold=cold, policy=policy) as state:
            values = _values(count)
            items = list(values.items())
            for start in range(0, count, 5000):
                state.set_many(dict(items[start:start + 5000]), tier="warm")
            payload_bytes = sum(len(codec.encode(v)) for v in values.values())
            started = time.perf_counter()
            report = state.sweep()
            seconds = time.perf_counter() - started
            assert report.moved == count and report.failed == 0, report
            keys = random.Random(7).sample(list(values), gets)
            samples = []
            for _ in range(3):
                t = time.perf_counter()
                for key in keys:
                    state.get(key, promote=False)
                samples.append((time.perf_counter() - t) / gets)
            assert state.get(keys[0], promote=False) == values[keys[0]]
            out: dict[str, Any] = {
                "records": count, "payload_bytes": payload_bytes, "sweep_s": seconds,
                "get_s": statistics.median(samples),
                "warm_file_bytes": (folder / "warm.db").stat().st_size,
            }
        if target == "s3":
            out["objects"], out["stored_bytes"] = _s3_usage(s3_url or "")
        else:
            out["allocated_bytes"], out["objects"] = _allocated(folder / "cold")
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if s3_url:
            _drop_s3(s3_url)


if __name__ == "__main__":
    import tiered_state

    target, count, gets, s3_url = sys.argv[1:]
    result = child(target, int(count), int(gets), s3_url or None)
    result["module"] = tiered_state.__file__
    print(json.dumps(result))
