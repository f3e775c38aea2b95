"""Cost of metrics on a memory-tier ``get``: StatsdMetrics on vs metrics off.

Run: ``python -m benchmarks.bench_metrics`` (about a minute). A UDP socket
on loopback stands in for StatsD. Each pair is timed in the same run, rounds alternating:

- ``get`` through a HOT-only manager (memory), metrics off vs on;
- ``get`` through the embedded default (memory + sqlite + file), key in HOT
  (the HOT guard checks SQLite's change signal before serving the copy);
- the same with a plain ``statsd.StatsClient`` (one UDP packet per call), to
  show what batching saves;
- ``fetch_record`` on the bare memory repository vs through the
  ``InstrumentedRepository`` hook (a repository-level row).

Target: StatsdMetrics on costs <= 1.10x metrics off for a
memory-tier ``get``, judged on the least-disturbed (minimum) CPU time per
call; the median is shown beside it, and the wall-clock ratio too, though on
a loaded machine wall time mostly measures the scheduler. The StatsD
collectors are warmed for two flush intervals first: a service runs in the
steady state, where busy operations are timed at a reduced rate (the first
interval times every call).
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import statsd

import tiered_state
from tiered_state import codec
from tiered_state.manager import StateManager
from tiered_state.metrics import InstrumentedRepository, StatsdMetrics
from tiered_state.record import make_metadata
from tiered_state.repositories.memory_repository import MemoryStateRepository

from .harness import fact, measure, print_rows, print_table, ratio, scaled, write_json

GETS = scaled(20_000, 2000)  # gets per timed call
ROUNDS = scaled(21, 5)
VALUE = {"qty": 1.5, "side": "buy", "price": 64_250.5, "note": "x" * 64}


class Sink:
    """A StatsD stand-in: a bound loopback UDP socket.

    Deliberately not read: a reader thread in this process would compete for
    the GIL with the code being timed. Once its buffer is full the kernel
    drops further datagrams, which costs the sender nothing extra.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


CPU: dict[str, list[float]] = {}


def timed(name: str, body: Callable[[], None]) -> Callable[[], None]:
    """Also record the thread's CPU time per call: on a busy machine wall time
    includes time spent descheduled, CPU time does not."""
    samples = CPU.setdefault(name, [])

    def run() -> None:
        start = time.thread_time()
        body()
        samples.append(time.thread_time() - start)

    return run


def getter(state: Any, key: str = "k") -> Callable[[], None]:
    get = state.get

    def run() -> None:
        for _ in range(GETS):
            get(key)

    return run


def fetcher(repo: Any) -> Callable[[], None]:
    fetch = repo.fetch_record

    def run() -> None:
        for _ in range(GETS):
            fetch("k")

    return run


def warm(fn: Callable[[], None], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        fn()


def main() -> None:
    sink = Sink()
    on = StatsdMetrics("127.0.0.1", sink.port)
    on_embedded = StatsdMetrics("127.0.0.1", sink.port)
    on_repo = StatsdMetrics("127.0.0.1", sink.port)
    client = statsd.StatsClient("127.0.0.1", sink.port)
    tmp = tempfile.TemporaryDirectory()

    managers = {
        "hot off": StateManager(hot=MemoryStateRepository()),
        "hot statsd": StateManager(hot=MemoryStateRepository(), metrics=on),
        "hot StatsClient": StateManager(hot=MemoryStateRepository(), metrics=client),  # type: ignore[arg-type]
        "embedded off": tiered_state.open(tmp.name + "/off"),
        "embedded statsd": tiered_state.open(tmp.name + "/on", metrics=on_embedded),
    }
    for state in managers.values():
        state.set("k", VALUE)
    bare = MemoryStateRepository()
    instrumented = InstrumentedRepository(bare, on_repo)
    payload = codec.encode(VALUE)
    bare.store("k", payload, make_metadata(payload, 1, now=time.time()))

    bodies = {name: getter(state) for name, state in managers.items()}
    bodies["repo bare"] = fetcher(bare)
    bodies["repo instrumented"] = fetcher(instrumented)
    for name, fn in bodies.items():
        warm(fn, 2.2 if "statsd" in name or "instrumented" in name else 0.2)
    cases = {name: timed(name, fn) for name, fn in bodies.items()}

    results = measure(cases, ops=GETS, rounds=ROUNDS)
    pairs = [
        ("memory-tier get (HOT-only manager)", "hot statsd", "hot off", 1.10),
        ("memory-tier get (embedded: memory+sqlite+file)", "embedded statsd", "embedded off", 1.10),
        ("memory-tier get, plain statsd.StatsClient", "hot StatsClient", "hot off", None),
        ("fetch_record through InstrumentedRepository", "repo instrumented", "repo bare", None),
    ]
    measured = {
        "hot statsd": "``get`` with ``StatsdMetrics``, HOT-only memory store",
        "embedded statsd": "``get`` with ``StatsdMetrics``, embedded default (key in HOT)",
        "hot StatsClient": "``get`` with a plain ``statsd.StatsClient``, HOT-only memory store",
        "repo instrumented": "memory ``fetch_record`` through the metrics hook",
    }
    rows = []
    standard = []
    for title, ours, base, target in pairs:
        r = ratio(results, ours, base)
        med_off, med_on = (statistics.median(CPU[n]) / GETS * 1e6 for n in (base, ours))
        min_off, min_on = (min(CPU[n]) / GETS * 1e6 for n in (base, ours))
        best = min_on / min_off
        rows.append(
            {
                "case": title,
                "wall ratio": r,
                "cpu off us": med_off,
                "cpu on us": med_on,
                "cpu ratio (median)": med_on / med_off,
                "cpu ratio (min)": best,
                "target": f"<= {target:.2f}" if target else "-",
                "ok": ("yes" if best <= target else "NO") if target else "-",
            }
        )
        standard.append(fact(
            f"{measured[ours]} (CPU, best of {ROUNDS})", "the same, metrics off",
            ours=min_on / 1e6, other=min_off / 1e6, unit="s/op",
            level="repository" if ours.startswith("repo") else "API",
            target=f"<= {target:.2f}" if target else "",
            met=(best <= target) if target else None,
        ))
    print_table(f"metrics overhead ({GETS} gets per call, {ROUNDS} alternating rounds)", rows)
    print_rows("metrics on vs off (ratio = CPU time on / off, least-disturbed round)", standard)

    for collector in (on, on_embedded, on_repo):
        collector.close()
    for state in managers.values():
        state.close()
    client.close()
    sink.close()
    write_json("metrics", standard, {"results": results, "summary": rows,
                                     "cpu_seconds": {name: CPU[name] for name in cases}})
    tmp.cleanup()


if __name__ == "__main__":
    main()
