"""The API users reach for: mapping protocol, add, get_or_set and memoize,
incr/decr, pop, touch, inspect, promote=, durations as timedelta, demote's
answer, health and the reserved keys in stats.

Each runs on the embedded layout (memory + SQLite + files) and on the server
layouts (Redis, Redis Cluster or Sentinel + PostgreSQL + S3); the
compute-once and counter tests run 4 processes x 4 threads against one store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import (
    ClosedError,
    ConfigurationError,
    StateManager,
    Tier,
    TieringPolicy,
    ValueTypeError,
)
from tiered_state.catalog import RESERVED_PREFIX
from tiered_state.record import make_metadata

from .support import unique_name

PROCESSES = 4
THREADS = 4
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["embedded", "server", "cluster", "sentinel"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``tiered_state.open`` arguments of a fresh store; the server ones are
    removed afterwards. HOT is one Redis ("server"), a Redis Cluster or a
    Sentinel-managed primary; WARM PostgreSQL, COLD S3."""
    config: dict[str, Any] = {"path": str(tmp_path / "store")}
    if request.param == "embedded":
        yield config
        return
    redis_url = {"server": lambda: request.getfixturevalue("redis_url"),
                 "cluster": lambda: request.getfixturevalue("redis_cluster").url,
                 "sentinel": lambda: request.getfixturevalue("redis_sentinel").url,
                 }[request.param]()
    postgres_url = request.getfixturevalue("postgres_url")
    s3_url = request.getfixturevalue("s3_url")
    table = unique_name("api").replace("-", "_")
    config["hot"] = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={unique_name('api')}:"
    config["warm"] = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={table}"
    config["cold"] = s3_url
    yield config
    from tiered_state.config import open_repository

    with open_repository(config["hot"]) as repo:
        repo.clear()
    import psycopg2

    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{table}"')


@pytest.fixture
def state(layout: dict[str, Any]) -> Iterator[StateManager]:
    with tiered_state.open(**layout) as manager:
        yield manager


def hot_copy(state: StateManager, key: str) -> Any:
    """The version of ``key``'s HOT copy (None: no copy, a placeholder counts as none)."""
    copy = state.repositories[Tier.HOT].fetch_record(key)
    return copy.version if copy is not None and copy.kind == "value" else None


# ------------------------------------------------------------------ mapping
def test_mapping_protocol_behaves_like_a_dict(state: StateManager) -> None:
    with pytest.raises(KeyError):
        state["absent"]
    with pytest.raises(KeyError):
        del state["absent"]
    state["a"] = {"qty": 1}
    state["b"] = None
    assert state["a"] == {"qty": 1}
    assert state["b"] is None  # a stored None is a value, not an absence
    assert "a" in state and "b" in state and "absent" not in state
    assert sorted(state) == ["a", "b"]
    del state["a"]
    assert "a" not in state
    with pytest.raises(KeyError):
        state["a"]
    with pytest.raises(TypeError):
        len(state)  # type: ignore[arg-type]
    assert bool(state) is True


def test_in_does_not_promote(state: StateManager) -> None:
    state.set("warm-only", 1, tier="warm")
    assert hot_copy(state, "warm-only") is None
    assert "warm-only" in state
    assert hot_copy(state, "warm-only") is None
    assert state.get("warm-only") == 1  # a get promotes, per the policy
    assert hot_copy(state, "warm-only") is not None


def test_iter_streams_keys_without_reserved_ones(state: StateManager) -> None:
    state.set_many({f"k{i:03d}": i for i in range(120)})
    state.get_or_set("computed", lambda: 1)
    it = iter(state)
    assert next(it).startswith(("k", "computed"))
    keys = sorted(state)
    assert len(keys) == 121 and not any(k.startswith(RESERVED_PREFIX) for k in keys)


