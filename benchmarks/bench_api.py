"""What the convenience operations cost next to the calls they are built on.

Run: ``python -m benchmarks.bench_api`` (under a minute; the Redis +
PostgreSQL rows need ``TIERED_STATE_TEST_{REDIS,POSTGRES}_URL``). Both sides
of every row go through the public API of the same store in the same run:

* ``incr`` (a read and a compare-and-set) against ``set`` of the same keys
  (one write): target -- incr at least half set's throughput, i.e. a time
  ratio of at most 2.0;
* a ``memoize``-d function whose results are stored (a hit: building the key
  from the arguments, then one read) against ``get`` of the same key: target
  at most 1.3x;
* ``get_or_set`` on a hit against ``get``, and ``add`` of a present key
  against ``set`` (for reference).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import tiered_state

from .harness import measure, print_table, ratio, server_urls, write_json

KEYS = 1000  # calls per timed round


def row(layout: str, case: str, results: dict[str, Any], ours: str, base: str,
        target: float | None) -> dict[str, Any]:
    r = ratio(results, ours, base)
    return {
        "layout": layout,
        "case": case,
        "us_per_op": results[ours]["per_op_us"],
        "vs": base,
        "vs_us_per_op": results[base]["per_op_us"],
        "ratio": r,
        "target": f"<= {target}" if target else "-",
        "met": ("yes" if r <= target else "NO") if target else "-",
    }


def bench(layout: str, state: tiered_state.StateManager) -> tuple[list[dict[str, Any]], Any]:
    counters = [f"counter:{i}" for i in range(KEYS)]
    plain = [f"plain:{i}" for i in range(KEYS)]
    state.set_many(dict.fromkeys(counters, 0))
    state.set_many(dict.fromkeys(plain, 0))

    @state.memoize(name="bench.square")
    def square(i: int) -> int:
        return i * i

    memo_keys = [square.cache_key(i) for i in range(KEYS)]
    for i in range(KEYS):
        square(i)  # stored: every timed call is a hit
    for key in memo_keys:
        state.get(key)  # and in HOT, for both sides alike

    def incr() -> None:
        for key in counters:
            state.incr(key)

    def set_() -> None:
        for n, key in enumerate(plain):
            state.set(key, n)

    def memoized() -> None:
        for i in range(KEYS):
            square(i)

    def get() -> None:
        for key in memo_keys:
            state.get(key)

    def get_or_set() -> None:
        for key in memo_keys:
            state.get_or_set(key, int)

    def add() -> None:
        for key in plain:
            state.add(key, 1)

    results = measure({"incr": incr, "set": set_, "memoize hit": memoized, "get": get,
                       "get_or_set hit": get_or_set, "add (present)": add},
                      ops=KEYS, rounds=7)
    rows = [
        row(layout, "incr", results, "incr", "set", 2.0),
        row(layout, "memoize hit", results, "memoize hit", "get", 1.3),
        row(layout, "get_or_set hit", results, "get_or_set hit", "get", None),
        row(layout, "add of a present key", results, "add (present)", "set", None),
    ]
    return rows, {layout: results}


def main() -> None:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        with tiered_state.open(folder / "embedded") as state:
            got = bench("memory+sqlite", state)
            rows.extend(got[0])
            raw.update(got[1])
        with server_urls("bench_api") as urls:
            if urls is not None:
                with tiered_state.open(folder / "server", hot=urls[0], warm=urls[1],
                                       cold="none") as state:
                    got = bench("redis+postgres", state)
                rows.extend(got[0])
                raw.update(got[1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table("Convenience operations vs the calls they build on (median of alternating "
                "rounds; ratio = time / the 'vs' case's)", rows)
    write_json("api", {"rows": rows, "raw": raw})


if __name__ == "__main__":
    main()
