"""Shared timing harness for the benchmark scripts.

Each script compares a tiered-state operation with the raw driver doing the
same work *in the same run*, alternating the two in rounds so drift (CPU
frequency, server caches) hits both alike, and reports the ratio. Results go
to stdout as a table and to ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REDIS_URL = os.environ.get("TIERED_STATE_TEST_REDIS_URL", "").strip()
POSTGRES_URL = os.environ.get("TIERED_STATE_TEST_POSTGRES_URL", "").strip()


def with_option(url: str, option: str) -> str:
    """``url`` with one more query option."""
    return url + ("&" if "?" in url else "?") + option


@contextlib.contextmanager
def server_urls(name: str) -> Iterator[tuple[str, str] | None]:
    """``(hot, warm)`` URLs on the test Redis and PostgreSQL with a prefix and a
    table of this run's own, both removed afterwards; None without those servers."""
    if not (REDIS_URL and POSTGRES_URL):
        print(f"{name}: redis+postgres rows skipped: set TIERED_STATE_TEST_{{REDIS,POSTGRES}}_URL")
        yield None
        return
    tag = f"{name}_{uuid.uuid4().hex[:10]}"
    hot = with_option(REDIS_URL, f"prefix={tag}:")
    try:
        yield hot, with_option(POSTGRES_URL, f"table={tag}")
    finally:
        from tiered_state.config import open_repository

        with open_repository(hot) as repo:
            repo.clear()  # our prefix only
        import psycopg2

        conn = psycopg2.connect(POSTGRES_URL)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{tag}"')  # created by this run
        conn.close()


def measure(
    cases: dict[str, Callable[[], object]],
    *,
    ops: int = 1,
    rounds: int = 7,
    setup: Callable[[], object] | None = None,
    before: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, float]]:
    """Time each case ``rounds`` times, alternating cases within every round.

    :param cases: name -> callable doing ``ops`` operations per call.
    :param ops: operations per call (to report per-operation cost and rate).
    :param setup: run before every timed call (not timed).
    :param before: name -> run before every timed call of that case only (not
        timed), for cases that need fresh state each round (a store to sweep,
        an empty store to restore into).
    :returns: name -> {"median_s", "best_s", "per_op_us", "ops_per_s"}.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            if setup is not None:
                setup()
            if before is not None and name in before:
                before[name]()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    out: dict[str, dict[str, float]] = {}
    for name, times in samples.items():
        median = statistics.median(times)
        out[name] = {
            "median_s": median,
            "best_s": min(times),
            "per_op_us": median / ops * 1e6,
            "ops_per_s": ops / median if median else float("inf"),
        }
    return out


def ratio(results: dict[str, dict[str, float]], ours: str, raw: str) -> float:
    """Our median time divided by the raw driver's (lower is better, 1.0 = equal)."""
    return results[ours]["median_s"] / results[raw]["median_s"]


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows (dicts with the same keys) as an aligned text table."""
    if not rows:
        return
    columns = list(rows[0])
    text = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write results with the machine description to results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "python": sys.version.split()[0],
        # The codec decodes with orjson when it is installed (the [fast] extra).
        "orjson": importlib.util.find_spec("orjson") is not None,
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path}")
    return path