# ------------------------------------------------------------------ add / get_or_set
def test_add_only_if_absent(state: StateManager) -> None:
    assert state.add("k", 1) is True
    assert state.add("k", 2) is False
    assert state["k"] == 1
    state.delete("k")
    assert state.add("k", 3, ttl=timedelta(seconds=30), tier="warm") is True
    record = state.get_record("k")
    assert record is not None and record.value == 3
    assert record.expires_at is not None and 25 < record.expires_at - time.time() <= 30


def test_add_after_expiry_stores(state: StateManager) -> None:
    state.set("k", 1, ttl=0.2)
    time.sleep(0.3)
    assert state.add("k", 2) is True
    assert state["k"] == 2


def test_get_or_set_factory_raises_stores_nothing(state: StateManager) -> None:
    with pytest.raises(ZeroDivisionError):
        state.get_or_set("k", lambda: 1 / 0)
    assert "k" not in state
    assert state.get_or_set("k", lambda: "second") == "second"
    assert state.get_or_set("k", lambda: "third") == "second"


def run_workers(mode: str, layout: dict[str, Any], tmp_path: Path, **params: Any
                ) -> list[dict[str, Any]]:
    """PROCESSES worker processes of tests/api_worker.py; their reports."""
    params.setdefault("threads", THREADS)
    params["calls"] = str(tmp_path / "calls.log")
    params["failed"] = str(tmp_path / "failed.flag")
    params["start"] = time.time() + 2.0  # after every process has started
    procs = []
    for n in range(PROCESSES):
        out = tmp_path / f"out{n}.json"
        config = json.dumps({**layout, "params": params})
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.api_worker", mode, config,
                                        str(out)], cwd=ROOT), out))
    reports = []
    for proc, out in procs:
        assert proc.wait(timeout=120) == 0
        reports.append(json.loads(out.read_text()))
    for report in reports:
        assert report["errors"] == []
    return reports


def calls(tmp_path: Path) -> Counter[int]:
    """How many times each round's factory ran, across every process."""
    path = tmp_path / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(int(line.split()[0]) for line in lines)


