"""Several processes sharing one store: the failures of 0.1, each as a regression test.

Each test reproduces one way 0.1 broke its promises with ordinary processes
and the public API (a sweep losing writes, a delete undone, two
compare-and-sets winning, a stale copy after a fork, ...). They run on the
embedded layout; the history test (``test_history.py``) covers the same
ground at random, on both layouts.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import TieringPolicy
from tiered_state.errors import ConflictError, IntegrityError
from tiered_state.record import VersionClock
from tiered_state.repositories.filesystem_repository import FileSystemStateRepository

CTX = multiprocessing.get_context("fork")
#: Every loop in these tests stops after this long, whatever happens.
BOUND = 20.0


def _open(path: Path, **kw: Any) -> tiered_state.StateManager:
    return tiered_state.open(path, **kw)


def _sweeper(path: str, stop: Any, cold_after: float) -> None:
    with _open(Path(path), policy=TieringPolicy(cold_after=cold_after, batch_size=7)) as state:
        deadline = time.monotonic() + BOUND
        while not stop.is_set() and time.monotonic() < deadline:
            state.sweep()


def _migrator(path: str, stop: Any, keys: list[str]) -> None:
    """demote/promote at random; must only ever win or lose races, never raise."""
    import random

    rng = random.Random(os.getpid())
    with _open(Path(path), policy=TieringPolicy(cold_after=0.01)) as state:
        deadline = time.monotonic() + BOUND
        while not stop.is_set() and time.monotonic() < deadline:
            key = rng.choice(keys)
            if rng.random() < 0.5:
                state.demote(key, to=rng.choice(["cold", "warm"]))
            else:
                state.promote(key, to=rng.choice(["hot", "warm"]))


def _start(target: Any, *args: Any) -> Any:
    proc = CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _join(*procs: Any) -> None:
    for proc in procs:
        proc.join(timeout=BOUND + 10)
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"


# -------------------------------------------------------------------- 1
def test_sweep_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
    """A writer alternates tier warm/cold while another process sweeps (cold_after tiny)."""
    stop = CTX.Event()
    sweeper = _start(_sweeper, str(tmp_path), stop, 0.001)
    last: dict[str, int] = {}
    with _open(tmp_path) as state:
        for round_ in range(30):
            for i in range(40):
                state.set(f"k{i}", round_, tier="warm" if (round_ + i) % 2 else "cold")
                last[f"k{i}"] = round_
        stop.set()
        _join(sweeper)
        state.sweep()
    with _open(tmp_path) as fresh:
        assert fresh.get_many(list(last)) == last


# -------------------------------------------------------------------- 2
def test_sweep_and_demote_never_bring_a_deleted_key_back(tmp_path: Path) -> None:
    stop = CTX.Event()
    keys = [f"d{i}" for i in range(12)]
    sweeper = _start(_sweeper, str(tmp_path), stop, 0.001)
    migrator = _start(_migrator, str(tmp_path), stop, keys)
    with _open(tmp_path) as state:
        for round_ in range(40):
            for key in keys:
                state.set(key, [round_, key], tier="warm")
                if (round_ + len(key)) % 3:
                    assert state.delete(key) is True
        final = {k: state.get(k) for k in keys}
        stop.set()
        _join(sweeper, migrator)
        for _ in range(3):
            state.sweep()
        assert {k: state.get(k) for k in keys} == final
    with _open(tmp_path) as fresh:
        assert {k: fresh.get(k) for k in keys} == final


# -------------------------------------------------------------------- 3
def _cas_counter(path: str, n: int, results: Any, tiers: list[str]) -> None:
    wins = []
    with _open(Path(path)) as state:
        deadline = time.monotonic() + BOUND
        i = 0
        while len(wins) < n and time.monotonic() < deadline:
            record = state.get_record("counter")
            current, version = (0, 0) if record is None else (record.value, record.version)
            try:
                new = state.set("counter", current + 1, tier=tiers[i % len(tiers)],
                                if_version=version)
            except ConflictError:
                continue
            finally:
                i += 1
            wins.append((version, new))
    results.put(wins)


def test_compare_and_set_has_one_winner_whatever_the_tiers(tmp_path: Path) -> None:
    results = CTX.Queue()
    with _open(tmp_path):
        pass
    procs = [_start(_cas_counter, str(tmp_path), 25, results, ["hot", "warm", "cold"])
             for _ in range(3)]
    wins = [w for _ in procs for w in results.get(timeout=BOUND + 10)]
    _join(*procs)
    assert len(wins) == 75
    # Each success replaced exactly the version the previous success created.
    chain = sorted(wins)
    assert chain[0][0] == 0
    assert [old for old, _ in chain[1:]] == [new for _, new in chain[:-1]]
    with _open(tmp_path) as state:
        assert state.get("counter") == 75


# -------------------------------------------------------------------- 4
@pytest.mark.parametrize("hot", ["memory", "redis"])
def test_if_version_holds_with_only_a_hot_tier(hot: str, request: pytest.FixtureRequest) -> None:
    if hot == "redis":
        from .support import unique_name

        url = request.getfixturevalue("redis_url")
        hot_url = f"{url}{'&' if '?' in url else '?'}prefix={unique_name('cas')}:"
    else:
        hot_url = "memory://"
    with tiered_state.open(hot=hot_url, warm="none", cold="none") as state:
        try:
            v1 = state.set("k", "a", if_version=0)
            with pytest.raises(ConflictError):
                state.set("k", "b", if_version=0)
            with pytest.raises(ConflictError):
                state.set("k", "b", if_version=v1 + 1)
            v2 = state.set("k", "c", if_version=v1)
            assert v2 > v1 and state.get("k") == "c"
            assert state.delete("k") is True
            assert state.set("k", "d", if_version=0) > v2
        finally:
            state.delete_many(["k"])
            if hot == "redis":
                state.repositories[tiered_state.Tier.HOT].clear()


# -------------------------------------------------------------------- 5
class _FastClock(VersionClock):
    """A host whose clock runs a minute ahead."""

    def next(self, after: int = 0) -> int:
        ahead = ((time.time_ns() // 1000) + 60_000_000) << self.NODE_BITS
        return super().next(after=max(after, ahead))


def test_clock_skew_cannot_order_an_older_value_first(tmp_path: Path) -> None:
    """Two hosts a minute apart: every write still gets a version above the
    one it replaces, and demote never trades the newest value for an older one."""
    with _open(tmp_path) as fast, _open(tmp_path) as slow:
        fast._clock = _FastClock()
        archived = fast.set("k", "archived", tier="cold")
        newer = slow.set("k", "newer", tier="warm")
        assert newer > archived
        assert fast.demote("k", to="cold") is True
        assert slow.get("k") == "newer" and fast.get("k") == "newer"
        newest = fast.set("k", "newest", tier="cold")
        last = slow.set("k", "slow-last", tier="warm", if_version=newest)
        assert last > newest
        assert fast.demote("k", to="cold") is True
        assert fast.get("k") == "slow-last" and slow.get("k") == "slow-last"


# -------------------------------------------------------------------- 6
def _set_value(path: str, value: int) -> None:
    with _open(Path(path)) as state:
        state.set("price", value)


def test_new_thread_and_forked_child_never_serve_an_overwritten_value(tmp_path: Path) -> None:
    with _open(tmp_path) as state:
        state.set("price", 100)
        assert state.get("price") == 100  # a copy in this process's memory tier
        writer = _start(_set_value, str(tmp_path), 200)
        _join(writer)
        seen: list[Any] = []
        thread = threading.Thread(target=lambda: seen.append(state.get("price")))
        thread.start()
        thread.join(timeout=BOUND)
        assert seen == [200]
        writer = _start(_set_value, str(tmp_path), 300)
        _join(writer)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child reads through the memory tier it inherited
            try:
                os.write(write, repr(state.get("price")).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        assert os.read(read, 100) == b"300"
        os.close(read)
        assert state.get("price") == 300


# -------------------------------------------------------------------- 8
def test_get_many_repairs_like_get_and_keys_lists_the_catalog(tmp_path: Path) -> None:
    with _open(tmp_path) as state:
        state.set_many({"b": 2, "c": 3}, tier="warm")
        state.set("a", 1, tier="cold")  # one object, named by key and version
        assert state.promote("a", to="warm") is True  # a valid copy of v(a) stays in COLD
        warm = state.repositories[tiered_state.Tier.WARM]
        entry = warm.fetch_record("a")
        assert entry is not None
        warm.store("a", "999", entry.metadata)  # corrupt the catalog row, same version
        state.set("b", 22)
        assert state.get_many(["a", "b", "c"]) == {"a": 1, "b": 22, "c": 3}
        assert warm.fetch_record("a").valid()  # type: ignore[union-attr]  # repaired
        with _open(tmp_path) as other:
            other.delete("c")
        assert state.keys() == ["a", "b"]
        assert state.get_many(["c"]) == {}


# -------------------------------------------------------------------- 9
def _delete(path: str, key: str) -> None:
    with _open(Path(path)) as state:
        state.delete(key)


def test_delete_reports_only_what_it_deleted(tmp_path: Path) -> None:
    with _open(tmp_path) as state:
        state.set("k", 1)
        assert state.get("k") == 1  # a copy in this process's memory tier
        _join(_start(_delete, str(tmp_path), "k"))
        assert state.delete("k") is False
        assert state.get("k") is None


def _delete_many(path: str, keys: list[str], results: Any) -> None:
    with _open(Path(path)) as state:
        results.put(state.delete_many(keys))


def test_concurrent_delete_many_count_each_key_once(tmp_path: Path) -> None:
    keys = [f"x{i}" for i in range(300)]
    with _open(tmp_path) as state:
        for _ in range(3):
            state.set_many(dict.fromkeys(keys, 1), tier="warm")
            results = CTX.Queue()
            procs = [_start(_delete_many, str(tmp_path), keys, results) for _ in range(3)]
            counts = [results.get(timeout=BOUND + 10) for _ in procs]
            _join(*procs)
            assert sum(counts) == len(keys)


def test_compare_and_set_on_the_current_version_never_conflicts(tmp_path: Path) -> None:
    """One writer, a sweeper and a migrator: versions only change by the writer,
    so its compare-and-set on the version it just read must always succeed, and
    promote/demote must lose races quietly (no IntegrityError)."""
    stop = CTX.Event()
    keys = ["c0", "c1"]
    with _open(tmp_path) as state:
        for key in keys:
            state.set(key, 0, tier="warm")
        procs = [_start(_sweeper, str(tmp_path), stop, 0.001),
                 _start(_migrator, str(tmp_path), stop, keys)]
        try:
            for i in range(150):
                key = keys[i % 2]
                record = state.get_record(key)
                assert record is not None
                state.set(key, record.value + 1, tier=["hot", "warm", "cold"][i % 3],
                          if_version=record.version)
        finally:
            stop.set()
            _join(*procs)
        assert [state.get(k) for k in keys] == [75, 75]


def test_promote_and_demote_racing_writers_never_raise(tmp_path: Path) -> None:
    keys = [f"m{i}" for i in range(4)]
    stop = CTX.Event()
    with _open(tmp_path) as state:
        for key in keys:
            state.set(key, 0)
        procs = [_start(_migrator, str(tmp_path), stop, keys) for _ in range(2)]
        errors: list[BaseException] = []
        try:
            for i in range(300):
                try:
                    state.set(keys[i % 4], i, tier=["hot", "warm", "cold"][i % 3])
                    if i % 5 == 0:
                        state.demote(keys[(i + 1) % 4], to="cold")
                except IntegrityError as exc:
                    errors.append(exc)
        finally:
            stop.set()
            _join(*procs)
        assert errors == []


# -------------------------------------------------------------------- 10
class _CountingCold(FileSystemStateRepository):
    """A COLD tier that counts every call the manager makes to it."""

    calls: list[str]

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in ("fetch_record", "fetch_many", "keys", "iter_keys", "iter_all_keys", "fetch"):
            super().__getattribute__("calls").append(name)
        return attr

    def segments(self) -> Any:
        store, calls = super().segments(), self.calls

        class Counting:
            def __getattr__(self, name: str) -> Any:
                if name in ("read", "read_many", "read_tail", "list"):
                    calls.append("segments." + name)
                return getattr(store, name)

        return Counting()


def test_misses_and_listings_never_touch_cold(tmp_path: Path) -> None:
    cold = _CountingCold(tmp_path / "cold")
    cold.calls = []
    with tiered_state.open(tmp_path, cold=cold, policy=TieringPolicy(cold_after=0.001)) as state:
        state.set_many({f"p:{i:06d}": i for i in range(300)}, tier="warm")
        time.sleep(0.01)
        assert state.sweep().moved == 300
        cold.calls.clear()
        assert state.get("p:absent") is None
        assert state.get_many(["p:absent", "q"]) == {}
        assert state.keys("p:000123*") == ["p:000123"]
        assert state.keys("p:00001*") == [f"p:{i:06d}" for i in range(10, 20)]
        assert state.delete("p:absent") is False
        assert cold.calls == []
        assert state.get("p:000123") == 123  # a hit below the catalog reads COLD, once
        assert cold.calls == ["segments.read_many"]  # the sweep put it in a segment


def test_iter_records_streams_from_the_first_page(tmp_path: Path) -> None:
    with _open(tmp_path) as state:
        state.set_many({f"r{i:05d}": i for i in range(3000)}, tier="warm")
        warm = state.repositories[tiered_state.Tier.WARM]
        fetched: list[int] = []
        original = warm.fetch_many

        def counting(keys: Any) -> Any:
            keys = list(keys)
            fetched.append(len(keys))
            return original(keys)

        warm.fetch_many = counting  # type: ignore[method-assign]
        records = state.iter_records("r*")
        first = next(records)
        assert first.key == "r00000" and first.value == 0
        assert sum(fetched) <= 500  # one page, not the whole store
        rest = list(records)
        assert len(rest) == 2999 and [r.key for r in rest][:2] == ["r00001", "r00002"]


# -------------------------------------------------------------------- opening a new store
def test_format_check_sees_data_written_after_the_record(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Process B reads "no format record", process A (which recorded the format
    first) writes data, then B finds the data: B must read the record again,
    not call the store a 0.1 store."""
    import importlib

    upgrade = importlib.import_module("tiered_state.upgrade")  # the module, not the function

    with _open(tmp_path) as first:
        first.set("k", 1)  # the record exists, and data
    real = upgrade._stored_format
    monkeypatch.setattr(upgrade, "_stored_format", lambda catalog: _first_none(real, catalog))
    with _open(tmp_path) as second:
        assert second.get("k") == 1


_SEEN: set[int] = set()


def _first_none(real: Any, catalog: Any) -> Any:
    """The first read of this catalog sees no record (as if it came a moment earlier)."""
    if id(catalog) not in _SEEN:
        _SEEN.add(id(catalog))
        return None
    return real(catalog)


def _open_and_write(path: str, barrier: Any, n: int, results: Any) -> None:
    barrier.wait(timeout=BOUND)
    try:
        with _open(Path(path)) as state:
            state.set(f"p{n}", n)
        results.put(None)
    except Exception as exc:  # reported to the parent
        results.put(repr(exc))


def test_processes_opening_a_new_store_at_once(tmp_path: Path) -> None:
    for round_ in range(5):
        path = tmp_path / f"store{round_}"
        barrier, results = CTX.Barrier(4), CTX.Queue()
        procs = [_start(_open_and_write, str(path), barrier, n, results) for n in range(4)]
        errors = [results.get(timeout=BOUND + 10) for _ in procs]
        _join(*procs)
        assert errors == [None] * 4
