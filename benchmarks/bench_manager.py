"""StateManager overhead against its own backends, in the same run.

Run: ``python -m benchmarks.bench_manager`` (about two minutes). Targets
(issue 3), each a ratio of medians over alternating rounds:

* a ``get`` served from HOT costs <= 1.5x the HOT backend's own ``fetch``
  (memory; and Redis when ``TIERED_STATE_TEST_REDIS_URL`` is set);
* a write-through ``set`` costs <= 1.2x the sum of the two backends' stores
  (memory + SQLite; Redis + PostgreSQL when both URLs are set). The raw case
  encodes the value and builds its metadata once, then stores it in both --
  what a hand-written write-through does;
* ``sweep`` moves records WARM -> COLD at >= 0.5x the COLD backend's own
  ``store_many`` throughput (same records, same batch size, files with fsync),
  with peak memory (tracemalloc) independent of the number of keys: 10,000 vs
  100,000 idle records (COLD without fsync there, to keep the run short; the
  memory the sweep holds does not depend on it).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import tiered_state
from tiered_state import TieringPolicy, codec
from tiered_state.record import make_metadata
from tiered_state.repositories.base import StateRepository, chunked
from tiered_state.repositories.filesystem_repository import FileSystemStateRepository

from .harness import measure, print_table, ratio, write_json

KEYS = 2000  # keys per timed call of get / set
SWEEP_KEYS = 3000  # records per timed sweep round (COLD fsyncs every file)
SWEEP_ROUNDS = 3
BATCH = 500
MEMORY_SIZES = (10_000, 100_000)
REDIS_URL = os.environ.get("TIERED_STATE_TEST_REDIS_URL", "").strip()
POSTGRES_URL = os.environ.get("TIERED_STATE_TEST_POSTGRES_URL", "").strip()


def value(i: int, salt: int) -> dict[str, Any]:
    return {"i": i, "salt": salt, "qty": 1.5 * i, "side": "buy", "note": "x" * 64}


def row(name: str, results: dict[str, dict[str, float]], raw: str, target: float) -> dict[str, Any]:
    r = ratio(results, name, raw)
    return {
        "case": name,
        "us_per_op": results[name]["per_op_us"],
        "vs": raw,
        "raw_us_per_op": results[raw]["per_op_us"],
        "ratio": r,
        "target": f"<= {target}",
        "met": "yes" if r <= target else "NO",
    }


def bench_get(label: str, state: tiered_state.StateManager) -> tuple[dict[str, Any], dict[str, Any]]:
    """``state.get`` of keys held in HOT vs the HOT repository's own ``fetch``."""
    hot = state.repositories[tiered_state.Tier.HOT]
    keys = [f"bench:get:{i}" for i in range(KEYS)]
    state.set_many({k: value(i, 0) for i, k in enumerate(keys)})
    assert all(state.get_record(k).tier is tiered_state.Tier.HOT for k in keys[:10])  # type: ignore[union-attr]

    def ours() -> None:
        get = state.get
        for k in keys:
            get(k)

    def raw() -> None:
        fetch = hot.fetch
        for k in keys:
            fetch(k)

    name, raw_name = f"get from HOT ({label})", f"{label} fetch"
    results = measure({name: ours, raw_name: raw}, ops=KEYS, rounds=9)
    return row(name, results, raw_name, 1.5), results


