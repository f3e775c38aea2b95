"""What the convenience operations cost next to the calls they are built on.

Run: ``python -m benchmarks.bench_api`` (under a minute; the Redis +
PostgreSQL rows need ``TIERED_STATE_TEST_{REDIS,POSTGRES}_URL``). Both sides
of every row go through the public API of the same store in the same run,
with the same values; there is no peer library here, the other side is the
plain call the convenience operation is built on:

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

from .harness import at_most, compare, measure, print_rows, scaled, server_urls, write_json

#: Calls per timed round: embedded calls take microseconds, server ones a
#: round trip or more (fewer calls, the same rounds).
EMBEDDED_KEYS = scaled(1000, 200)
SERVER_KEYS = scaled(200, 50)


def bench(layout: str, state: tiered_state.StateManager, n: int
          ) -> tuple[list[dict[str, Any]], Any]:
    counters = [f"counter:{i}" for i in range(n)]
    plain = [f"plain:{i}" for i in range(n)]
    state.set_many(dict.fromkeys(counters, 0))
    state.set_many(dict.fromkeys(plain, 0))

    @state.memoize(name="bench.square")
    def square(i: int) -> int:
        return i * i

    memo_keys = [square.cache_key(i) for i in range(n)]
    for i in range(n):
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
        for i in range(n):
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
                      ops=n, rounds=scaled(7, 3))
    rows = [
        compare(results, "incr", "set", measurement=f"``incr``, {layout}",
                vs="``set`` of the same keys", target=at_most(2.0)),
        compare(results, "memoize hit", "get", measurement=f"``memoize``-d call, a hit, {layout}",
                vs="``get`` of its key", target=at_most(1.3)),
        compare(results, "get_or_set hit", "get", measurement=f"``get_or_set``, a hit, {layout}",
                vs="``get`` of the same key", readme=False),
        compare(results, "add (present)", "set", measurement=f"``add`` of a present key, {layout}",
                vs="``set`` of the same key", readme=False),
    ]
    return rows, {layout: results}


def main() -> None:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        with tiered_state.open(folder / "embedded") as state:
            got = bench("embedded", state, EMBEDDED_KEYS)
            rows.extend(got[0])
            raw.update(got[1])
        with server_urls("bench_api") as urls:
            if urls is not None:
                with tiered_state.open(folder / "server", hot=urls[0], warm=urls[1],
                                       cold="none") as state:
                    got = bench("Redis + PostgreSQL", state, SERVER_KEYS)
                rows.extend(got[0])
                raw.update(got[1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_rows("convenience operations vs the calls they build on (ratio = our median time / "
               "the other side's; lower is better)", rows)
    write_json("api", rows, {"results": raw},
               used_servers=("redis", "postgres") if "Redis + PostgreSQL" in raw else ())


if __name__ == "__main__":
    main()
