"""StateManager overhead over its own backends, in the same run.

Run: ``python -m benchmarks.bench_manager`` (under a minute; the Redis +
PostgreSQL rows need ``TIERED_STATE_TEST_{REDIS,POSTGRES}_URL``). No peer
library here: every row sets the manager's public call against the same
manager's repositories (``state.repositories``) called directly -- a floor
of our own, labelled as such -- doing the same work, ratio of medians over
alternating rounds:

* ``get`` of a key held in HOT vs the HOT repository's own ``fetch`` (which
  also verifies the checksum and decodes); target <= 1.5x. Memory, and Redis.
* ``get`` of a key held in the catalog, HOT switched off, vs the catalog
  repository's own ``fetch`` (checksum and decode included); no target, it
  shows what the read path adds. SQLite, and PostgreSQL.
* ``set`` (tier HOT: the catalog entry plus a HOT copy) against two
  floors, each encoding the value and building its metadata in the loop:

  - a hand-written write-through: ``catalog.store`` + ``hot.store`` -- what
    a user would write by hand, with no protection against a concurrent
    writer or a stale HOT copy; target <= 1.2x;
  - the backend calls the manager's write path makes, in its order:
    invalidate HOT (memory: ``delete``; Redis: a placeholder,
    ``store_if_newer`` of a stub one version below, so a racing reader
    cannot fill HOT with the old value), the conditional entry write
    ``store_if_newer`` in the catalog, the copy ``store_if_newer`` in HOT.
    The ratio to it is the manager's own overhead; no target.

The sweep's throughput and memory are measured by ``bench_catalog``.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import tiered_state
from tiered_state import codec
from tiered_state.record import VersionClock, make_metadata, make_stub
from tiered_state.repositories.base import StateRepository

from .harness import at_most, compare, measure, print_rows, scaled, server_urls, write_json

#: Keys per timed call of get / set: embedded layouts take microseconds per
#: call, the server ones a round trip or more (fewer keys, the same rounds).
EMBEDDED_KEYS = scaled(2000, 300)
SERVER_KEYS = scaled(300, 100)
HOT, WARM = tiered_state.Tier.HOT, tiered_state.Tier.WARM


def value(i: int, salt: int) -> dict[str, Any]:
    return {"i": i, "salt": salt, "qty": 1.5 * i, "side": "buy", "note": "x" * 64}


def bench_get_hot(label: str, state: tiered_state.StateManager, n: int
                  ) -> tuple[list[dict[str, Any]], Any]:
    """``state.get`` of keys held in HOT vs the HOT repository's own ``fetch``."""
    hot = state.repositories[HOT]
    keys = [f"bench:get:{i}" for i in range(n)]
    state.set_many({k: value(i, 0) for i, k in enumerate(keys)})
    assert all(state.get_record(k).tier is HOT for k in keys[:10])  # type: ignore[union-attr]
    get, fetch = state.get, hot.fetch

    def ours() -> None:
        for k in keys:
            get(k)

    def raw() -> None:
        for k in keys:
            fetch(k)

    name, raw_name = f"get from HOT ({label})", f"{label} fetch"
    results = measure({name: ours, raw_name: raw}, ops=n, rounds=scaled(9, 3))
    return [compare(results, name, raw_name, measurement=f"``get`` of a key in HOT, {label}",
                    vs=f"floor: the {label} repository's ``fetch``", target=at_most(1.5))], results


def bench_get_catalog(label: str, state: tiered_state.StateManager, n: int
                      ) -> tuple[list[dict[str, Any]], Any]:
    """``state.get`` of keys in the catalog (no HOT) vs the catalog repository's ``fetch``."""
    catalog = state.repositories[state.catalog_tier]
    keys = [f"bench:cat:{i}" for i in range(n)]
    state.set_many({k: value(i, 0) for i, k in enumerate(keys)})
    get, fetch = state.get, catalog.fetch

    def ours() -> None:
        for k in keys:
            get(k)

    def raw() -> None:
        for k in keys:
            fetch(k)

    name, raw_name = f"get from the catalog ({label})", f"{label} fetch"
    results = measure({name: ours, raw_name: raw}, ops=n, rounds=scaled(9, 3))
    return [compare(results, name, raw_name, measurement=f"``get``, {label} alone (no HOT)",
                    vs=f"floor: the {label} repository's ``fetch``", readme=False)], results


