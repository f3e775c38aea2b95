"""Shared timing harness for the benchmark scripts.

Each script compares a tiered-state operation with the raw driver doing the
same work *in the same run*, alternating the two in rounds so drift (CPU
frequency, server caches) hits both alike, and reports the ratio. Results go
to stdout as a table and to ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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