@pytest.mark.parametrize("mode", ["get_or_set", "memoize"])
def test_computes_once_across_processes_and_threads(mode: str, layout: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """4 processes x 4 threads ask for the same absent key at the same moment,
    five rounds in a row: each round's factory runs once, and every caller
    returns that one run's value."""
    rounds = 5
    reports = run_workers(mode, layout, tmp_path, rounds=rounds, round_seconds=0.6)
    assert calls(tmp_path) == {r: 1 for r in range(rounds)}
    for r in range(rounds):
        values = {json.dumps(t[r], sort_keys=True) for rep in reports for t in rep["results"]}
        assert len(values) == 1, f"round {r}: callers got different values {values}"
        assert json.loads(values.pop())["round"] == r


def test_a_failed_factory_lets_a_waiter_compute(layout: dict[str, Any], tmp_path: Path) -> None:
    """The first factory call raises: nothing is stored, one waiter computes
    instead, and every caller still ends with that one value."""
    reports = run_workers("get_or_set", layout, tmp_path, rounds=2, round_seconds=0.8,
                          fail_first=True)
    assert calls(tmp_path) == {0: 2, 1: 1}
    for r in range(2):
        values = {json.dumps(t[r], sort_keys=True) for rep in reports for t in rep["results"]}
        assert len(values) == 1


def test_a_killed_holder_lets_another_compute(layout: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The process computing a value is SIGKILLed: its lease runs out and the
    next caller computes."""
    from tiered_state import operations

    params = {"threads": 1, "lease": 1.0, "calls": str(tmp_path / "calls.log")}
    holder = subprocess.Popen([sys.executable, "-m", "tests.api_worker", "hold",
                               json.dumps({**layout, "params": params}),
                               str(tmp_path / "out.json")], cwd=ROOT)
    monkeypatch.setattr(operations, "LEASE_SECONDS", 1.0)
    with tiered_state.open(**layout) as state:
        name = operations.lease_name("held")
        deadline = time.monotonic() + 30
        while state._catalog.repo.fetch_record(name) is None:  # the holder took the lease
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.02)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        assert state.get_or_set("held", lambda: "mine") == "mine"
        assert time.monotonic() - started < 5.0  # the lease, not the default minute
        assert state["held"] == "mine"


# ------------------------------------------------------------------ memoize
def test_memoize_keys_cache_key_and_forget(state: StateManager) -> None:
    runs: list[tuple[Any, ...]] = []

    @state.memoize(ttl=60)
    def price(symbol: str, days: int = 1) -> float:
        runs.append((symbol, days))
        return 100.0 * days

    assert price("BTC") == 100.0 and price("BTC") == 100.0
    assert price("BTC", days=7) == 700.0
    assert runs == [("BTC", 1), ("BTC", 7)]
    assert price.cache_key("BTC", days=7) == f"{__name__}.{price.__qualname__}(\"BTC\",days=7)"
    assert price.__name__ == "price" and price.__wrapped__ is not None
    assert state.get(price.cache_key("BTC")) == 100.0
    record = state.get_record(price.cache_key("BTC"))
    assert record is not None and record.expires_at is not None
    assert price.forget("BTC") is True and price.forget("BTC") is False
    assert price("BTC") == 100.0 and len(runs) == 3

    @state.memoize(name="named")
    def f(x: Any) -> Any:
        return x

    assert f.cache_key({"b": 1, "a": [1, 2]}) == 'named({"a":[1,2],"b":1})'
    assert f.cache_key("x" * 2000).startswith("named(#")

    @state.memoize(key=lambda user, **_: f"user:{user}")
    def profile(user: str, verbose: bool = False) -> dict[str, Any]:
        return {"user": user}

    assert profile("ann") == {"user": "ann"} and state["user:ann"] == {"user": "ann"}
    assert profile("ann", verbose=True) == {"user": "ann"}
    with pytest.raises(tiered_state.SerializationError):
        f(object())


def test_memoize_stores_none_results(state: StateManager) -> None:
    runs = []

    @state.memoize()
    def nothing() -> None:
        runs.append(1)

    assert nothing() is None and nothing() is None
    assert runs == [1]


# ------------------------------------------------------------------ incr / decr / pop
def test_incr_decr(state: StateManager) -> None:
    assert state.incr("n") == 1
    assert state.incr("n", 10) == 11
    assert state.decr("n", 2) == 9
    assert state.incr("f", 0.5, default=1) == 1.5
    assert state.decr("new", default=10) == 9
    state["s"] = "text"
    version = state.get_record("s").version  # type: ignore[union-attr]
    with pytest.raises(ValueTypeError) as excinfo:
        state.incr("s")
    assert isinstance(excinfo.value, TypeError) and "str" in str(excinfo.value)
    assert state.get_record("s").version == version  # type: ignore[union-attr]
    for bad in (True, "1", None):
        with pytest.raises(TypeError):
            state.incr("n", bad)  # type: ignore[arg-type]
    state["b"] = True
    with pytest.raises(TypeError):
        state.incr("b")  # a bool is not a number here
    assert state["n"] == 9


def test_incr_keeps_or_sets_the_expiry(state: StateManager) -> None:
    state.set("n", 1, ttl=30)
    assert state.incr("n") == 2
    record = state.get_record("n")
    assert record is not None and record.expires_at is not None
    assert 25 < record.expires_at - time.time() <= 30
    state.incr("n", ttl=timedelta(minutes=5))
    record = state.get_record("n")
    assert record is not None and record.expires_at is not None
    assert 290 < record.expires_at - time.time() <= 300


def test_incr_is_atomic_across_processes_and_threads(layout: dict[str, Any],
                                                     tmp_path: Path) -> None:
    """16 callers increment one counter: none lost, and no two saw the same value."""
    increments = 25
    reports = run_workers("incr", layout, tmp_path, increments=increments)
    seen = [v for rep in reports for t in rep["results"] for v in t]
    total = PROCESSES * THREADS * increments
    assert sorted(seen) == list(range(1, total + 1))
    with tiered_state.open(**layout) as state:
        assert state["counter"] == total


def test_pop(state: StateManager) -> None:
    state["k"] = [1, 2]
    assert state.pop("k") == [1, 2]
    assert "k" not in state
    assert state.pop("k", None) is None
    with pytest.raises(KeyError):
        state.pop("k")
    state.set("cold", "x", tier="cold")
    assert state.pop("cold") == "x" and "cold" not in state


def test_pop_races_with_writers_lose_nothing(state: StateManager) -> None:
    """Threads increment while others pop: every increment ends up either in
    a popped value or in the final value, exactly once."""
    import threading

    increments, poppers = 200, 2
    popped: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def increment() -> None:
        for _ in range(increments):
            state.incr("n")

    def pop() -> None:
        while not done.is_set():
            value = state.pop("n", None)
            if value is not None:
                with lock:
                    popped.append(value)
            time.sleep(0.001)

    writers = [threading.Thread(target=increment) for _ in range(2)]
    takers = [threading.Thread(target=pop) for _ in range(poppers)]
    for t in writers + takers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    done.set()
    for t in takers:
        t.join(timeout=30)
    assert sum(popped) + state.get("n", 0) == 2 * increments


# ------------------------------------------------------------------ touch
def test_touch_changes_the_lifetime_only(state: StateManager) -> None:
    version = state.set("k", {"v": 1}, ttl=60)
    assert state.get("k") == {"v": 1}  # a HOT copy
    assert state.touch("k", timedelta(seconds=0.5)) is True
    record = state.get_record("k")
    assert record is not None and record.version == version and record.value == {"v": 1}
    assert record.expires_at is not None and record.expires_at - time.time() <= 0.5
    time.sleep(0.7)
    assert state.get("k") is None  # no tier serves it past its new expiry
    assert state.touch("k", 10) is False


def test_touch_none_removes_the_expiry_in_every_tier(state: StateManager) -> None:
    version = state.set("k", 1, ttl=0.6, tier="cold")
    assert state.touch("k", None) is True
    time.sleep(0.8)
    assert state["k"] == 1
    for copy in state.inspect("k"):
        if copy.role == "placeholder":  # touch's: one above, blocking the old copy
            continue
        assert copy.version == version
        if copy.role in ("value", "stub"):
            assert copy.expires_at is None


def test_touch_drops_hot_copies_that_carry_the_old_expiry(state: StateManager) -> None:
    state.set("k", 1)
    assert hot_copy(state, "k") is not None
    state.touch("k", 30)
    assert hot_copy(state, "k") is None
    assert state["k"] == 1


# ------------------------------------------------------------------ inspect / promote=
def test_inspect_shows_every_copy_and_changes_nothing(state: StateManager) -> None:
    def roles() -> list[str]:
        # A shared HOT also holds the writer's placeholder: not a copy.
        return [c.role for c in state.inspect("k") if c.role != "placeholder"]

    version = state.set("k", {"a": 1}, tier="cold")
    before = dict(state.stats()["manager"])
    copies = {c.role: c for c in state.inspect("k") if c.role != "placeholder"}
    assert set(copies) == {"stub", "payload"}
    assert copies["payload"].tier == "cold" and copies["payload"].checksum_ok is True
    assert all(c.version == version and c.current for c in copies.values())
    assert copies["payload"].size_bytes == len('{"a":1}')
    after = state.stats()["manager"]
    assert {k: after[k] for k in ("hit_hot", "hit_warm", "hit_cold", "miss", "promotions")} == \
        {k: before[k] for k in ("hit_hot", "hit_warm", "hit_cold", "miss", "promotions")}
    assert roles() == ["stub", "payload"]  # nothing promoted
    assert state.get("k") == {"a": 1}
    assert roles() == ["copy", "stub", "payload"]
    state.delete("k")
    assert [c.role for c in state.inspect("k") if c.tier != "hot"] == ["tombstone"]
    assert state.inspect("never") == []
    assert json.dumps([c.as_dict() for c in state.inspect("k")])


def test_inspect_reports_a_corrupt_hot_copy(state: StateManager) -> None:
    state.set("k", "good")
    hot = state.repositories[Tier.HOT]
    md = make_metadata('"good"', state.get_record("k").version,  # type: ignore[union-attr]
                       now=time.time())
    hot.store("k", '"evil"', md)  # bytes that do not match their checksum
    found = {c.tier: c for c in state.inspect("k")}
    assert found["hot"].checksum_ok is False and found["hot"].current is False
    assert found["warm"].checksum_ok is True and found["warm"].current is True
    assert state["k"] == "good"


def test_promote_argument_overrides_the_policy(layout: dict[str, Any]) -> None:
    with tiered_state.open(**layout, policy=TieringPolicy(promote_to=None)) as state:
        state.set("a", 1, tier="warm")
        state.set("b", 2, tier="warm")
        assert state.get("a") == 1 and hot_copy(state, "a") is None
        assert state.get("a", promote=True) == 1 and hot_copy(state, "a") is not None
        assert state.get_many(["b"], promote=True) == {"b": 2}
        assert hot_copy(state, "b") is not None
    with tiered_state.open(**layout) as state:
        state.set("c", 3, tier="warm")
        assert state.get("c", promote=False) == 3 and hot_copy(state, "c") is None
        record = state.get_record("c", promote=False)
        assert record is not None and record.tier == "warm" and hot_copy(state, "c") is None


# ------------------------------------------------------------------ smaller fixes
def test_cold_after_zero_moves_every_warm_record(layout: dict[str, Any]) -> None:
    with tiered_state.open(**layout, policy=TieringPolicy(cold_after=0)) as state:
        state.set_many({f"k{i}": i for i in range(10)}, tier="warm")
        report = state.sweep()
        assert report.moved == 10
        assert all(state.get_record(f"k{i}", promote=False).tier == "cold"  # type: ignore[union-attr]
                   for i in range(10))


def test_durations_accept_timedelta() -> None:
    policy = TieringPolicy(hot_ttl=timedelta(minutes=1), cold_after=timedelta(days=2),
                           purge_after=timedelta(0), hot_trust_window=timedelta(milliseconds=50))
    assert (policy.hot_ttl, policy.cold_after, policy.purge_after, policy.hot_trust_window) == \
        (60.0, 172800.0, 0.0, 0.05)
    assert tiered_state.LocalCache(ttl=timedelta(milliseconds=250)).ttl == 0.25
    for bad in ({"cold_after": -1}, {"hot_ttl": 0}, {"hot_ttl": timedelta(seconds=-1)},
                {"cold_after": "1d"}, {"purge_after": None}, {"hot_ttl": float("inf")}):
        with pytest.raises(ConfigurationError):
            TieringPolicy(**bad)  # type: ignore[arg-type]


def test_ttl_accepts_timedelta(state: StateManager) -> None:
    state.set("k", 1, ttl=timedelta(hours=1))
    record = state.get_record("k")
    assert record is not None and record.expires_at is not None
    assert 3590 < record.expires_at - time.time() <= 3600
    for bad in (0, -1, timedelta(0), "1h"):
        with pytest.raises(ConfigurationError):
            state.set("k", 1, ttl=bad)  # type: ignore[arg-type]


def test_demote_answers_whether_anything_moved(state: StateManager) -> None:
    state.set("k", 1, tier="warm")
    assert state.demote("k", to="warm") is False  # lives there, no copy above
    assert state.get("k") == 1  # now a HOT copy too
    assert state.demote("k", to="warm") is True  # the HOT copy went
    assert state.demote("k", to="cold") is True
    assert state.demote("k", to="cold") is False
    assert state.demote("k", to="warm") is False  # never up
    assert state.demote("absent", to="cold") is False
    assert state["k"] == 1


def test_stats_count_user_keys_only(state: StateManager) -> None:
    state.set_many({"a": 1, "b": 2})
    state.get_or_set("c", lambda: 3)
    state.set("d", 4, tier="cold")
    tiers = state.stats()["tiers"]
    assert tiers["warm"]["key_count"] == 4


def test_health_reports_every_tier(state: StateManager) -> None:
    health = state.health()
    assert set(health) == {"hot", "warm", "cold"}
    for tier in health.values():
        assert tier["ok"] is True and tier["error"] is None and tier["latency_ms"] >= 0


def test_new_calls_on_a_closed_manager_raise_closed_error(layout: dict[str, Any]) -> None:
    state = tiered_state.open(**layout)
    memoized = state.memoize()(lambda: 1)
    state.close()
    state.close()
    calls: list[Any] = [
        lambda: state["k"], lambda: state.__setitem__("k", 1), lambda: state.__delitem__("k"),
        lambda: "k" in state, lambda: list(state), lambda: state.add("k", 1),
        lambda: state.get_or_set("k", lambda: 1), lambda: state.incr("k"),
        lambda: state.decr("k"), lambda: state.pop("k"), lambda: state.touch("k", 1),
        lambda: state.inspect("k"), lambda: state.health(), memoized,
    ]
    for call in calls:
        with pytest.raises(ClosedError):
            call()


def test_tier_names_are_checked(state: StateManager) -> None:
    with pytest.raises(ConfigurationError):
        state.set("k", 1, tier="lukewarm")  # type: ignore[arg-type]
    assert os.environ.get("TIERED_STATE_HOT") is None


def test_bad_input_is_refused_before_anything_runs_or_is_written(state: StateManager) -> None:
    from tiered_state.operations import lease_name

    ran: list[int] = []

    def factory() -> int:
        ran.append(1)
        return 1

    for bad in ({"tier": "lukewarm"}, {"ttl": -1}, {"ttl": "1h"}):
        with pytest.raises(ConfigurationError):
            state.get_or_set("k", factory, **bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            state.memoize(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        state.get_or_set("k", 42)  # type: ignore[arg-type]
    with pytest.raises(tiered_state.InvalidKeyError):
        state.get_or_set(RESERVED_PREFIX + "x", factory)
    for call in (lambda: state.incr("k", 1, "0"), lambda: state.touch("k", 0),  # type: ignore[arg-type]
                 lambda: state.add("k", (1, 2)), lambda: state.pop("bad\x00key")):
        with pytest.raises(tiered_state.TieredStateError):
            call()
    assert ran == [] and "k" not in state
    assert state._catalog.repo.fetch_record(lease_name("k")) is None  # no lease was taken


def test_touch_racing_writes_never_changes_a_value_or_a_version(layout: dict[str, Any]) -> None:
    """A writer keeps writing while another manager touches the same key: every
    read returns a written value with a version that only grows, and the last
    write is the value at the end (a touch that lost the race did nothing)."""
    import threading

    with tiered_state.open(**layout) as writer, tiered_state.open(**layout) as toucher:
        written: dict[int, int] = {}
        done = threading.Event()
        problems: list[str] = []

        def touch() -> None:
            while not done.is_set():
                toucher.touch("k", 60)
                record = toucher.get_record("k", promote=False)
                if record is not None and written.get(record.version, record.value) != record.value:
                    problems.append(f"version {record.version} read as {record.value}")

        writer.set("k", 0)
        thread = threading.Thread(target=touch)
        thread.start()
        last = 0
        for n in range(1, 150):
            version = writer.set("k", n)
            written[version] = n
            assert version > last
            last = version
        done.set()
        thread.join(timeout=60)
        assert problems == []
        final = writer.get_record("k")
        assert final is not None and final.version == last and final.value == 149
        assert toucher.get("k") == 149