def bench_set(label: str, state: tiered_state.StateManager, n: int
              ) -> tuple[list[dict[str, Any]], Any]:
    """``state.set`` vs a hand-written write-through and vs the protocol's backend calls."""
    hot: StateRepository = state.repositories[HOT]
    catalog: StateRepository = state.repositories[state.catalog_tier]
    shared = hot.shared  # Redis: placeholders; memory: a delete
    keys = [f"bench:set:{i}" for i in range(n)]
    salts = {name: itertools.count(1) for name in ("ours", "store x2", "protocol")}
    clock = VersionClock()  # versions as the manager makes them (and above its own)

    def ours() -> None:
        s = next(salts["ours"])
        put = state.set
        for i, k in enumerate(keys):
            put(k, value(i, s))

    def by_hand() -> None:
        s = next(salts["store x2"])
        for i, k in enumerate(keys):
            payload = codec.encode(value(i, s))
            md = make_metadata(payload, clock.next(), now=time.time())
            catalog.store(k, payload, md)
            hot.store(k, payload, md)

    def protocol() -> None:
        s = next(salts["protocol"])
        for i, k in enumerate(keys):
            payload = codec.encode(value(i, s))
            now = time.time()
            version = clock.next()
            md = make_metadata(payload, version, now=now)
            if shared:
                stub, stub_md = make_stub(make_metadata("", version - 1, now=now))
                hot.store_if_newer(k, stub, stub_md)
            else:
                hot.delete(k)
            catalog.store_if_newer(k, payload, md)
            hot.store_if_newer(k, payload, md)

    ours()
    name = f"set ({label})"
    floor_hand, floor_protocol = f"{label}: store x2 by hand", f"{label}: protocol calls"
    results = measure({name: ours, floor_hand: by_hand, floor_protocol: protocol}, ops=n,
                      rounds=scaled(7, 3))
    return [
        compare(results, name, floor_hand, measurement=f"``set``, {label}",
                vs="by hand: encode, ``store`` in the catalog and in HOT", target=at_most(1.2)),
        compare(results, name, floor_protocol, measurement=f"``set``, {label}",
                vs="floor: the write path's own backend calls"),
    ], results


def main() -> None:
    rows: list[dict[str, Any]] = []
    raw_results: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="bench-manager-"))

    def add(got: tuple[list[dict[str, Any]], Any]) -> None:
        rows.extend(got[0])
        raw_results.update(got[1])

    try:
        with tiered_state.open(folder / "embedded") as state:
            add(bench_get_hot("memory", state, EMBEDDED_KEYS))
            add(bench_set("memory + SQLite", state, EMBEDDED_KEYS))
        with tiered_state.open(folder / "sqlite", hot="none") as state:
            add(bench_get_catalog("SQLite", state, EMBEDDED_KEYS))
        with server_urls("bench_manager") as urls:
            if urls is not None:
                with tiered_state.open(folder / "server", hot=urls[0], warm=urls[1],
                                       cold="none") as state:
                    add(bench_get_hot("Redis", state, SERVER_KEYS))
                    add(bench_set("Redis + PostgreSQL", state, SERVER_KEYS))
                with tiered_state.open(folder / "pg", hot="none", warm=urls[1],
                                       cold="none") as state:
                    add(bench_get_catalog("PostgreSQL", state, SERVER_KEYS))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_rows("StateManager vs its own backends (ratio = our median time / the other side's; "
               "lower is better)", rows)
    write_json("manager", rows, {"results": raw_results},
               used_servers=("redis", "postgres") if any("Redis" in k for k in raw_results) else ())


if __name__ == "__main__":
    main()