def bench_set(
    label: str, state: tiered_state.StateManager, hot: StateRepository, warm: StateRepository
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write-through ``state.set`` vs encode + metadata + store in both backends."""
    keys = [f"bench:set:{i}" for i in range(KEYS)]
    salt = iter(range(1, 1_000_000))
    version = iter(range(1, 10**9))

    def ours() -> None:
        s = next(salt)
        put = state.set
        for i, k in enumerate(keys):
            put(k, value(i, s))

    def raw() -> None:
        s = next(salt)
        for i, k in enumerate(keys):
            payload = codec.encode(value(i, s))
            md = make_metadata(payload, next(version), now=time.time())
            warm.store(k, payload, md)
            hot.store(k, payload, md)

    name, raw_name = f"set write-through ({label})", f"{label} store x2"
    results = measure({name: ours, raw_name: raw}, ops=KEYS, rounds=7)
    return row(name, results, raw_name, 1.2), results


def _idle_store(folder: Path, n: int, *, fsync: bool) -> tiered_state.StateManager:
    """A store with ``n`` WARM records that are idle for a ``cold_after`` of 0.05 s."""
    cold = folder.joinpath("cold").as_uri() + ("" if fsync else "?fsync=false")
    policy = TieringPolicy(cold_after=0.05, batch_size=BATCH)
    state = tiered_state.open(folder, cold=cold, policy=policy)
    for chunk in chunked(range(n), 5000):
        state.set_many({f"idle:{i}": value(i, 0) for i in chunk}, tier="warm")
    time.sleep(0.1)
    return state


def bench_sweep() -> tuple[dict[str, Any], dict[str, Any]]:
    """Records moved per second by ``sweep`` vs COLD ``store_many`` of the same records."""
    times: dict[str, list[float]] = {"sweep": [], "store_many": []}
    for _ in range(SWEEP_ROUNDS):
        folder = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
        try:
            state = _idle_store(folder / "a", SWEEP_KEYS, fsync=True)
            warm = state.repositories[tiered_state.Tier.WARM]
            entries = [e for batch in warm.scan(BATCH, idle_before=time.time()) for e in batch]
            start = time.perf_counter()
            report = state.sweep()
            times["sweep"].append(time.perf_counter() - start)
            assert report.moved == SWEEP_KEYS and report.failed == 0, report.as_dict()
            state.close()

            cold = FileSystemStateRepository(folder / "raw")
            start = time.perf_counter()
            for chunk in chunked(entries, BATCH):
                cold.store_many({e.key: (e.payload, e.metadata) for e in chunk})
            times["store_many"].append(time.perf_counter() - start)
            cold.close()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    rate = {k: SWEEP_KEYS / sorted(v)[len(v) // 2] for k, v in times.items()}
    r = rate["sweep"] / rate["store_many"]
    result = {
        "case": f"sweep WARM->COLD ({SWEEP_KEYS} records)",
        "us_per_op": 1e6 / rate["sweep"],
        "vs": "file store_many",
        "raw_us_per_op": 1e6 / rate["store_many"],
        "ratio": r,
        "target": ">= 0.5 (throughput)",
        "met": "yes" if r >= 0.5 else "NO",
    }
    return result, {"records_per_s": rate, "seconds": times}


def sweep_peak(n: int) -> tuple[int, float]:
    """Peak traced memory (bytes) of one sweep moving ``n`` idle records, and its seconds."""
    folder = Path(tempfile.mkdtemp(prefix="bench-sweep-mem-"))
    try:
        state = _idle_store(folder, n, fsync=False)
        gc.collect()
        tracemalloc.start()
        start = time.perf_counter()
        report = state.sweep()
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.moved == n and report.failed == 0, report.as_dict()
        state.close()
        return peak, seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    rows: list[dict[str, Any]] = []
    raw_results: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="bench-manager-"))
    try:
        state = tiered_state.open(folder / "embedded")
        r, res = bench_get("memory", state)
        rows.append(r)
        raw_results.update(res)
        repos = state.repositories
        r, res = bench_set("memory+sqlite", state, repos[tiered_state.Tier.HOT],
                           repos[tiered_state.Tier.WARM])
        rows.append(r)
        raw_results.update(res)
        state.close()
        if REDIS_URL:
            prefix = f"bench_manager_{os.getpid()}:"
            sep = "&" if "?" in REDIS_URL else "?"
            hot_url = f"{REDIS_URL}{sep}prefix={prefix}"
            warm_url = (
                f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}table=bench_manager"
                if POSTGRES_URL else None
            )
            state = tiered_state.open(folder / "server", hot=hot_url, warm=warm_url, cold="none")
            try:
                r, res = bench_get("redis", state)
                rows.append(r)
                raw_results.update(res)
                if POSTGRES_URL:
                    repos = state.repositories
                    r, res = bench_set("redis+postgres", state, repos[tiered_state.Tier.HOT],
                                       repos[tiered_state.Tier.WARM])
                    rows.append(r)
                    raw_results.update(res)
            finally:
                for repo in state.repositories.values():
                    repo.clear()  # an empty bench_manager table stays in PostgreSQL
                state.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    r, sweep_raw = bench_sweep()
    rows.append(r)
    print_table("StateManager vs its own backends (median of alternating rounds)", rows)

    memory_rows = []
    peaks = {}
    for n in MEMORY_SIZES:
        peak, seconds = sweep_peak(n)
        peaks[n] = peak
        memory_rows.append({"records": n, "peak_kib": peak / 1024, "seconds": seconds,
                            "records_per_s": n / seconds})
    growth = peaks[MEMORY_SIZES[-1]] / peaks[MEMORY_SIZES[0]]
    for m in memory_rows:
        m["peak vs smallest"] = m["peak_kib"] * 1024 / peaks[MEMORY_SIZES[0]]
    print_table(
        f"sweep peak memory (tracemalloc), target: independent of the key count "
        f"({MEMORY_SIZES[-1] // MEMORY_SIZES[0]}x the keys -> {growth:.2f}x the peak)",
        memory_rows,
    )
    write_json("manager", {"rows": rows, "raw": raw_results, "sweep": sweep_raw, "memory": memory_rows})


if __name__ == "__main__":
    main()
