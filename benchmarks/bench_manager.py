"""StateManager overhead over its own backends, in the same run.

Run: ``python -m benchmarks.bench_manager`` (about a minute; the Redis +
PostgreSQL rows need ``TIERED_STATE_TEST_{REDIS,POSTGRES}_URL``). Every case
is a ratio of medians over alternating rounds, the manager's public call
against the same manager's repositories (``state.repositories``) called
directly:

* ``get`` of a key held in HOT vs the HOT repository's own ``fetch`` (which
  also verifies the checksum and decodes); target <= 1.5x. Memory, and Redis.
* ``get`` of a key held in the catalog, HOT switched off, vs the catalog
  repository's own ``fetch`` (checksum and decode included); no target, it
  shows what the read path adds. SQLite, and PostgreSQL.
* ``set`` (tier HOT: the catalog entry plus a HOT copy) against two
  floors, each encoding the value and building its metadata in the loop:

  - a hand-written write-through: ``catalog.store`` + ``hot.store`` -- what
    a user would write by hand, with no protection against a concurrent
    writer or a stale HOT copy; target <= 1.2x (kept from 0.1);
  - the catalog protocol's own backend calls (docs/design.rst, "The write
    path"): invalidate HOT (memory: ``delete``; Redis: a placeholder,
    ``store_if_newer`` of a stub one version below), the conditional entry
    write ``store_if_newer`` in the catalog, the copy ``store_if_newer`` in
    HOT. The ratio to it is the manager's own overhead; no target.

The sweep's throughput and memory, formerly here, are targets (f) of
``bench_catalog``, measured there with the harness's alternating rounds.
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

from .harness import measure, print_table, ratio, server_urls, write_json

KEYS = 2000  # keys per timed call of get / set
HOT, WARM = tiered_state.Tier.HOT, tiered_state.Tier.WARM


def value(i: int, salt: int) -> dict[str, Any]:
    return {"i": i, "salt": salt, "qty": 1.5 * i, "side": "buy", "note": "x" * 64}


def row(name: str, results: dict[str, dict[str, float]], raw: str, target: float | None
        ) -> dict[str, Any]:
    r = ratio(results, name, raw)
    return {
        "case": name,
        "us_per_op": results[name]["per_op_us"],
        "vs": raw,
        "raw_us_per_op": results[raw]["per_op_us"],
        "ratio": r,
        "target": f"<= {target}" if target else "-",
        "met": ("yes" if r <= target else "NO") if target else "-",
    }


def bench_get_hot(label: str, state: tiered_state.StateManager) -> tuple[list[dict[str, Any]], Any]:
    """``state.get`` of keys held in HOT vs the HOT repository's own ``fetch``."""
    hot = state.repositories[HOT]
    keys = [f"bench:get:{i}" for i in range(KEYS)]
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
    results = measure({name: ours, raw_name: raw}, ops=KEYS, rounds=9)
    return [row(name, results, raw_name, 1.5)], results


def bench_get_catalog(label: str, state: tiered_state.StateManager
                      ) -> tuple[list[dict[str, Any]], Any]:
    """``state.get`` of keys in the catalog (no HOT) vs the catalog repository's ``fetch``."""
    catalog = state.repositories[state.catalog_tier]
    keys = [f"bench:cat:{i}" for i in range(KEYS)]
    state.set_many({k: value(i, 0) for i, k in enumerate(keys)})
    get, fetch = state.get, catalog.fetch

    def ours() -> None:
        for k in keys:
            get(k)

    def raw() -> None:
        for k in keys:
            fetch(k)

    name, raw_name = f"get from the catalog ({label})", f"{label} fetch"
    results = measure({name: ours, raw_name: raw}, ops=KEYS, rounds=9)
    return [row(name, results, raw_name, None)], results


def bench_set(label: str, state: tiered_state.StateManager) -> tuple[list[dict[str, Any]], Any]:
    """``state.set`` vs a hand-written write-through and vs the protocol's backend calls."""
    hot: StateRepository = state.repositories[HOT]
    catalog: StateRepository = state.repositories[state.catalog_tier]
    shared = hot.shared  # Redis: placeholders; memory: a delete
    keys = [f"bench:set:{i}" for i in range(KEYS)]
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
    results = measure({name: ours, floor_hand: by_hand, floor_protocol: protocol}, ops=KEYS,
                      rounds=7)
    return [row(name, results, floor_hand, 1.2), row(name, results, floor_protocol, None)], results


def main() -> None:
    rows: list[dict[str, Any]] = []
    raw_results: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="bench-manager-"))

    def add(got: tuple[list[dict[str, Any]], Any]) -> None:
        rows.extend(got[0])
        raw_results.update(got[1])

    try:
        with tiered_state.open(folder / "embedded") as state:
            add(bench_get_hot("memory", state))
            add(bench_set("memory+sqlite", state))
        with tiered_state.open(folder / "sqlite", hot="none") as state:
            add(bench_get_catalog("sqlite", state))
        with server_urls("bench_manager") as urls:
            if urls is not None:
                with tiered_state.open(folder / "server", hot=urls[0], warm=urls[1],
                                       cold="none") as state:
                    add(bench_get_hot("redis", state))
                    add(bench_set("redis+postgres", state))
                with tiered_state.open(folder / "pg", hot="none", warm=urls[1],
                                       cold="none") as state:
                    add(bench_get_catalog("postgres", state))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table("StateManager vs its own backends (median of alternating rounds; ratio = our "
                "time / the 'vs' case's)", rows)
    write_json("manager", {"rows": rows, "raw": raw_results})


if __name__ == "__main__":
    main()
